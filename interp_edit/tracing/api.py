"""``trace`` and ``trace_all``: check the inputs, pick a method, wrap the grid in a result."""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit import _validate
from interp_edit.models import Model
from interp_edit.tracing.inputs import (
    check_cells, check_fact, check_options, prepare, screen_precision, select_cells)
from interp_edit.tracing.results import KINDS, TraceResult, TraceSet

# method -> module with ``run(inputs, kinds, *, window, sever, cells, progress) -> Traced``
# (attribution also takes ``precision`` and ``estimate``)
_METHOD_MODULES = {
    "fast": "interp_edit.tracing.engine",
    "reference": "interp_edit.tracing.reference",
    "attribution": "interp_edit.tracing.attribution",
}


def trace(
    model: Model,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    kind: str = "resid",
    window: int = 10,
    samples: int = 10,
    noise: str | float | Float[Tensor, "samples subject_len d_model"] = "s3",
    seed: int = 1,
    method: str = "fast",
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    sever: str | None = None,
    precision: str = "auto",
    estimate: str = "logodds",
    progress: bool | None = None,
) -> TraceResult | TraceSet:
    """Causal trace of one fact (Meng et al. 2022): corrupt the subject's token embeddings
    with Gaussian noise, restore one (token, layer) cell at a time to its clean value, and
    record p(target) at the last position, averaged over the noise samples.

    Args:
        target: the answer to score (its first token, leading space added when missing);
            ``None`` means the model's own clean top-1 token.
        kind: ``"resid"`` (block outputs), ``"mlp"`` or ``"attn"`` (windows of ``window``
            layers' outputs), or ``"all"`` for a :class:`TraceSet` of the three, sharing
            the clean and corrupted runs.
        noise: ``"sK"`` (K x the std of subject-token embeddings over a built-in reference
            list, see :mod:`interp_edit.tracing.noise`), a float std, or a tensor
            ``[samples, subject_len, d_model]`` used as given. Seeded by ``seed``. The result's
            ``noise_source`` says which list (``trace_dataset``'s ``"sK"`` measures the std
            over the dataset's own subjects instead, as ROME does, and records that).
        method: ``"fast"`` (exact), ``"reference"`` (exact, one forward pass per cell; the
            yardstick) or ``"attribution"`` (a first-order gradient estimate for screening).
        positions, layers: compute only these tokens/layers; other cells hold NaN.
        sever: ``"mlp"`` or ``"attn"`` (kind ``"resid"`` only): also freeze that output of
            every later layer at the restored token at its corrupted value.
        precision: the matrix multiplies of ``method="attribution"``, forward and backward:
            ``"auto"`` (default: bf16 where the hardware multiplies it natively, as AMX /
            AVX-512 BF16 CPUs and CUDA do, else the model's dtype), ``"bfloat16"``, or
            ``"model"`` (the model's dtype, fp32 for the default model: a grid that does not
            depend on the CPU it ran on). In bf16 the screen runs ~2x faster on such a CPU and
            its grid, ``low_score`` and ``high_score`` included, moves by rounding (Pearson r
            >= 0.998 with the fp32 grid on the benchmark fact; README); the default target is
            its clean row's top-1, the exact methods' except where two logits tie within
            rounding. The exact methods always run in the model's dtype: they ignore
            ``"auto"`` and refuse ``"bfloat16"``. The result's ``precision`` records what ran.
            The bf16 copies of the weights (two per matrix: as is and transposed, for the
            backward pass; ~540 MB on the default model) are made on first use and kept while
            the model lives.
        estimate: how ``method="attribution"`` turns its gradients into scores:
            ``"logodds"`` (default: first order in each noise sample's log-odds of the
            target, ``mean_s sigmoid(o_s + d_s / (1 - p_s))``; closer to the exact grid, and a
            probability) or
            ``"prob"`` (first order in p(target), ``low_score + mean_s p_s d_s``: attribution
            patching with the probability as the metric). See
            :mod:`interp_edit.tracing.attribution`. The result's ``estimate`` records it
            (None for the exact methods, which refuse ``"prob"``).
        progress: show a progress bar (``None``: on a terminal, for runs longer than 3 s).
    """
    _validate.instance("model", model, Model)
    kinds = KINDS if kind == "all" else (kind,)
    check_options(kinds, method, window, sever, precision, estimate)
    check_fact(prompt, subject, target, samples, seed)  # every argument before any pass
    check_cells(model, prompt, positions, layers)
    ran = screen_precision(model, method, precision)
    dtype = torch.bfloat16 if ran == "bfloat16" else None
    module = importlib.import_module(_METHOD_MODULES[method])
    # only the fast engine reads prepare's cached clean run; the others run the clean prompt
    # within their own passes (see prepare)
    inputs = prepare(model, prompt, subject, target, samples, noise, seed,
                     clean_pass=method == "fast")
    cells = select_cells(inputs, positions, layers)
    screen = method == "attribution"
    options = {"precision": dtype, "estimate": estimate} if screen else {}
    grids, low, inputs = module.run(inputs, kinds, window=window, sever=sever, cells=cells,
                                    progress=progress, **options)
    results = {
        k: TraceResult(
            scores=grids[k], low_score=float(low), high_score=inputs.high_score,
            prompt=prompt, subject=subject, tokens=model.to_str_tokens(inputs.ids),
            token_ids=inputs.ids.tolist(), subject_range=inputs.subject_range,
            target=inputs.target, target_id=inputs.target_id, kind=k, window=int(window),
            noise_std=inputs.noise_std, noise_source=inputs.noise_source, samples=samples,
            seed=inputs.seed, model_name=model.name, method=method, sever=sever,
            precision=ran, estimate=estimate if screen else None,
        )  # fmt: skip
        for k in kinds
    }
    return TraceSet(**results) if kind == "all" else results[kind]


def trace_all(model: Model, prompt: str, subject: str, **kwargs) -> TraceSet:
    """The hidden-state, MLP and attention traces of one fact (``trace(..., kind="all")``)."""
    return trace(model, prompt, subject, kind="all", **kwargs)
