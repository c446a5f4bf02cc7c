"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023).

One update for a batch of facts, spread over a contiguous range of MLP layers ``l₁ < … < l_L``:

1. **targets**: for each fact, the residual stream z after the top layer l_L at the subject's
   last token of the prompt when that layer's MLP writes m + δ instead of m, where δ is
   optimised as ROME's v* is (:mod:`~interp_edit.editing.vstar`: added to what the top
   layer's MLP output matrix writes), all facts of the batch together. Where the MLP output is
   added to the residual stream as it is, z = h + δ; through a post-norm N (Gemma 2/3,
   OLMo-2), z = h + N(m + δ) − N(m) (:func:`resid_change`);
2. **spread**: for each layer l of the range, bottom up, on the weights as edited so far: the
   batch's keys K_l (k* of each fact at l, :mod:`~interp_edit.editing.keys`), the residual
   R = (z − h_now) / (layers left, l included), taken back through l's post-norm where it has
   one (:func:`written_change`), and the update ΔW_l = R K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹
   (:func:`~interp_edit.editing.update.memit_update`, C_l the cached key statistics ROME uses).
   Each layer writes its share; later layers see its effect in h_now, so the top layer writes
   what is left.

With one layer, one fact and λ = 0 this is ROME's update (the same k*, v* and C). AlphaEdit
(:mod:`~interp_edit.editing.alphaedit`) is this procedure with another per-layer update.
``layers="auto"`` takes the range from the tracing module's locate step
(:func:`~interp_edit.tracing.locate.locate`: the ``auto_span`` contiguous MLP layers with the
largest summed indirect effect at the last subject token, over the batch's first
``auto_facts`` facts) and records the range, why, and the effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from interp_edit import _validate
from interp_edit.arch import adapter
from interp_edit.editing.base import (
    AppliedEdit,
    EditRequest,
    Laps,
    get_parameter,
    parameter_name,
    register_editor,
)
from interp_edit.editing.keys import (ROWS_PER_PASS, FactBatch, at_subject_last, context_batch,
                                      context_templates)
from interp_edit.editing.stats import GENERATED, second_moments
from interp_edit.editing.update import memit_update
from interp_edit.editing.vstar import VOptions, optimise_in_groups
from interp_edit.errors import InterpEditError
from interp_edit.models import Model, mlp_key_hook, mlp_write_hook, resid_hook
from interp_edit.tracing.locate import locate, search_layers

# one layer's update: (layer, R [d_model, n], K [d_mlp, n], C [d_mlp, d_mlp]) -> ΔW
LayerUpdate = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class MEMITHparams:
    """MEMIT's settings. The defaults work on the default model (SmolLM2-135M)."""

    layers: tuple[int, ...] | str = (3, 4, 5, 6, 7)  # a contiguous range, or "auto"
    auto_span: int = 5  # "auto": the span of layers with the largest summed MLP effect ...
    auto_search: tuple[float, float] = (0.0, 0.5)  # ... inside this fraction of the depth,
    auto_facts: int = 16  # ... traced over the batch's first this many facts
    trace_samples: int = 3  # noise samples of the locating trace
    trace_window: int | None = None  # MLP layers restored together (None: locate's default)
    mom2_update_weight: float = 1500.0  # λ: weight of the preserved keys (C) against the batch
    n_prefixes: int = 5  # context prefixes sampled from the model for k* and v*
    prefix_len: int = 10  # tokens per prefix
    seed: int = 0  # seeds the prefixes and the generated corpus
    v_lr: float = 0.5  # Adam learning rate of δ
    v_steps: int = 25  # at most this many steps ...
    v_nll_stop: float = 0.05  # ... or until the fact's mean NLL of the new target is below
    v_weight_decay: float = 0.5  # × ‖δ‖ / ‖v0‖²
    kl_factor: float = 0.0625  # × KL(edited ‖ original) on "{subject} is a"
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ this × ‖W k*‖ at the top layer
    v_batch: int = 32  # facts optimised together in one pass (bounds memory)
    corpus: str = GENERATED  # key statistics: a text file, "generated", or a HF dataset name
    stats_tokens: int = 100_000  # tokens of the corpus used for C
    mom2_ridge: float = 1e-4  # C + ridge · mean(diag C) · I
    precision: str = "bf16"  # "bf16": autocast the v* passes and the statistics pass; "fp32"

    def __post_init__(self) -> None:
        if self.layers != "auto":
            if isinstance(self.layers, int) or not self.layers:
                raise InterpEditError(
                    f"layers must be 'auto' or a non-empty tuple of layers, not {self.layers!r}")
            layers = tuple(_validate.integer("MEMITHparams.layers entry", x, 0)
                           for x in _validate.items("MEMITHparams.layers", self.layers))
            if list(layers) != list(range(layers[0], layers[0] + len(layers))):
                raise InterpEditError(f"layers {layers} must be a contiguous ascending range")
            object.__setattr__(self, "layers", layers)
        auto_search = _validate.items("MEMITHparams.auto_search", self.auto_search)
        for x in auto_search:
            _validate.number("auto_search (fractions of the depth)", x, 0.0, 1.0)
        object.__setattr__(self, "auto_search", tuple(auto_search))
        search_layers(2, self.auto_search)  # raises unless 0 <= start < stop <= 1
        _validate.fields(self, counts=("v_steps", "stats_tokens", "v_batch", "auto_span",
                                       "auto_facts", "prefix_len"),
                         positive=("v_lr", "clamp_norm_factor"),
                         nonnegative=("v_weight_decay", "kl_factor", "mom2_ridge", "v_nll_stop",
                                      "mom2_update_weight"),
                         seeds=("seed",))
        object.__setattr__(self, "trace_samples", _validate.count(
            "MEMITHparams.trace_samples", self.trace_samples, 1, _validate.MAX_SAMPLES))
        object.__setattr__(self, "n_prefixes", _validate.count("MEMITHparams.n_prefixes",
                                                               self.n_prefixes, 0))
        if self.trace_window is not None:
            _validate.fields(self, counts=("trace_window",))
        _validate.choice("precision", self.precision, ("bf16", "fp32"))
        _validate.text("MEMITHparams.corpus", self.corpus)


@register_editor("memit", MEMITHparams)
def apply_memit(model: Model, requests: Sequence[EditRequest], hp: MEMITHparams) -> AppliedEdit:
    def update(layer: int, resid: Tensor, keys: Tensor, mom2: Tensor) -> Tensor:
        return memit_update(resid, keys, mom2, weight=hp.mom2_update_weight, ridge=hp.mom2_ridge)

    return mass_edit(model, requests, hp, "memit", update)


def check_batch(requests: Sequence[EditRequest]) -> None:
    """Raise if one fact (template and subject) appears twice: with two targets the batch asks
    one key for two values."""
    seen: dict[tuple[str, str], str] = {}
    for r in requests:
        key = (r.template, r.subject)
        if key in seen:
            what = ("conflicting targets " f"{seen[key]!r} and {r.target_new!r}"
                    if seen[key] != r.target_new else f"the target {r.target_new!r} twice")
            raise InterpEditError(
                f"the batch asks {r.template.format(r.subject)!r} for {what}: one request per "
                "fact (subject and prompt) in a batch")
        seen[key] = r.target_new


def choose_layers(model: Model, requests: Sequence[EditRequest],
                  hp: MEMITHparams) -> tuple[tuple[int, ...], str, dict | None]:
    """The layer range, why, and the locate step's details (``layers="auto"``)."""
    if hp.layers != "auto":
        bad = [x for x in hp.layers if x >= model.n_layers]
        if bad:
            raise InterpEditError(
                f"layers {hp.layers} are outside the {model.n_layers}-layer model {model.name!r}"
                f" (layers {bad}): use indices 0..{model.n_layers - 1}")
        return hp.layers, f"given (layers={list(hp.layers)})", None
    lo, hi = search_layers(model.n_layers, hp.auto_search)
    if hp.auto_span > hi - lo:
        raise InterpEditError(f"auto_span={hp.auto_span} is wider than the {hi - lo} layers "
                              f"that auto_search={hp.auto_search} searches on {model.name!r}")
    traced = list(requests[: hp.auto_facts])
    loc = locate(model, traced, kind="mlp", span=hp.auto_span, search=hp.auto_search,
                 window=hp.trace_window, samples=hp.trace_samples, seed=hp.seed + 1)
    why = f"{loc.reason} (traced: the first {len(traced)} of the {len(requests)} facts)"
    return tuple(loc.layers), why, loc.to_dict()


def mass_edit(model: Model, requests: Sequence[EditRequest], hp: MEMITHparams, method: str,
              layer_update: LayerUpdate) -> AppliedEdit:
    """MEMIT's procedure (module docstring) with ``layer_update`` as each layer's closed form."""
    check_batch(requests)
    clock = Laps()
    layers, why, located = choose_layers(model, requests, hp)
    clock("locate")
    contexts = context_templates(model, hp.n_prefixes, hp.prefix_len, seed=hp.seed)
    mom2s = second_moments(model, layers, hp.corpus, hp.stats_tokens, seed=hp.seed,
                           precision=hp.precision)
    clock("stats")
    top = layers[-1]
    ad = adapter(model)
    norms = {layer: ad.mlp_post_norm(layer) for layer in layers}
    batch = context_batch(model, [(r.template, r.subject) for r in requests], contexts)
    k_top, m_top, h_top = keys_and_outputs(model, top, top, batch, len(contexts))
    v0 = k_top @ ad.mlp_out_matrix(top).detach().T  # [n, d_model] W k* at the top
    facts = [(r.template, r.subject, r.target_new) for r in requests]
    delta, v_info = optimise_in_groups(model, top, facts, v0, contexts, VOptions.of(hp),
                                       hp.v_batch)
    target = h_top + resid_change(norms[top], m_top, delta)  # z: [n, d_model]
    clock("v")
    originals: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    written: dict[str, Tensor] = {}
    resid_norms = []
    try:
        for i, layer in enumerate(layers):
            keys, m_now, h = keys_and_outputs(model, layer, top, batch, len(contexts))
            resid = (target - h) / (len(layers) - i)  # this layer's share of what is left
            resid_norms.append(round(float(resid.norm(dim=1).mean()), 4))
            change = written_change(norms[layer], m_now, resid)  # in the matrix's output
            weight = model.mlp_out_proj(layer).weight
            name = parameter_name(model, model.mlp_out_proj(layer))
            dw = ad.to_parameter(layer, layer_update(layer, change.T, keys.T, mom2s[layer]))
            dw = dw.to(weight.dtype)  # [d_model, d_mlp] in the parameter's own orientation
            originals[name] = weight.detach().clone()
            with torch.no_grad():
                weight.add_(dw)  # the next layer's keys and residual see this update
            deltas[name], written[name] = dw, keys
        clock("update")
        h_end = keys_and_outputs(model, top, top, batch, len(contexts))[2]
        reached = 1 - (target - h_end).norm() / (target - h_top).norm().clamp(min=1e-12)
    finally:
        with torch.no_grad():
            for name, orig in originals.items():
                get_parameter(model, name).copy_(orig)
    info = {"layers": list(layers), "why": why, "locate": located, "n_facts": len(requests),
            "target_reached": round(float(reached), 4), "resid_norm": resid_norms,
            "v_steps": round(sum(x["steps"] for x in v_info) / len(v_info), 2),
            "v": v_info, "timings": clock.laps}
    return AppliedEdit.from_deltas(model, method, requests, hp, deltas, info=info, owned=True,
                                   keys=written)


@torch.no_grad()
def keys_and_outputs(
    model: Model, layer: int, top: int, batch: FactBatch, n_contexts: int
) -> tuple[Float[Tensor, "n_facts d_mlp"], Float[Tensor, "n_facts d_model"],
           Float[Tensor, "n_facts d_model"]]:
    """In one pass over :func:`~interp_edit.editing.keys.context_batch`'s rows, for each fact:
    its k* at ``layer`` (mean over its contexts), and at the subject's last token of its prompt
    alone (context 0) what ``layer``'s MLP output matrix writes and the residual stream after
    ``top``."""
    names = (mlp_key_hook(layer), mlp_write_hook(layer), resid_hook(top))
    rows_per_pass = max(1, ROWS_PER_PASS // n_contexts) * n_contexts  # whole facts per pass
    keys, written, resid = (
        rearrange(act.float(), "(f c) d -> f c d", c=n_contexts)
        for act in at_subject_last(model, names, batch, max(layer, top) + 1, rows_per_pass))
    return keys.mean(1), written[:, 0], resid[:, 0]


def resid_change(norm: torch.nn.Module | None, written: Float[Tensor, "n d_model"],
                 delta: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """How the residual stream moves when a layer's MLP output matrix writes
    ``written + delta`` instead of ``written``: ``delta`` where the MLP output is added as it
    is, N(written + delta) − N(written) through the layer's post-norm N."""
    if norm is None:
        return delta
    with torch.no_grad():
        return (norm(written + delta) - norm(written)).float()


def written_change(norm: torch.nn.Module | None, written: Float[Tensor, "n d_model"],
                   resid: Float[Tensor, "n d_model"], steps: int = 8,
                   damping: float = 1e-2) -> Float[Tensor, "n d_model"]:
    """The change of what a layer's MLP output matrix writes that moves the residual stream by
    ``resid``: the inverse of :func:`resid_change`.

    Without a post-norm it is ``resid``. Through an RMS norm N(x) = g ⊙ x / rms(x) the wanted
    output is y = N(m) + r. N is scale-free, N(c·x) = N(x) for c > 0, so each step writes the
    wanted output in gain units, u = N(x) ⊘ g + (y − N(x)) ⊘ g, and takes the copy c·u nearest
    m (c = u·m / u·u: the weights change least), but no shorter than ‖m‖ / 2: v* may turn the
    output far from m (δ up to 4 ‖W k*‖), where the nearest copy shrinks towards 0 and the
    norm's ε breaks its scale-freedom. One step is exact when rms(u) = 1 and every
    gain is large; the division is damped (g / (g² + (damping · rms g)²)), since real post-norms
    have gains ≈ 0 (Gemma-3-270M) whose coordinates cannot carry the residual, and ``steps``
    repeats take up what the damping and the rms left (Gauss-Newton on ‖N(x) − y‖). A
    coordinate of gain ≈ 0 keeps its relative value, and with it its share of the rms, so
    there the match is close but not exact (``tests/unit/test_memit.py``). Raises
    :class:`InterpEditError` if N is not an RMS norm (its output not a per-row multiple of
    g ⊙ m)."""
    if norm is None:
        return resid
    with torch.no_grad():
        m = written.float()
        gain = norm(torch.ones_like(m[:1])).float()[0]  # g, up to a factor that c absorbs
        inverse = gain / (gain.square() + (damping * gain.square().mean().sqrt()).square())
        want = norm(m).float() + resid.float()
        x = m
        for step in range(steps):
            out = norm(x).float()
            gx = gain * x
            a = (out * gx).sum(-1, keepdim=True) / (gx * gx).sum(-1, keepdim=True).clamp(
                min=1e-30)  # N(x) = a · g ⊙ x
            if step == 0 and (out - a * gx).norm() > 1e-3 * out.norm():
                raise InterpEditError(
                    f"the post-norm {type(norm).__name__} is not an RMS norm (its output is "
                    "not a per-row multiple of gain × input): the residual cannot be taken "
                    "back through it")
            u = a * x + (want - out) * inverse
            uu = (u * u).sum(-1, keepdim=True).clamp(min=1e-30)
            nearest = (u * m).sum(-1, keepdim=True) / uu
            x = torch.maximum(nearest, 0.5 * m.norm(dim=-1, keepdim=True) / uu.sqrt()) * u
        return x - m
