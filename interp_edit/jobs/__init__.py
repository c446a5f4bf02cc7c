"""Dataset jobs as plan -> units -> collect, run in this process or on a Ray cluster.

:func:`~interp_edit.tracing.dataset.trace_dataset` and
:func:`~interp_edit.evaluation.harness.evaluate` build a :class:`Plan` (frozen, JSON), run its
missing units with an executor (``executor="local"`` or ``"ray"``), each unit writing one
content-addressed result file, and collect those files into an ``AverageTrace`` or an
``EvalReport``. See :mod:`interp_edit.jobs.plan` and :mod:`interp_edit.jobs.executors`.
"""

from interp_edit.jobs.executors import (
    EXECUTORS,
    RunStats,
    execute,
    missing,
    open_executor,
    run_plan,
)
from interp_edit.jobs.plan import ModelSpec, Plan, Unit, read_result, unit_key, write_atomic

__all__ = ["EXECUTORS", "ModelSpec", "Plan", "RunStats", "Unit", "execute", "missing",
           "open_executor", "read_result", "run_plan", "unit_key", "write_atomic"]
