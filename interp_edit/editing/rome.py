"""ROME: Rank-One Model Editing (Meng et al. 2022), with consistent keys.

An MLP output projection W (``model.mlp_out_proj(layer)``, seen as ``[d_model, d_mlp]``
whatever its storage: :meth:`interp_edit.arch.Adapter.mlp_out_matrix`; GPT-2's Conv1D stores
it transposed) is read as a linear associative memory: the key k at the subject's last token maps to a value W k that
carries the subject's attributes. One edit:

1. **locate**: ``layer="auto"`` asks :func:`interp_edit.tracing.locate` for the layer with the
   largest MLP indirect effect at the subject's last token, within ``auto_search`` (a fraction
   of the depth); ``layer=int`` overrides;
2. **k\\***: the mean key at the subject's last token over the prompt and sampled context
   prefixes (:mod:`interp_edit.editing.keys`);
3. **v\\***: W k* + δ, with δ optimised through the hook layer (added to the MLP output at the
   subject's last token of every prompt) to make the new target likely after every prefix,
   with a KL term keeping "{subject} is a" unchanged, weight decay and a norm clamp;
4. **update**: ΔW = (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*), so W' k* = v* exactly and keys
   typical of ordinary text (C, :mod:`interp_edit.editing.stats`) move as little as possible.

The *same* k* enters every term of the update. The original implementation used the prefixed
mean in C⁻¹k* but the unprefixed key in the residual, which breaks W' k* = v* and makes
sequential edits collapse the model (kmeng01/rome PR #44; Gupta et al. 2024, "Rebuilding
ROME"). Several requests in one call are applied one after another (each with its own layer,
k* and v*) and returned as one :class:`AppliedEdit`.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit import _validate
from interp_edit._cache import tensors_digest
from interp_edit.arch import adapter
from interp_edit.editing.base import (
    AppliedEdit,
    EditRequest,
    Laps,
    get_parameter,
    parameter_name,
    register_editor,
)
from interp_edit.editing.keys import context_templates, key_star
from interp_edit.editing.stats import GENERATED, corpus_identity, second_moment
from interp_edit.editing.update import memit_update
from interp_edit.editing.vstar import VOptions, optimise_deltas
from interp_edit.errors import InterpEditError
from interp_edit.models import Model
from interp_edit.tracing.locate import locate, search_layers


@dataclass(frozen=True)
class ROMEHparams:
    """ROME's settings. Layer defaults are fractions of the depth, not layer numbers."""

    layer: int | str = "auto"  # "auto": where the fact is recalled (tracing.locate); or an index
    auto_search: tuple[float, float] = (0.0, 0.5)  # "auto" searches this fraction of the depth
    # "auto" takes this fraction of the depth (an early layer, where edits work best: README's
    # localization study) when no MLP effect in the search reaches min_effect
    auto_fallback: float = 0.07
    min_effect: float = 0.02  # smallest indirect effect that counts as located
    trace_method: str = "fast"  # "fast" (exact) | "attribution" (gradient estimate)
    trace_samples: int = 3  # noise samples of the locating trace
    trace_window: int | None = None  # MLP layers restored together (None: locate's default)
    n_prefixes: int = 5  # context prefixes sampled from the model for k* and v*
    prefix_len: int = 10  # tokens per prefix
    seed: int = 0  # seeds the prefixes and the generated corpus
    v_lr: float = 1.0  # Adam learning rate of δ
    v_steps: int = 20  # at most this many steps ...
    v_nll_stop: float = 0.05  # ... or until the mean NLL of the new target falls below this
    v_weight_decay: float = 0.5  # × ‖δ‖ / ‖W k*‖²
    kl_factor: float = 0.0625  # × KL(edited ‖ original) on "{subject} is a"
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ this × ‖W k*‖
    corpus: str = GENERATED  # key statistics: a text file, "generated", or a HF dataset name
    stats_tokens: int = 100_000  # tokens of the corpus used for C
    mom2_ridge: float = 1e-4  # C + ridge · mean(diag C) · I, for a well-posed C⁻¹k*
    precision: str = "bf16"  # "bf16": autocast the v* passes and the statistics pass; "fp32"

    def __post_init__(self) -> None:
        if self.layer != "auto":
            if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or (
                    self.layer < 0):
                raise InterpEditError(f"layer must be 'auto' or a layer index, not "
                                      f"{self.layer!r}")
            object.__setattr__(self, "layer", int(self.layer))
        _validate.choice("trace_method", self.trace_method, ("fast", "reference", "attribution"))
        _validate.choice("precision", self.precision, ("bf16", "fp32"))
        _validate.text("ROMEHparams.corpus", self.corpus)
        _validate.fields(self, counts=("v_steps", "stats_tokens", "prefix_len"),
                         positive=("v_lr", "clamp_norm_factor"),
                         nonnegative=("v_weight_decay", "kl_factor", "mom2_ridge", "v_nll_stop"),
                         seeds=("seed",))
        object.__setattr__(self, "trace_samples", _validate.count(
            "ROMEHparams.trace_samples", self.trace_samples, 1, _validate.MAX_SAMPLES))
        object.__setattr__(self, "n_prefixes", _validate.count("ROMEHparams.n_prefixes",
                                                               self.n_prefixes, 0))
        _validate.number("min_effect", self.min_effect)
        if self.trace_window is not None:
            _validate.fields(self, counts=("trace_window",))
        if isinstance(self.auto_search, (str, bytes)) or len(self.auto_search) != 2:
            raise InterpEditError(f"auto_search={self.auto_search!r}: give (start, stop) "
                                  "fractions of the depth, e.g. (0.0, 0.5)")
        for x in self.auto_search:
            _validate.number("auto_search (fractions of the depth)", x, 0.0, 1.0)
        object.__setattr__(self, "auto_search", tuple(self.auto_search))
        search_layers(2, self.auto_search)  # raises unless 0 <= start < stop <= 1
        _validate.number("auto_fallback (a fraction of the depth)", self.auto_fallback, 0.0, 1.0)

    def check_model(self, model: Model) -> None:
        """The layers asked for exist in ``model`` (checked before any work of an edit)."""
        if self.layer != "auto":
            _validate.index("ROMEHparams.layer", self.layer, model.n_layers)
        corpus_identity(self.corpus, self.seed)  # a missing text file fails here, not later


@dataclass(frozen=True)
class RomeStep:
    """One request's edit, computed on the current weights (not applied)."""

    layer: int
    parameter: str  # Hugging Face state-dict name of the edited weight
    k: Float[Tensor, "d_mlp"]  # k*: mean key at the subject's last token
    v: Float[Tensor, "d_model"]  # v*: the value W' k* must produce
    delta: Float[Tensor, "d_model d_mlp"]  # ΔW, rank one, as [d_model, d_mlp]
    update: Tensor  # ΔW in the parameter's own orientation (what is added to it)
    info: dict  # why this layer, the locating trace, the v* losses, seconds per phase


@register_editor("rome", ROMEHparams)
def apply_rome(model: Model, requests: Sequence[EditRequest], hp: ROMEHparams) -> AppliedEdit:
    """Apply ``requests`` one after another; the returned edit holds their summed deltas."""
    contexts = context_templates(model, hp.n_prefixes, hp.prefix_len, seed=hp.seed)
    originals: dict[str, Tensor] = {}
    total: dict[str, Tensor] = {}
    written: dict[str, list[Tensor]] = {}  # parameter -> the k* of each request edited there
    infos = []
    marks = contextlib.ExitStack()
    try:
        for i, req in enumerate(requests):
            step = rome_step(model, req, hp, contexts)
            weight = model.mlp_out_proj(step.layer).weight
            originals.setdefault(step.parameter, weight.detach().clone())
            with torch.no_grad():
                weight.add_(step.update)  # the next request sees this one
            if i + 1 < len(requests):  # and caches see it too (Model.weights_key)
                marks.enter_context(model.weights_changed(
                    tensors_digest({step.parameter: step.update})))
            prev = total.get(step.parameter)
            total[step.parameter] = step.update if prev is None else prev + step.update
            written.setdefault(step.parameter, []).append(step.k)
            infos.append(step.info)
    finally:
        marks.close()
        with torch.no_grad():
            for name, orig in originals.items():
                get_parameter(model, name).copy_(orig)
    one = len(infos) == 1
    summary = {
        "layer": infos[0]["layer"] if one else [i["layer"] for i in infos],
        "why": infos[0]["why"] if one else [i["why"] for i in infos],
        "timings": {k: round(sum(i["seconds"][k] for i in infos), 3) for k in infos[0]["seconds"]},
        "edits": infos,
    }
    keys = {name: torch.stack(ks) for name, ks in written.items()}
    return AppliedEdit.from_deltas(model, "rome", requests, hp, total, info=summary, keys=keys)


def rome_step(model: Model, req: EditRequest, hp: ROMEHparams, contexts: Sequence[str]) -> RomeStep:
    """One request on the current weights: the layer, k*, v* and ΔW."""
    clock = Laps()
    layer, why, trace = choose_layer(model, req, hp)
    clock("locate")
    proj = model.mlp_out_proj(layer)
    mom2 = second_moment(model, layer, hp.corpus, hp.stats_tokens, seed=hp.seed,
                         precision=hp.precision)
    clock("stats")
    k = key_star(model, layer, req.template, req.subject, contexts)
    clock("k")
    ad = adapter(model)
    w = ad.mlp_out_matrix(layer).detach()  # [d_model, d_mlp], whatever the storage
    v, losses = compute_v(model, layer, req, w @ k, contexts, hp)
    clock("v")
    delta = rank_one_update(w, k, v, mom2, ridge=hp.mom2_ridge)
    clock("update")
    info = {"layer": layer, "why": why, "trace": trace, "v": losses, "seconds": clock.laps}
    return RomeStep(layer, parameter_name(model, proj), k, v, delta,
                    ad.to_parameter(layer, delta), info)


def choose_layer(model: Model, req: EditRequest, hp: ROMEHparams) -> tuple[int, str, dict | None]:
    """The edit layer, the reason in words, and the location that decided it
    (:func:`interp_edit.tracing.locate`: the MLP trace of the request's true answer)."""
    if hp.layer != "auto":
        model._check_layer(hp.layer)
        return hp.layer, f"given (layer={hp.layer})", None
    loc = locate(model, req, kind="mlp", search=hp.auto_search, window=hp.trace_window,
                 samples=hp.trace_samples, seed=hp.seed + 1, method=hp.trace_method)
    layer, why = loc.layer, loc.reason
    if float(loc.effects[layer]) < hp.min_effect:
        layer = round(hp.auto_fallback * (model.n_layers - 1))
        why = (f"no MLP indirect effect reaches min_effect {hp.min_effect} ({why}): fallback "
               f"layer {layer} (auto_fallback {hp.auto_fallback} of the depth)")
    return layer, why, loc.to_dict()


def compute_v(
    model: Model,
    layer: int,
    req: EditRequest,
    v0: Float[Tensor, "d_model"],
    contexts: Sequence[str],
    hp: ROMEHparams,
) -> tuple[Float[Tensor, "d_model"], dict]:
    """v* = v0 + δ: the one-fact case of :func:`~interp_edit.editing.vstar.optimise_deltas`."""
    delta, losses = optimise_deltas(model, layer, [(req.template, req.subject, req.target_new)],
                                    v0[None], contexts, VOptions.of(hp))
    return (v0 + delta[0]).detach(), losses[0]


def rank_one_update(
    w: Float[Tensor, "d_model d_mlp"],
    k: Float[Tensor, "d_mlp"],
    v: Float[Tensor, "d_model"],
    mom2: Float[Tensor, "d_mlp d_mlp"],
    *,
    ridge: float = 0.0,
) -> Float[Tensor, "d_model d_mlp"]:
    """ΔW = (v − W k)(C⁻¹k)ᵀ / (kᵀC⁻¹k), so (W + ΔW) k = v: MEMIT's update for one key with
    no weight on the preserved keys (:func:`~interp_edit.editing.update.memit_update`)."""
    resid = (v.double() - w.double() @ k.double())[:, None]
    return memit_update(resid, k[:, None], mom2, ridge=ridge).to(w.dtype)
