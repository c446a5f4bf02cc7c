"""Logits of a batch whose rows share a long token prefix, with the prefix run once.

In-context editing (IKE) puts the same context of demonstrations (hundreds of tokens) before
every query it is scored on, so a batch of wrapped queries is mostly one repeated prefix. On
the layer stepper the prefix's positions are computed once, on one row, and every row's own
tokens attend to its keys and values (:meth:`~interp_edit.arch.stepper.Stepper.layer` with
``past``). The attention is causal, so the prefix's activations do not depend on what follows
it: the logits equal a plain forward pass of the whole batch up to float rounding.

:meth:`interp_edit.models.Model.logits` takes this path by itself where :func:`split` says it
pays (the stepper runs the model, no hook is installed, at least :data:`MIN_SHARED` tokens are
shared by two or more rows); callers see no difference. Padding needs no care: rows are
right-padded (:meth:`~interp_edit.models.Model.batch_ids`), and a column counts as shared only
where every row holds the same token there, pad or not. The BOS token, where the model
prepends one, is simply the prefix's first token.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import repeat
from jaxtyping import Float, Int
from torch import Tensor

from interp_edit.arch.stepper import Stepper
from interp_edit.errors import InterpEditError

MIN_SHARED = 16  # shared tokens below which one plain pass is as cheap (and simpler)


def shared_length(ids: Int[Tensor, "batch pos"]) -> int:
    """The number of leading columns that hold the same token in every row of ``ids``."""
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise InterpEditError(f"token ids must be [batch, pos] with a row, not {tuple(ids.shape)}")
    differs = (ids != ids[:1]).any(0).nonzero()  # columns where some row differs
    return int(differs[0]) if len(differs) else ids.shape[1]


def split(model, ids: Int[Tensor, "batch pos"]) -> int:
    """How many leading tokens of ``ids`` the shared-prefix path runs once; 0 where the plain
    pass is taken instead (one row, fewer than :data:`MIN_SHARED` shared tokens, or a model
    the layer stepper cannot run: another family, or a hook installed that it would skip).
    At least the last column is always left to the rows (it is where their logits are read)."""
    if ids.ndim != 2 or ids.shape[0] < 2:
        return 0
    n = min(shared_length(ids), ids.shape[1] - 1)
    return n if n >= MIN_SHARED and Stepper.usable(model) else 0


def split_sequences(model, sequences: Sequence[Sequence[int]]) -> int:
    """:func:`split` of unpadded token sequences: the shared tokens that any batch of two or
    more of them runs once (for callers that size batches by the tokens really computed)."""
    if len(sequences) < 2:
        return 0
    return split(model, model.batch_ids(sequences)[0][:, : min(map(len, sequences))])


def logits(
    model,
    ids: Int[Tensor, "batch pos"],
    n_shared: int,
    positions: Int[Tensor, "k"] | None = None,
) -> Float[Tensor, "batch k d_vocab"]:
    """Logits of ``ids`` at every position (or at ``positions``, as ``Model.logits``) with the
    first ``n_shared`` tokens, the same in every row, run once on the layer stepper. Use
    :func:`split` for ``n_shared``; the model must be one :meth:`Stepper.usable` accepts."""
    batch, width = ids.shape
    if not 0 < n_shared < width or shared_length(ids) < n_shared:
        raise InterpEditError(f"{n_shared} shared tokens: every row must hold them, and at "
                              f"least one of the {width} columns must follow them")
    step = Stepper(model, width)
    head = step.embed(ids[:1, :n_shared])  # [1, n_shared, d_model]
    tail = step.embed(ids[:, n_shared:], n_shared)  # [batch, width - n_shared, d_model]
    for j in range(len(step.layers)):
        out = step.layer(j, head, 0)
        past = tuple(repeat(a[0], "h p d -> b h p d", b=batch) for a in (out.k, out.v))
        head, tail = out.out, step.layer(j, tail, n_shared, past=past).out
    h = torch.cat((repeat(head[0], "p d -> b p d", b=batch), tail), 1)  # [batch, width, d]
    return step.unembed(h if positions is None else h[:, positions])
