"""``method="attribution"``: attribution patching (Nanda 2023; Syed et al. 2023), a first-order
estimate of the whole causal-tracing grid from one forward pass over the clean prompt and the
corrupted samples together and one backward pass (with ``precision="bfloat16"``, both in bf16
multiplies: ``high_score`` and the default target then come from the bf16 clean row too).

For every site (block output, MLP output, attention output) of every layer ``j`` and token
``t``, and every noise sample ``s``, restoring the clean value changes log p_s(target) by about

    d_s[j, t] = (clean[j, t] - corrupted_s[j, t]) . d log p_s / d act[j, t]

and a cell's ``d_s`` sums this over the restorations of its plan (one site for ``"resid"``,
the window of layers for ``"mlp"``/``"attn"``). The estimates (``estimate=``; the arithmetic
is in :mod:`.estimates`, independent of the model):

- ``"logodds"`` (default): first order in the log-odds of p, ``o_s = log(p_s / (1 - p_s))``,
  whose change is ``d_s / (1 - p_s)``; the cell scores ``mean_s sigmoid(o_s + d_s / (1 -
  p_s))``. A restoration that brings the answer back multiplies its probability while it is
  small, and saturates it as it nears 1: a step in log-odds can say so, a linear step in p
  from a corrupted ``p_s`` near 0 cannot, and the estimate stays a probability.
- ``"prob"``: first order in p itself, ``low_score + mean_s p_s d_s`` (d p_s = p_s d log
  p_s), attribution patching with p(target) as the metric. Estimates can leave [0, 1].
- ``"ig"`` / ``"ig-K"``: integrated gradients (EAP-IG, Hanna et al. 2024) of the log-odds.
  The batch holds each noise sample at K noise scales ``1, 1 - 1/K, ..`` (and the clean
  row); each site's effect is the integral of ``gradient . d(activation)`` along the path
  its activation takes as the noise shrinks to 0, by the trapezoid rule
  (:func:`.estimates.path`). Where a site carries all of the corruption (a cut) this
  converges to the exact score as K grows (tested); elsewhere it is the site's share of the
  whole restoration, not the effect of restoring it alone. K times the screen's batch.
- ``"atpstar"``: AtP*'s attention fix (Kramar et al. 2024) made the estimate: each cell's
  restoration rides the residual stream and every later layer's attention reads of it are
  recomputed exactly; windows are restored jointly; the last token's cells are exact
  (:mod:`.atpstar`). About 5x the plain screen's time, 1/10 of the exact engine's.

``"logodds"``, ``"prob"`` and ``"ig"`` are exact to first order for a hidden-state cell and a
one-layer window (tested: the error falls with the noise std); a wider window is the sum of
its layers' estimates, which ignores that restoring several outputs of one token together
also cuts the paths between them. ``"atpstar"`` is not exact to first order before the last
token (the restored position's own later layers are not re-run), but it follows the exact
grid more closely. Which agrees best with the exact grid, at what cost, is measured by
``benchmarks/bench_trace.py`` (README). Confirm what a screen finds with
``method="screen+exact"`` (:mod:`.confirm`) or ``method="fast"``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.arch.stepper import RunCache, Stepper
from interp_edit.errors import InterpEditError
from interp_edit.tracing import atpstar, estimates
from interp_edit.tracing.inputs import TraceInputs, Traced, parse_estimate
from interp_edit.tracing.reference import SITE_HOOKS, capture_runs

Acts = dict[str, list[Tensor]]  # site -> one tensor [rows, pos, d_model] per layer


class GradientPass(NamedTuple):
    """One forward and one backward pass over ``1 + steps * samples`` rows: row 0 the clean
    prompt, then ``steps`` groups of the noise samples, group ``i`` with its noise scaled by
    ``scales[i]`` (group 0 unscaled: the corrupted run)."""

    acts: Acts  # every site of every layer, per row
    grads: Acts  # d log p(target) of each row / d act (where a layer ran its last position
    # alone, the earlier positions' rows hold the activations and a zero gradient)
    logp: Float[Tensor, "rows"]  # each row's log p(target)
    inputs: TraceInputs  # completed by the clean row (default target, high_score)
    run: RunCache | None  # the layer stepper's run (None: the hook layer ran)

    def points(self, site: str, layer: int, rows: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``site`` of ``layer``: the clean row and its gradient ``[1, pos, d]``, the noisy
        rows and theirs ``[steps, samples, pos, d]`` (positions the gradient reaches)."""
        a, g = self.acts[site][layer], self.grads[site][layer]
        a = a[:, -g.shape[1]:].detach()
        noisy = [t[1:].reshape(-1, rows, *t.shape[1:]) for t in (a, g)]
        return a[:1], g[:1], noisy[0], noisy[1]


def gradient_pass(inputs: TraceInputs, scales: list[float],
                  precision: torch.dtype | None = None) -> GradientPass:
    """The screen's forward and backward pass (:class:`GradientPass`), on the layer stepper
    where it runs (``precision``: the multiplies' dtype, forward and backward; None: the
    model's), else through the hook layer."""
    noise = torch.cat([inputs.noise.new_zeros(1, *inputs.noise.shape[1:])]
                      + [s * inputs.noise for s in scales]).requires_grad_(True)
    with torch.enable_grad():
        if Stepper.usable(inputs.model):
            run, completed, (out, seed, logp) = _stepper_runs(inputs, noise, precision)
            acts = _sites(run)
        else:
            run, (acts, completed, (out, seed, logp)) = None, _hooked_runs(inputs, noise)
        flat = [a for site in SITE_HOOKS for a in acts[site]]
        grads = iter(torch.autograd.grad(out, flat, seed))
    by_site = {site: [next(grads) for _ in acts[site]] for site in SITE_HOOKS}
    return GradientPass(acts, by_site, logp.detach().float().cpu(), completed, run)


def _stepper_runs(
    inputs: TraceInputs, noise: Tensor, precision: torch.dtype | None,
) -> tuple[RunCache, TraceInputs, tuple[Tensor, Tensor, Tensor]]:
    """One forward pass on the Llama layer stepper over the rows (row 0: zero noise, the
    clean prompt), so that the clean and corrupted activations come from the same
    multiplies (clean - corrupted holds no rounding difference where the noise changed
    nothing) and the weights are read once; logits at the last position only. The clean
    row's probabilities complete ``inputs`` (default target, ``high_score``).

    Returns the run, the completed inputs and what to differentiate: the logits
    with the gradient of each row's log p(target) as their seed, ``onehot - probs`` (the log
    softmax's backward, in closed form), and the rows' log p(target). The last layer runs
    the last position alone: the others' outputs there reach nothing."""
    stepper = Stepper(inputs.model, inputs.n_tokens, precision)
    run = stepper.full_run(inputs.batch(noise.shape[0]), noise, inputs.subject_range,
                           last_only=True)
    logits = stepper.unembed(run.final)  # [rows, d_vocab]
    with torch.no_grad():
        logp = logits.float().log_softmax(-1)
        inputs = inputs.completed(logp[0].exp(), None)
        seed = -logp.exp()
        seed[:, inputs.target_id] += 1
    return run, inputs, (logits, seed.to(logits.dtype), logp[:, inputs.target_id])


def _sites(run: RunCache) -> Acts:
    return {"resid": run.x[1:], "mlp": run.mlp, "attn": run.attn}


def _hooked_runs(inputs: TraceInputs, noise: Tensor
                 ) -> tuple[Acts, TraceInputs, tuple[Tensor, None, Tensor]]:
    """The same through the hook layer, for any model: the clean prompt is row 0 of the
    differentiated batch too (``capture_runs``' own clean pass completes the inputs)."""
    _, acts, probs, completed = capture_runs(replace(inputs, noise=noise.detach()), noise)
    layers = range(inputs.n_layers)
    sites = {site: [acts[hook(j)] for j in layers] for site, hook in SITE_HOOKS.items()}
    logp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return sites, replace(completed, noise=inputs.noise), (logp.sum(), None, logp)


def run(inputs: TraceInputs, kinds, *, window, sever, cells, progress, precision=None,
        estimate="logodds") -> Traced:
    """``method="attribution"``; ``inputs`` come without the clean pass (``prepare(...,
    clean_pass=False)``): the screen runs its own. ``estimate``: see the module docstring."""
    name, steps = parse_estimate(estimate)
    if name == "atpstar" and not atpstar.supported(inputs.model):
        raise InterpEditError("estimate='atpstar' needs the layer stepper (a family the "
                              "architecture adapters know, no hooks installed): use "
                              "'logodds' or 'ig'")
    g = gradient_pass(inputs, [1 - i / steps for i in range(steps)], precision)
    if name == "atpstar":
        traced = atpstar.run(inputs, g, kinds, window=window, progress=progress,
                             precision=precision)
    else:
        traced = _scored(g, kinds, window, name, inputs.samples)
    keep = torch.zeros(inputs.n_tokens, inputs.n_layers, dtype=torch.bool)
    keep[tuple(torch.tensor(cells).T)] = True
    grids = {k: torch.where(keep, v, float("nan")) for k, v in traced.grids.items()}
    exact = None if traced.exact is None else {k: v & keep for k, v in traced.exact.items()}
    return traced._replace(grids=grids, exact=exact)


def _scored(g: GradientPass, kinds, window: int, name: str, samples: int) -> Traced:
    """The grids of the gradient-only estimates (``"logodds"``, ``"prob"``, ``"ig"``)."""
    S, L, T = samples, g.inputs.n_layers, g.inputs.n_tokens
    logp = g.logp[1 : 1 + S]  # the corrupted samples'
    if name == "ig":  # gradients of the log-odds: every row's times 1 / (1 - p)
        w = estimates.logodds_weights(g.logp).to(g.grads["resid"][0].device)[:, None, None]
        g = g._replace(grads={k: [t * w for t in v] for k, v in g.grads.items()})
    effects = {}
    for site in SITE_HOOKS:
        # [sample, layer, pos]; where a layer ran its last positions only (the last one), the
        # earlier ones reach nothing: zero
        effects[site] = torch.zeros(S, L, T)
        for j in range(L):
            clean, clean_grad, noisy, grads = g.points(site, j, S)
            d = (estimates.path(clean, noisy, clean_grad, grads) if name == "ig"
                 else estimates.linear(clean, noisy[0], grads[0]))
            effects[site][:, j, T - d.shape[1]:] = d.float().cpu()
    score = {"ig": estimates.logodds_scores, "logodds": estimates.logodds_step,
             "prob": estimates.prob_scores}[name]
    grids = {k: score(logp, estimates.windows(effects[k], k, window)) for k in kinds}
    return Traced(grids, float(logp.exp().mean()), g.inputs)
