"""``evaluate``: edit, measure, undo, for every record, with any registered editor.

For each record, in order, until ``n`` records have been evaluated:

1. skip it if its request is invalid for this model (``EditRequest.validate``), or if the
   model does not already prefer ``target_true`` to ``target_new`` on the edit prompt (mean
   per-token log-probability, as the efficacy metric): an edit of a fact the model does not
   know measures nothing;
2. measure it before the edit (one batched pass over all its probes; plus fluency if asked);
3. edit it alone with ``interp_edit.editing.edit(model, [record.request], method, **hparams)``
   (``torch.manual_seed(seed + i)`` first, so stochastic editors are reproducible), time it;
4. measure it after the edit, through ``edit.wrap`` (so in-context editors are measured by the
   same functions), plus the unchanged top-1 rate on unrelated prompts; the editor's scalar
   ``info`` (e.g. the chosen layer) goes into the row as ``info_<key>`` columns;
5. undo the edit (also on error).

``method="none"`` is the no-edit baseline: the same table with the model left as it is.
Unrelated prompts are the edit prompts of ``n_unrelated`` records drawn (seeded) from all
records, minus those about the record's own subject; their top-1 tokens are taken once up front.
Ctrl-C (KeyboardInterrupt) stops early and returns the records evaluated so far
(``report.info["interrupted"]``); ``evaluate(..., resume=that_report)`` goes on from there and
returns what one uninterrupted run would have (the same rows: each record's seed depends only
on its position, and the unrelated prompts only on ``seed``).

``batch_size=B`` edits B records per edit call instead, and ``sequential=True`` applies batch
after batch without undo, measuring everything edited so far along the way
(:mod:`interp_edit.evaluation.streams`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from interp_edit import _validate
from interp_edit.editing.base import AppliedEdit, check_hparams, edit, make_hparams
from interp_edit.errors import InterpEditError
from interp_edit.evaluation import metrics, streams
from interp_edit.evaluation.records import EditRecord
from interp_edit.evaluation.report import EvalReport
from interp_edit.models import Model

BASELINE = "none"
log = logging.getLogger(__name__)


def evaluate(
    model: Model,
    records: Iterable[EditRecord],
    method: str = "rome",
    *,
    n: int | None = None,
    progress: bool = True,
    fluency: bool = False,
    seed: int = 0,
    n_unrelated: int = 10,
    fluency_tokens: int = 40,
    resume: EvalReport | None = None,
    batch_size: int | None = None,
    sequential: bool = False,
    every: int = 1,
    perplexity_text: str | None = None,
    edits_dir: str | None = None,
    **hparams: Any,
) -> EvalReport:
    """Edit, measure and undo each record; returns per-record rows and aggregates with CIs.

    ``n``: stop after this many *evaluated* records (skipped ones do not count); ``None``: all.
    ``fluency``: also measure ROME's n-gram entropy of greedy generations (slow on a CPU).
    ``hparams`` go to the editor (``method="none"`` takes none).
    ``resume``: a report of an earlier (interrupted) run with the same model, method, hparams,
    seed and settings; its records are kept and not evaluated again.
    ``batch_size``, ``sequential``, ``every``, ``perplexity_text``, ``edits_dir``: the batch and
    sequential protocols (:mod:`~interp_edit.evaluation.streams`; ``sequential`` without a
    ``batch_size`` edits one record per batch).
    """
    _validate.instance("model", model, Model)
    records = _validate.items("records", records)
    if not records:
        raise InterpEditError("no records to evaluate: load some with load_counterfact/load_zsre")
    if bad := [type(r).__name__ for r in records if not isinstance(r, EditRecord)][:1]:
        raise InterpEditError(f"evaluate takes EditRecords (load_counterfact, load_zsre), "
                              f"not {bad[0]}")
    n = _validate.optional_count("n", n)
    seed = _validate.seed("seed", seed)
    n_unrelated = _validate.count("n_unrelated", n_unrelated, 0)
    fluency_tokens = _validate.count("fluency_tokens", fluency_tokens)
    # the whole configuration before the first record: a wrong one is an error, not a skip
    # of every record ("edit failed" is for what goes wrong with one record's edit)
    hp = _resolve_hparams(model, method, hparams)

    rng = random.Random(seed)
    pool = [(r.subject, r.text) for r in rng.sample(records, min(n_unrelated, len(records)))]
    pool_top1 = metrics.top1(model, [p for _, p in pool])

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    settings = {"fluency_tokens": fluency_tokens if fluency else None,
                "unrelated_prompts": [p for _, p in pool]}
    stream = None
    if batch_size is not None or sequential:
        stream = streams.StreamOptions(1 if batch_size is None else batch_size, sequential,
                                       every, perplexity_text, edits_dir=edits_dir)
        if method == BASELINE:
            raise InterpEditError("the batch and sequential protocols need an edit method")
        settings.update(stream.settings())
    seconds_before = 0.0
    if resume is not None:
        _check_resume(resume, model, method, hp, seed, settings)
        if stream is None:
            rows, skipped = list(resume.rows), list(resume.skipped)
            seconds_before = float(resume.info.get("seconds_total", 0.0))
    if stream is not None:
        t_start = time.perf_counter()
        chosen, skipped = streams.select(model, records, n, _skip_reason)
        rows, info = streams.run_stream(model, chosen, method, hparams, stream, pool, pool_top1,
                                        fluency_tokens if fluency else 0, seed, resume)
        return EvalReport(method=method, model_name=model.name, hparams=hp, rows=tuple(rows),
                          skipped=tuple(skipped), seed=seed,
                          info={"seconds_total": time.perf_counter() - t_start
                                + (float(resume.info.get("seconds_total", 0)) if resume else 0),
                                "n_requested": n, "n_records": len(records), **settings,
                                **info})
    done = {str(x["case_id"]) for x in (*rows, *skipped)}
    bar = tqdm(total=n or len(records), initial=len(rows), desc=f"evaluate {method}",
               disable=not progress)
    t_start, interrupted = time.perf_counter(), False
    try:
        for i, rec in enumerate(records):
            if n is not None and len(rows) >= n:
                break
            if str(rec.case_id) in done:
                continue
            torch.manual_seed(seed + i)
            out = _evaluate_one(model, rec, method, hparams, pool, pool_top1,
                                fluency_tokens if fluency else 0)
            if "kind" in out:
                skipped.append(out)
                bar.set_postfix(skipped=len(skipped))
            else:
                rows.append(out)
                bar.update(1)
    except KeyboardInterrupt:  # keep what was measured; the record in flight was undone
        interrupted = True
        log.warning("evaluate interrupted: returning the %d records evaluated so far", len(rows))
    finally:
        bar.close()
    return EvalReport(
        method=method,
        model_name=model.name,
        hparams=hp,
        rows=tuple(rows),
        skipped=tuple(skipped),
        seed=seed,
        info={"seconds_total": seconds_before + time.perf_counter() - t_start,
              "n_requested": n, "interrupted": interrupted, "n_records": len(records),
              "resumed_from": resume.n if resume is not None else None, **settings},
    )


def _check_resume(report: EvalReport, model: Model, method: str, hp: dict[str, Any],
                  seed: int, settings: dict[str, Any]) -> None:
    """Refuse to resume a report made with other settings (its rows would not match)."""
    theirs = {"model": report.model_name, "method": report.method, "hparams": report.hparams,
              "seed": report.seed, **{k: report.info.get(k) for k in settings}}
    ours = {"model": model.name, "method": method, "hparams": hp, "seed": seed, **settings}

    def plain(x: Any) -> Any:  # as saved: tuples become lists
        return json.loads(json.dumps(x, default=str))

    differ = [k for k in ours if plain(theirs[k]) != plain(ours[k])]
    if differ:
        raise InterpEditError(
            f"cannot resume: the report differs in {', '.join(differ)} "
            f"(report: {', '.join(f'{k}={theirs[k]!r}' for k in differ)[:300]}); "
            "evaluate with the same settings, or start afresh"
        )


def _evaluate_one(
    model: Model,
    rec: EditRecord,
    method: str,
    hparams: dict[str, Any],
    pool: list[tuple[str, str]],
    pool_top1: list[int],
    fluency_tokens: int,
) -> dict[str, Any]:
    """The row of one record, or ``{"case_id", "kind", "reason"}`` if it is skipped."""
    why = _skip_reason(model, rec)
    if why is None:
        pre = metrics.measure(model, rec)
        if pre["efficacy"] > 0:
            why = ("unknown", "the model does not prefer target_true to target_new")
    if why is not None:
        return {"case_id": rec.case_id, "kind": why[0], "reason": why[1]}
    gen = (rec.generation_prompts or (rec.text, *rec.paraphrases[:1])) if fluency_tokens else ()
    if gen:
        pre["fluency"] = metrics.fluency(model, gen, None, fluency_tokens)
    unrelated = [(p, t) for (s, p), t in zip(pool, pool_top1) if s != rec.subject]

    t0 = time.perf_counter()
    try:
        applied = None if method == BASELINE else edit(model, [rec.request], method, **hparams)
    except InterpEditError as exc:
        return {"case_id": rec.case_id, "kind": "edit failed", "reason": str(exc)}
    seconds = time.perf_counter() - t0
    try:
        post = _measure_after(model, rec, pre, applied, unrelated, gen, fluency_tokens)
    finally:
        if applied is not None and applied.applied:
            applied.undo()
    return {
        "case_id": rec.case_id, "subject": rec.subject, "target_true": rec.target_true,
        "target_new": rec.target_new, "source": rec.source, "seconds": seconds,
        **{"pre_" + k: v for k, v in pre.items()}, **post, **_scalar_info(applied),
    }


def _measure_after(
    model: Model,
    rec: EditRecord,
    pre: dict[str, Any],
    applied: AppliedEdit | None,
    unrelated: list[tuple[str, int]],
    gen: tuple[str, ...],
    fluency_tokens: int,
) -> dict[str, Any]:
    # the baseline leaves the model as it is: its "after" is its "before" (already measured)
    out: dict[str, Any] = dict(pre) if applied is None else metrics.measure(model, rec, applied)
    out["unchanged_top1"] = metrics.unchanged_top1(
        model, [p for p, _ in unrelated], [t for _, t in unrelated], applied
    )
    if gen and applied is not None:
        out["fluency"] = metrics.fluency(model, gen, applied, fluency_tokens)
    return out


def _scalar_info(applied: AppliedEdit | None) -> dict[str, Any]:
    """The editor's scalar details (e.g. ROME's chosen layer) as ``info_<key>`` columns."""
    if applied is None:
        return {}
    ok = (bool, int, float, str)
    return {f"info_{k}": v for k, v in applied.info.items() if isinstance(v, ok)}


def _skip_reason(model: Model, rec: EditRecord) -> tuple[str, str] | None:
    if rec.target_new.strip() == rec.target_true.strip():
        return ("invalid", "target_new equals target_true")
    try:
        rec.request.validate(model)
    except InterpEditError as exc:
        return ("invalid", str(exc))
    return None


def _resolve_hparams(model: Model, method: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The editor's full hparams (defaults filled in), checked against the model (layers,
    editor and pool files: :func:`~interp_edit.editing.base.check_hparams`) before any
    record is edited."""
    if method == BASELINE:
        if hparams:
            raise InterpEditError(
                f"method='none' (no edit) takes no hparams, got {sorted(hparams)}")
        return {}
    hp = make_hparams(method, **hparams)
    check_hparams(hp, model)
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)}
