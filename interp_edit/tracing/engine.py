"""``method="fast"``: exact causal tracing, many times faster than one pass per cell.

Where the reference spends its time, and what this engine does instead:

1. The clean and corrupted runs happen once, caching every layer's input, sublayer outputs
   and keys/values (:class:`~interp_edit.arch.stepper.RunCache`).
2. Cells that provably change nothing need no compute. Before the subject's first token the
   corrupted run equals the clean one (the noise is on subject tokens only and attention is
   causal): ``low_score``. At the last layer only the last position reaches the logits, so a
   restoration there at an earlier token is dropped (kind ``"resid"``: ``low_score``), and
   restoring the last layer's output at the last token gives the clean state: the clean score.
3. Every other token ``t`` gets one *sweep* over the layers. A cell's state is only
   recomputed from the first layer it restores, and only at positions ``t..T-1``; earlier
   positions' keys/values come from the corrupted cache. All cells of the token (of every
   requested kind) are batched together, ``cells x samples`` rows per layer call, in chunks
   small enough for the activations to stay in cache.
4. Cells whose restorations agree up to some layer share one state until they differ (an
   MLP/attention window clipped at layer 0 has the same start as its neighbours): a state is
   keyed by the restorations applied so far, and computed once per key.
5. At the first restored layer only position ``t`` is computed; at the last layer only the
   last position (and the keys/values of the others); an MLP output that a restoration
   replaces is not computed; the unembedding runs once at the end, on the last position only.

What is left is bound by matrix-multiply FLOPs: for a prompt whose subject starts at token 0
it is 1/4.5 of the reference's multiply-adds for kind ``"resid"`` on the default model (each
cell still recomputes every later layer at every later position), 1/3.9 and 1/3.7 for MLP and
attention windows. ``benchmarks/bench_trace.py`` counts them and measures the ratio.

Models the layer stepper does not support (anything but Llama-family decoders), and models
with hooks installed on the bridge, go through the hook layer instead, batching many cells
per pass and unembedding the last position only
(:func:`interp_edit.tracing.reference.hooked_grid`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor

from interp_edit.tracing import reference
from interp_edit.arch.stepper import Stepper, Patch, RunCache
from interp_edit.tracing.inputs import Plan, Restore, TraceInputs, Traced, progress_bar

_FALLBACK_CELLS_PER_PASS = 16
_MAX_ROWS = 1024  # (states x samples x positions) per layer call: keeps activations in cache
_UNEMBED_ROWS = 256  # final states per unembedding call


def run(inputs: TraceInputs, kinds, *, window, sever, cells, progress) -> Traced:
    if not Stepper.usable(inputs.model):
        return reference.run(
            inputs, kinds, window=window, sever=sever, cells=cells, progress=progress,
            cells_per_pass=_FALLBACK_CELLS_PER_PASS, last_logits=True,
        )
    jobs = reference.grid_jobs(inputs, kinds, window, sever, cells)
    scores, low = _fast_grid(inputs, [(t, p) for _, t, _, p in jobs], progress)
    return Traced(reference.fill_grids(inputs, kinds, jobs, scores), low, inputs)


@torch.no_grad()
def _fast_grid(
    inputs: TraceInputs, jobs: Sequence[tuple[int, Plan]], progress: bool | None
) -> tuple[Float[Tensor, "n_jobs"], float]:
    S, T, L, tid = inputs.samples, inputs.n_tokens, inputs.n_layers, inputs.target_id
    stepper = Stepper(inputs.model, T)
    clean = inputs.clean  # prepare's clean pass (trace asks for it with method='fast')
    assert clean is not None, "the fast engine needs prepare(..., clean_pass=True)"
    corrupted = stepper.full_run(inputs.batch(S), inputs.noise, inputs.subject_range)
    low = float(stepper.target_probs(corrupted.final, tid).mean())
    scores = torch.full((len(jobs),), low)
    by_token: dict[int, list[tuple[int, Plan]]] = defaultdict(list)
    for i, (t, cell_plan) in enumerate(jobs):
        if t < inputs.subject_range[0]:
            continue  # before the subject the corrupted run equals the clean one: low_score
        cell_plan = effective_plan(cell_plan, t, T, L)
        if not cell_plan:
            continue  # nothing left that reaches the last position: low_score
        if t == T - 1 and Restore(L - 1, "resid", "clean") in cell_plan:
            scores[i] = inputs.high_score  # the final state is the clean one
            continue
        by_token[t].append((i, cell_plan))
    bar = progress_bar(len(jobs), progress, "causal trace")
    bar.update(len(jobs) - sum(map(len, by_token.values())))
    index, finals = [], []  # the unembedding runs once at the end, on big batches
    for t, cells in sorted(by_token.items()):
        index += [i for i, _ in cells]
        finals.append(_Sweep(stepper, clean, corrupted, t).finals([p for _, p in cells]))
        bar.update(len(cells))
    bar.close()
    if finals:
        h = torch.cat(finals).flatten(0, 1)  # [(cell sample), d_model]
        probs = torch.cat([stepper.target_probs(c, tid) for c in h.split(_UNEMBED_ROWS)])
        scores[index] = rearrange(probs, "(cell s) -> cell s", s=S).mean(1).float().cpu()
    return scores, low


def effective_plan(cell_plan: Plan, t: int, n_tokens: int, n_layers: int) -> Plan:
    """The restorations of a cell at token ``t`` that can change the score: at the last layer,
    only the last position's activations reach the logits."""
    if t == n_tokens - 1:
        return cell_plan
    return tuple(r for r in cell_plan if r.layer < n_layers - 1)


def _prefix(plan: Plan, layer: int) -> Plan:
    """The restorations of ``plan`` applied by the end of ``layer`` (plans are layer-sorted)."""
    return tuple(r for r in plan if r.layer <= layer)


class _Sweep:
    """All cells of one token ``t``, layer by layer, states keyed by restorations so far."""

    def __init__(self, stepper: Stepper, clean: RunCache, corrupted: RunCache, t: int):
        self.st, self.clean, self.cor, self.t = stepper, clean, corrupted, t
        self.S = corrupted.x[0].shape[0]
        self.T = corrupted.x[0].shape[1]
        self.L = len(corrupted.attn)

    def finals(self, plans: list[Plan]) -> Float[Tensor, "n_plans samples d_model"]:
        """Each cell's final hidden state at the last position."""
        states: dict[Plan, Tensor] = {}  # key -> state after the previous layer [S, T-t, d]
        for j in range(min(p[0].layer for p in plans), self.L):
            keys = list(dict.fromkeys(_prefix(p, j) for p in plans if p[0].layer <= j))
            fresh = [k for k in keys if len(_prefix(k, j - 1)) == 0]
            going = [k for k in keys if len(_prefix(k, j - 1)) > 0]
            new = {}
            if fresh:
                new |= dict(zip(fresh, self._start(j, fresh)))
            for chunk in _chunks(going, self.S * (self.T - self.t)):
                x = torch.cat([states[_prefix(k, j - 1)] for k in chunk])
                new |= dict(zip(chunk, self._continue(j, x, chunk)))
            states = new
        return torch.stack([states[p] for p in plans])  # [n, S, d] at the last position

    def _patches(self, j: int, keys: list[Plan]) -> dict[str, Patch] | None:
        """Per-row replacements at token t for the restorations of ``keys`` at layer j."""
        S, t, D = self.S, self.t, self.cor.x[0].shape[-1]
        masks: dict[str, Tensor] = {}
        values: dict[str, Tensor] = {}
        for i, key in enumerate(keys):
            for r in reversed(key):  # keys are layer-sorted: layer j's steps come last
                if r.layer < j:
                    break
                run = self.clean if r.source == "clean" else self.cor
                acts = run.x[j + 1] if r.site == "resid" else getattr(run, r.site)[j]
                if r.site not in masks:
                    masks[r.site] = torch.zeros(len(keys), S, dtype=torch.bool, device=acts.device)
                    values[r.site] = acts.new_zeros(len(keys), S, D)
                masks[r.site][i], values[r.site][i] = True, acts[:, t]
        return {k: Patch(masks[k].flatten(), values[k].flatten(0, 1)) for k in masks}

    def _past(self, j: int, n: int) -> tuple[Tensor, Tensor]:
        k, v = self.cor.k[j][:, :, : self.t], self.cor.v[j][:, :, : self.t]
        return tuple(repeat(a, "s h p d -> (n s) h p d", n=n) for a in (k, v))

    def _start(self, j: int, keys: list[Plan]) -> list[Tensor]:
        """States after layer j of cells whose first restoration is at layer j: only
        position t differs from the corrupted run there."""
        n, t = len(keys), self.t
        x = repeat(self.cor.x[j][:, t : t + 1], "s p d -> (n s) p d", n=n)
        out = self.st.layer(j, x, t, self._past(j, n), self._patches(j, keys)).out
        rest = repeat(self.cor.x[j + 1][:, t + 1 :], "s p d -> (n s) p d", n=n)
        states = torch.cat((out, rest), 1)
        return list(self._finish(j, states).split(self.S))

    def _continue(self, j: int, x: Tensor, keys: list[Plan]) -> list[Tensor]:
        last = j == self.L - 1
        out = self.st.layer(j, x, self.t, self._past(j, len(keys)), self._patches(j, keys),
                            last_only=last).out  # fmt: skip
        return list(self._finish(j, out).split(self.S))

    def _finish(self, j: int, states: Tensor) -> Tensor:
        """After the last layer keep only the last position, ``[rows, d]``."""
        return states[:, -1] if j == self.L - 1 else states


def _chunks(keys: list[Plan], rows_per_key: int) -> list[list[Plan]]:
    size = max(1, _MAX_ROWS // max(1, rows_per_key))
    return [keys[i : i + size] for i in range(0, len(keys), size)]
