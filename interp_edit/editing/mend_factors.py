"""MEND's gradient factors: the inputs ``u_t`` and output gradients ``δ_t`` of the edited MLP
output projections, whose outer products sum to an edit loss's weight gradient.

The loss is the mean NLL per target token of each request's ``target_new`` (minus that of its
``target_true`` for a contrastive editor), over right-padded rows of prompt + target tokens
(:class:`TargetBatch`). Only tokens up to the last target position get a gradient; the
others are dropped.

The gradient pass (:func:`batch_factors`) is most of an edit's cost, so it does only what the
factors need: the blocks below the first edited one run without gradients (on the layer
stepper of :mod:`interp_edit.arch.stepper` when the model's family has one and no bridge hook
is installed),
logits are computed at the target positions only, and a further pass on the same requests
(MEND's ``passes`` > 1, or the training loop's edited pass) resumes from the first edited
block's saved input (:mod:`interp_edit.resume`). :func:`gaps_from` is that further pass
without gradients, when only the sign of p(new) − p(old) is asked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from torch.profiler import record_function

from interp_edit.arch.stepper import LayerOut, Stepper
from interp_edit.hooks import add_delta, capture, hooked
from interp_edit.models import Model, mlp_key_hook, mlp_write_hook
from interp_edit.resume import (
    BlockInput, block_input, logits_from, record_block_input, stepper_for, supports_resume)

Factors = tuple[Float[Tensor, "n d_in"], Float[Tensor, "n d_out"]]  # (u_t, δ_t) per token


@dataclass(frozen=True)
class TargetBatch:
    """Right-padded rows of prompt + target tokens (teacher forcing, as
    ``Model.target_logprobs``); row i's target tokens are predicted at ``positions(i)``."""

    ids: Int[Tensor, "batch pos"]
    spans: tuple[tuple[int, int], ...]  # (index of the first target token, number of tokens)

    @classmethod
    def build(cls, model: Model, prompts: Sequence[str], targets: Sequence[str]) -> "TargetBatch":
        seqs, spans = [], []
        for prompt, target in zip(prompts, targets, strict=True):
            pid, tid = model.tokenize(prompt).tolist(), model.target_ids(target)
            seqs.append(pid + tid)
            spans.append((len(pid), len(tid)))
        return cls(model.batch_ids(seqs)[0], tuple(spans))

    def positions(self, row: int) -> Int[Tensor, "n"]:
        """Where row ``row``'s target tokens are predicted."""
        start, n = self.spans[row]
        return torch.arange(start - 1, start - 1 + n, device=self.ids.device)

    @functools.cached_property
    def width(self) -> int:
        """How many positions a pass needs: up to the last prediction position (a row's last
        target token predicts nothing, so the one-token answers of the same prompt leave
        identical rows of prompt tokens)."""
        return max(start + n - 1 for start, n in self.spans)

    @functools.cached_property
    def keep(self) -> Int[Tensor, "k"]:
        """Every row's prediction positions, sorted: the only logits a score needs."""
        return torch.unique(torch.cat([self.positions(i) for i in range(len(self.spans))]))

    def columns(self, row: int) -> Int[Tensor, "n"]:
        """Row ``row``'s prediction positions as indices into :attr:`keep`."""
        return torch.searchsorted(self.keep, self.positions(row))

    @property
    def n_rows(self) -> int:
        return len(self.spans)

    def one_token_after_same_prompt(self, row: int, other: int) -> bool:
        """Both rows' targets are one token, predicted after the same prompt tokens."""
        (a, n), (b, m) = self.spans[row], self.spans[other]
        return n == m == 1 and a == b and bool((self.ids[row, :a] == self.ids[other, :a]).all())

    def logprob_gaps(
        self, logits: Float[Tensor, "batch keep d_vocab"], pairs: Sequence[tuple[int, int]]
    ) -> Float[Tensor, "pairs"]:
        """Mean log-probability of row i's target minus row j's, per pair (i, j)."""
        i, j = zip(*pairs)
        return self.mean_logprobs(logits, i) - self.mean_logprobs(logits, j)

    def mean_logprobs(
        self, logits: Float[Tensor, "batch keep d_vocab"], rows: Sequence[int]
    ) -> Float[Tensor, "rows"]:
        """Mean log-probability per target token of each of ``rows``, from logits at
        :attr:`keep` (``Model.logits(batch.ids, batch.keep)``)."""
        out = []
        for row in rows:
            logp = logits[row, self.columns(row)].log_softmax(-1)  # [n, d_vocab]
            out.append(logp.gather(-1, self.ids[row, self.positions(row) + 1, None]).mean())
        return torch.stack(out)


def gradient_factors(
    model: Model, layers: Sequence[int], prompts: Sequence[str], targets: Sequence[str],
    away: Sequence[str | None] | None = None,
) -> dict[int, Factors]:
    """Inputs ``u_t`` and output gradients ``δ_t`` of each layer's MLP output projection, at
    every token with a non-zero gradient, for the loss Σ_requests mean-NLL(target | prompt)
    − mean-NLL(away | prompt) (the second term only where ``away`` gives a target).

    ``Σ_t δ_t u_tᵀ`` is exactly that loss's gradient with respect to the projection's weight.
    The model's weights get no gradient: δ is read from zero tensors added to the MLP outputs.
    """
    pairs = [(p, a) for p, a in zip(prompts, away or [None] * len(prompts), strict=True)
             if a is not None]
    batch = TargetBatch.build(model, [*prompts, *(p for p, _ in pairs)],
                              [*targets, *(a for _, a in pairs)])
    n = len(prompts)
    return batch_factors(model, layers, batch, range(n), away=range(n, n + len(pairs))).factors


def gaps_from(model: Model, batch: TargetBatch, start: BlockInput,
               pairs: Sequence[tuple[int, int]]) -> Float[Tensor, "pairs"]:
    """Mean log p(new) − mean log p(old) of every (new row, old row) pair of ``batch`` at
    the current weights: the blocks from ``start`` up without gradients. Where
    both answers are one token after the same prompt (most CounterFact facts), log p(new) −
    log p(old) is logit(new) − logit(old): the normaliser cancels, so two rows of the
    unembedding are read instead of all of it (on the layer stepper; the unembedding is
    most of this pass)."""
    with torch.no_grad(), record_function("mend: check the edit"):
        if start.kwargs is None and all(batch.one_token_after_same_prompt(*p) for p in pairs):
            stepper = stepper_for(model, start)
            news, olds = [i for i, _ in pairs], [j for _, j in pairs]
            where = torch.tensor([batch.spans[i][0] - 1 for i in news])  # shared position
            # the old rows equal the new ones up to there: only the new ones run, and where
            # they share that position, the last block computes it alone
            same = bool((where == where[0]).all())
            h = stepper.run(start.hidden[news, : int(where.max()) + 1], start.layer,
                            model.n_layers, last_only=same)
            ids = torch.stack([batch.ids[news, where + 1], batch.ids[olds, where + 1]], -1)
            final = h[:, -1] if same else h[torch.arange(len(news)), where]
            logits = stepper.token_logits(final, ids)
            return logits[:, 0] - logits[:, 1]
        return batch.logprob_gaps(logits_from(model, start, batch.keep), pairs)


class FactorPass(NamedTuple):
    factors: dict[int, Factors]
    logprobs: Float[Tensor, "batch"]  # each row's mean target log-probability, detached
    logits: Float[Tensor, "batch keep d_vocab"]  # at TargetBatch.keep, detached
    start: BlockInput | None  # the input of the first edited block (None: cannot resume)


def batch_factors(
    model: Model,
    layers: Sequence[int],
    batch: TargetBatch,
    rows: Sequence[int],
    away: Sequence[int] = (),
    start: BlockInput | None = None,
    below: torch.dtype | None = None,
) -> FactorPass:
    """:func:`gradient_factors` of the loss on ``rows`` of ``batch`` (minus that on ``away``),
    from one pass over every row; also returns that pass's mean target log-probability per
    row, its logits at ``batch.keep`` and the input of the first edited block. With ``start``
    (that input, from an earlier pass on the same batch) only the blocks from there up run.
    ``below``: the dtype of the matrix multiplies of the blocks below the first edited one
    (layer stepper only; None: the model's), see :class:`MENDHparams`.

    On models the layer stepper runs, with no bridge hook installed, the pass runs on it
    (:mod:`interp_edit.arch.stepper`; ``δ_t`` is the gradient at the output matrix's own
    output, ``LayerOut.write``, before any post-norm); otherwise on the bridge, with a capture
    hook for ``u_t`` and zero tensors added to what the matrix writes (``mlp_write_hook``)
    for ``δ_t``."""
    if start is None and Stepper.usable(model):
        with record_function("mend: blocks below the edit"):
            start = block_input(model, batch.ids[:, : batch.width], min(layers), below)
    if start is not None and start.kwargs is None:
        return _stepper_factors(model, layers, batch, rows, away, start)
    return _hooked_factors(model, layers, batch, rows, away, start)


def _loss(logprobs: Float[Tensor, "batch"], rows: Sequence[int], away: Sequence[int]) -> Tensor:
    loss = -logprobs[list(rows)].sum()
    return loss + logprobs[list(away)].sum() if len(away) else loss


def _nonzero(u: Tensor, delta: Tensor) -> Factors:
    """Flatten batch and positions; keep tokens with a gradient (none after the last target)."""
    u = rearrange(u, "batch pos d_in -> (batch pos) d_in")
    delta = rearrange(delta, "batch pos d_out -> (batch pos) d_out")
    keep = delta.abs().amax(-1) > 0
    return u[keep], delta[keep]


def _stepper_factors(model: Model, layers: Sequence[int], batch: TargetBatch,
                     rows: Sequence[int], away: Sequence[int], start: BlockInput) -> FactorPass:
    stepper = stepper_for(model, start)
    outs, keys = {}, {}

    def keep(j: int, x_j: Tensor, out: LayerOut) -> None:
        if j in layers:
            outs[j], keys[j] = out.write, out.key.detach()

    x = start.hidden.detach().requires_grad_()  # the graph starts here (weights are frozen)
    # every row predicts at the last position only (one-token answers of one prompt): the last
    # block computes that position alone (its other outputs get no gradient)
    single = batch.keep.numel() == 1 and int(batch.keep[0]) == x.shape[1] - 1
    with torch.enable_grad():
        with record_function("mend: edited blocks, forward"):
            x = stepper.run(x, start.layer, model.n_layers, keep, last_only=single)
        with record_function("mend: unembedding at the targets"):
            logits = stepper.unembed(x if single else x[:, batch.keep])
            logprobs = batch.mean_logprobs(logits, range(batch.n_rows))
        with record_function("mend: backward"):
            grads = torch.autograd.grad(_loss(logprobs, rows, away), [outs[j] for j in layers])
    with torch.no_grad():
        factors = {j: _nonzero(keys[j], g) for j, g in zip(layers, grads)}
    return FactorPass(factors, logprobs.detach(), logits.detach(), start)


def _hooked_factors(model: Model, layers: Sequence[int], batch: TargetBatch,
                    rows: Sequence[int], away: Sequence[int], start: BlockInput | None,
                    ) -> FactorPass:
    w = model.mlp_out_proj(layers[0]).weight
    store: dict[str, Tensor] = {}
    bumps = {layer: torch.zeros(*batch.ids.shape, model.d_model, dtype=w.dtype, device=w.device,
                                requires_grad=True) for layer in layers}
    hooks = [capture(mlp_key_hook(layer), store) for layer in layers]
    hooks += [add_delta(mlp_write_hook(layer), slice(None), bumps[layer]) for layer in layers]
    with torch.enable_grad(), hooked(model, hooks):
        if start is not None:
            logits = logits_from(model, start, batch.keep)
        elif supports_resume(model):
            with record_block_input(model, min(layers)) as rec:
                logits = model.logits(batch.ids, batch.keep)
            start = rec.value
        else:
            logits = model.logits(batch.ids, batch.keep)
        logprobs = batch.mean_logprobs(logits, range(batch.n_rows))
        grads = torch.autograd.grad(_loss(logprobs, rows, away),
                                    [bumps[layer] for layer in layers])
    factors = {j: _nonzero(store[mlp_key_hook(j)], g) for j, g in zip(layers, grads)}
    return FactorPass(factors, logprobs.detach(), logits.detach(), start)
