"""Locate: where in the network does the model recall these facts? One layer, or a range.

    loc = ie.locate(model, ie.EditRequest("{} is located in", "The Space Needle", "Rome"))
    loc.layer, loc.layers, loc.reason

Every "pick the layer to edit" in the toolkit goes through :func:`locate` (ROME's
``layer="auto"``, the MEND trainer's ``layers="traced"``, the localization study, the demo and
the multi-layer editors). What it does:

1. For each fact, the causal trace of ``kind`` (``"mlp"`` by default: windows of ``window``
   MLP outputs restored together) at the last subject token, and with ``every_token=True`` at
   every subject token; the indirect effect is ``p(target) restored - p(target) corrupted``.
   The target is the fact's true answer (``target_true`` of an edit request, ``attribute`` of a
   traced fact; ``None``: the model's own top-1).
2. The mean effect over facts per layer (:attr:`Location.effects`).
3. The choice, inside ``search`` (a fraction of the model's depth, so the same default fits a
   4-layer and a 48-layer model): the layer with the largest mean effect; for ``span > 1`` the
   contiguous range of ``span`` layers inside the search range whose summed mean effect is
   largest (ties: the earliest), MEMIT's "a range of critical MLP layers" picked by the same
   evidence. Effects are traced only at the searched layers; others are NaN.

Each fact's effects are cached per model (``INTERP_EDIT_CACHE``/locate, JSON keyed by the
model fingerprint and every trace setting). A later call with the same settings, or one that
searches more layers, traces only what is missing. While the weights differ from the loaded
model's (:attr:`~interp_edit.models.Model.weights_key` is not the fingerprint: an edit applied,
or a sequence of edits in progress) nothing is read or written: traces of a passing weight
state would never be asked for again. This is the policy of every cache keyed by the model.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit import _cache, _files, _validate
from interp_edit.errors import InterpEditError
from interp_edit.models import Model
from interp_edit.tracing.inputs import screen_precision
from interp_edit.tracing.results import KINDS

# default window: this fraction of the depth, at least one layer (ROME's 10 of 48 is ~1/5)
WINDOW_FRACTION = 1 / 6
METHODS = ("fast", "reference", "attribution")


@dataclass(frozen=True)
class Location:
    """Where ``n_facts`` facts are recalled, and why this layer (range) was chosen."""

    kind: str  # "mlp" | "attn" | "resid"
    effects: Float[Tensor, "n_layers"]  # mean indirect effect at the last subject token (NaN: not searched)
    token_effects: Float[Tensor, "n_layers"] | None  # mean over every subject token (every_token=True)
    layer: int  # the layer with the largest mean effect in the search range
    layers: tuple[int, ...]  # the chosen contiguous range, len == span
    reason: str  # the choice in words
    n_facts: int
    search: tuple[int, int]  # the searched layers [lo, hi)
    fact_effects: Float[Tensor, "n_facts n_layers"] = field(repr=False)  # per fact, last subject token
    high_scores: Float[Tensor, "n_facts"] = field(repr=False)  # clean p(target)
    low_scores: Float[Tensor, "n_facts"] = field(repr=False)  # p(target) with the subject corrupted
    targets: tuple[str, ...] = ()  # the answer traced per fact
    settings: dict[str, Any] = field(default_factory=dict)  # window, samples, noise, seed, method

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (what an edit records about its layer choice)."""
        def floats(t: Tensor | None) -> list | None:
            return None if t is None else [None if x != x else round(x, 5) for x in t.tolist()]

        return {"kind": self.kind, "layer": self.layer, "layers": list(self.layers),
                "reason": self.reason, "n_facts": self.n_facts, "search": list(self.search),
                "effects": floats(self.effects), "token_effects": floats(self.token_effects),
                "high_scores": floats(self.high_scores), "low_scores": floats(self.low_scores),
                "targets": list(self.targets),
                **self.settings}


def locate(
    model: Model,
    facts: Any,
    *,
    kind: str = "mlp",
    span: int = 1,
    search: tuple[float, float] = (0.0, 0.5),
    window: int | None = None,
    samples: int = 3,
    noise: str | float = "s3",
    seed: int = 1,
    method: str = "fast",
    every_token: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Location:
    """Trace ``facts`` and choose the layer (``span > 1``: the layer range) that recalls them.

    Args:
        facts: one fact or a sequence: :class:`~interp_edit.EditRequest`, an ``EditRecord``,
            or anything traced by :func:`~interp_edit.trace_dataset` (``.prompt`` with the
            subject filled in, ``.subject``, ``.attribute``).
        search: ``(start, stop)`` fractions of the depth; layers ``floor(start * n_layers)``
            up to ``ceil(stop * n_layers)`` (exclusive) are searched.
        window: layers restored together per cell (``kind`` ``"mlp"``/``"attn"``); ``None``:
            ``WINDOW_FRACTION`` of the depth, at least 1.
        samples, noise, seed, method: the trace's (see :func:`~interp_edit.trace`).
        every_token: also trace every subject token (:attr:`Location.token_effects`).
        progress: called as ``progress(done, total)`` after each fact.
    """
    _validate.instance("model", model, Model)
    items = _facts(facts)
    lo, hi = search_layers(model.n_layers, search)
    _check(kind, span, hi - lo, samples, method, window)
    window = default_window(model.n_layers) if window is None else window
    settings = {"window": int(window), "samples": int(samples), "noise": noise, "seed": int(seed),
                "method": method}
    cache = _fact_cache(model, kind, settings)
    layers = list(range(lo, hi))
    rows = []
    for i, (text, subject, target) in enumerate(items):
        rows.append(_fact_effects(model, text, subject, target, kind, settings, layers,
                                  every_token, cache))
        if progress is not None:
            progress(i + 1, len(items))
    last = torch.stack([r["grid"][-1] for r in rows])  # [fact, layer]
    effects = last.mean(0)
    token_effects = torch.stack([r["grid"].mean(0) for r in rows]).mean(0) if every_token else None
    layer, chosen = choose(effects, lo, hi, span)
    return Location(
        kind=kind, effects=effects, token_effects=token_effects, layer=layer, layers=chosen,
        reason=_reason(kind, effects, layer, chosen, lo, hi, len(rows), settings),
        n_facts=len(rows), search=(lo, hi), fact_effects=last,
        high_scores=torch.tensor([r["high"] for r in rows], dtype=torch.float64),
        low_scores=torch.tensor([r["low"] for r in rows], dtype=torch.float64),
        targets=tuple(r["target"] for r in rows),
        settings=settings,
    )


def default_window(n_layers: int) -> int:
    """The window of layers restored together when none is given: a fraction of the depth."""
    return max(1, round(WINDOW_FRACTION * n_layers))


def search_layers(n_layers: int, search: tuple[float, float]) -> tuple[int, int]:
    """The layers ``[lo, hi)`` that ``search`` (fractions of the depth) covers."""
    try:
        start, stop = (float(x) for x in search)
    except (TypeError, ValueError):
        raise InterpEditError(f"search={search!r}: give (start, stop) fractions of the depth, "
                              "e.g. (0.0, 0.5)") from None
    if not 0.0 <= start < stop <= 1.0:
        raise InterpEditError(f"search={search!r} must be fractions 0 <= start < stop <= 1 of "
                              "the model's depth (not layer numbers)")
    lo = min(math.floor(start * n_layers), n_layers - 1)
    return lo, max(lo + 1, math.ceil(stop * n_layers))


def choose(
    effects: Float[Tensor, "n_layers"], lo: int, hi: int, span: int = 1
) -> tuple[int, tuple[int, ...]]:
    """The peak layer in ``[lo, hi)`` and the ``span``-layer range there with the largest summed
    effect (the earliest among equals). NaN counts as no effect."""
    e = torch.nan_to_num(effects[lo:hi].double(), nan=-math.inf)
    peak = lo + int(e.argmax())
    sums = torch.nan_to_num(effects[lo:hi].double(), nan=0.0).unfold(0, span, 1).sum(-1)
    start = lo + int(sums.argmax())
    return peak, tuple(range(start, start + span))


# ---- facts ----------------------------------------------------------------------------------
def _facts(facts: Any) -> list[tuple[str, str, str | None]]:
    """``(text, subject, target)`` of each fact, whatever its type."""
    if _is_fact(facts):
        facts = [facts]
    if isinstance(facts, (str, bytes)) or not isinstance(facts, Iterable):
        raise InterpEditError(f"locate takes facts (EditRequest, EditRecord or a traced fact), "
                              f"not {type(facts).__name__}")
    out = []
    for f in facts:
        if hasattr(f, "target_true") and hasattr(f, "text"):  # EditRequest, EditRecord
            out.append((f.text, f.subject, f.target_true))
        elif all(hasattr(f, a) for a in ("prompt", "subject", "attribute")):
            out.append((f.prompt, f.subject, f.attribute))
        else:
            raise InterpEditError(
                f"locate cannot read a {type(f).__name__}: give EditRequests, EditRecords or "
                "facts with .prompt, .subject and .attribute")
    if not out:
        raise InterpEditError("locate needs at least one fact")
    return out


def _is_fact(obj: Any) -> bool:
    return hasattr(obj, "subject") and (hasattr(obj, "target_true") or hasattr(obj, "attribute"))


def _check(kind: str, span: Any, n_search: int, samples: Any, method: str, window: Any) -> None:
    if kind not in KINDS:
        raise InterpEditError(f"unknown kind {kind!r}: choose one of {KINDS}")
    if method not in METHODS:
        raise InterpEditError(f"unknown method {method!r}: choose one of {METHODS}")
    _validate.count("span", span)
    _validate.count("samples", samples, 1, _validate.MAX_SAMPLES)
    if window is not None:
        _validate.count("window", window)
    if span > n_search:
        raise InterpEditError(f"span={span} is longer than the {n_search} searched layers: "
                              "widen search (fractions of the depth) or shorten span")


# ---- tracing one fact, through the cache ----------------------------------------------------
def _fact_effects(model: Model, text: str, subject: str, target: str | None, kind: str,
                  settings: dict, layers: list[int], every_token: bool,
                  cache: Path | None) -> dict[str, Any]:
    """The fact's effects ``grid`` ``[subject_tokens, n_layers]`` (NaN: not traced) and its
    clean/corrupted scores, traced where the cache lacks the cells asked for."""
    from interp_edit.tracing.api import trace

    first, end = model.subject_range(text, subject)
    path = cache / f"{_cache.stable_hash([text, subject, target])}.json" if cache else None
    row = _read(path, end - first, model.n_layers)
    tokens = list(range(first, end)) if every_token else [end - 1]
    grid = row["grid"]
    missing = [(t, l) for t in tokens for l in layers if math.isnan(grid[t - first, l])]
    if missing:
        r = trace(model, text, subject, target=target, kind=kind, window=settings["window"],
                  samples=settings["samples"], noise=settings["noise"], seed=settings["seed"],
                  method=settings["method"], positions=sorted({t for t, _ in missing}),
                  layers=sorted({l for _, l in missing}), progress=False)
        effect = r.indirect_effect[first:end].double()
        grid = torch.where(torch.isnan(grid), effect, grid)
        row = {"grid": grid, "high": r.high_score, "low": r.low_score, "target": r.target}
        if path is not None:
            _write(path, row)
    keep = torch.full_like(grid, math.nan)  # only the cells asked for, whatever the cache has
    rows = [t - first for t in tokens]
    keep[rows, :] = grid[rows, :]
    keep[:, [l for l in range(model.n_layers) if l not in layers]] = math.nan
    return {**row, "grid": keep}


def _fact_cache(model: Model, kind: str, settings: dict) -> Path | None:
    """The cache directory for these settings, or None while the weights are edited."""
    if model.weights_key != model.fingerprint:
        return None
    ran = screen_precision(model, settings["method"], "auto")
    key = {"model": model.fingerprint, "kind": kind, "precision": ran, "prepend_bos":
           model.prepend_bos, **{k: repr(v) for k, v in settings.items()}}
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name)
    return _cache.cache_dir("locate", f"{slug}-{_cache.stable_hash(key)}")


def _read(path: Path | None, n_tokens: int, n_layers: int) -> dict[str, Any]:
    empty = {"grid": torch.full((n_tokens, n_layers), math.nan, dtype=torch.float64),
             "high": math.nan, "low": math.nan, "target": None}
    if path is None:
        return empty
    # a damaged entry, or one of another grid, is removed (with a warning) and traced again
    row = _files.load_cached(path, functools.partial(_read_row, shape=(n_tokens, n_layers)))
    return empty if row is None else row


def _read_row(path: Path, shape: tuple[int, int]) -> dict[str, Any]:
    data = _files.read_json(path)
    grid = torch.tensor([[math.nan if x is None else x for x in r] for r in data["grid"]],
                        dtype=torch.float64)
    _files.require(grid.shape == shape, f"not a {shape[0]}x{shape[1]} grid of effects")
    return {"grid": grid, "high": float(data["high"]), "low": float(data["low"]),
            "target": str(data["target"])}


def _write(path: Path, row: dict[str, Any]) -> None:
    grid = [[None if x != x else x for x in r] for r in row["grid"].tolist()]
    _files.write_json(path, {"grid": grid, "high": row["high"], "low": row["low"],
                             "target": row["target"]})


def _reason(kind: str, effects: Tensor, layer: int, chosen: Sequence[int], lo: int, hi: int,
            n: int, settings: dict) -> str:
    what = {"mlp": "MLP", "attn": "attention", "resid": "hidden-state"}[kind]
    facts = "1 fact" if n == 1 else f"mean over {n} facts"
    where = (f"layer {layer}" if len(chosen) == 1 else
             f"layers {chosen[0]}..{chosen[-1]} (largest summed effect of {len(chosen)} "
             f"contiguous layers; peak at layer {layer})")
    return (f"{where}: peak {what} indirect effect {float(effects[layer]):.3f} at the last "
            f"subject token ({facts}) in search range layers {lo}..{hi - 1}; "
            f"{settings['method']} trace, window {settings['window']}, "
            f"{settings['samples']} samples, noise {settings['noise']}")
