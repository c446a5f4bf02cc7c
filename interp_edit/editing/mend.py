"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022).

The gradient of a loss with respect to a linear layer's weight ``W [d_out, d_in]`` over a
sequence is ``Σ_t δ_t u_tᵀ``: ``u_t`` is the layer's input at token t and ``δ_t`` the loss
gradient at its output. MEND never forms that matrix. A small trained network maps each pair
``(u_t, δ_t)`` to ``(û_t, δ̂_t)`` and the edit is

    ΔW_l = −α_l · Σ_t δ̂_t (P_l û_t)ᵀ        (a rank ≤ T update, α_l a learned step size)

``P_l`` is the identity in MEND. With ``MENDConfig.precondition`` it is ROME's ``C_l⁻¹``, the
inverse second moment of the projection's inputs over ordinary text (plus a ridge; see
:mod:`interp_edit.editing.stats`), stored in the editor: the update then spreads along
directions that typical keys rarely use, which keeps edits of the last layers from spilling
onto other subjects of the same relation (measured: see ``analyses/train_mend.py``).

The edited matrices are MLP output projections (``Model.mlp_out_proj``, as ``[d_model,
d_mlp]`` matrices whatever their storage; ``u`` is the hook point ``mlp_key_hook``, ``δ`` the
gradient at ``mlp_write_hook``, what the matrix writes, before any post-norm) of the layers
the editor was trained for: MEND's last three (``layer_choice="last"``), the layers where the MLP causal trace is
strongest (``"traced"``, location-aware; see :mod:`interp_edit.editing.mend_train`) or a given
list (``"given"``). The loss whose gradient is decomposed is the mean NLL per target token
of each request's ``target_new``; with ``MENDConfig.contrast`` minus that of its
``target_true`` too (when the request has one), the direction that moves probability from
the old answer to the new one, which is what efficacy measures.

The gradient factors and the pass that computes them are in
:mod:`interp_edit.editing.mend_factors`, the network in :mod:`interp_edit.editing.mend_network`
(an untrained one is the identity, so an untrained editor takes a plain, preconditioned
gradient step of size ``α_l``). This module holds the editor (the networks, the step sizes,
the preconditioners, saving and loading) and the registered ``"mend"`` method:

    edit = ie.edit(model, [req], method="mend", editor="mend.safetensors")

An editor file is safetensors with its JSON config (model fingerprint, layers, sizes, training
summary) in the header; it refuses to load for another model (:class:`ModelMismatchError`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor, nn
from torch.profiler import record_function

from interp_edit import _files, _validate
from interp_edit._cache import cache_dir
from interp_edit.arch import adapter
from interp_edit.arch.stepper import resolve_precision
from interp_edit._precision import PRECISIONS
from interp_edit.editing.base import AppliedEdit, EditRequest, parameter_name, register_editor
from interp_edit.editing.mend_factors import Factors, TargetBatch, batch_factors, gaps_from
from interp_edit.editing.mend_network import GradientTransform
from interp_edit.errors import InterpEditError, ModelMismatchError
from interp_edit.models import Model
from interp_edit.resume import BlockInput

FORMAT = "interp_edit.MENDEditor/1"
LAYER_CHOICES = ("last", "traced", "given")


@dataclass(frozen=True)
class MENDConfig:
    """What an editor edits and how big its network is (saved with the weights)."""

    model_name: str
    fingerprint: str  # Model.fingerprint of the model the editor was trained on
    layers: tuple[int, ...]
    layer_choice: str  # "last" (MEND) | "traced" (location-aware) | "given"
    shapes: tuple[tuple[int, int], ...]  # [d_out, d_in] = [d_model, d_mlp] of each edited
    # weight as a matrix (Adapter.mlp_out_matrix), whatever its storage (GPT-2: transposed)
    rank: int = 128  # hidden width of each residual block
    n_blocks: int = 1
    init_edit_lr: float = 1e-4  # α_l before training (the trainer may calibrate it per layer)
    precondition: bool = False  # û_t -> P_l û_t, P_l = (C_l + ridge)⁻¹ stored in the editor
    contrast: bool = False  # the input gradient also raises the NLL of target_true (if given)

    def __post_init__(self) -> None:
        layers = _validate.items("MENDConfig.layers", self.layers)
        object.__setattr__(self, "layers", tuple(_validate.integer("MENDConfig.layers entry", x, 0)
                                                 for x in layers))
        object.__setattr__(self, "shapes", tuple(
            tuple(_validate.count("MENDConfig.shapes size", d)
                  for d in _validate.items("MENDConfig.shapes entry", s))
            for s in _validate.items("MENDConfig.shapes", self.shapes)))
        if self.layer_choice not in LAYER_CHOICES:
            raise InterpEditError(f"layer_choice {self.layer_choice!r}: use one of {LAYER_CHOICES}")
        if not self.layers or len(self.layers) != len(self.shapes):
            raise InterpEditError("an editor needs at least one layer, each with its shape")
        _validate.fields(self, counts=("rank", "n_blocks"), positive=("init_edit_lr",))

    @classmethod
    def for_model(cls, model: Model, layers: Sequence[int], layer_choice: str,
                  **sizes: Any) -> "MENDConfig":
        matrix = adapter(model).mlp_out_matrix
        shapes = [tuple(matrix(int(layer)).shape) for layer in layers]
        return cls(model.name, model.fingerprint, tuple(layers), layer_choice, tuple(shapes),
                   **sizes)


def last_layers(model: Model, n: int = 3) -> tuple[int, ...]:
    """MEND's default: the MLPs of the last ``n`` layers."""
    return tuple(range(max(0, model.n_layers - n), model.n_layers))


# ---- the editor --------------------------------------------------------------------------
class MENDEditor(nn.Module):
    """Gradient transforms (one per weight shape) and per-layer log step sizes.

    ``info`` holds JSON-serialisable provenance (training steps, data, validation metrics)."""

    def __init__(self, config: MENDConfig, info: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.info: dict[str, Any] = dict(info or {})
        keys = [_shape_key(s) for s in config.shapes]
        self._modes = [keys[:i].count(k) for i, k in enumerate(keys)]  # index among its shape
        self.nets = nn.ModuleDict({
            k: GradientTransform(s[1], s[0], config.rank, config.n_blocks, keys.count(k))
            for k, s in dict(zip(keys, config.shapes)).items()
        })
        self._keys = keys
        self.log_lr = nn.Parameter(torch.full((len(config.layers),), math.log(config.init_edit_lr)))
        if config.precondition:  # identity until set_preconditioner (a fixed buffer, not trained)
            for layer, (_, d_in) in zip(config.layers, config.shapes):
                self.register_buffer(f"precond_{layer}", torch.eye(d_in))

    @torch.no_grad()
    def set_preconditioner(self, layer: int, inverse: Float[Tensor, "d_in d_in"]) -> None:
        """Set P_l (symmetric, e.g. the inverse of the key second moment C_l plus a ridge)."""
        buf = getattr(self, f"precond_{layer}", None)
        if buf is None or buf.shape != inverse.shape:
            raise InterpEditError(f"layer {layer}: this editor has no {tuple(inverse.shape)} "
                                  "preconditioner (MENDConfig.precondition=False?)")
        buf.copy_(inverse)

    def forward(self, factors: dict[int, Factors]) -> dict[int, Float[Tensor, "d_out d_in"]]:
        """ΔW of every edited layer from its raw gradient factors."""
        out = {}
        for i, layer in enumerate(self.config.layers):
            u, delta = factors[layer]
            u_hat, delta_hat = self.nets[self._keys[i]](u, delta, self._modes[i])
            if self.config.precondition:
                u_hat = einsum(u_hat, getattr(self, f"precond_{layer}"), "n i, i j -> n j")
            # the step size scales the n x d_out factor, not the d_out x d_in product: one
            # matrix-sized tensor fewer per layer
            out[layer] = einsum(-self.log_lr[i].exp() * delta_hat, u_hat,
                                "n d_out, n d_in -> d_out d_in")
        return out

    def check_model(self, model: Model) -> None:
        if model.fingerprint != self.config.fingerprint:
            raise ModelMismatchError(
                f"this MEND editor was trained for {self.config.model_name!r} (fingerprint "
                f"{self.config.fingerprint}), not {model.name!r} (fingerprint "
                f"{model.fingerprint}); load that model or train an editor for this one "
                "(interp-edit mend-train)"
            )

    def deltas(self, model: Model, requests: Sequence[EditRequest]) -> dict[str, Tensor]:
        """Parameter name -> ΔW for ``requests`` edited together (their tokens are summed)."""
        return self.step(model, requests).deltas

    def step(
        self, model: Model, requests: Sequence[EditRequest], start: BlockInput | None = None,
        *, stop_if_done: bool = False, below: torch.dtype | None = None,
    ) -> "EditorStep":
        """:meth:`deltas`, and whether every request with a ``target_true`` already has
        p(new) > p(true) (mean per-token log-probabilities, as efficacy) at the current
        weights, read from the same forward pass. ``start``: the input of the first edited
        block from an earlier step on the same requests (the layers below are never edited,
        so only the blocks from there up run again); the step returns it for the next one.
        ``stop_if_done``: when done, return empty deltas: with ``start``, as soon as a
        forward pass of the edited blocks without gradients shows it (:func:`gaps_from`).
        ``below``: see :func:`batch_factors`."""
        self.check_model(model)
        texts = [r.text for r in requests]
        olds = [(r.text, r.target_true) for r in requests if r.target_true is not None]
        batch = TargetBatch.build(model, [*texts, *(t for t, _ in olds)],
                                  [*(r.target_new for r in requests), *(o for _, o in olds)])
        n, rows_old = len(texts), range(len(texts), len(texts) + len(olds))
        pairs = list(zip([i for i, r in enumerate(requests) if r.target_true is not None],
                         rows_old))
        if (stop_if_done and pairs and start is not None
                and bool((gaps_from(model, batch, start, pairs) > 0).all())):
            return EditorStep({}, True, start)
        run = batch_factors(model, self.config.layers, batch, range(n),
                            away=rows_old if self.config.contrast else (), start=start,
                            below=below)
        done = bool(pairs) and all(bool(run.logprobs[i] > run.logprobs[j]) for i, j in pairs)
        if done and stop_if_done:  # (only without a start: the check needed the whole pass)
            return EditorStep({}, True, run.start)
        with torch.no_grad(), record_function("mend: editor network"):
            steps = self(run.factors)
        names = {layer: parameter_name(model, model.mlp_out_proj(layer)) for layer in steps}
        to_parameter = adapter(model).to_parameter  # [d_out, d_in] -> the weight's orientation
        return EditorStep({names[j]: to_parameter(j, d) for j, d in steps.items()}, done,
                          run.start)

    # ---- persistence ----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "config": asdict(self.config), "info": self.info}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights and running statistics as safetensors, the config as JSON."""
        return _files.save_safetensors(self.state_dict(), path,
                                       {"interp_edit": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None) -> "MENDEditor":
        """Read an editor; with ``model``, check that it was trained for that model."""
        path = Path(path)
        if not path.is_file():
            raise InterpEditError(f"MEND editor {str(path)!r} does not exist: train one with "
                                  "`interp-edit mend-train --out PATH`")
        with _files.reading(path, "MEND editor", "train it again with `interp-edit "
                            "mend-train --out PATH` (or copy an intact one)"):
            tensors, header = _files.read_safetensors(path)
            meta = json.loads(header.get("interp_edit", "{}"))
            _files.require(isinstance(meta, dict) and meta.get("format") == FORMAT,
                           f"its metadata is not of format {FORMAT}")
            editor = cls(MENDConfig(**meta["config"]), meta.get("info"))
            editor.load_state_dict(tensors)  # strict: every weight, each of its shape
            _files.require(all(bool(t.isfinite().all()) for t in tensors.values()
                               if t.is_floating_point()), "a weight is not finite")
        editor.eval()
        if model is not None:
            editor.check_model(model)
        return editor


def _shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class EditorStep(NamedTuple):
    deltas: dict[str, Tensor]  # parameter name -> ΔW
    done: bool  # every request with a target_true already had p(new) > p(true)
    start: BlockInput | None  # to resume the next step from (see batch_factors)


# ---- the registered editor -------------------------------------------------------------------
def default_editor_path(model: Model) -> Path:
    """Where ``analyses/train_mend.py`` writes the editor of ``model`` (the user cache)."""
    return cache_dir("mend", model.fingerprint) / "mend.safetensors"


@dataclass(frozen=True)
class MENDHparams:
    """``editor``: a trained editor file; ``None``: the default one for this model in the user
    cache (written by ``analyses/train_mend.py``).

    ``passes``: 1 is MEND as published (one gradient, one editor pass). ``k > 1`` (default 3)
    applies the editor again, to the gradient at the edited weights, until every request with
    a ``target_true`` has p(new) > p(true) on its prompt, at most k times: a per-fact step
    size, so facts the model holds firmly get more passes and the others keep a small edit
    (which is what keeps neighbours intact; README, "MEND").

    ``below``: the precision of the blocks below the first edited one, which only produce
    the edited blocks' input and are most of an edit's time. ``"bfloat16"``: their matrix
    multiplies in bf16 (weights copied once and kept, inputs cast; norms, attention and the
    residual stream in the model's dtype), on the layer stepper; the edited blocks, the
    backward pass and the editor stay in the model's dtype. ``"model"``: the model's own
    dtype throughout. ``"auto"`` (default): bfloat16 where the hardware multiplies it natively
    (AMX or AVX-512 BF16 CPUs, CUDA with bf16), else the model's. The edit's numbers differ
    from ``"model"`` by the rounding of the edited blocks' input; the held-out metrics were
    measured with both (README, "MEND")."""

    editor: str | None = None
    passes: int = 3
    below: str = "auto"

    def __post_init__(self) -> None:
        if self.editor is not None:
            object.__setattr__(self, "editor", os.fspath(self.editor))
        object.__setattr__(self, "passes", _validate.count("MENDHparams.passes (1: MEND as "
                                                          "published)", self.passes))
        if self.below not in PRECISIONS:
            raise InterpEditError(f"below={self.below!r}: use one of {', '.join(PRECISIONS)}")

    def check_model(self, model: Model) -> None:
        """The editor exists and was trained for ``model`` (before any work of an edit)."""
        load_editor(model, self.editor)

    def below_dtype(self, model: Model) -> torch.dtype | None:
        """The dtype of the multiplies below the edit on ``model`` (None: the model's own,
        also wherever the layer stepper does not run)."""
        return resolve_precision(model, self.below)


def load_editor(model: Model, editor: str | os.PathLike | None = None) -> MENDEditor:
    """The editor at ``editor`` (or the model's default one), read once and kept in memory."""
    path = Path(editor) if editor is not None else default_editor_path(model)
    if editor is None and not path.is_file():
        raise InterpEditError(
            f"no trained MEND editor for {model.name!r} at {path}: train one with "
            "`interp-edit mend-train --train counterfact-train.json --val counterfact-val.json "
            "--out mend.safetensors` and pass editor='mend.safetensors', or run "
            "analyses/train_mend.py (writes the default path)"
        )
    stat = path.stat() if path.is_file() else None
    stamp = (stat.st_mtime_ns, stat.st_size) if stat else None
    loaded = _load_cached(str(path.resolve()), stamp)
    loaded.check_model(model)
    return loaded


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, stamp: tuple[int, int] | None) -> MENDEditor:
    return MENDEditor.load(path)


@register_editor("mend", MENDHparams)
def apply_mend(model: Model, requests: Sequence[EditRequest], hp: MENDHparams) -> AppliedEdit:
    """Edit with a trained editor: one forward/backward pass for the gradient factors, one pass
    of the editor network, then ΔW added to the edited projections."""
    with model.hooks_fixed():  # the edit installs none and runs no user code
        return _apply_mend(model, requests, hp)


def _apply_mend(model: Model, requests: Sequence[EditRequest], hp: MENDHparams) -> AppliedEdit:
    editor = load_editor(model, hp.editor)
    params = model.parameters_by_name
    below = hp.below_dtype(model)
    first = editor.step(model, requests, below=below)
    deltas, start, used = first.deltas, first.start, 1
    original = {n: params[n].detach().clone() for n in deltas} if hp.passes > 1 else {}
    added = False  # whether the weights hold original + deltas
    try:
        while used < hp.passes:
            with torch.no_grad():
                for name, d in deltas.items():
                    torch.add(original[name], d, out=params[name])  # no temporary
            added = True
            # blocks below the edit are unchanged: resume; no backward pass once it holds
            step = editor.step(model, requests, start, stop_if_done=True)
            if step.done:  # the passes so far did it
                break
            deltas = {name: d + step.deltas[name] for name, d in deltas.items()}
            added, used = False, used + 1
        if original and not added:
            with torch.no_grad():
                for name, d in deltas.items():
                    torch.add(original[name], d, out=params[name])
    except BaseException:  # the original weights, bit for bit
        with torch.no_grad():
            for name, w in original.items():
                params[name].copy_(w)
        raise
    cfg = editor.config
    info = {"layers": list(cfg.layers), "layer_choice": cfg.layer_choice,
            "editor": str(hp.editor or default_editor_path(model)),
            "editor_steps": editor.info.get("step"),
            "edit_lr": [round(float(x), 8) for x in editor.log_lr.detach().exp()],
            "passes": used, "below": "bfloat16" if below else "model"}
    return AppliedEdit.from_deltas(model, "mend", requests, hp, deltas, info=info, owned=True,
                                   added_to=original or None)
