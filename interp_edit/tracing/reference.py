"""The plain algorithm, through the hook layer: for every cell, one forward pass over the
batch of corrupted samples with that cell's activations patched to their clean values.

This is the yardstick the fast engine is tested against; keep it short and obvious.
:func:`hooked_grid` with ``cells_per_pass > 1`` packs several cells into one pass (rows
``i*S .. (i+1)*S`` belong to cell ``i``), and with ``last_logits`` unembeds the last position
only: that is the fast method's fallback for models the fast engine does not support.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from interp_edit import hooks as H
from interp_edit.models import attn_out_hook, mlp_out_hook, resid_hook
from interp_edit.tracing.inputs import Plan, TraceInputs, Traced, plan, progress_bar

# a plan step's site -> the bridge hook point that holds that activation
SITE_HOOKS = {"resid": resid_hook, "mlp": mlp_out_hook, "attn": attn_out_hook}


def all_sites(n_layers: int) -> list[str]:
    return [SITE_HOOKS[site](j) for j in range(n_layers) for site in SITE_HOOKS]


def capture_runs(
    inputs: TraceInputs, noise: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, TraceInputs]:
    """Clean activations ``[1, pos, d]``, corrupted ones ``[samples, pos, d]`` (every site of
    every layer), the corrupted p(target) per sample, and ``inputs`` completed by the clean
    pass where ``prepare`` did not run one (see there). ``noise``: the
    samples to add, on the autograd graph; the corrupted run is then differentiable
    (attribution's gradient pass)."""
    model, names = inputs.model, all_sites(inputs.n_layers)
    clean: dict[str, Tensor] = {}
    with torch.no_grad(), H.hooked(model, [H.capture(n, clean) for n in names]):
        logits = model.logits(inputs.batch(1), [-1])
    if inputs.high_score is None:
        inputs = inputs.completed(logits[0, -1].softmax(-1), None)
    grad = noise is not None
    corrupted: dict[str, Tensor] = {}
    hooks = [H.add_noise(slice(*inputs.subject_range), noise if grad else inputs.noise)]
    hooks += [H.capture(n, corrupted, detach=not grad) for n in names]
    with torch.set_grad_enabled(grad), H.hooked(model, hooks):
        logits = model.logits(inputs.batch(inputs.samples), [-1])
    return clean, corrupted, logits[:, -1].softmax(-1)[:, inputs.target_id], inputs


def restore_hooks(
    t: int, cell_plan: Plan, clean: dict[str, Tensor], corrupted: dict[str, Tensor], rows: slice
) -> list[H.Hook]:
    """One patch per restoration of a cell (token ``t``), on batch rows ``rows``."""
    hooks = []
    for step in cell_plan:
        name = SITE_HOOKS[step.site](step.layer)
        value = clean[name][0, t] if step.source == "clean" else corrupted[name][:, t]
        hooks.append(H.patch(name, t, value, rows=rows))
    return hooks


@torch.no_grad()
def hooked_grid(
    inputs: TraceInputs,
    jobs: Sequence[tuple[int, Plan]],
    cells_per_pass: int,
    progress: bool | None,
    last_logits: bool = False,
) -> tuple[Float[Tensor, "n_jobs"], float, TraceInputs]:
    """Score each ``(token, plan)`` job; returns the scores, the corrupted ``low_score`` and
    the inputs (completed by the clean pass, see :func:`capture_runs`). ``last_logits``:
    unembed the last position only (the plain algorithm unembeds all)."""
    clean, corrupted, low, inputs = capture_runs(inputs)
    # filled in place: a small tensor kept per pass would sit on the heap above that pass's
    # freed activations, and glibc's resident memory grew ~1.5 MB per pass (2.6 GiB peak for
    # one reference trace of the default model; 1.1 GiB now)
    S, out = inputs.samples, torch.empty(len(jobs))
    last = [-1] if last_logits else None
    bar = progress_bar(len(jobs), progress, "causal trace")
    for i in range(0, len(jobs), cells_per_pass):
        chunk = jobs[i : i + cells_per_pass]
        noise = H.add_noise(slice(*inputs.subject_range), inputs.noise.repeat(len(chunk), 1, 1))
        hooks = [noise]
        for c, (t, cell_plan) in enumerate(chunk):
            hooks += restore_hooks(t, cell_plan, clean, corrupted, slice(c * S, (c + 1) * S))
        with H.hooked(inputs.model, hooks):
            logits = inputs.model.logits(inputs.batch(len(chunk) * S), last)
        p = logits[:, -1].softmax(-1)[:, inputs.target_id]
        out[i : i + len(chunk)] = rearrange(p, "(cell s) -> cell s", s=S).mean(1)
        bar.update(len(chunk))
    bar.close()
    return out, float(low.mean()), inputs


def grid_jobs(
    inputs: TraceInputs, kinds: Sequence[str], window: int, sever: str | None, cells
) -> list[tuple[str, int, int, Plan]]:
    """Every ``(kind, token, layer, plan)`` to compute."""
    L = inputs.n_layers
    return [(k, t, layer, plan(k, layer, window, L, sever)) for k in kinds for t, layer in cells]


def fill_grids(inputs: TraceInputs, kinds, jobs, scores: Tensor) -> dict[str, Tensor]:
    """Scatter per-job scores into NaN-initialised ``[n_tokens, n_layers]`` grids."""
    grids = {k: torch.full((inputs.n_tokens, inputs.n_layers), float("nan")) for k in kinds}
    for (kind, t, layer, _), score in zip(jobs, scores.tolist()):
        grids[kind][t, layer] = score
    return grids


def run(inputs: TraceInputs, kinds, *, window, sever, cells, progress, cells_per_pass=1,
        last_logits=False) -> Traced:
    """``method="reference"``: one forward pass per cell (see :func:`hooked_grid` for the
    other options)."""
    jobs = grid_jobs(inputs, kinds, window, sever, cells)
    scores, low, inputs = hooked_grid(inputs, [(t, p) for _, t, _, p in jobs], cells_per_pass,
                                      progress, last_logits)
    return Traced(fill_grids(inputs, kinds, jobs, scores), low, inputs)
