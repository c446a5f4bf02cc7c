"""The hook layer: the one place that builds forward hooks for the bridge.

Each factory returns a ``(hook_name, fn)`` pair; :func:`hooked` installs a list of them for
the duration of a ``with`` block. Everything else in the toolkit (tracing, editors, analyses)
uses these factories instead of writing its own hooks.

Positions select tokens along the ``pos`` axis: an ``int``, a ``slice`` or a sequence of ints.
``rows`` optionally restricts a hook to some batch rows (a ``slice`` or a sequence of ints).

Nesting: leaving a bridge ``hooks()`` context can remove hooks that an enclosing context put
on the same hook point. :func:`hooked` therefore refuses to open a context on a point that an
enclosing :func:`hooked` context already holds; pass all hooks for one run in one call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, MutableMapping, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.errors import HookNestingError, InterpEditError
from interp_edit.models import EMBED_HOOK, Model, mlp_key_hook

Positions = Union[int, slice, Sequence[int], Tensor]
Rows = Union[None, slice, Sequence[int], Tensor]
Hook = tuple[str, Callable]


def _index(act: Tensor, positions: Positions, rows: Rows):
    """An index into ``act[batch, pos, ...]`` for the selected rows and positions."""
    pos = positions if isinstance(positions, (int, slice)) else torch.as_tensor(positions)
    row = slice(None) if rows is None else rows
    if isinstance(row, slice) or isinstance(pos, (int, slice)):
        return (row, pos)
    return (torch.as_tensor(row)[:, None], pos[None, :])


def add_noise(
    positions: Positions, noise: Float[Tensor, "batch n_pos d_model"], *, rows: Rows = None
) -> Hook:
    """Add ``noise`` to the token embeddings at ``positions`` (causal tracing's corruption)."""

    def fn(act: Float[Tensor, "batch pos d_model"], hook=None):
        act = act.clone()
        act[_index(act, positions, rows)] += noise.to(act)
        return act

    return EMBED_HOOK, fn


def patch(
    hook_name: str,
    positions: Positions,
    value: Tensor | Callable[[Tensor], Tensor],
    *,
    rows: Rows = None,
) -> Hook:
    """Replace the activation at ``positions`` with ``value`` (a tensor that broadcasts to the
    selected slice, or a function of the current slice)."""

    def fn(act: Tensor, hook=None):
        idx = _index(act, positions, rows)
        act = act.clone()
        new = value(act[idx]) if callable(value) else value
        act[idx] = new.to(act)
        return act

    return hook_name, fn


def add_delta(
    hook_name: str, positions: Positions, delta: Float[Tensor, "... d"], *, rows: Rows = None
) -> Hook:
    """Add ``delta`` to the activation at ``positions``; gradients flow into ``delta``
    (used to optimise ROME's v* and in MEND)."""

    def fn(act: Tensor, hook=None):
        idx = _index(act, positions, rows)
        bump = torch.zeros_like(act)
        bump[idx] = bump[idx] + delta
        return act + bump

    return hook_name, fn


def capture(hook_name: str, store: MutableMapping[str, Tensor], *, detach: bool = True) -> Hook:
    """Store the activation under ``store[hook_name]`` (detached unless ``detach=False``)."""

    def fn(act: Tensor, hook=None):
        store[hook_name] = act.detach() if detach else act
        return act

    return hook_name, fn


@contextmanager
def hooked(model: Model, hooks: Sequence[Hook]) -> Iterator[Model]:
    """Install ``hooks`` on ``model.bridge`` for the ``with`` block (one context, no nesting)."""
    bridge = model.bridge
    points = set()
    for name, _ in hooks:
        point = _resolve(bridge, name)
        points.add(id(point))
    active: set[int] = bridge.__dict__.setdefault("_interp_edit_active_points", set())
    clash = points & active
    if clash:
        raise HookNestingError(
            "a hooked() context is already open on one of these hook points "
            f"({sorted({n for n, _ in hooks})}); leaving the inner context would drop the "
            "outer hooks. Pass all hooks for one run to a single hooked() call."
        )
    active |= points
    try:
        with bridge.hooks(fwd_hooks=list(hooks)):
            yield model
    finally:
        active -= points


def hook_path(model: Model):
    """A ``with`` block in which every pass runs through the bridge and its hooks: a hook that
    changes nothing is installed, so the layer stepper's fast paths (tracing, v*, MEND, the
    shared-prefix cache) step aside. For checking a fast path against the plain one."""
    return hooked(model, [capture(mlp_key_hook(0), {})])


def _resolve(bridge, name: str):
    point = bridge.get_hook_point(name) if hasattr(bridge, "get_hook_point") else None
    if point is None:
        point = bridge.hook_dict.get(name)
    if point is None:
        raise InterpEditError(f"unknown hook point {name!r} on this model")
    return point


def run_with_hooks(
    model: Model, ids: Tensor, hooks: Sequence[Hook]
) -> Float[Tensor, "batch pos d_vocab"]:
    """One forward pass of ``ids`` with ``hooks`` installed; returns the logits."""
    with hooked(model, hooks):
        return model.logits(ids)
