"""Key statistics: the uncentred second moment C = E[k kᵀ] of the MLP keys at a layer.

ROME spreads its rank-one update along C⁻¹k*, so keys the edit should not touch (those that
are typical of ordinary text) change as little as possible. C is estimated from a corpus:

- a text file (``corpus="path/to/text.txt"``), read only as far as ``n_tokens`` needs;
- ``corpus="generated"``: text sampled from the model itself (seeded), so a fresh offline
  machine needs no data; the sampled tokens are cached too;
- a Hugging Face dataset name, ``"name"`` or ``"name:config"`` (needs the network).

The text is cut into fixed-length chunks (no padding), the forward pass stops after the
deepest requested layer, and every requested layer is captured in the same pass. Results are
cached as safetensors plus a JSON sidecar, keyed by the weights in use (``Model.weights_key``:
the model's fingerprint, plus any applied edit), layer, corpus
identity (a file's content digest), token count and chunk length. An entry that does not
load, or is not a finite symmetric ``d_mlp x d_mlp`` matrix, is rebuilt with a warning.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from interp_edit import _files, _validate
from interp_edit._cache import cache_dir, file_digest
from interp_edit._loading import hub_unreachable
from interp_edit.arch import adapter
from interp_edit.editing.keys import sample_token_ids
from interp_edit.errors import InterpEditError
from interp_edit.hooks import capture, hooked
from interp_edit.models import Model, mlp_key_hook

log = logging.getLogger(__name__)

GENERATED = "generated"
_LOADED: dict[Path, Tensor] = {}  # in-memory cache of files read this session
_FACTORS: dict[tuple[int, float], tuple[Tensor, Tensor, Tensor]] = {}  # (C, factor, ridged C)
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")


def second_moment(
    model: Model, layer: int, corpus: str | os.PathLike = GENERATED, n_tokens: int = 100_000,
    **kwargs,
) -> Float[Tensor, "d_mlp d_mlp"]:
    """C = E[k kᵀ] of the keys entering ``model.mlp_out_proj(layer)``; see
    :func:`second_moments`."""
    return second_moments(model, [layer], corpus, n_tokens, **kwargs)[layer]


def second_moments(
    model: Model,
    layers: Sequence[int],
    corpus: str | os.PathLike = GENERATED,
    n_tokens: int = 100_000,
    *,
    seq_len: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    precision: str = "bf16",
    refresh: bool = False,
    progress: bool | None = None,
) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """Second moments of the MLP keys at ``layers``, from the cache or from one pass over
    ``n_tokens`` tokens of ``corpus`` (chunks of ``seq_len`` tokens, ``batch_size`` chunks a
    forward pass). ``precision="bf16"`` runs the forward pass under bfloat16 autocast (about
    2x faster on CPUs with bf16 units; the products k kᵀ are summed in float32/float64),
    ``"fp32"`` runs it in float32. ``refresh`` rebuilds cached entries; ``progress`` shows a
    bar (``None``: on a terminal). Returns float32 matrices on the model's device."""
    autocast(model, precision)  # checks the name
    n_tokens, seq_len = _validate.count("n_tokens", n_tokens), _validate.count("seq_len", seq_len)
    batch_size, seed = _validate.count("batch_size", batch_size), _validate.seed("seed", seed)
    seq_len = min(seq_len, model.n_ctx)  # learned positions end at the context (GPT-2, OPT)
    if n_tokens < seq_len:
        raise InterpEditError(f"n_tokens={n_tokens} is less than one chunk of {seq_len} tokens")
    for layer in layers:
        model._check_layer(layer)
    ident = corpus_identity(corpus, seed)
    paths = {layer: _cache_path(model, layer, ident, n_tokens, seq_len, precision)
             for layer in sorted(set(layers))}
    for layer, path in paths.items():  # read (and check) what is cached
        if path not in _LOADED and not refresh:
            mom2 = _files.load_cached(path, functools.partial(_read_mom2, model=model))
            if mom2 is not None:
                _LOADED[path] = mom2
    missing = [layer for layer, p in paths.items() if refresh or p not in _LOADED]
    if missing:
        t0 = time.perf_counter()
        chunks = _chunks(model, corpus, n_tokens, seq_len, seed, progress)
        with autocast(model, precision):
            moments, count = _accumulate(model, missing, chunks, batch_size, progress)
        seconds = time.perf_counter() - t0
        if count <= n_tokens - seq_len:
            log.warning("corpus %s has only %d tokens (asked for %d)", ident, count, n_tokens)
        for layer in missing:
            meta = {"model": model.name, "fingerprint": model.fingerprint,
                    "weights": model.weights_key, "layer": layer,
                    "corpus": ident, "n_tokens_requested": n_tokens, "n_tokens": count,
                    "seq_len": seq_len, "precision": precision, "seconds": round(seconds, 2)}
            _files.save_safetensors({"mom2": moments[layer]}, paths[layer])
            _files.write_json(paths[layer].with_suffix(".json"), meta, indent=1)
            _LOADED[paths[layer]] = moments[layer]
    return {layer: _LOADED[path].to(model.device) for layer, path in paths.items()}


def _read_mom2(path: Path, model: Model) -> Tensor:
    """A cached second moment, checked: ``d_mlp x d_mlp``, finite, symmetric with a
    non-negative diagonal (a mean of k kᵀ)."""
    mom2 = _files.read_safetensors(path)[0]["mom2"]
    d = adapter(model).mlp_out_matrix(0).shape[1]
    _files.require(mom2.shape == (d, d) and mom2.dtype == torch.float32
                   and bool(mom2.isfinite().all()) and bool((mom2.diagonal() >= 0).all())
                   and torch.allclose(mom2, mom2.T, rtol=1e-4,
                                      atol=1e-6 * float(mom2.diagonal().mean())),
                   f"not a finite symmetric {d}x{d} float32 second moment")
    return mom2


def solve_mom2(
    mom2: Float[Tensor, "d_mlp d_mlp"], k: Float[Tensor, "d_mlp *n"], ridge: float = 0.0
) -> Float[Tensor, "d_mlp *n"]:
    """C⁻¹k in float64 (``k`` one key or a matrix of keys as columns), with
    C = mom2 + ridge · mean(diag mom2) · I. The Cholesky factor of each matrix is kept in
    memory, so repeated edits at a layer solve in milliseconds; the solve is refined against
    C itself, so it is float64-accurate whatever the factorisation's own accuracy."""
    key = (id(mom2), float(ridge))
    hit = _FACTORS.get(key)
    if hit is None or hit[0] is not mom2:
        c = mom2.double()
        c = c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype, device=c.device)
        factor, info = torch.linalg.cholesky_ex(c)
        if info:
            raise InterpEditError(
                "the key second moment is singular (too few tokens for d_mlp dimensions?): "
                "use more stats tokens or a ridge > 0")
        _FACTORS[key] = hit = (mom2, factor, c)
    rhs = k.double()
    rhs = rhs[:, None] if rhs.dim() == 1 else rhs
    out = torch.cholesky_solve(rhs, hit[1])
    # two steps of iterative refinement: some CPU builds factor float64 matrices only to
    # float32 accuracy, and each step gains that many digits again
    for _ in range(2):
        out = out + torch.cholesky_solve(rhs - hit[2] @ out, hit[1])
    return out[:, 0] if k.dim() == 1 else out


def stats_info(model: Model, layer: int, corpus: str | os.PathLike = GENERATED,
               n_tokens: int = 100_000, *, seq_len: int = 128, seed: int = 0,
               precision: str = "bf16") -> dict | None:
    """The JSON metadata of a cached entry (tokens used, build seconds), or None."""
    path = _cache_path(model, layer, corpus_identity(corpus, seed), n_tokens, seq_len,
                       precision)
    return _files.load_cached(path.with_suffix(".json"), _read_info)


def _read_info(path: Path) -> dict:
    info = _files.read_json(path)
    _files.require(isinstance(info, dict), "not a JSON object")
    return info


def _cache_path(model: Model, layer: int, ident: str, n_tokens: int, seq_len: int,
                precision: str) -> Path:
    name = f"{ident}-n{n_tokens}-len{seq_len}-{precision}-L{layer}.safetensors"
    return cache_dir("stats", model.weights_key) / name


def autocast(model: Model, precision: str):
    """A bfloat16 autocast context for ``precision="bf16"``, a no-op for ``"fp32"``."""
    if precision not in ("bf16", "fp32"):
        raise InterpEditError(f"precision must be 'bf16' or 'fp32', not {precision!r}")
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ---- corpora -----------------------------------------------------------------------------
def corpus_identity(corpus: str | os.PathLike, seed: int) -> str:
    """A file-name-safe identity: the content digest for a file, the name for the rest."""
    if str(corpus) == GENERATED:
        return f"generated-v3-s{seed}"  # v3: sampled in fp32 on the layer stepper
    path = Path(os.fspath(corpus)).expanduser()
    if path.is_file():
        return f"file-{path.stem[:40]}-{file_digest(path)}"
    raw = str(corpus)
    if path.suffix in _TEXT_SUFFIXES or raw.startswith((".", "/", "~")) or path.is_dir():
        raise InterpEditError(
            f"corpus {raw!r} is not a text file: pass an existing text file, "
            f"corpus='{GENERATED}' (text sampled from the model), or a Hugging Face dataset name"
        )
    return "hf-" + raw.replace("/", "--").replace(":", "-")


def _chunks(model: Model, corpus, n_tokens: int, seq_len: int, seed: int,
            progress: bool | None) -> Tensor:
    """``[n_chunks, seq_len]`` token ids: the corpus token stream cut into chunks."""
    if str(corpus) == GENERATED:
        return _generated(model, -(-n_tokens // seq_len), seq_len, seed, progress)
    path = Path(os.fspath(corpus)).expanduser()
    texts = _read_file(path) if path.is_file() else _read_hf_dataset(str(corpus))
    stream: list[int] = []
    for text in texts:
        stream += model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= n_tokens:
            break
    n = min(len(stream), n_tokens) // seq_len
    if n == 0:
        raise InterpEditError(f"corpus {str(corpus)!r} has fewer than {seq_len} tokens")
    return rearrange(torch.tensor(stream[: n * seq_len]), "(n t) -> n t", t=seq_len)


def _generated(model: Model, n: int, seq_len: int, seed: int, progress: bool | None) -> Tensor:
    """``n`` sequences of ``seq_len`` tokens sampled from the model *as loaded* (fp32,
    whatever the statistics' precision: the same text either way), cached per model. While
    edits are applied they are lifted for the sampling (the statistics themselves are of the
    weights in use): one text per model, and a ROME edit on top of others does not sample
    the corpus again."""
    from interp_edit.editing.base import loaded_weights

    name = f"generated-v3-s{seed}-{n}x{seq_len}.safetensors"
    path = cache_dir("corpora", model.fingerprint) / name
    ids = _files.load_cached(path, functools.partial(_read_ids, shape=(n, seq_len),
                                                     vocab=len(model.tokenizer)))
    if ids is not None:
        return ids
    log.warning("sampling %d tokens from %s for key statistics (once; cached)", n * seq_len,
                model.name)
    with loaded_weights(model):
        rows = sample_token_ids(model, n, seq_len - 1, seed=seed, exact=True, batch_size=128,
                                progress=_show(progress))
    ids = torch.tensor([r[:seq_len] for r in rows], dtype=torch.long)
    _files.save_safetensors({"ids": ids}, path)
    return ids


def _read_ids(path: Path, shape: tuple[int, int], vocab: int) -> Tensor:
    """Cached sampled token ids, checked: ``shape``, integers in the vocabulary."""
    ids = _files.read_safetensors(path)[0]["ids"]
    _files.require(ids.shape == shape and ids.dtype == torch.long
                   and bool(((ids >= 0) & (ids < vocab)).all()),
                   f"not {shape[0]}x{shape[1]} token ids below {vocab}")
    return ids


def _read_file(path: Path, block: int = 1 << 20) -> Iterator[str]:
    """The file in blocks of whole lines (about ``block`` characters each)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while lines := f.readlines(block):
            yield "".join(lines)


def _read_hf_dataset(name: str) -> Iterator[str]:
    why = hub_unreachable()
    if why:
        raise InterpEditError(
            f"corpus {name!r} is not a local file, so it was taken as a Hugging Face dataset, "
            f"which needs the network ({why}). Pass a text file (e.g. WikiText) or "
            f"corpus='{GENERATED}' to sample text from the model itself."
        )
    try:
        import datasets
    except ImportError:
        raise InterpEditError("Hugging Face datasets need `pip install datasets`") from None
    ds_name, _, config = name.partition(":")
    ds = datasets.load_dataset(ds_name, config or None, split="train", streaming=True)
    for row in ds:
        if row.get("text"):
            yield row["text"]


# ---- the pass ------------------------------------------------------------------------------
@torch.no_grad()
def _accumulate(model: Model, layers: list[int], chunks: Tensor, batch_size: int,
                progress: bool | None) -> tuple[dict[int, Tensor], int]:
    """Mean of k kᵀ over every token of ``chunks``, for each layer, in one pass."""
    from tqdm.auto import tqdm

    store: dict[str, Tensor] = {}
    hooks = [capture(mlp_key_hook(layer), store) for layer in layers]
    sums: dict[int, Tensor] = {}
    count = 0
    bar = tqdm(total=chunks.numel(), desc="key statistics", unit="tok", disable=not _show(progress))
    with hooked(model, hooks), bar:
        for batch in chunks.split(batch_size):
            model.bridge(batch.to(model.device), return_type=None, stop_at_layer=max(layers) + 1)
            for layer in layers:
                k = rearrange(store[mlp_key_hook(layer)], "b p d -> (b p) d").float()
                with torch.autocast(k.device.type, enabled=False):
                    kk = (k.T @ k).double()  # float32 products, float64 running sum
                sums[layer] = sums[layer] + kk if layer in sums else kk
            count += batch.numel()
            bar.update(batch.numel())
    return {layer: (s / count).float() for layer, s in sums.items()}, count


def _show(progress: bool | None) -> bool | None:
    """tqdm's ``disable``-compatible flag: None shows the bar on a terminal only."""
    import sys

    return sys.stderr.isatty() if progress is None else progress
