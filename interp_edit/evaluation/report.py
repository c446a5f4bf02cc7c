"""The result of ``evaluate``: per-record rows, aggregates with 95% CIs, JSON/CSV/markdown.

Confidence intervals are percentile bootstrap intervals of the mean over records (1000
resamples, seeded with the report's seed): they stay inside [0, 1] for scores near 1, where a
normal approximation would not.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from interp_edit import _files, _validate
from interp_edit.errors import InterpEditError
from interp_edit.evaluation.metrics import METRICS

_FORMAT = "interp_edit.EvalReport/1"
_N_BOOT = 1000
# every metric column of a row; "pre_<name>" holds the value before the edit
METRIC_COLUMNS: tuple[str, ...] = (
    *(name + s for name, m in METRICS.items() for s in m.suffixes),
    "unchanged_top1",
    "fluency",
)
# the headline columns of summary tables
MAIN_COLUMNS = ("efficacy", "paraphrase", "neighborhood", "reverse", "portability",
                "unchanged_top1", "fluency")


@dataclass(frozen=True)
class Summary:
    """The mean of a metric over records, its 95% bootstrap CI, and how many records had it."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


@dataclass(frozen=True)
class EvalReport:
    """Rows (one dict per evaluated record: ids, ``pre_*`` and post-edit metrics, ``seconds``
    for the edit) and the records skipped, with why."""

    method: str
    model_name: str
    hparams: dict[str, Any]
    rows: tuple[dict[str, Any], ...]
    skipped: tuple[dict[str, Any], ...] = ()
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """How many records were evaluated."""
        return len(self.rows)

    def head(self, n: int | None, records: Sequence[Any]) -> "EvalReport":
        """The report as a run with ``n=n`` over ``records`` would have written it: the first
        ``n`` evaluated rows and the records skipped before the last of them (records are
        taken in order, so a saved 200-record run also serves a 50-record comparison on the
        same records). ``records``: the records the run was given (anything with a
        ``case_id``)."""
        n = _validate.optional_count("n", n)
        if n is None or self.n <= n:
            return self
        order = {str(r.case_id): i for i, r in enumerate(records)}
        missing = [str(x["case_id"]) for x in (*self.rows, *self.skipped)
                   if str(x["case_id"]) not in order]
        if missing:
            raise InterpEditError(f"record {missing[0]!r} of this report is not among the "
                                  "records given: pass the records the run was made on")
        rows = self.rows[:n]
        last = order[str(rows[-1]["case_id"])]
        skipped = tuple(s for s in self.skipped if order[str(s["case_id"])] < last)
        info = {**self.info, "n_requested": n, "n_records": len(rows) + len(skipped),
                "sliced_from": self.n}
        if "seconds_total" in info:  # pro rata
            info["seconds_total"] = info["seconds_total"] * len(rows) / self.n
        return dataclasses.replace(self, rows=rows, skipped=skipped, info=info)

    def skip_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.skipped:
            out[s["kind"]] = out.get(s["kind"], 0) + 1
        return out

    def summary(self, column: str) -> Summary | None:
        """Mean and 95% CI of one column over the records that have it (None if none do)."""
        x = np.array([r[column] for r in self.rows if r.get(column) is not None], dtype=float)
        if not len(x):
            return None
        rng = np.random.default_rng(self.seed)
        means = x[rng.integers(0, len(x), (_N_BOOT, len(x)))].mean(1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        return Summary(float(x.mean()), float(lo), float(hi), len(x))

    def aggregate(self) -> dict[str, Summary]:
        """Every metric (post-edit and ``pre_``) and ``seconds`` that some record has."""
        cols = [*METRIC_COLUMNS, *("pre_" + c for c in METRIC_COLUMNS), "seconds"]
        return {c: s for c in cols if (s := self.summary(c)) is not None}

    # ---- text -------------------------------------------------------------------------------
    def headline(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in self.skip_reasons().items())
        skipped = f"; skipped {len(self.skipped)} ({reasons})" if self.skipped else ""
        return (f"{self.method} on {self.model_name}: {self.n} records evaluated "
                f"of {self.n + len(self.skipped)} seen{skipped}")

    def to_markdown(self) -> str:
        """Each metric before and after the edit, with 95% CIs and the number of records."""
        agg = self.aggregate()
        lines = [f"**{self.headline()}**", "",
                 "| metric | before edit | after edit (95% CI) | records |", "|---|---|---|---|"]
        for c in METRIC_COLUMNS:
            if c in agg:
                pre = agg.get("pre_" + c)
                lines.append(f"| {c} | {pre.mean:.3f} | {agg[c]} | {agg[c].n} |" if pre else
                             f"| {c} | | {agg[c]} | {agg[c].n} |")
        if "seconds" in agg:
            lines.append(f"| seconds per edit | | {agg['seconds']} | {agg['seconds'].n} |")
        return "\n".join(lines) + "\n"

    # ---- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = _FORMAT
        d["aggregate"] = {k: dataclasses.asdict(v) for k, v in self.aggregate().items()}
        return d

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``<name>.json`` (everything), ``<name>.csv`` (rows) and ``<name>.md``.

        ``out`` is a directory (files named after the method) or a ``.json`` path.
        Returns the JSON path.
        """
        path = report_path(out, self.method)
        _files.write_json(path, self.to_dict(), indent=1, default=str)
        with _files.atomic_open(path.with_suffix(".csv"), "w", newline="") as f:
            cols = list(dict.fromkeys(k for r in self.rows for k in r))
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            writer.writerows(self.rows)
        _files.write_text(path.with_suffix(".md"), self.to_markdown())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalReport":
        """Read a report written by :meth:`save`; a damaged or foreign file raises
        ``CorruptFileError``."""
        path = Path(path)
        with _files.reading(path, "evaluation report",
                            "run `interp-edit evaluate ... --out` again to rewrite it"):
            d = _files.read_json(path)
            _files.require(isinstance(d, dict) and d.get("format") == _FORMAT,
                           f"it is not of format {_FORMAT}")
            names = {f.name for f in dataclasses.fields(cls)}
            d = {k: v for k, v in d.items() if k in names}
            report = cls(**{**d, "rows": tuple(d["rows"]), "skipped": tuple(d["skipped"])})
            _check_loaded(report)
        return report


def _check_loaded(report: EvalReport) -> None:
    """The fields of a read report have the types :meth:`EvalReport.save` writes."""
    for name, kind in (("method", str), ("model_name", str), ("hparams", dict),
                       ("seed", int), ("info", dict)):
        _files.require(isinstance(getattr(report, name), kind),
                       f"its {name} is not a {kind.__name__}")
    _files.require(all(isinstance(r, dict) for r in (*report.rows, *report.skipped)),
                   "a row is not a JSON object")
    for r in report.rows:
        bad = [c for c in METRIC_COLUMNS if r.get(c) is not None
               and (isinstance(r[c], bool) or not isinstance(r[c], (int, float)))]
        _files.require(not bad, f"row {r.get('case_id')!r} has metrics that are not numbers: "
                                f"{bad}")


def report_path(out: str | os.PathLike, method: str) -> Path:
    """Where :meth:`EvalReport.save` writes a ``method`` report given ``out`` (a directory,
    or a ``.json`` path)."""
    out = Path(out)
    return out if out.suffix == ".json" else out / f"{method}.json"


def summary_table(reports: Sequence[EvalReport], columns: Sequence[str] = MAIN_COLUMNS) -> str:
    """One markdown row per report (method), headline metrics with 95% CIs.

    The no-edit baseline is the report of ``evaluate(..., method="none")``.
    """
    cols = [c for c in columns if any(r.summary(c) for r in reports)]
    lines = ["| method | records | skipped | " + " | ".join(cols) + " | s/edit |",
             "|---" * (len(cols) + 4) + "|"]
    for r in reports:
        cells = [str(s) if (s := r.summary(c)) else "" for c in cols]
        sec = r.summary("seconds")
        cells.append(f"{sec.mean:.2f}" if sec else "")
        lines.append(f"| {r.method} | {r.n} | {len(r.skipped)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
