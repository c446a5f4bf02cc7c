"""Run a :class:`~interp_edit.jobs.plan.Plan`'s missing units, in this process or on Ray.

    with open_executor(plan, model, executor="ray", workers=2) as ex:
        stats = execute(plan, ex)

- ``executor="local"`` (the default of every dataset function): one unit after another on
  the caller's model, in this process.
- ``executor="ray"``: one Ray actor per worker, each loading the model from the plan's
  :class:`~interp_edit.jobs.plan.ModelSpec` once and checking its fingerprint. Without
  ``address`` (and no ``RAY_ADDRESS``) a local Ray instance is started with one worker per
  CPU, each with its own torch thread budget (``cpus // workers`` threads, so workers do not
  oversubscribe the cores) and shut down at the end; with one, the existing cluster is joined
  (``workers`` defaults to its GPUs, else its CPUs). A Ray instance this process already
  started (``ray.init``) is used as it is.

Either way the *driver* writes every result file (:func:`~interp_edit.jobs.plan.write_atomic`):
results come back through Ray's object store, so workers need no shared filesystem with the
driver. Faults: a killed worker is restarted by Ray and its tasks retried; a unit whose
actor is gone for good goes to another worker. Ctrl-C stops the run; only whole result files
remain, and the next run does only the units whose files are missing or fail their check.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from interp_edit.errors import InterpEditError
from interp_edit.jobs.plan import ModelSpec, Plan, Unit, read_result, write_atomic
from interp_edit.jobs.tasks import task
from interp_edit.models import Model

EXECUTORS = ("local", "ray")
_IN_FLIGHT = 2  # tasks queued per actor, so a worker never waits for the driver
_ATTEMPTS = 3  # times a unit is sent out again after its actor died for good


@dataclass
class RunStats:
    """What one :func:`execute` did: units found done, units computed, and the processes
    that computed them (a restarted worker is a new process)."""

    reused: int = 0
    ran: int = 0
    pids: Counter = field(default_factory=Counter)


class Executor(Protocol):
    def map(self, plan: Plan, units: Sequence[Unit]) -> Iterator[tuple[Unit, bytes, int]]:
        """``(unit, result bytes, pid)`` for every unit, in the order they finish."""


class LocalExecutor:
    """Units one after another on the caller's model, in this process."""

    def __init__(self, model: Model):
        self.model = model

    def map(self, plan: Plan, units: Sequence[Unit]) -> Iterator[tuple[Unit, bytes, int]]:
        run = task(plan.task).run
        for unit in units:
            yield unit, run(self.model, plan.settings, unit.payload), os.getpid()


class _Worker:
    """A Ray actor: the model, loaded once from the plan's spec, and the task functions."""

    def __init__(self, spec: dict[str, Any], threads: int):
        import ray

        torch.set_num_threads(threads)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.model = ModelSpec(**spec).load(device)

    def ready(self) -> int:
        return os.getpid()

    def run(self, name: str, settings: dict[str, Any], payload: dict[str, Any]) -> tuple[bytes, int]:
        return task(name).run(self.model, settings, payload), os.getpid()


def _ray():
    try:
        import ray
    except ImportError:
        raise InterpEditError(
            "executor='ray' needs the package 'ray' (pip install ray); executor='local' "
            "runs without it") from None
    return ray


class RayExecutor:
    """Units on Ray actors (see the module docstring); ``close`` ends them."""

    def __init__(self, spec: ModelSpec, workers: int | None = None, address: str | None = None):
        ray = self.ray = _ray()
        self.started = False
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
            warnings.warn(
                "OMP_WAIT_POLICY=ACTIVE with executor='ray': the driver's idle OpenMP threads "
                "spin while the workers compute and take CPU from them; unset it for Ray runs",
                UserWarning, stacklevel=3)
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
                self.started = True
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        workers = workers or gpus or cpus
        if workers < 1:
            raise InterpEditError(f"workers must be at least 1, got {workers}")
        threads = max(1, cpus // workers)
        options = dict(num_cpus=min(threads, cpus), num_gpus=1 if gpus else 0,
                       max_restarts=_ATTEMPTS, max_task_retries=_ATTEMPTS)
        actor = ray.remote(**options)(_Worker)
        self.actors = [actor.remote(asdict(spec), threads) for _ in range(workers)]
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise InterpEditError(f"a Ray worker could not load the model: {exc}") from None

    def map(self, plan: Plan, units: Sequence[Unit]) -> Iterator[tuple[Unit, bytes, int]]:
        ray = self.ray
        settings = ray.put(plan.settings)
        queue, pending, tries = deque(units), {}, Counter()

        def submit(actor) -> None:
            unit = queue.popleft()
            pending[actor.run.remote(plan.task, settings, unit.payload)] = (unit, actor)

        for _ in range(_IN_FLIGHT):
            for actor in self.actors:
                if queue:
                    submit(actor)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            unit, actor = pending.pop(ref)
            try:
                data, pid = ray.get(ref)
            except ray.exceptions.RayActorError:  # restarts used up: send it elsewhere
                if actor in self.actors:
                    self.actors.remove(actor)
                tries[unit.key] += 1
                if not self.actors or tries[unit.key] > _ATTEMPTS:
                    raise InterpEditError(f"unit {unit.key}: its Ray workers kept dying "
                                          f"({tries[unit.key]} tries)") from None
                queue.appendleft(unit)
                actor = self.actors[0]
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                raise InterpEditError(f"unit {unit.key} failed on a Ray worker: {cause}") from None
            else:
                yield unit, data, pid
            if queue:
                submit(actor)

    def close(self) -> None:
        for actor in self.actors if hasattr(self, "actors") else ():
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


@contextmanager
def open_executor(plan: Plan, model: Model | None = None, executor: str = "local",
                  workers: int | None = None, address: str | None = None) -> Iterator[Executor]:
    """The executor that runs ``plan``'s units (``model``: the caller's, for ``"local"``)."""
    if executor == "local":
        if workers not in (None, 1) or address is not None:
            raise InterpEditError("workers= and address= are for executor='ray'")
        if model is None:
            model = plan.model.load()
        yield LocalExecutor(model)
    elif executor == "ray":
        ex = RayExecutor(plan.model, workers, address)
        try:
            yield ex
        finally:
            ex.close()
    else:
        raise InterpEditError(f"unknown executor {executor!r}: choose from {EXECUTORS}")


def missing(plan: Plan, units: Sequence[Unit] | None = None) -> list[Unit]:
    """The units whose result file is absent or fails its check (such a file is removed)."""
    check = task(plan.task).check
    return [u for u in (plan.units if units is None else units)
            if read_result(plan.path(u), lambda d, u=u: check(d, plan.settings, u.payload)) is None]


def execute(plan: Plan, ex: Executor, units: Sequence[Unit] | None = None, *,
            progress: bool = True, desc: str | None = None, bar: tqdm | None = None) -> RunStats:
    """Compute the missing results of ``units`` (default: all the plan's) and write them.
    One progress bar on the driver: ``bar`` if given (updated once per unit), else its own."""
    units = plan.units if units is None else units
    todo = missing(plan, units)
    stats = RunStats(reused=len(units) - len(todo))
    check = task(plan.task).check
    own = bar is None
    if own:
        bar = tqdm(total=len(units), initial=stats.reused, unit=plan.task,
                   desc=desc or plan.task, disable=not progress, dynamic_ncols=True)
    try:
        for unit, data, pid in ex.map(plan, todo):
            check(data, plan.settings, unit.payload)  # never write a result that fails it
            write_atomic(plan.path(unit), data)
            stats.ran += 1
            stats.pids[pid] += 1
            bar.update()
    finally:
        if own:
            bar.close()
    return stats


def run_plan(plan: Plan, model: Model | None = None, *, executor: str = "local",
             workers: int | None = None, address: str | None = None,
             progress: bool = True, desc: str | None = None) -> RunStats:
    """Open the executor, compute what is missing, close it. Nothing to do: no workers start."""
    if not missing(plan):
        return RunStats(reused=len(plan.units))
    with open_executor(plan, model, executor, workers, address) as ex:
        return execute(plan, ex, progress=progress, desc=desc)
