"""What every tracing method shares: checked inputs, the grid of cells, and what restoring a
cell means (its *plan*), so the reference, fast and attribution methods cannot disagree on
semantics.

A cell is ``(token t, layer l)``. Its plan is a tuple of :class:`Restore` steps, each replacing
one activation at token ``t`` of one layer, where the activation ("site") is the block output
(``"resid"``, ``hook_resid_post``), the MLP output (``"mlp"``) or the attention output
(``"attn"``), and the value comes from the clean run or from the corrupted run:

- kind ``"resid"``: block ``l``'s output, clean. With ``sever="mlp"`` (or ``"attn"``) the MLP
  (attention) outputs of every later layer at token ``t`` are also frozen at their corrupted
  values (Meng et al. 2022, Fig. 3).
- kinds ``"mlp"``/``"attn"``: that output of every layer in :func:`window_layers`, clean.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp_edit import _validate
from interp_edit.arch.stepper import Stepper, RunCache, resolve_precision
from interp_edit._precision import PRECISIONS
from interp_edit.errors import InterpEditError
from interp_edit.models import Model
from interp_edit.tracing.noise import resolve_noise
from interp_edit.tracing.results import KINDS

METHODS = ("fast", "reference", "attribution")
SEVERS = ("mlp", "attn")
ESTIMATES = ("logodds", "prob")  # the screen's first order: in p(target)'s log-odds, or in p


class Restore(NamedTuple):
    """Replace ``site`` of ``layer`` at the cell's token with its ``source`` run's value."""

    layer: int
    site: str  # "resid" | "mlp" | "attn"
    source: str  # "clean" | "corrupted"


Plan = tuple[Restore, ...]


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored together around ``layer`` (kmeng01/rome ``causal_trace``)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def plan(kind: str, layer: int, window: int, n_layers: int, sever: str | None = None) -> Plan:
    """The restorations that make up cell ``(t, layer)`` of a trace of this kind."""
    if kind == "resid":
        frozen = range(layer + 1, n_layers) if sever else range(0)
        return (Restore(layer, "resid", "clean"),) + tuple(
            Restore(j, sever, "corrupted") for j in frozen
        )
    return tuple(Restore(j, kind, "clean") for j in window_layers(layer, window, n_layers))


@dataclass(frozen=True, eq=False)
class TraceInputs:
    """A checked tracing problem: tokens, subject span, target and the noise samples."""

    model: Model
    prompt: str
    subject: str
    ids: Int[Tensor, "pos"]
    subject_range: tuple[int, int]
    # the answer scored: given, or (None until the clean pass ran, see ``completed``) the
    # model's top-1 after the prompt
    target: str | None
    target_id: int | None
    high_score: float | None  # clean p(target), from the clean pass
    noise: Float[Tensor, "samples subject_len d_model"]
    noise_std: float
    noise_source: str
    seed: int
    # the clean pass, every layer cached, where the layer stepper ran it (None: the bridge did)
    clean: RunCache | None = None

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    def completed(self, probs: Float[Tensor, "d_vocab"],
                  clean: RunCache | None) -> "TraceInputs":
        """These inputs with a clean pass's results: ``probs`` (its next-token probabilities
        at the last position) give the default target (the top-1) and ``high_score``;
        ``clean`` is its cached run (None: not kept)."""
        tid = int(probs.argmax()) if self.target_id is None else self.target_id
        target = self.model.tokenizer.decode([tid]) if self.target is None else self.target
        return replace(self, target=target, target_id=tid, high_score=float(probs[tid]),
                       clean=clean)

    def batch(self, copies: int) -> Int[Tensor, "batch pos"]:
        """The prompt repeated ``copies`` times (one row per corrupted sample)."""
        return self.ids[None].expand(copies, -1).to(self.model.device)


class Traced(NamedTuple):
    """What a method's ``run`` returns: a grid per kind (NaN outside the cells asked for), the
    corrupted score, and the inputs, completed by the method's own clean pass where it ran
    one (see :func:`prepare`)."""

    grids: dict[str, Float[Tensor, "n_tokens n_layers"]]
    low_score: float
    inputs: TraceInputs


@torch.no_grad()
def prepare(
    model: Model,
    prompt: str,
    subject: str,
    target: str | None,
    samples: int,
    noise: str | float | Tensor,
    seed: int,
    clean_pass: bool = True,
) -> TraceInputs:
    """Check the inputs; with ``clean_pass``, on the layer stepper, also run the clean pass
    with every layer's activations kept (the fast engine reads them) and complete the inputs
    from it (default target, ``high_score``). Otherwise the method completes them from its
    own clean pass (:meth:`TraceInputs.completed`): the attribution screen runs the clean
    prompt as one more row of its corrupted batch, and the hook-layer paths (the reference,
    the fast engine's fallback, the screen on other models) score the pass that captures the
    clean activations (:func:`interp_edit.tracing.reference.capture_runs`)."""
    check_fact(prompt, subject, target, samples, seed)
    ids = model.tokenize(prompt)  # raises on an empty prompt or one longer than the context
    start, end = model.subject_range(prompt, subject)
    target_id = None if target is None else model.target_ids(target)[0]
    values, std, source = resolve_noise(model, noise, samples, end - start, seed)
    inputs = TraceInputs(
        model, prompt, subject, ids, (start, end), target, target_id, None, values, std,
        source, int(seed),
    )  # fmt: skip
    if not (clean_pass and Stepper.usable(model)):
        return inputs
    stepper = Stepper(model, len(ids))
    clean = stepper.full_run(ids[None].to(model.device))
    return inputs.completed(stepper.unembed(clean.final[0]).softmax(-1), clean)


def screen_precision(model: Model, method: str, precision: str) -> str:
    """What a trace's multiplies run in, ``"model"`` or ``"bfloat16"``: ``precision`` resolved
    for ``method="attribution"`` (see :func:`interp_edit.arch.stepper.resolve_precision`), the
    model's dtype for the exact methods."""
    if method != "attribution" or resolve_precision(model, precision) is None:
        return "model"
    return "bfloat16"


def check_options(kinds: Sequence[str], method: str, window: int, sever: str | None,
                  precision: str = "model", estimate: str = "logodds") -> None:
    if method not in METHODS:
        raise InterpEditError(f"unknown method {method!r}: choose one of {METHODS}")
    if estimate not in ESTIMATES:
        raise InterpEditError(f"unknown estimate {estimate!r}: choose one of {ESTIMATES}")
    if estimate != "logodds" and method != "attribution":
        raise InterpEditError(f"estimate={estimate!r} applies to method='attribution' only: "
                              f"method={method!r} is exact")
    if precision not in PRECISIONS:
        raise InterpEditError(f"unknown precision {precision!r}: choose one of {PRECISIONS}")
    if precision == "bfloat16" and method != "attribution":
        raise InterpEditError(f"precision='bfloat16' applies to method='attribution' only: "
                              f"method={method!r} is exact and runs in the model's dtype")
    for kind in kinds:
        if kind not in KINDS:
            raise InterpEditError(f"unknown kind {kind!r}: choose one of {KINDS} or 'all'")
    _validate.count("window", window)
    if sever is not None:
        if sever not in SEVERS:
            raise InterpEditError(f"unknown sever {sever!r}: choose one of {SEVERS} or None")
        if tuple(kinds) != ("resid",):
            raise InterpEditError("sever= applies to kind='resid' only (hidden-state traces)")
        if method == "attribution":
            raise InterpEditError("sever= needs an exact method: use method='fast'")


def select_cells(
    inputs: TraceInputs, positions: Sequence[int] | None, layers: Sequence[int] | None
) -> list[tuple[int, int]]:
    """The ``(token, layer)`` cells to compute: all, or the given tokens/layers."""
    toks = _indices("positions", positions, inputs.n_tokens)
    lays = _indices("layers", layers, inputs.n_layers)
    return [(t, layer) for t in toks for layer in lays]


def _indices(name: str, given: Sequence[int] | None, n: int) -> list[int]:
    return list(range(n)) if given is None else _validate.indices(name, given, n)


def check_fact(prompt: str, subject: str, target: str | None, samples: int, seed: int) -> None:
    """The fact and the sampling settings of a trace, checked before any pass runs."""
    _validate.text("prompt", prompt)
    _validate.text("subject", subject)
    if target is not None:
        _validate.text("target", target)
    _validate.count("samples", samples, 1, _validate.MAX_SAMPLES)
    _validate.seed("seed", seed)


def check_cells(model: Model, prompt: str, positions: Sequence[int] | None,
                layers: Sequence[int] | None) -> None:
    """``positions``/``layers`` checked against the prompt's tokens and the model's layers
    (what :func:`select_cells` reads later), before the trace's first pass."""
    _indices("layers", layers, model.n_layers)
    if positions is not None:
        _indices("positions", positions, len(model.tokenize(prompt)))


def progress_bar(total: int, show: bool | None, desc: str):
    """A tqdm bar over cells. ``show=None``: only on a terminal, and only once the run has
    taken more than 3 s (so short runs and test logs stay quiet)."""
    from tqdm.auto import tqdm

    if show is None:
        return tqdm(total=total, desc=desc, unit="cell", delay=3.0, leave=False,
                    disable=not sys.stderr.isatty())  # fmt: skip
    return tqdm(total=total, desc=desc, unit="cell", disable=not show, leave=False)
