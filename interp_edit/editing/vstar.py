"""v*: the hidden state each fact's edit must write, optimised for a batch of facts at once.

For fact i, δ_i is added to what the MLP output matrix of ``layer`` writes (before any
post-norm: Gemma 2/3, OLMo-2), at the subject's last token of every prompt (the fact's template after each context prefix) and optimised so that the new target
becomes likely after every prefix (NLL), while the "{subject} is a" prompt keeps its next-token
distribution (KL), under weight decay ‖δ_i‖ / ‖v0_i‖² and the clamp ‖δ_i‖ ≤ c · ‖v0_i‖
(Meng et al. 2022, §3.1). ROME (one fact, ``v* = W k* + δ``), MEMIT and AlphaEdit (a batch,
``z = h + δ`` at the top of their layer range) all call :func:`optimise_deltas`.

A batch runs one forward and backward pass per step over the rows of all facts still
optimising. The loss is the *sum* of the facts' losses, so δ_i's gradient is exactly its own
fact's gradient, and the optimiser (Adam, with a step size, step count and moments per fact)
moves δ_i as a one-fact optimisation would. A step that raises a fact's loss is undone for
that fact and its step size halved (its moments reset), so a ``v_lr`` too large for some model
cannot make the loss oscillate; the δ kept is the one of the lowest loss. A fact stops (its δ
frozen) at the step its own NLL falls below the threshold, as it would alone. So the batch
gives the per-fact v* up to float rounding, in one pass per step instead of one per fact.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.arch.stepper import Stepper
from interp_edit.editing.keys import FactBatch, encode_facts
from interp_edit.editing.stats import autocast
from interp_edit.errors import InterpEditError
from interp_edit.hooks import add_delta, hooked
from interp_edit.models import Model, mlp_write_hook
from interp_edit.resume import block_input

KL_TEMPLATE = "{} is a"  # the essence prompt whose next-token distribution must not change


@dataclass(frozen=True)
class VOptions:
    """The v* optimisation's settings (the same-named fields of an editor's hparams)."""

    v_lr: float = 1.0  # Adam learning rate of δ
    v_steps: int = 20  # at most this many steps ...
    v_nll_stop: float = 0.05  # ... or until the fact's mean NLL of the new target falls below
    v_weight_decay: float = 0.5  # × ‖δ‖ / ‖v0‖²
    kl_factor: float = 0.0625  # × KL(edited ‖ original) on "{subject} is a"
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ this × ‖v0‖
    precision: str = "bf16"  # "bf16": autocast the passes; "fp32"

    @classmethod
    def of(cls, hparams: Any) -> "VOptions":
        """The options named in ``hparams`` (a method's frozen hparams dataclass)."""
        return cls(**{f.name: getattr(hparams, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class _Rows:
    """The encoded rows of a batch of facts: per fact, its contexts' rows, then its KL row."""

    batch: FactBatch
    fact: Tensor  # [rows] the fact of each row
    is_kl: Tensor  # [rows] bool: the row is a fact's KL prompt


def _encode(model: Model, facts: Sequence[tuple[str, str, str]],
            contexts: Sequence[str]) -> _Rows:
    templates, subjects, targets, fact, is_kl = [], [], [], [], []
    for i, (template, subject, target) in enumerate(facts):
        for c in contexts:
            templates.append(c.format(template)), subjects.append(subject)
            targets.append(target), fact.append(i), is_kl.append(False)
        templates.append(KL_TEMPLATE), subjects.append(subject)
        targets.append(None), fact.append(i), is_kl.append(True)
    batch = encode_facts(model, templates, subjects, targets)
    dev = batch.ids.device
    return _Rows(batch, torch.tensor(fact, device=dev), torch.tensor(is_kl, device=dev))


def optimise_deltas(
    model: Model,
    layer: int,
    facts: Sequence[tuple[str, str, str]],
    v0: Float[Tensor, "n_facts d_model"],
    contexts: Sequence[str],
    opts: VOptions,
) -> tuple[Float[Tensor, "n_facts d_model"], list[dict]]:
    """δ for each fact ``(template, subject, target_new)``, optimised together (see the module
    docstring); ``v0[i]`` scales fact i's weight decay and clamp. Returns the δs and, per
    fact, its loss curve."""
    if not facts or len(facts) != len(v0):
        raise InterpEditError(f"optimise_deltas: {len(facts)} facts but {len(v0)} v0 rows")
    if not contexts:
        raise InterpEditError("optimise_deltas needs at least one context ('{}')")
    rows = _encode(model, facts, contexts)
    n = len(facts)
    v0 = v0.detach().float()
    v0_norm = v0.norm(dim=1)  # [n]
    delta = torch.zeros_like(v0, requires_grad=True)
    adam = _Adam(delta, opts.v_lr)
    best_loss = torch.full((n,), float("inf"), device=v0.device)
    best = torch.zeros_like(v0)  # each fact's δ of its lowest loss so far
    active = torch.ones(n, dtype=torch.bool, device=v0.device)
    kl_init: Tensor | None = None  # [n, d_vocab] the unedited KL rows' log-distributions
    curves: list[list[tuple[float, float, float]]] = [[] for _ in range(n)]
    with autocast(model, opts.precision):
        start = _block_inputs(model, layer, rows)
    for step in range(opts.v_steps):
        live = active.nonzero()[:, 0]
        sel = active[rows.fact].nonzero()[:, 0]  # rows of the facts still optimising
        with autocast(model, opts.precision):
            nll, logp_kl = _fact_losses(model, layer, rows, sel, delta, live, start)
        if kl_init is None:
            kl_init = logp_kl.detach()
        kl = (logp_kl.exp() * (logp_kl - kl_init[live])).sum(-1)  # KL(edited ‖ original)
        decay = opts.v_weight_decay * delta[live].norm(dim=1) / v0_norm[live] ** 2
        loss = nll + opts.kl_factor * kl + decay  # [live]
        for j, i in enumerate(live.tolist()):
            curves[i].append((loss[j].item(), nll[j].item(), kl[j].item()))
        worse = loss.detach() > best_loss[live]  # overshot: back to the best δ, half the step
        adam.backtrack(live[worse], best)
        better = live[~worse]
        best_loss[better], best[better] = loss.detach()[~worse], delta.detach()[better]
        last = step == opts.v_steps - 1
        stop = ~worse & ((nll.detach() < opts.v_nll_stop) | last)
        active[live[stop]] = False
        if last:
            active[:] = False
        if not active.any():
            break
        move = ~worse & ~stop
        adam.zero_grad()
        loss[move].sum().backward()
        adam.step(live[move])
        with torch.no_grad():  # project back into the ball ‖δ_i‖ ≤ clamp · ‖v0_i‖
            max_norm = opts.clamp_norm_factor * v0_norm
            norm = delta.norm(dim=1)
            over = norm > max_norm
            delta[over] *= (max_norm[over] / norm[over])[:, None]
    final = best
    kept = [min(range(len(c)), key=lambda j: c[j][0]) for c in curves]  # the step kept
    infos = [{"steps": len(c), "loss": [round(x[0], 4) for x in c],
              "nll": [round(c[0][1], 4), round(c[kept[i]][1], 4)],
              "kl": round(c[kept[i]][2], 5), "lr": round(float(adam.lr[i]), 6),
              "delta_norm_ratio": round(float(final[i].norm() / v0_norm[i]), 4)}
             for i, c in enumerate(curves)]
    return final, infos


class _Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's arithmetic) on the rows of one parameter, each
    row with its own step size, step count and moments, so facts optimised together move as
    each would alone, and one fact's backtracking leaves the others untouched."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.betas, self.eps = param, betas, eps
        n = param.shape[0]
        self.lr = torch.full((n,), float(lr), dtype=torch.float64, device=param.device)
        self.t = torch.zeros(n, dtype=torch.long, device=param.device)
        self.m = torch.zeros_like(param, requires_grad=False)
        self.v = torch.zeros_like(param, requires_grad=False)

    def zero_grad(self) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self, rows: Tensor) -> None:
        """One Adam step on ``rows`` (the others keep their value and state)."""
        if not len(rows):
            return
        b1, b2 = self.betas
        g = self.param.grad[rows]
        self.t[rows] += 1
        t = self.t[rows].to(torch.float64)
        self.m[rows] = self.m[rows] * b1 + g * (1 - b1)
        self.v[rows] = self.v[rows] * b2 + g * g * (1 - b2)
        bias1, bias2 = 1 - b1 ** t, 1 - b2 ** t
        size = (self.lr[rows] / bias1).to(g.dtype)[:, None]
        denom = self.v[rows].sqrt() / bias2.sqrt().to(g.dtype)[:, None] + self.eps
        self.param[rows] -= size * self.m[rows] / denom

    @torch.no_grad()
    def backtrack(self, rows: Tensor, best: Tensor) -> None:
        """``rows`` back to their ``best`` values, with half the step size and fresh state."""
        if not len(rows):
            return
        self.param[rows] = best[rows]
        self.lr[rows] /= 2
        self.t[rows], self.m[rows], self.v[rows] = 0, 0.0, 0.0


def _fact_losses(
    model: Model, layer: int, rows: _Rows, sel: Tensor, delta: Float[Tensor, "n d_model"],
    live: Tensor, start: Float[Tensor, "rows pos d_model"] | None,
) -> tuple[Float[Tensor, "live"], Float[Tensor, "live d_vocab"]]:
    """For the live facts (``sel``: their rows), with δ added at each row's subject-last
    token: each fact's mean over its prompts of the per-token NLL of the new target, and the
    next-token log-distribution of its KL row. ``start``: every row's input of block
    ``layer`` (see :func:`_block_inputs`), or None for a full pass through the hooks."""
    batch = rows.batch.select(sel)
    fact = rows.fact[sel]
    bump = batch.at_subject_last()[..., None] * delta[fact][:, None, :]  # [rows, pos, d_model]
    kl_rows = rows.is_kl[sel].nonzero()[:, 0]  # one per live fact, in fact order
    kl_pos = batch.subject_last[kl_rows]
    if start is not None:  # the layer stepper from block `layer`, unembedding only what is read
        stepper = Stepper(model, batch.ids.shape[1])
        h = stepper.layer(layer, start[sel], 0, add=bump).out
        h = stepper.run(h, layer + 1, model.n_layers)
        target_logits = stepper.unembed(h[batch.target_mask])
        kl_logits = stepper.unembed(h[kl_rows, kl_pos])
    else:
        with hooked(model, [add_delta(mlp_write_hook(layer), slice(None), bump)]):
            logits = model.logits(batch.ids)  # [rows, pos, d_vocab]
        target_logits, kl_logits = logits[batch.target_mask], logits[kl_rows, kl_pos]
    logp = target_logits.float().log_softmax(-1)  # [n_target_tokens, d_vocab]
    token_logp = logp.gather(-1, batch.target_labels[batch.target_mask][:, None])[:, 0]
    token_row = batch.target_mask.nonzero()[:, 0]
    n_rows = len(sel)
    row_sum = torch.zeros(n_rows, device=logp.device).index_add(0, token_row, token_logp)
    row_len = batch.target_mask.sum(1).clamp(min=1)
    slot = torch.searchsorted(live, fact)  # each row's index among the live facts
    prompt = ~rows.is_kl[sel]
    per_fact = torch.zeros(len(live), device=logp.device).index_add(
        0, slot[prompt], (row_sum / row_len)[prompt])
    n_prompts = torch.zeros(len(live), device=logp.device).index_add(
        0, slot[prompt], torch.ones_like(row_sum[prompt]))
    return -per_fact / n_prompts, kl_logits.float().log_softmax(-1)


def _block_inputs(model: Model, layer: int, rows: _Rows) -> Tensor | None:
    """Every row's input of block ``layer``, computed once: δ changes nothing below it, so
    each step runs only the blocks from ``layer`` up, on the layer stepper, and unembeds only
    the positions its losses read. None where the stepper cannot run (a family the adapter
    does not know, or a bridge hook installed): each step is then a full pass."""
    if not Stepper.usable(model):
        return None
    return block_input(model, rows.batch.ids, layer).hidden


def optimise_in_groups(model: Model, layer: int, facts: Sequence[tuple[str, str, str]],
             v0: Float[Tensor, "n_facts d_model"], contexts: Sequence[str], opts: VOptions,
             group: int) -> tuple[Float[Tensor, "n_facts d_model"], list[dict]]:
    """:func:`optimise_deltas` over groups of at most ``group`` facts (bounds the memory of
    one pass: every row's logits over the vocabulary)."""
    out, infos = [], []
    for lo in range(0, len(facts), group):
        d, i = optimise_deltas(model, layer, facts[lo:lo + group], v0[lo:lo + group], contexts,
                               opts)
        out.append(d)
        infos += i
    return torch.cat(out), infos

