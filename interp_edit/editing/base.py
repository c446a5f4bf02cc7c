"""The editor framework: the registry and applied (undoable, saveable) edits (requests, the
facts to rewrite, are :mod:`interp_edit.editing.request`'s).

Every method (ROME, MEND, IKE, FT, FT-L) is one module with a frozen hparams dataclass and an
``apply`` function registered under a name; ``edit(model, requests, method=...)`` validates the
requests before any weight is touched, builds the hparams and dispatches. A new method is one
module plus one line in ``_METHOD_MODULES``.

Weight edits are stored as per-parameter deltas. ``AppliedEdit`` keeps the original tensors,
so ``undo()`` restores them bit for bit. In-context edits (IKE) change no weight: they carry a
``context`` that is prepended to prompts (``edit.wrap(prompt)``), and ``undo()`` drops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from interp_edit import _files, _validate
from interp_edit._cache import tensors_digest
from interp_edit.errors import InterpEditError, ModelMismatchError
from interp_edit.editing.request import EditRequest, requests_from  # noqa: F401 (re-exported)
from interp_edit.models import Model

_EDIT_FORMAT = "interp_edit.AppliedEdit/1"  # in every saved edit's metadata


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
    "memit": "interp_edit.editing.memit",
    "alphaedit": "interp_edit.editing.alphaedit",
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
    _validate.text("the edit method", method)
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
    try:
        return cls(**overrides)
    except TypeError as exc:  # a value of the wrong type met a comparison or a conversion
        raise InterpEditError(f"hparams for {method!r}: {exc}") from None


def edit(
    model: Model,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "rome",
    **hparams: Any,
) -> "AppliedEdit":
    """Apply ``requests`` with ``method``; returns an :class:`AppliedEdit` (undo, save).

    All requests and the hparams are validated before any weight is touched (hparams that
    depend on the model, such as a layer index, through their ``check_model(model)``); a
    delta that is not finite is refused before it is applied.
    """
    _validate.instance("model", model, Model)
    reqs = [requests] if isinstance(requests, EditRequest) else _validate.items("requests",
                                                                                requests)
    if not reqs:
        raise InterpEditError("no edit requests given")
    for r in reqs:
        if not isinstance(r, EditRequest):
            raise InterpEditError(f"expected EditRequest, got {type(r).__name__}")
        r.validate(model)
    entry = _lookup(method)
    hp = make_hparams(method, **hparams)
    check_hparams(hp, model)
    t0 = time.perf_counter()
    applied = entry.apply(model, reqs, hp)
    applied.info.setdefault("seconds", time.perf_counter() - t0)
    return applied


def check_hparams(hp: Any, model: Model) -> None:
    """The checks of ``hp`` that need the model (``hp.check_model``, where it has one)."""
    if (check := getattr(hp, "check_model", None)) is not None:
        check(model)


# ---- applied edits -----------------------------------------------------------------------
def get_parameter(model: Model, name: str) -> torch.nn.Parameter:
    params = model.parameters_by_name
    if name not in params:
        raise InterpEditError(f"model {model.name!r} has no parameter {name!r}")
    return params[name]


def parameter_name(model: Model, module: torch.nn.Module, attr: str = "weight") -> str:
    """The Hugging Face state-dict name of ``module.<attr>`` (e.g. an MLP output projection's
    weight), which is what saved edits store: it does not depend on the bridge's wrapper paths
    (:attr:`Model.parameters_by_name`)."""
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
    - ``info``: JSON-serialisable details (chosen layer and why, timings, losses);
    - ``keys``: parameter name -> the keys ``[n, d_in]`` the edit wrote values for (ROME's
      and MEMIT's k*), so that later edits can protect them (AlphaEdit).
    """

    model: Model | None
    method: str
    requests: list[EditRequest]
    hparams: dict[str, Any]
    deltas: dict[str, Tensor] = field(default_factory=dict)
    context: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Tensor] = field(default_factory=dict)
    _originals: dict[str, Tensor] = field(default_factory=dict, repr=False)
    model_name: str = ""
    fingerprint: str = ""
    _digest: str | None = field(default=None, repr=False)

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
        keys: Mapping[str, Tensor] | None = None,
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
            keys={k: v.detach().clone() for k, v in (keys or {}).items()},
            model_name=model.name,
            fingerprint=model.fingerprint,
        )
        if added_to is None:
            return out.apply(model)
        if added_to.keys() != out.deltas.keys():
            raise InterpEditError("added_to must hold the weights before of exactly the edited "
                                  f"parameters ({sorted(out.deltas)}), not {sorted(added_to)}")
        try:
            out._check_finite()
        except InterpEditError:  # the editor added them already: put the weights back
            with torch.no_grad():
                for name, before in added_to.items():
                    get_parameter(model, name).copy_(before)
            raise
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
    def weights_digest(self) -> str | None:
        """A digest of the deltas (None for an edit that changes no weight): part of
        :attr:`~interp_edit.models.Model.weights_key` while the edit is applied."""
        if self._digest is None and self.deltas:
            self._digest = tensors_digest(self.deltas)
        return self._digest

    def _check_finite(self) -> None:
        for name, delta in self.deltas.items():
            _validate.finite(f"the {self.method} edit's delta for {name}", delta)

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
        self._check_finite()
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
        tensors = self.deltas | {_KEYS + k: v for k, v in self.keys.items()}
        meta = {"interp_edit": json.dumps(self.metadata(), default=_json_default)}
        return _files.save_safetensors(tensors, path, meta)


def load_edit(path: str | Path) -> AppliedEdit:
    """Read an edit written by ``AppliedEdit.save``; call ``.apply(model)`` to apply it. A
    damaged or foreign file raises :class:`~interp_edit.errors.CorruptFileError`."""
    path = Path(path)
    with _files.reading(path, "saved edit", "save the edit again with AppliedEdit.save"):
        tensors, header = _files.read_safetensors(path)
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
        _files.require(all(t.is_floating_point() for t in tensors.values()),
                       "a delta or key is not a floating-point tensor")
    return AppliedEdit(
        model=None,
        method=meta["method"],
        requests=requests,
        hparams=meta["hparams"],
        deltas={k: v for k, v in tensors.items() if not k.startswith(_KEYS)},
        context=meta["context"],
        info=meta["info"],
        keys={k[len(_KEYS):]: v for k, v in tensors.items() if k.startswith(_KEYS)},
        model_name=meta["model_name"],
        fingerprint=meta["fingerprint"],
    )


@contextlib.contextmanager
def loaded_weights(model: Model) -> Iterator[None]:
    """Inside the block ``model`` has its weights as loaded (every applied weight edit
    lifted); after it, the edited weights are back bit for bit. For what is defined on the
    loaded weights whatever is applied, such as the text ROME samples for its key statistics."""
    if model._weight_marks:
        raise InterpEditError("an editor is changing the weights in place: the weights as "
                              "loaded are not available until it is done")
    loaded: dict[str, Tensor] = {}
    for applied in _edit_stack(model):  # oldest first: its originals are the loaded weights
        for name, original in applied._originals.items():
            loaded.setdefault(name, original)
    params = {name: get_parameter(model, name) for name in loaded}
    edited = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(loaded[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(edited[name])


_KEYS = "keys/"  # prefix of the written keys' tensor names in a saved edit


def applied_edits(model: Model) -> tuple[AppliedEdit, ...]:
    """The edits applied to ``model``, oldest first."""
    return tuple(_edit_stack(model))


def _edit_stack(model: Model) -> list[AppliedEdit]:
    """Edits applied to ``model``, oldest first (undo must go newest first)."""
    return model._applied_edits


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


class Laps:
    """Lap timer: ``laps("phase")`` records the seconds since the previous lap in ``.laps``."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now

