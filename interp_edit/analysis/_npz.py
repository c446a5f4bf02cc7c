"""Save and load a frozen dataclass as one ``.npz`` file: tensor fields become arrays, the
other fields one JSON string (loadable with ``allow_pickle=False``, like ``TraceResult``)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from interp_edit import _files
from interp_edit.errors import InterpEditError

T = TypeVar("T")


def npz_path(path: str | os.PathLike) -> str:
    """``np.savez`` appends ``.npz`` to other names; load the same name it wrote."""
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


def save_dataclass(obj: Any, path: str | os.PathLike, fmt: str) -> str:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": fmt}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            arrays[f.name] = value.detach().cpu().numpy()
        else:
            meta[f.name] = value
    out = npz_path(path)
    _files.save_npz(out, __meta__=np.array(json.dumps(meta)), **arrays)
    return out


def load_dataclass(cls: type[T], path: str | os.PathLike, fmt: str) -> T:
    """The ``cls`` saved at ``path``; a damaged or foreign file raises ``CorruptFileError``."""
    path = npz_path(path)
    with _files.reading(path, f"saved {cls.__name__}", "compute it again and save it"):
        data = _files.read_npz(path)
        meta = json.loads(str(data.pop("__meta__")))
        _files.require(isinstance(meta, dict) and meta.pop("format", None) == fmt,
                       f"it is not of format {fmt}")
        arrays = {k: torch.from_numpy(v) for k, v in data.items()}
        return cls(**arrays, **{k: _tuples(v) for k, v in meta.items()})


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the frozen dataclasses hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


class NpzDataclass:
    """``save`` / ``load`` (one ``.npz``, see :func:`save_dataclass`) and a ``plot`` that
    dispatches on ``what`` to the functions in ``_PLOTS``, for a frozen dataclass."""

    _FORMAT: ClassVar[str]
    _PLOTS: ClassVar[dict[str, Callable[[], Callable[..., Any]]]]  # what -> (lazy) plot fn

    def plot(self, what: str, **kw: Any) -> Any:
        if what not in self._PLOTS:
            raise InterpEditError(f"what must be one of {tuple(self._PLOTS)}, not {what!r}")
        return self._PLOTS[what]()(self, **kw)

    def save(self, path: str | os.PathLike) -> str:
        return save_dataclass(self, path, self._FORMAT)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        return load_dataclass(cls, path, cls._FORMAT)  # type: ignore[attr-defined]
