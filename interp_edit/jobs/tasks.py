"""The work a plan's units do, by task name: run one unit on a model and return its result
file's bytes, and check such bytes against the unit they answer.

A task is one registry line; the same functions run in the caller's process (the local
executor) and on Ray workers, so both write the same results.

- ``"trace"``: one fact traced under one :class:`~interp_edit.tracing.average.Condition`
  (the per-fact ``.npz`` of :func:`~interp_edit.tracing.dataset.trace_dataset`);
- ``"evaluate"``: one record edited, measured and undone (a JSON row of
  :func:`~interp_edit.evaluation.harness.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from interp_edit.errors import InterpEditError
from interp_edit.models import Model

Settings = dict[str, Any]
Payload = dict[str, Any]


@dataclass(frozen=True)
class Task:
    run: Callable[[Model, Settings, Payload], bytes]
    check: Callable[[bytes, Settings, Payload], None]  # raises if the bytes do not answer


def _run_trace(model: Model, settings: Settings, payload: Payload) -> bytes:
    from interp_edit.tracing.api import trace
    from interp_edit.tracing.average import Condition

    c = Condition(**payload["condition"])
    prompt, subject = payload["prompt"], payload["subject"]
    # a severed trace is only read at the last subject token (ROME Fig. 3)
    last_subject = [model.subject_range(prompt, subject)[1] - 1] if c.sever else None
    r = trace(model, prompt, subject, target=payload["target"], kind=c.kind,
              window=settings["window"], samples=settings["samples"],
              noise=settings["noise_std"], seed=settings["seed"], method=c.method,
              precision=c.precision, estimate=c.estimate or "logodds", sever=c.sever,
              top=c.top, positions=last_subject, progress=False)
    # the trace saw a float std: record where it came from (the dataset's subjects); and the
    # caller's name of the model (a worker may have loaded it from a saved copy)
    return dataclasses.replace(r, noise_source=settings["noise_source"],
                               model_name=settings["model_name"]).to_bytes()


def _check_trace(data: bytes, settings: Settings, payload: Payload) -> None:
    from interp_edit.tracing.dataset import trace_differs
    from interp_edit.tracing.results import TraceResult

    if differ := trace_differs(TraceResult.from_bytes(data), payload, settings):
        raise InterpEditError(f"another trace: it differs in {', '.join(differ)}")


def _run_evaluate(model: Model, settings: Settings, payload: Payload) -> bytes:
    from interp_edit.evaluation.harness import _evaluate_one
    from interp_edit.evaluation.records import EditRecord

    index, rec = payload["index"], EditRecord.from_dict(payload["record"])
    torch.manual_seed(settings["seed"] + index)
    row = _evaluate_one(model, rec, settings["method"], settings["hparams"],
                        [tuple(p) for p in settings["pool"]], settings["pool_top1"],
                        settings["fluency_tokens"])
    return json.dumps({"index": index, "case_id": rec.case_id, "row": row}).encode()


def _check_evaluate(data: bytes, settings: Settings, payload: Payload) -> None:
    d = json.loads(data)
    want = (payload["index"], payload["record"]["case_id"])
    if (d["index"], d["case_id"]) != want or d["row"]["case_id"] != want[1]:
        raise InterpEditError(f"evaluate result answers {d['index'], d['case_id']}, not {want}")


TASKS: dict[str, Task] = {
    "trace": Task(_run_trace, _check_trace),
    "evaluate": Task(_run_evaluate, _check_evaluate),
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise InterpEditError(f"unknown task {name!r}: choose from {sorted(TASKS)}")
    return TASKS[name]
