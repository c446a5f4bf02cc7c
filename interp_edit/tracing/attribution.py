"""``method="attribution"``: attribution patching (Nanda 2023; Syed et al. 2023), a first-order
estimate of the whole causal-tracing grid from one forward pass over the clean prompt and the
corrupted samples together and one backward pass (with ``precision="bfloat16"``, both in bf16
multiplies: ``high_score`` and the default target then come from the bf16 clean row too).

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
from interp_edit.tracing.inputs import TraceInputs, Traced, window_layers
from interp_edit.tracing.reference import SITE_HOOKS, capture_runs

Acts = dict[str, list[Tensor]]  # site -> one tensor [batch, pos, d_model] per layer


def own_clean_pass(model) -> bool:
    """Whether the screen runs the clean prompt itself, as a row of its batch (the layer
    stepper's path), so that ``prepare`` need not (``prepare(..., clean_pass=False)``); the
    hook path scores the clean pass ``prepare`` ran."""
    return LlamaStepper.usable(model)


def site_effects(
    inputs: TraceInputs, precision: torch.dtype | None = None,
) -> tuple[dict[str, Float[Tensor, "n_layers n_tokens"]], float, TraceInputs]:
    """First-order effect of restoring each site, ``{site: [n_layers, n_tokens]}``, the
    corrupted score ``low_score``, and ``inputs`` completed by the clean pass (where the layer
    stepper ran it here, see :func:`_stepper_runs`). ``precision``: the dtype of the matrix
    multiplies, forward and backward (layer stepper only; None: the model's)."""
    noise = inputs.noise.clone().requires_grad_(True)  # puts the corrupted run on the graph
    with torch.enable_grad():
        if own_clean_pass(inputs.model):
            clean, corrupted, inputs, backward = _stepper_runs(inputs, noise, precision)
        else:
            clean, corrupted, probs = _hooked_runs(inputs, noise)
            backward = (probs.mean(), None, probs.detach().mean())
        flat = [a for site in SITE_HOOKS for a in corrupted[site]]
        out, seed, low = backward
        grads = iter(torch.autograd.grad(out, flat, seed))
    effects = {}
    for site in SITE_HOOKS:
        # the grad of the mean already carries 1/S: summing over samples gives the mean effect
        # [layer, pos]; where a layer ran its last positions only (the last one), the earlier
        # ones reach nothing: zero
        effects[site] = torch.zeros(inputs.n_layers, inputs.n_tokens)
        for j, (c, a) in enumerate(zip(clean[site], corrupted[site])):
            effects[site][j, -a.shape[1]:] = ((c - a.detach()) * next(grads)).sum((0, 2))
    return effects, float(low), inputs


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
    gradient of the mean p(target) over samples as their seed, ``p_s (onehot - probs_s) / S``
    (the softmax's backward, in closed form), and the corrupted score. The last layer runs
    the last position alone: the others' outputs there reach nothing."""
    stepper = LlamaStepper(inputs.model, inputs.n_tokens, precision)
    rows = torch.cat((noise.new_zeros(1, *noise.shape[1:]), noise))
    run = stepper.full_run(inputs.batch(1 + inputs.samples), rows, inputs.subject_range,
                           last_only=True)
    logits = stepper.unembed(run.final)  # [1 + S, d_vocab]
    with torch.no_grad():
        probs = logits.softmax(-1)
        inputs = inputs.completed(probs[0], None)
        p = probs[1:, inputs.target_id]
        seed = torch.zeros_like(probs)
        seed[1:] = probs[1:] * (-p / inputs.samples)[:, None]
        seed[1:, inputs.target_id] += p / inputs.samples
    sites = _sites(run)
    clean = {site: [a[:1].detach() for a in acts] for site, acts in sites.items()}
    return clean, sites, inputs, (logits, seed, p.mean())


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


def run(inputs: TraceInputs, kinds, *, window, sever, cells, progress, precision=None
        ) -> Traced:
    """``method="attribution"``; ``inputs`` may come without the clean pass (``prepare(...,
    clean_pass=False)``) where the layer stepper runs: it is one row of the batch here."""
    effects, low, inputs = site_effects(inputs, precision)
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
    return Traced(grids, low, inputs)
