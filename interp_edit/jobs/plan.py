"""A dataset job as data: a :class:`Plan` (what to compute) made of :class:`Unit` s (one result
file each), and the checked, atomic result files themselves.

A plan is frozen and JSON-serialisable, so it can be written next to its results, shipped to
workers on other machines and read back to resume:

- ``model``: a :class:`ModelSpec`, how a worker rebuilds the model (a name
  :func:`~interp_edit.models.load_model` takes, or a directory the weights were saved to) and
  the fingerprint the rebuilt model must have;
- ``task``: which work function runs each unit (:mod:`interp_edit.jobs.tasks`);
- ``settings``: what every unit shares (noise, samples, seed, editor and hparams, ...);
- ``units``: per unit its payload (the fact, the condition, the record) and its result file's
  name, derived from everything the result depends on (content-addressed), so a rerun with the
  same settings finds the same files and a changed setting never reuses them;
- ``out``: the directory of the result files.

A result file is written whole or not at all (unique temporary name, then ``os.replace``) and
checked when read (:func:`read_result`): a truncated or corrupt file, or one that answers
another unit, counts as missing and is done again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from interp_edit._builtin import BUILTINS
from interp_edit._cache import stable_hash
from interp_edit.errors import InterpEditError, ModelMismatchError
from interp_edit.models import DEFAULT_MODEL, Model, load_model

_FORMAT = "interp_edit.Plan/1"
log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WRAPPER = "._original_component"  # the bridge's wrapper segment in parameter names
IN_MEMORY = "<in memory>"  # a ModelSpec source: only the caller's model object runs the plan


@dataclass(frozen=True)
class ModelSpec:
    """How a worker rebuilds the model: ``load_model(source, dtype=dtype)`` (``source=None``:
    the default model), which must give weights with ``fingerprint``."""

    source: str | None
    dtype: str
    fingerprint: str

    @classmethod
    def of(cls, model: Model, spill_dir: str | os.PathLike | None) -> ModelSpec:
        """The spec of an in-memory model. A model loaded by name, with no edit applied, is
        rebuilt from that name. Any other (a tiny test model, an edited model) is first saved
        as a Hugging Face directory under ``spill_dir``, keyed by its weights, and rebuilt from
        there (workers on other machines then need that directory on a shared filesystem);
        with ``spill_dir=None`` its spec names no source: only the caller's model runs it."""
        dtype = next(str(p.dtype).removeprefix("torch.") for p in model.hf_model.parameters())
        if dtype not in _DTYPES:
            raise InterpEditError(f"a plan's model must be one of {sorted(_DTYPES)}, not {dtype}")
        weights = model.weights_key  # the weights in use: with any applied edit
        name = _loadable_name(model) if weights == model.fingerprint else None
        if name is not None:
            return cls(None if name == DEFAULT_MODEL else name, dtype, weights)
        if spill_dir is None:
            return cls(IN_MEMORY, dtype, weights)
        path, loaded = save_model(model, spill_dir, weights)
        return cls(str(path), dtype, loaded)

    def load(self, device: str | torch.device = "cpu") -> Model:
        """The model, checked against the plan's fingerprint."""
        if self.source == IN_MEMORY:
            raise InterpEditError("this plan's model was built in memory and not saved: run "
                                  "it with executor='local' and that model, or plan again "
                                  "for another executor (which saves the weights)")
        model = load_model(self.source, device=device, dtype=_DTYPES[self.dtype])
        if model.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"the plan was made with model weights {self.fingerprint}, but "
                f"{self.source or DEFAULT_MODEL!r} loads {model.fingerprint} on this worker: "
                "install the same model (and version) everywhere, or plan again")
        return model


def _loadable_name(model: Model) -> str | None:
    """The model's name if ``load_model`` can take it: the default model, a built-in model
    (``"gemma-3-270m"``: workers load it from their own install, never from weights saved
    beside the results), an existing path or a hub name (``org/name``); ``None`` for models
    built in memory."""
    if model.name == DEFAULT_MODEL or model.name in BUILTINS:
        return model.name
    path = Path(model.name).expanduser()
    if path.exists():
        return str(path.resolve())
    return model.name if re.fullmatch(r"[\w.-]+/[\w.-]+", model.name) else None


def save_model(model: Model, root: str | os.PathLike, fingerprint: str) -> tuple[Path, str]:
    """Save the model's weights, config and tokenizer as a Hugging Face directory
    ``root/model-<fingerprint>`` (once; published by a rename, so never half-written), and
    the fingerprint the directory loads with: loaded once here, which also proves it loads
    (the config a loader fills in, such as its dtype, is part of the fingerprint)."""
    from safetensors.torch import save_file

    target = Path(root) / f"model-{fingerprint}"
    done = target / "fingerprint.txt"
    if not done.exists():
        tmp = Path(root) / f".model-{fingerprint}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir(parents=True)
        weights = {n.replace(_WRAPPER, ""): p.detach().contiguous().cpu()
                   for n, p in model.parameters_by_name.items()}
        model.hf_model.config.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        dtype = next(model.hf_model.parameters()).dtype
        (tmp / "fingerprint.txt").write_text(load_model(tmp, dtype=dtype).fingerprint)
        try:
            os.replace(tmp, target)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
            if not done.exists():
                raise
    return target, done.read_text().strip()


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``payload`` for the task, result written to ``out/key``."""

    key: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """A frozen, JSON-serialisable dataset job (see the module docstring)."""

    task: str
    model: ModelSpec
    settings: dict[str, Any]
    units: tuple[Unit, ...]
    out: str
    meta: dict[str, Any] = field(default_factory=dict)  # for the collect step, not the workers

    def __post_init__(self):
        keys = [u.key for u in self.units]
        if len(set(keys)) != len(keys):
            raise InterpEditError("a plan's units must have distinct result files")
        try:  # fail here, not on a worker, if something is not JSON
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InterpEditError(f"a plan must be plain JSON (numbers, strings, lists, "
                                  f"dicts): {exc}; pass such values (e.g. hparams)") from None

    def path(self, unit: Unit) -> Path:
        return Path(self.out) / unit.key

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "task": self.task, "model": asdict(self.model),
                "settings": self.settings, "units": [asdict(u) for u in self.units],
                "out": self.out, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != _FORMAT:
            raise InterpEditError(f"not a saved plan (expected format {_FORMAT})")
        return cls(d["task"], ModelSpec(**d["model"]), d["settings"],
                   tuple(Unit(**u) for u in d["units"]), d["out"], d.get("meta", {}))

    @property
    def digest(self) -> str:
        return stable_hash(self.to_dict())

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the plan as JSON (default: ``out/plan-<digest>.json``), atomically."""
        path = Path(path) if path is not None else Path(self.out) / f"plan-{self.digest}.json"
        write_atomic(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InterpEditError(f"cannot read the plan {str(path)!r}: {exc}") from None


def unit_key(*parts: Any, suffix: str) -> str:
    """A content-addressed file name: a digest of everything the result depends on."""
    return f"{stable_hash(list(parts))}{suffix}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a unique temporary name beside ``path``, then rename: readers see the whole
    file or none, also with several writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_result(path: Path, check: Callable[[bytes], None]) -> bytes | None:
    """The file's bytes if it exists and ``check`` accepts them; otherwise ``None`` (a corrupt
    file is removed, so it is done again)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        check(data)
    except Exception as exc:  # noqa: BLE001 - any failure to read it back means: redo it
        # the toolkit's cache policy (interp_edit._files.load_cached): never used, rebuilt
        warnings.warn(f"the result file {path} is damaged or another unit's ({exc}); "
                      "rebuilding it", stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    return data
