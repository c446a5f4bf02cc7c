"""``evaluate`` as a plan: one unit (and one JSON result file) per record, run by an executor,
collected in record order into the :class:`~interp_edit.evaluation.report.EvalReport` one
uninterrupted in-process run returns.

:func:`~interp_edit.evaluation.harness.evaluate` comes here with ``executor="ray"`` or a
``results_dir``. ``n`` (stop after ``n`` evaluated records) is honoured without computing
every record: units are sent out in record order, in rounds of the records still needed
(at least two per Ray worker), until the first records that have results hold ``n`` rows;
:func:`collect` then walks them in order exactly as the sequential loop does (skipped records
count in ``skipped``, not in ``n``). A record's seed is ``seed + its position`` and the
unrelated prompts are fixed by the plan, so where a record runs does not change its row.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from interp_edit import _cache
from interp_edit.evaluation.records import EditRecord
from interp_edit.jobs.executors import execute, missing, open_executor
from interp_edit.jobs.plan import ModelSpec, Plan, Unit, read_result, unit_key
from interp_edit.jobs.tasks import task
from interp_edit.models import Model


def evaluate_plan(
    model: Model,
    records: Sequence[EditRecord],
    method: str,
    hparams: dict[str, Any],
    *,
    seed: int,
    pool: Sequence[tuple[str, str]],
    pool_top1: Sequence[int],
    fluency_tokens: int,
    results_dir: str | None,
    local: bool,
) -> Plan:
    """The plan of one evaluation: its result files under ``results_dir`` (default: the user
    cache, by model), named by the weights, method, hparams, seed, unrelated prompts,
    fluency setting, the record and its position."""
    settings = dict(method=method, hparams=dict(hparams), seed=seed,
                    pool=[list(p) for p in pool], pool_top1=list(pool_top1),
                    fluency_tokens=fluency_tokens)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name)
    out = results_dir if results_dir is not None else str(_cache.cache_dir("evaluate", slug))
    common = [model.weights_key, settings]
    units = tuple(Unit(unit_key(*common, i, r.to_dict(), suffix=".json"),
                       {"index": i, "record": r.to_dict()}) for i, r in enumerate(records))
    return Plan("evaluate", ModelSpec.of(model, None if local else out), settings, units, out)


def collect(plan: Plan, n: int | None) -> tuple[list[dict], list[dict], bool]:
    """Rows and skipped records in record order up to the ``n``-th row; whether that is all
    (``False``: a record before it has no result yet)."""
    rows: list[dict] = []
    skipped: list[dict] = []
    check = task(plan.task).check
    for u in plan.units:
        if n is not None and len(rows) >= n:
            break
        data = read_result(plan.path(u), lambda d, u=u: check(d, plan.settings, u.payload))
        if data is None:
            return rows, skipped, False
        row = json.loads(data)["row"]
        (skipped if "kind" in row else rows).append(row)
    return rows, skipped, True


def run_evaluation(plan: Plan, model: Model, *, n: int | None, executor: str,
                   workers: int | None, address: str | None,
                   progress: bool) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Compute what ``n`` rows need, in rounds; ``(rows, skipped, info)``. Ctrl-C stops it
    (``info["interrupted"]``): the rows before the first missing record are returned and
    every result file written is whole, for the next run to keep."""
    t0 = time.perf_counter()
    rows, skipped, complete = collect(plan, n)
    info: dict[str, Any] = {"executor": executor, "results_dir": plan.out,
                            "resumed_from": len(rows) or None, "interrupted": False}
    if complete:
        return rows, skipped, {**info, "seconds_total": time.perf_counter() - t0}
    bar = tqdm(total=n or len(plan.units), initial=len(rows), unit="record",
               desc=f"evaluate {plan.settings['method']}", disable=not progress)
    try:
        with bar, open_executor(plan, model, executor, workers, address) as ex:
            width = 2 * len(getattr(ex, "actors", [None]))  # keep every worker busy
            while not complete:
                need = len(plan.units) if n is None else max(n - len(rows), width)
                todo = missing(plan)[:need]
                if not todo:
                    break
                execute(plan, ex, todo, bar=bar)
                rows, skipped, complete = collect(plan, n)
    except KeyboardInterrupt:
        info["interrupted"] = True
        rows, skipped, _ = collect(plan, n)
    return rows, skipped, {**info, "seconds_total": time.perf_counter() - t0}

