"""``method="attribution"``: attribution patching (Nanda 2023; Syed et al. 2023), a first-order
estimate of the whole causal-tracing grid from one clean pass and one batched corrupted
forward + backward pass.

For every site (block output, MLP output, attention output) of every layer ``j`` and token
``t``, restoring the clean value changes the score by about

    (clean[j, t] - corrupted_s[j, t]) . d p_s / d act[j, t]        (mean over noise samples s)

and a cell's estimate sums this over the restorations of its plan (one site for ``"resid"``,
the window of layers for ``"mlp"``/``"attn"``). ``scores = low_score + estimate``.

It is a screening tool: it ranks cells well where the score is locally linear in the
activation, but it does not reproduce probabilities (estimates can fall outside [0, 1]), and
it misses saturation effects: restoring a whole hidden state is a large step. Confirm what it
finds with ``method="fast"``. The benchmark (``benchmarks/bench_trace.py``) reports its Pearson
correlation with the exact grid.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit._llama import LlamaStepper, RunCache
from interp_edit.tracing.inputs import TraceInputs, window_layers
from interp_edit.tracing.reference import SITE_HOOKS, capture_runs

Acts = dict[str, list[Tensor]]  # site -> one tensor [batch, pos, d_model] per layer


def site_effects(
    inputs: TraceInputs, precision: torch.dtype | None = None,
) -> tuple[dict[str, Float[Tensor, "n_layers n_tokens"]], float]:
    """First-order effect of restoring each site, ``{site: [n_layers, n_tokens]}``, and the
    corrupted score ``low_score``. ``precision``: the dtype of the matrix multiplies, forward
    and backward (layer stepper only; None: the model's)."""
    noise = inputs.noise.clone().requires_grad_(True)  # puts the corrupted run on the graph
    with torch.enable_grad():
        if LlamaStepper.usable(inputs.model):
            clean, corrupted, probs = _stepper_runs(inputs, noise, precision)
        else:
            clean, corrupted, probs = _hooked_runs(inputs, noise)
        flat = [a for site in SITE_HOOKS for a in corrupted[site]]
        grads = iter(torch.autograd.grad(probs.mean(), flat))
    effects = {}
    for site in SITE_HOOKS:
        # the grad of the mean already carries 1/S: summing over samples gives the mean effect
        effects[site] = torch.stack([
            ((c - a.detach()) * next(grads)).sum((0, 2))
            for c, a in zip(clean[site], corrupted[site])
        ])  # [layer, pos]
    return {k: v.float().cpu() for k, v in effects.items()}, float(probs.detach().mean())


def _stepper_runs(inputs: TraceInputs, noise: Tensor, precision: torch.dtype | None,
                  ) -> tuple[Acts, Acts, Tensor]:
    """Corrupted activations from the Llama layer stepper, on the autograd graph, logits at the
    last position only; the clean ones from ``prepare``'s run (no gradient), or with a
    ``precision`` from a clean run in it (so that clean - corrupted holds no rounding
    difference where the noise changed nothing)."""
    stepper = LlamaStepper(inputs.model, inputs.n_tokens, precision)
    run = stepper.full_run(inputs.batch(inputs.samples), noise, inputs.subject_range)
    probs = stepper.target_probs(run.final, inputs.target_id)
    if precision is None:
        return _sites(inputs.clean_run()), _sites(run), probs
    with torch.no_grad():
        clean = stepper.full_run(inputs.batch(1))
    return _sites(clean), _sites(run), probs


def _sites(run: RunCache) -> Acts:
    return {"resid": run.x[1:], "mlp": run.mlp, "attn": run.attn}


def _hooked_runs(inputs: TraceInputs, noise: Tensor) -> tuple[Acts, Acts, Tensor]:
    """The same through the hook layer, for any model."""
    clean, acts, probs = capture_runs(inputs, noise)
    layers = range(inputs.n_layers)
    by_site = [
        {site: [run[hook(j)] for j in layers] for site, hook in SITE_HOOKS.items()}
        for run in (clean, acts)
    ]
    return by_site[0], by_site[1], probs


def run(inputs: TraceInputs, kinds, *, window, sever, cells, progress, precision=None):
    effects, low = site_effects(inputs, precision)
    L, T = inputs.n_layers, inputs.n_tokens
    keep = torch.zeros(T, L, dtype=torch.bool)
    keep[tuple(torch.tensor(cells).T)] = True
    grids = {}
    for kind in kinds:
        if kind == "resid":
            estimate = effects["resid"].T
        else:  # a window's estimate is the sum of its layers': differences of a prefix sum
            csum = torch.cat((torch.zeros(1, T), effects[kind].cumsum(0)))
            spans = [window_layers(layer, window, L) for layer in range(L)]
            estimate = torch.stack([csum[w.stop] - csum[w.start] for w in spans], 1)
        grids[kind] = torch.where(keep, low + estimate, float("nan"))
    return grids, low
