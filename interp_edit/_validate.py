"""Checks of public arguments, shared by every entry point (tracing, editing, evaluation, the
CLI), so that a bad value fails at once with an :class:`InterpEditError` naming the argument
and the range it must lie in, before any work starts.

``bool`` is not an integer here (``layer=True`` is refused), a float with a fractional part is
not an index (``layers=[1.7]``), and a number is finite unless said otherwise. Each helper
returns the value converted (``numpy``/``torch`` integers become ``int``), so callers can use it.
"""

from __future__ import annotations

import math
import numbers
import os
import operator
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from interp_edit.errors import InterpEditError

# the largest noise-sample count a trace accepts: every sample is a row of each batched pass,
# so this bounds the memory of the corrupted runs (~1.5 GB of activations per 100 rows at
# the default model's size and a 20-token prompt, before the cells are batched)
MAX_SAMPLES = 1024
MAX_SEED = 2**63 - 1


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` in ``lo..hi`` (inclusive, either end open when ``None``)."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise InterpEditError(f"{name} must be an integer, not {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise InterpEditError(f"{name} must be an integer, not {value!r}") from None
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise InterpEditError(f"{name} must be {_span(lo, hi)}; {out} is out of range")
    return out


def count(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    """A count or size (``limit``, ``n``, ``samples``, batch sizes): an integer >= ``lo``."""
    return integer(name, value, lo, hi)


def optional_count(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int | None:
    return None if value is None else count(name, value, lo, hi)


def seed(name: str, value: Any) -> int:
    return integer(name, value, 0, MAX_SEED)


def index(name: str, value: Any, n: int, *, negative: bool = False) -> int:
    """An index into ``n`` things (``0..n-1``; with ``negative``, ``-n..-1`` count from the
    end and are returned as their positive equivalent)."""
    i = integer(name, value, -n if negative else 0, n - 1)
    return i + n if i < 0 else i


def indices(name: str, values: Any, n: int, *, negative: bool = True) -> list[int]:
    """A non-empty collection of indices into ``n`` things, sorted and without repeats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InterpEditError(f"{name} must be a list of integer indices, not {values!r}")
    out = sorted({index(f"{name} entry", v, n, negative=negative) for v in values})
    if not out:
        raise InterpEditError(f"{name} is empty: give at least one index in 0..{n - 1}")
    return out


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           above: bool = False) -> float:
    """A finite real number in ``[lo, hi]`` (``above``: strictly greater than ``lo``)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        if not (isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point()):
            raise InterpEditError(f"{name} must be a number, not {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InterpEditError(f"{name} must be a finite number, not {out}")
    low = lo is not None and (out <= lo if above else out < lo)
    if low or (hi is not None and out > hi):
        where = f"positive (> {lo:g})" if above and hi is None else _span(lo, hi)
        raise InterpEditError(f"{name} must be {where}; {out:g} is out of range")
    return out


def text(name: str, value: Any, *, empty: bool = False) -> str:
    """A string (non-blank unless ``empty``)."""
    if not isinstance(value, str):
        raise InterpEditError(f"{name} must be a string, not {type(value).__name__} {value!r}")
    if not empty and not value.strip():
        raise InterpEditError(f"{name} is empty: give the text")
    return value


def instance(name: str, value: Any, cls: type) -> Any:
    """``value``, checked to be a ``cls`` (e.g. the model passed to an entry point)."""
    if not isinstance(value, cls):
        kind = type(value).__name__
        raise InterpEditError(f"{name} must be of type {cls.__name__}, not {kind}")
    return value


def path(name: str, value: Any) -> str | os.PathLike:
    """A file or directory path: a non-empty string or an ``os.PathLike``."""
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
        return value
    raise InterpEditError(f"{name} must be a path (a string or pathlib.Path), not {value!r}")


def items(name: str, value: Any) -> list:
    """A collection (list, tuple, generator...) as a list; a string or a number is not one."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise InterpEditError(f"{name} must be a list, not {type(value).__name__}")
    return list(value)


def choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    if not isinstance(value, (str, type(None))) or value not in options:
        raise InterpEditError(f"unknown {name} {value!r}: choose one of {tuple(options)}")
    return value


def finite(name: str, tensor: Tensor) -> Tensor:
    """``tensor`` unchanged, after checking that it holds no NaN or infinity."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InterpEditError(f"{name} holds {bad} non-finite value(s) (NaN or infinity)")
    return tensor


def fields(obj: Any, *, counts: Sequence[str] = (), nonnegative: Sequence[str] = (),
           positive: Sequence[str] = (), seeds: Sequence[str] = ()) -> None:
    """Check the numeric fields of a (frozen) hparams dataclass by name: ``counts`` are
    integers >= 1, ``nonnegative`` / ``positive`` finite numbers >= 0 / > 0, ``seeds``
    integers in ``0..2**63-1``. Integers are stored back as ``int`` (a numpy integer from a
    config becomes one); numbers are left as given."""
    kind = type(obj).__name__
    for field in nonnegative:
        number(f"{kind}.{field}", getattr(obj, field), 0.0)
    for field in positive:
        number(f"{kind}.{field}", getattr(obj, field), 0.0, above=True)
    for names, check in ((counts, count), (seeds, seed)):
        for field in names:
            object.__setattr__(obj, field, check(f"{kind}.{field}", getattr(obj, field)))


def _span(lo: float | None, hi: float | None) -> str:
    if lo == 1 and hi is None:
        return "a positive integer (>= 1)"
    if lo is not None and hi is not None:
        return f"in {lo:g}..{hi:g}"
    return f">= {lo:g}" if lo is not None else f"<= {hi:g}"
