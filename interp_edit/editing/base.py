"""The editor framework: requests, the registry, and applied (undoable, saveable) edits.

Every method (ROME, MEND, IKE, FT, FT-L) is one module with a frozen hparams dataclass and an
``apply`` function registered under a name; ``edit(model, requests, method=...)`` validates the
requests before any weight is touched, builds the hparams and dispatches. A new method is one
module plus one line in ``_METHOD_MODULES``.

Weight edits are stored as per-parameter deltas. ``AppliedEdit`` keeps the original tensors,
so ``undo()`` restores them bit for bit. In-context edits (IKE) change no weight: they carry a
``context`` that is prepended to prompts (``edit.wrap(prompt)``), and ``undo()`` drops it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from interp_edit import _files
from interp_edit.errors import InterpEditError, ModelMismatchError
from interp_edit.models import Model

_EDIT_FORMAT = "interp_edit.AppliedEdit/1"  # in every saved edit's metadata


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt`` is a template with ``{}`` for the subject, or a string
    that contains the subject (its first occurrence becomes ``{}``)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def template(self) -> str:
        if "{}" in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, "{}", 1)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.format(self.subject)

    def validate(self, model: Model) -> None:
        """Raise InterpEditError if this request cannot be applied to ``model``."""
        if not self.subject or not self.subject.strip():
            raise InterpEditError("EditRequest.subject is empty")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise InterpEditError(
                f"subject {self.subject!r} is not in prompt {self.prompt!r}: "
                "use a template with '{}' or a prompt that contains the subject"
            )
        if self.template.count("{}") != 1:
            raise InterpEditError(f"prompt template {self.template!r} must contain one '{{}}'")
        for name in ("target_new", "target_true"):
            value = getattr(self, name)
            if value is None and name == "target_true":
                continue
            if not isinstance(value, str) or not value.strip():
                raise InterpEditError(f"EditRequest.{name} is empty: give the answer text")
            model.target_ids(value)  # raises if it tokenizes to nothing
        model.subject_range(self.text, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the registry ------------------------------------------------------------------------
ApplyFn = Callable[[Model, Sequence[EditRequest], Any], "AppliedEdit"]


@dataclass(frozen=True)
class _Registered:
    hparams_cls: type
    apply: ApplyFn


_REGISTRY: dict[str, _Registered] = {}
# method name -> module that registers it (imported on first use)
_METHOD_MODULES = {
    "rome": "interp_edit.editing.rome",
    "mend": "interp_edit.editing.mend",
    "ike": "interp_edit.editing.ike",
    "ft": "interp_edit.editing.finetune",
    "ft-l": "interp_edit.editing.finetune",
}


def register_editor(name: str, hparams_cls: type) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: ``@register_editor("rome", ROMEHparams)`` on ``apply(model, requests, hp)``."""
    if not dataclasses.is_dataclass(hparams_cls) or not hparams_cls.__dataclass_params__.frozen:
        raise TypeError(f"{hparams_cls.__name__} must be a frozen dataclass")

    def deco(fn: ApplyFn) -> ApplyFn:
        _REGISTRY[name] = _Registered(hparams_cls, fn)
        return fn

    return deco


def available_methods() -> list[str]:
    return sorted(set(_METHOD_MODULES) | set(_REGISTRY))


def _lookup(method: str) -> _Registered:
    if method not in _REGISTRY and method in _METHOD_MODULES:
        importlib.import_module(_METHOD_MODULES[method])
    if method not in _REGISTRY:
        raise InterpEditError(
            f"unknown edit method {method!r}; available: {', '.join(available_methods())}"
        )
    return _REGISTRY[method]


def make_hparams(method: str, **overrides: Any):
    """The method's hparams dataclass with defaults, overridden by keyword arguments."""
    cls = _lookup(method).hparams_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InterpEditError(
            f"unknown hparams for {method!r}: {unknown}; valid: {sorted(names)}"
        )
    return cls(**overrides)


def edit(
    model: Model,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "rome",
    **hparams: Any,
) -> "AppliedEdit":
    """Apply ``requests`` with ``method``; returns an :class:`AppliedEdit` (undo, save).

    All requests are validated before any weight is touched.
    """
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not reqs:
        raise InterpEditError("no edit requests given")
    for r in reqs:
        if not isinstance(r, EditRequest):
            raise InterpEditError(f"expected EditRequest, got {type(r).__name__}")
        r.validate(model)
    entry = _lookup(method)
    hp = make_hparams(method, **hparams)
    t0 = time.perf_counter()
    applied = entry.apply(model, reqs, hp)
    applied.info.setdefault("seconds", time.perf_counter() - t0)
    return applied


# ---- applied edits -----------------------------------------------------------------------
def get_parameter(model: Model, name: str) -> torch.nn.Parameter:
    params = model.parameters_by_name
    if name not in params:
        raise InterpEditError(f"model {model.name!r} has no parameter {name!r}")
    return params[name]


def parameter_name(model: Model, module: torch.nn.Module, attr: str = "weight") -> str:
    """The ``hf_model`` parameter name of ``module.<attr>`` (e.g. an MLP down projection)."""
    target = getattr(module, attr)
    for name, p in model.parameters_by_name.items():
        if p is target:
            return name
    raise InterpEditError(f"{type(module).__name__}.{attr} is not a parameter of the model")


@dataclass
class AppliedEdit:
    """An edit applied to a model. ``undo()`` restores the exact original weights.

    - ``deltas``: parameter name -> weight change (empty for in-context methods);
    - ``context``: text prepended to prompts by in-context methods (IKE); use ``wrap``;
    - ``info``: JSON-serialisable details (chosen layer and why, timings, losses).
    """

    model: Model | None
    method: str
    requests: list[EditRequest]
    hparams: dict[str, Any]
    deltas: dict[str, Tensor] = field(default_factory=dict)
    context: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    _originals: dict[str, Tensor] = field(default_factory=dict, repr=False)
    model_name: str = ""
    fingerprint: str = ""

    @classmethod
    def from_deltas(
        cls,
        model: Model,
        method: str,
        requests: Sequence[EditRequest],
        hparams: Any,
        deltas: Mapping[str, Tensor],
        info: dict[str, Any] | None = None,
        *,
        owned: bool = False,
        added_to: Mapping[str, Tensor] | None = None,
    ) -> "AppliedEdit":
        """Record ``deltas`` and apply them to ``model`` (the common path for weight editors).
        ``owned``: the editor hands its fresh tensors over, so they are kept, not copied.
        ``added_to``: the editor has already set every edited weight to
        ``torch.add(added_to[name], deltas[name])`` (what :meth:`apply` computes, bit for
        bit) and hands over ``added_to``, its copies of the weights before: they are kept for
        :meth:`undo`, and nothing is copied or added again (MEND's passes, where each
        weight-sized copy or add costs milliseconds)."""
        out = cls(
            model=None,
            method=method,
            requests=list(requests),
            hparams=_hparams_dict(hparams),
            deltas={k: v.detach() if owned else v.detach().clone() for k, v in deltas.items()},
            info=dict(info or {}),
            model_name=model.name,
            fingerprint=model.fingerprint,
        )
        if added_to is None:
            return out.apply(model)
        if added_to.keys() != out.deltas.keys():
            raise InterpEditError("added_to must hold the weights before of exactly the edited "
                                  f"parameters ({sorted(out.deltas)}), not {sorted(added_to)}")
        out._originals.update(added_to)
        return out._attach(model)

    @classmethod
    def in_context(
        cls, model: Model, method: str, requests: Sequence[EditRequest], hparams: Any,
        context: str, info: dict[str, Any] | None = None,
    ) -> "AppliedEdit":
        out = cls(model=None, method=method, requests=list(requests),
                  hparams=_hparams_dict(hparams), context=context, info=dict(info or {}),
                  model_name=model.name, fingerprint=model.fingerprint)
        return out.apply(model)

    @property
    def applied(self) -> bool:
        return self.model is not None

    def wrap(self, prompt: str) -> str:
        """The prompt as the edited model sees it (the IKE context prepended, if any)."""
        return self.context + prompt if self.context else prompt

    def apply(self, model: Model) -> "AppliedEdit":
        """Apply the stored deltas to ``model`` (which must be the model they were made for)."""
        if self.applied:
            raise InterpEditError("this edit is already applied; undo() it first")
        if self.fingerprint and model.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"this edit was made for {self.model_name!r} (fingerprint {self.fingerprint}), "
                f"not {model.name!r} (fingerprint {model.fingerprint}); load the right model"
            )
        params = {n: get_parameter(model, n) for n in self.deltas}
        for name, delta in self.deltas.items():  # every check before any weight changes
            if params[name].shape != delta.shape:
                raise ModelMismatchError(f"delta for {name} has shape {tuple(delta.shape)}, "
                                         f"parameter has {tuple(params[name].shape)}")
        with torch.no_grad(), record_function("edit: apply the deltas"):
            for name, delta in self.deltas.items():
                p = params[name]
                self._originals[name] = p.detach().clone()
                p.add_(delta.to(p))
        return self._attach(model)

    def _attach(self, model: Model) -> "AppliedEdit":
        self.model = model
        _edit_stack(model).append(self)
        return self

    def undo(self) -> None:
        """Restore the original weights bit for bit (and drop any context)."""
        if not self.applied:
            raise InterpEditError("this edit is not applied")
        stack = _edit_stack(self.model)
        if stack and stack[-1] is not self:
            raise InterpEditError(
                f"undo edits in reverse order: {len(stack) - 1 - stack.index(self)} later edit(s)"
                " are still applied on top of this one"
            )
        if stack:
            stack.pop()
        with torch.no_grad():
            for name, orig in self._originals.items():
                get_parameter(self.model, name).copy_(orig)
        self._originals.clear()
        self.model = None

    def __enter__(self) -> "AppliedEdit":
        return self

    def __exit__(self, *exc) -> None:
        if self.applied:
            self.undo()

    # ---- persistence ----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": _EDIT_FORMAT,
            "method": self.method,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "requests": [r.to_dict() for r in self.requests],
            "hparams": self.hparams,
            "context": self.context,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write the deltas as safetensors with the metadata as JSON in the header."""
        meta = {"interp_edit": json.dumps(self.metadata(), default=_json_default)}
        return _files.save_safetensors(self.deltas, path, meta)


def load_edit(path: str | Path) -> AppliedEdit:
    """Read an edit written by ``AppliedEdit.save``; call ``.apply(model)`` to apply it. A
    damaged or foreign file raises :class:`~interp_edit.errors.CorruptFileError`."""
    path = Path(path)
    with _files.reading(path, "saved edit", "save the edit again with AppliedEdit.save"):
        deltas, header = _files.read_safetensors(path)
        _files.require("interp_edit" in header, "no interp_edit metadata in its header")
        meta = json.loads(header["interp_edit"])
        _files.require(isinstance(meta, dict) and meta.get("format") == _EDIT_FORMAT,
                       f"its metadata is not of format {_EDIT_FORMAT}")
        for key, kind in (("method", str), ("model_name", str), ("fingerprint", str),
                          ("requests", list), ("hparams", dict), ("context", str),
                          ("info", dict)):
            _files.require(isinstance(meta.get(key), kind),
                           f"metadata field {key!r} is missing or not a {kind.__name__}")
        requests = [EditRequest(**r) for r in meta["requests"]]
        for r in requests:
            _files.require(all(isinstance(v, str) for v in (r.prompt, r.subject, r.target_new))
                           and isinstance(r.target_true, (str, type(None))),
                           "a request has a field that is not text")
        _files.require(bool(requests), "it holds no request")
        _files.require(all(d.is_floating_point() for d in deltas.values()),
                       "a delta is not a floating-point tensor")
    return AppliedEdit(
        model=None,
        method=meta["method"],
        requests=requests,
        hparams=meta["hparams"],
        deltas=deltas,
        context=meta["context"],
        info=meta["info"],
        model_name=meta["model_name"],
        fingerprint=meta["fingerprint"],
    )


def _edit_stack(model: Model) -> list[AppliedEdit]:
    """Edits applied to ``model``, oldest first (undo must go newest first)."""
    return model.__dict__.setdefault("_applied_edits", [])


def _hparams_dict(hp: Any) -> dict[str, Any]:
    return dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else dict(hp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def requests_from(items: Iterable[Any]) -> list[EditRequest]:
    """EditRequests from records that have ``prompt``, ``subject``, ``target_new`` and
    ``target_true`` attributes (e.g. evaluation records)."""
    return [EditRequest(i.prompt, i.subject, i.target_new, getattr(i, "target_true", None))
            for i in items]
