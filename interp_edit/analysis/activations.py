"""What an edit does inside the model: activations before and after an edit, compared.

    diff = ie.compare_activations(model, edit, probe_prompts(request, paraphrase=...,
                                                            neighborhood=..., unrelated=...))
    diff.curve("resid")            # [prompt, layer]: ||h_after - h_before|| / ||h_before||
    diff.lens_after[..., 1]        # [prompt, layer]: logit-lens p(target_new) after the edit
    diff.plot("curves"); diff.save("eiffel_rome.npz"); ActivationDiff.load("eiffel_rome.npz")

**Edit state.** Weight edits are toggled with the edit's own bit-exact ``undo``/``apply``:
an applied edit is run, undone, run again and re-applied; an edit that is not applied is run
unedited, applied, run again and undone. Either way the model is in the caller's state on
return (also when a run raises). In-context edits (IKE) change no weight: the "after" run has
``edit.context`` prepended.

**Alignment for in-context edits.** The after run is the context's tokens followed by the
prompt's own tokens, so the prompt's tokens are exactly the last ``n`` of the wrapped
sequence; every per-token quantity compares those aligned final tokens (a BOS token, if the
model adds one, is left out of the comparison). ``diff.context`` records the context, and the
figures say that the comparison is aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Sequence, TypeVar

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from interp_edit import _validate
from interp_edit.analysis._npz import NpzDataclass
from interp_edit.analysis.logit_lens import target_lens
from interp_edit.editing.base import AppliedEdit, EditRequest
from interp_edit.errors import InterpEditError
from interp_edit.hooks import capture, hooked
from interp_edit.models import Model, attn_out_hook, mlp_out_hook, resid_hook

PROMPT_KINDS = ("edit", "paraphrase", "neighborhood", "unrelated")
UNRELATED_PROMPT = "The chemical symbol for gold is"
# metric name -> the field holding its ||change||
METRICS = {"resid": "resid_change", "mlp": "mlp_change", "attn": "attn_change"}
_SITES = {"resid": resid_hook, "mlp": mlp_out_hook, "attn": attn_out_hook}
_FORMAT = "interp_edit.ActivationDiff/1"
T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class ActivationDiff(NpzDataclass):
    """Per prompt, token and layer: how much the edit moved the residual stream (block
    outputs), the MLP outputs and the attention outputs; and the logit-lens probabilities of
    the old and new answer at the prompt's last token, before and after.

    Token axes are padded with NaN past each prompt's length (``len(tokens[i])``).
    """

    kinds: tuple[str, ...]  # one label per prompt: "edit", "paraphrase", ...
    prompts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]  # each prompt's own (aligned) tokens
    subject_ranges: tuple[tuple[int, int], ...]  # [start, end) of the subject; (0, 0): absent
    resid_change: Float[Tensor, "prompt pos layer"]  # ||h_after - h_before||
    resid_norm: Float[Tensor, "prompt pos layer"]  # ||h_before||
    resid_cos: Float[Tensor, "prompt pos layer"]  # cos(h_after, h_before)
    mlp_change: Float[Tensor, "prompt pos layer"]  # ||mlp_out_after - mlp_out_before||
    attn_change: Float[Tensor, "prompt pos layer"]  # ||attn_out_after - attn_out_before||
    lens_before: Float[Tensor, "prompt layer target"]  # targets = (target_true, target_new)
    lens_after: Float[Tensor, "prompt layer target"]
    targets: tuple[str, str]
    subject: str
    method: str
    edit_layers: tuple[int, ...]  # layers whose weights the edit changed (empty: in-context)
    context: str  # in-context edits: the text prepended in the after run
    model_name: str

    @property
    def n_layers(self) -> int:
        return int(self.resid_change.shape[-1])

    @property
    def in_context(self) -> bool:
        return bool(self.context)

    def index(self, kind: str) -> int:
        if kind not in self.kinds:
            raise InterpEditError(f"no prompt of kind {kind!r}; kinds: {self.kinds}")
        return self.kinds.index(kind)

    def relative(self, metric: str) -> Float[Tensor, "prompt pos layer"]:
        """``||change||`` of ``metric`` ("resid" | "mlp" | "attn") divided by the pre-edit
        residual norm at the same token and layer: a change comparable across layers."""
        if metric not in METRICS:
            raise InterpEditError(f"unknown metric {metric!r}: choose one of {tuple(METRICS)}")
        return getattr(self, METRICS[metric]) / self.resid_norm

    def curve(self, metric: str = "resid", position: str = "last") -> Float[Tensor, "prompt layer"]:
        """Relative change per layer at the last token (``position="last"``) or the largest
        over the prompt's tokens (``"max"``)."""
        rel = self.relative(metric)
        if position == "max":
            return torch.nan_to_num(rel, nan=-torch.inf).amax(dim=1)
        if position == "last":
            last = torch.tensor([len(t) - 1 for t in self.tokens])
            return rel[torch.arange(len(self.tokens)), last]
        raise InterpEditError(f"position must be 'last' or 'max', not {position!r}")

    _FORMAT: ClassVar[str] = _FORMAT
    _PLOTS: ClassVar[dict] = {
        "curves": lambda: _plots().plot_change_curves,
        "heatmap": lambda: _plots().plot_change_heatmap,
        "lens": lambda: _plots().plot_logit_lens,
    }

    def plot(self, what: str = "curves", **kw):
        """``"curves"`` | ``"heatmap"`` | ``"lens"``: see :mod:`interp_edit.plotting.edits`."""
        return super().plot(what, **kw)


def _plots():
    from interp_edit.plotting import edits  # matplotlib only when plotting

    return edits


def probe_prompts(
    request: EditRequest,
    *,
    paraphrase: str | None = None,
    neighborhood: str | None = None,
    unrelated: str | None = UNRELATED_PROMPT,
) -> dict[str, str]:
    """The four labelled prompts of the edit-effect figures (kinds you pass as None are left
    out): the edit prompt itself, a paraphrase naming the same subject, a neighbourhood prompt
    (same relation, another subject) and an unrelated prompt."""
    out = {"edit": request.text, "paraphrase": paraphrase, "neighborhood": neighborhood,
           "unrelated": unrelated}
    return {k: v for k, v in out.items() if v}


def before_after(model: Model, edit: AppliedEdit, run: Callable[[bool], T]) -> tuple[T, T]:
    """``(run(False), run(True))`` with the edit absent and present; the model is left in the
    state it was in (see the module docstring). ``run(after)`` receives which state it is in."""
    if edit.context or not edit.deltas:
        return run(False), run(True)
    if edit.applied:
        if edit.model is not model:
            raise InterpEditError("this edit is applied to another Model object than the one given")
        after = run(True)
        edit.undo()
        try:
            before = run(False)
        finally:
            edit.apply(model)
    else:
        before = run(False)
        edit.apply(model)
        try:
            after = run(True)
        finally:
            edit.undo()
    return before, after


@torch.no_grad()
def compare_activations(
    model: Model,
    edit: AppliedEdit,
    prompts: Mapping[str, str] | Sequence[str],
    *,
    targets: tuple[str, str] | None = None,
) -> ActivationDiff:
    """Capture block outputs, MLP outputs and attention outputs of every layer for each prompt
    before and after ``edit``, and the logit lens of ``targets`` (default: the first request's
    ``(target_true, target_new)``) at the last token. ``prompts``: ``{kind: text}`` (see
    :func:`probe_prompts`) or plain texts (labelled ``"prompt 0"``, ...)."""
    _validate.instance("model", model, Model)
    _validate.instance("edit", edit, AppliedEdit)
    kinds, texts = _labelled(prompts)
    req = edit.requests[0]
    if targets is None:
        if req.target_true is None:
            raise InterpEditError("the edit's request has no target_true: pass targets=(true, new)")
        targets = (req.target_true, req.target_new)
    target_ids = [model.target_ids(t)[0] for t in targets]
    own, ctx = _own_tokens(model, texts, edit.context)
    shift = 1 if edit.context and model.prepend_bos else 0
    spans = tuple(tuple(x - shift for x in model.subject_range(t, req.subject))
                  if req.subject in t else (0, 0) for t in texts)

    n = max(len(ids) for ids in own)
    last = torch.tensor([len(ids) - 1 for ids in own])
    pad = torch.arange(n)[None, :] > last[:, None]  # [prompt, pos]: past a prompt's end

    def run(after: bool) -> dict[str, Tensor]:
        seqs = [(ctx if after else []) + ids for ids in own]
        acts = _capture_all(model, seqs, start=len(ctx) if after else 0, width=n)
        out = {site: a.masked_fill(pad[:, :, None, None], torch.nan) for site, a in acts.items()}
        out["lens"] = target_lens(model, out["resid"][torch.arange(len(own)), last], target_ids)
        return out

    before, after = before_after(model, edit, run)
    d = {site: (after[site] - before[site]).norm(dim=-1) for site in _SITES}
    return ActivationDiff(
        kinds=kinds,
        prompts=texts,
        tokens=tuple(tuple(model.to_str_tokens(ids)) for ids in own),
        subject_ranges=spans,
        resid_change=d["resid"],
        resid_norm=before["resid"].norm(dim=-1),
        resid_cos=torch.nn.functional.cosine_similarity(after["resid"], before["resid"], dim=-1),
        mlp_change=d["mlp"],
        attn_change=d["attn"],
        lens_before=before["lens"],
        lens_after=after["lens"],
        targets=tuple(targets),
        subject=req.subject,
        method=edit.method,
        edit_layers=_edit_layers(model, edit),
        context=edit.context,
        model_name=model.name,
    )


def trace_edit(model: Model, edit: AppliedEdit, kind: str = "mlp", **trace_kw):
    """The causal trace of the edited fact before the edit (target: ``target_true``, or the
    model's own top-1 when the request has none) and after it (target: ``target_new``), as a
    pair of :class:`~interp_edit.tracing.TraceResult`: where does the old fact live, and
    where the new one? ``trace_kw`` go to ``ie.trace`` (``samples``, ``window``, ...)."""
    from interp_edit.tracing import trace

    if edit.context:
        raise InterpEditError(
            "trace_edit needs a weight edit: an in-context edit's prompt contains the subject in "
            "its demonstrations too, so corrupting 'the subject' is ambiguous"
        )
    req = edit.requests[0]

    def run(after: bool):
        target = req.target_new if after else req.target_true
        return trace(model, req.text, req.subject, target=target, kind=kind, **trace_kw)

    return before_after(model, edit, run)


def _labelled(
    prompts: Mapping[str, str] | Sequence[str],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    items = list(prompts.items()) if isinstance(prompts, Mapping) else [
        (f"prompt {i}", p) for i, p in enumerate(prompts)]
    if not items:
        raise InterpEditError("no prompts given: pass {kind: text} (see probe_prompts)")
    return tuple(k for k, _ in items), tuple(p for _, p in items)


def _own_tokens(
    model: Model, texts: Sequence[str], context: str
) -> tuple[list[list[int]], list[int]]:
    """Each prompt's token ids and the context's. With a context, a BOS token the model adds
    belongs to the context (it starts the wrapped sequence), not to the compared tokens."""
    own = [model.tokenize(t).tolist() for t in texts]
    if not context:
        return own, []
    bos = 1 if model.prepend_bos else 0
    return [ids[bos:] for ids in own], model.tokenize(context).tolist()


def _capture_all(
    model: Model, seqs: list[list[int]], *, start: int, width: int
) -> dict[str, Float[Tensor, "batch width layer d_model"]]:
    """One batched (right-padded) forward pass capturing every site of every layer at
    positions ``start .. start + width - 1`` (rows shorter than that hold padding there)."""
    ids, _ = model.batch_ids(seqs)
    store: dict[str, Tensor] = {}
    names = {site: [fn(layer) for layer in range(model.n_layers)] for site, fn in _SITES.items()}
    with hooked(model, [capture(n, store) for ns in names.values() for n in ns]):
        model.logits(ids)
    window = slice(start, start + width)
    return {
        site: rearrange(torch.stack([store[n][:, window].float().cpu() for n in ns]),
                        "layer b pos d -> b pos layer d")
        for site, ns in names.items()
    }


def _edit_layers(model: Model, edit: AppliedEdit) -> tuple[int, ...]:
    """Block indices of the parameters the edit changed (the adapter finds each parameter's
    block, whatever the family's naming)."""
    from interp_edit.arch import adapter

    found = {adapter(model).layer_of(name) for name in edit.deltas}
    return tuple(sorted(j for j in found if j is not None))
