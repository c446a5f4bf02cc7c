"""The user cache directory: ``INTERP_EDIT_CACHE``, else ``$XDG_CACHE_HOME/interp_edit``, else
``~/.cache/interp_edit``. Every cache key includes what it depends on (model fingerprint,
corpus, sizes), so a different model or corpus never reuses an entry."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor


def cache_root() -> Path:
    env = os.environ.get("INTERP_EDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "interp_edit"


def cache_dir(*parts: str) -> Path:
    """A sub-directory of the cache root, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object (keys sorted), for cache keys."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_digest(path: Path, length: int = 16) -> str:
    """Digest of a file's name, size and content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def tensors_digest(tensors: Mapping[str, Tensor], length: int = 16) -> str:
    """Digest of named tensors (names, dtypes, shapes and bytes, in name order): what a set of
    weight deltas does, for cache keys (:attr:`interp_edit.models.Model.weights_key`)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]
