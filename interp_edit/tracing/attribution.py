"""``method="attribution"``: attribution patching (Nanda 2023; Syed et al. 2023), a first-order
estimate of the whole causal-tracing grid from one forward pass over the clean prompt and the
corrupted samples together and one backward pass (with ``precision="bfloat16"``, both in bf16
multiplies: ``high_score`` and the default target then come from the bf16 clean row too).

For every site (block output, MLP output, attention output) of every layer ``j`` and token
``t``, and every noise sample ``s``, restoring the clean value changes log p_s(target) by about

    d_s[j, t] = (clean[j, t] - corrupted_s[j, t]) . d log p_s / d act[j, t]

and a cell's ``d_s`` sums this over the restorations of its plan (one site for ``"resid"``,
the window of layers for ``"mlp"``/``"attn"``). Two estimates of the cell's score follow
(``estimate=``):

- ``"logodds"`` (default): first order in the log-odds of p, ``o_s = log(p_s / (1 - p_s))``,
  whose change is ``d_s / (1 - p_s)``; the cell scores ``mean_s sigmoid(o_s + d_s / (1 -
  p_s))``. A restoration that brings the answer back multiplies its probability while it is
  small, and saturates it as it nears 1: a linear step in p from a corrupted ``p_s`` near 0
  cannot say by how much, a step in log-odds can, and the estimate stays a probability (no
  clipping, so no ties at 1). It agrees better with the exact grid (README: mean Pearson r
  over 20 known facts 0.64 / 0.49 / 0.76 for resid / mlp / attn against 0.57 / 0.41 / 0.66,
  all cells pooled 0.58 / 0.44 / 0.71 against 0.34 / 0.31 / 0.35).
- ``"prob"``: first order in p itself, ``low_score + mean_s p_s d_s`` (the same gradient:
  d p_s = p_s d log p_s), attribution patching with p(target) as the metric. Estimates can
  leave [0, 1].

Either is a screening tool: it ranks cells well where the score is locally linear in the
activation (in log-odds or in p), and it misses saturation effects: restoring a whole hidden
state is a large step. A hidden-state cell's estimate is exact to first order (tested: the
error falls with the noise std); a window's is not, since restoring several outputs of one
token together also cuts the paths between them, which the sum of single-site effects
ignores. Confirm what it finds with ``method="fast"``. The benchmark
(``benchmarks/bench_trace.py``) reports both estimates' Pearson correlation with the exact grid.
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from interp_edit.arch.stepper import Stepper, RunCache
from interp_edit.tracing.inputs import TraceInputs, Traced, window_layers
from interp_edit.tracing.reference import SITE_HOOKS, capture_runs

Acts = dict[str, list[Tensor]]  # site -> one tensor [batch, pos, d_model] per layer


def site_effects(
    inputs: TraceInputs, precision: torch.dtype | None = None,
) -> tuple[dict[str, Float[Tensor, "samples n_layers n_tokens"]], Float[Tensor, "samples"],
           TraceInputs]:
    """First-order change of each noise sample's log p(target) when each site is restored,
    ``{site: [samples, n_layers, n_tokens]}``, the corrupted log p(target) per sample, and
    ``inputs`` completed by the clean pass run here (:func:`_stepper_runs`, or the hooks'
    ``capture_runs``). ``precision``: the dtype of the matrix multiplies, forward and
    backward (layer stepper only; None: the model's)."""
    noise = inputs.noise.clone().requires_grad_(True)  # puts the corrupted run on the graph
    with torch.enable_grad():
        if Stepper.usable(inputs.model):
            clean, corrupted, inputs, (out, seed, logp) = _stepper_runs(inputs, noise, precision)
        else:
            clean, corrupted, probs, inputs = _hooked_runs(inputs, noise)
            logp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
            out, seed = logp.sum(), None  # row s's gradient: d log p_s
        flat = [a for site in SITE_HOOKS for a in corrupted[site]]
        grads = iter(torch.autograd.grad(out, flat, seed))
    S = inputs.samples
    first = corrupted["resid"][0].shape[0] - S  # the stepper's batch starts with the clean row
    effects = {}
    for site in SITE_HOOKS:
        # [sample, layer, pos]; where a layer ran its last positions only (the last one), the
        # earlier ones reach nothing: zero
        effects[site] = torch.zeros(S, inputs.n_layers, inputs.n_tokens)
        for j, (c, a) in enumerate(zip(clean[site], corrupted[site])):
            d = ((c - a.detach()) * next(grads)).sum(-1)[first:]
            effects[site][:, j, -a.shape[1]:] = d.float().cpu()
    return effects, logp.detach().float().cpu(), inputs


def _stepper_runs(
    inputs: TraceInputs, noise: Tensor, precision: torch.dtype | None,
) -> tuple[Acts, Acts, TraceInputs, tuple[Tensor, Tensor, Tensor]]:
    """One forward pass on the Llama layer stepper over the clean prompt (row 0: zero noise)
    and the corrupted samples, so that the clean and corrupted activations come from the same
    multiplies (clean - corrupted holds no rounding difference where the noise changed
    nothing) and the weights are read once; logits at the last position only. The clean
    row's probabilities complete ``inputs`` (default target, ``high_score``).

    Returns the clean sites (row 0, no gradient), the whole batch's sites (the clean row's
    gradient is zero), the completed inputs and what to differentiate: the logits with the
    gradient of each sample's log p(target) as their seed, ``onehot - probs_s`` (the log
    softmax's backward, in closed form; zero on the clean row), and the samples' log
    p(target). The last layer runs the last position alone: the others' outputs there reach
    nothing."""
    stepper = Stepper(inputs.model, inputs.n_tokens, precision)
    rows = torch.cat((noise.new_zeros(1, *noise.shape[1:]), noise))
    run = stepper.full_run(inputs.batch(1 + inputs.samples), rows, inputs.subject_range,
                           last_only=True)
    logits = stepper.unembed(run.final)  # [1 + S, d_vocab]
    with torch.no_grad():
        logp = logits.float().log_softmax(-1)
        inputs = inputs.completed(logp[0].exp(), None)
        seed = -logp.exp()
        seed[:, inputs.target_id] += 1
        seed[0] = 0
    sites = _sites(run)
    clean = {site: [a[:1].detach() for a in acts] for site, acts in sites.items()}
    return clean, sites, inputs, (logits, seed.to(logits.dtype), logp[1:, inputs.target_id])


def _sites(run: RunCache) -> Acts:
    return {"resid": run.x[1:], "mlp": run.mlp, "attn": run.attn}


def _hooked_runs(inputs: TraceInputs, noise: Tensor
                 ) -> tuple[Acts, Acts, Tensor, TraceInputs]:
    """The same through the hook layer, for any model."""
    clean, acts, probs, inputs = capture_runs(inputs, noise)
    layers = range(inputs.n_layers)
    by_site = [
        {site: [run[hook(j)] for j in layers] for site, hook in SITE_HOOKS.items()}
        for run in (clean, acts)
    ]
    return by_site[0], by_site[1], probs, inputs


def run(inputs: TraceInputs, kinds, *, window, sever, cells, progress, precision=None,
        estimate="logodds") -> Traced:
    """``method="attribution"``; ``inputs`` come without the clean pass (``prepare(...,
    clean_pass=False)``): the screen runs its own.
    ``estimate``: ``"logodds"`` or ``"prob"`` (the module docstring)."""
    effects, logp, inputs = site_effects(inputs, precision)
    low = float(logp.exp().mean())
    L, T = inputs.n_layers, inputs.n_tokens
    keep = torch.zeros(T, L, dtype=torch.bool)
    keep[tuple(torch.tensor(cells).T)] = True
    grids = {}
    for kind in kinds:
        d = cell_effects(effects[kind], kind, window)  # [sample, token, layer]
        if estimate == "logodds":
            score = _logodds_step(logp, d).mean(0).float()
        else:
            score = low + (logp.exp()[:, None, None] * d).mean(0)
        grids[kind] = torch.where(keep, score, float("nan"))
    return Traced(grids, low, inputs)


def _logodds_step(
    logp: Float[Tensor, "samples"], d: Float[Tensor, "samples n_tokens n_layers"]
) -> Float[Tensor, "samples n_tokens n_layers"]:
    """``sigmoid(o + d / (1 - p))`` per sample: the log-odds ``o`` of p moved by the first-order
    change of log p, ``d``, times d(log-odds)/d(log p) = 1 / (1 - p); in float64, so that a
    corrupted p of 1 (1 - p = 0 in float32) gives 1, not NaN."""
    logp, d = logp.double()[:, None, None], d.double()
    log1m = torch.log(-torch.expm1(logp)).clamp_min(-700.0)  # log(1 - p), finite
    return torch.sigmoid(logp - log1m + d * (-log1m).exp())


def cell_effects(
    effects: Float[Tensor, "samples n_layers n_tokens"], kind: str, window: int
) -> Float[Tensor, "samples n_tokens n_layers"]:
    """Per sample, the sum of the site effects over each cell's restorations: one site for
    ``"resid"``; a window of layers for ``"mlp"``/``"attn"`` (differences of a prefix sum)."""
    S, L, T = effects.shape
    if kind == "resid":
        return rearrange(effects, "s l t -> s t l")
    csum = torch.cat((effects.new_zeros(S, 1, T), effects.cumsum(1)), 1)
    spans = [window_layers(layer, window, L) for layer in range(L)]
    return torch.stack([csum[:, w.stop] - csum[:, w.start] for w in spans], 2)
