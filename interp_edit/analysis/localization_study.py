"""Running the localization-vs-editing study (Hase et al. 2023) on any ``ie.load_model`` model.

For each fact: the MLP causal trace at the last subject token for every layer (the tracing
effect), then a ROME edit at each studied layer and at ``layer="auto"``, measured with the
shared metrics of :mod:`interp_edit.evaluation.metrics`. The result, a
:class:`LocalizationStudy`, saves, loads, computes its statistics
(:mod:`~interp_edit.analysis.localization`) and plots itself.

    study = run_study(model, known_records, layers=range(0, model.n_layers, 3), cache="rows.jsonl")
    study.stats("efficacy_gap").pooled_r      # Estimate(value, lo, hi)
    print(study.to_markdown())
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp_edit import _files
from interp_edit.analysis._npz import NpzDataclass
from interp_edit.analysis.localization import R2_TERMS, LocalizationStats, localization_stats
from interp_edit.errors import InterpEditError
from interp_edit.models import Model
from interp_edit.tracing.locate import default_window, locate

# success metrics (keys of evaluation.metrics.measure) and how tables name them
SUCCESS = {
    "efficacy_gap": "efficacy magnitude, p(new) \u2212 p(true)",
    "paraphrase_gap": "paraphrase magnitude, p(new) \u2212 p(true)",
    "neighborhood_gap": "neighbourhood magnitude, p(true) \u2212 p(new)",
}
_MEASURED = ("efficacy", "paraphrase", "neighborhood")
_FORMAT = "interp_edit.LocalizationStudy/1"


@dataclass(frozen=True, eq=False)
class LocalizationStudy(NpzDataclass):
    """Tracing effects and edit successes of ``n`` facts. ``effect`` covers every layer;
    ``success`` covers the edited ``layers`` only (``success[m, f, j]``: metric ``metrics[m]``
    of fact ``f`` edited at ``layers[j]``)."""

    case_ids: tuple[str, ...]
    subjects: tuple[str, ...]
    layers: tuple[int, ...]
    metrics: tuple[str, ...]
    effect: Float[Tensor, "fact all_layers"]  # MLP indirect effect, last subject token
    clean: Float[Tensor, "fact"]  # clean p(target_true), the trace's high score
    success: Float[Tensor, "metric fact layer"]
    auto_layer: Int[Tensor, "fact"]  # the layer ROME's layer="auto" chose
    auto_success: Float[Tensor, "metric fact"]
    seconds: Float[Tensor, "fact"]  # tracing + editing time per fact
    model_name: str
    window: int
    samples: int
    rome: dict[str, Any]  # ROME settings other than the layer

    @property
    def n_facts(self) -> int:
        return len(self.case_ids)

    def grid(self, metric: str) -> tuple[Float[Tensor, "fact layer"], Float[Tensor, "fact layer"]]:
        """``(effect, success)`` at the edited layers, for one metric."""
        return self.effect[:, list(self.layers)], self.success[self._m(metric)]

    def stats(
        self, metric: str = "efficacy_gap", n_boot: int = 1000, seed: int = 0
    ) -> LocalizationStats:
        effect, success = self.grid(metric)
        return localization_stats(effect, success, self.layers, metric=metric,
                                  auto=self.auto_success[self._m(metric)], n_boot=n_boot, seed=seed)

    def to_markdown(self, n_boot: int = 1000) -> str:
        """One table row per success metric; 95% bootstrap CIs over facts."""
        head = ("| edit success | r pooled | mean per-fact r | R² layer | R² tracing | R² layer + "
                "tracing | best fixed layer (mean) | auto (mean) | auto − best fixed |")
        rows = [head, "|" + "---|" * 9]
        for m in self.metrics:
            s = self.stats(m, n_boot)
            r2 = {k: s.r2[k] for k in R2_TERMS}
            rows.append(
                f"| {SUCCESS.get(m, m)} | {s.pooled_r} | {s.mean_per_fact_r} | {r2['layer']} | "
                f"{r2['tracing']} | {r2['layer + tracing']} | {s.best_layer} "
                f"({s.best_layer_success:+.3f}) | {s.auto_success:+.3f} | {s.auto_gain} |"
            )
        return "\n".join(rows)

    _FORMAT: ClassVar[str] = _FORMAT
    _PLOTS: ClassVar[dict] = {
        "scatter": lambda: _plots().plot_effect_vs_success,
        "layers": lambda: _plots().plot_layerwise,
    }

    def plot(self, what: str = "scatter", **kw):
        """``"scatter"`` | ``"layers"``: see :mod:`interp_edit.plotting.localization`."""
        return super().plot(what, **kw)

    def _m(self, metric: str) -> int:
        if metric not in self.metrics:
            raise InterpEditError(f"unknown metric {metric!r}; this study has {self.metrics}")
        return self.metrics.index(metric)


def fact_row(model: Model, record, layers: Sequence[int], *, window: int, samples: int,
             seed: int = 1, rome: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the study needs about one fact (an ``EditRecord``), JSON-serialisable."""
    import interp_edit as ie
    from interp_edit.evaluation.metrics import measure

    t0 = time.perf_counter()
    # the MLP effect at the last subject token at every layer
    loc = locate(model, record, kind="mlp", search=(0.0, 1.0), window=window, samples=samples,
                 seed=seed)

    def success(layer) -> dict[str, float]:
        with ie.edit(model, record.request, method="rome", layer=layer, **(rome or {})) as e:
            scores = measure(model, record, e, _MEASURED)
            chosen = e.info["layer"]
        return {**{m: scores[m] for m in SUCCESS}, "layer": chosen}

    auto = success("auto")
    return {
        "case_id": str(record.case_id), "subject": record.subject,
        "clean": float(loc.high_scores[0]), "effect": loc.effects.tolist(),
        "success": [success(layer) for layer in layers], "auto": auto,
        "config": {"layers": list(layers), "window": window, "samples": samples, "seed": seed,
                   "rome": rome or {}, "model": model.name},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_study(
    model: Model,
    records: Iterable,
    layers: Sequence[int],
    *,
    window: int | None = None,
    samples: int = 10,
    seed: int = 1,
    rome: dict[str, Any] | None = None,
    cache: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = print,
) -> LocalizationStudy:
    """Trace and edit every record (see the module docstring). With ``cache`` (a JSON-lines
    file) finished facts are appended as they complete and reused by a later run with the
    same settings, so a long run can be stopped and resumed. ``window=None``: the locate
    default (a fraction of the depth)."""
    layers = [int(x) for x in layers]
    window = default_window(model.n_layers) if window is None else window
    for layer in layers:
        model._check_layer(layer)
    records = list(records)
    done = read_rows(cache)
    rows = []
    for i, rec in enumerate(records):
        row = done.get(str(rec.case_id))
        want = {"layers": layers, "window": window, "samples": samples, "seed": seed,
                "rome": rome or {}, "model": model.name}
        if row is None or row["config"] != want:
            row = fact_row(model, rec, layers, window=window, samples=samples, seed=seed, rome=rome)
            if cache is not None:
                done[str(rec.case_id)] = row
                _files.write_text(cache, "".join(json.dumps(r) + "\n" for r in done.values()))
        rows.append(row)
        if progress:
            best = max(range(len(layers)), key=lambda j: row["success"][j]["efficacy_gap"])
            progress(f"[{i + 1}/{len(records)}] {rec.subject!r}: auto layer "
                     f"{row['auto']['layer']}, best efficacy at layer {layers[best]}")
    return study_from_rows(rows)


def study_from_rows(rows: Sequence[dict]) -> LocalizationStudy:
    """The study of rows written by :func:`fact_row` (all with the same settings)."""
    if not rows:
        raise InterpEditError("no facts were studied: pass at least two records")
    cfg = rows[0]["config"]
    if any(r["config"] != cfg for r in rows):
        raise InterpEditError("these rows were computed with different settings; study one kind")
    metrics = tuple(SUCCESS)
    return LocalizationStudy(
        case_ids=tuple(r["case_id"] for r in rows),
        subjects=tuple(r["subject"] for r in rows),
        layers=tuple(cfg["layers"]),
        metrics=metrics,
        effect=torch.tensor([r["effect"] for r in rows], dtype=torch.float32),
        clean=torch.tensor([r["clean"] for r in rows], dtype=torch.float32),
        success=torch.tensor([[[s[m] for s in r["success"]] for r in rows] for m in metrics]),
        auto_layer=torch.tensor([r["auto"]["layer"] for r in rows]),
        auto_success=torch.tensor([[r["auto"][m] for r in rows] for m in metrics]),
        seconds=torch.tensor([r.get("seconds", float("nan")) for r in rows]),
        model_name=cfg["model"],
        window=cfg["window"],
        samples=cfg["samples"],
        rome=cfg["rome"],
    )


def read_rows(cache) -> dict[str, dict]:
    """The rows of a cache file by case id (the last one of each id wins); a file that does
    not read as such rows is set aside with a warning (its facts are studied again)."""
    if cache is None:
        return {}
    return _files.load_cached(Path(cache), _read_rows) or {}


def _read_rows(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    _files.require(all(isinstance(r, dict) and "case_id" in r and "config" in r for r in rows),
                   "a line is not a study row")
    return {str(r["case_id"]): r for r in rows}


def _plots():
    from interp_edit.plotting import localization  # matplotlib only when plotting

    return localization
