"""Plans, result files and executors: Ray and local give the same collected results on the
tiny fact model, a worker killed mid-run costs only its task, Ctrl-C leaves only whole
result files and a rerun does only what is missing, corrupt files are redone.

The Ray tests start a local Ray instance of 2 CPUs for this module (no service to start by
hand); its workers rebuild the tiny model from the copy the plan saves under tmp_path."""

from __future__ import annotations

import _thread
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from interp_edit.errors import InterpEditError, ModelMismatchError
from interp_edit.evaluation import EditRecord, evaluate
from interp_edit.jobs import ModelSpec, Plan, Unit, read_result, write_atomic
from interp_edit.testing import CITIES
from interp_edit.tracing import api as T
from interp_edit.tracing.dataset import trace_dataset
from interp_edit.tracing.results import TraceResult

KW = dict(kinds=("resid", "mlp"), samples=4, progress=False)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_thread():
    """The local runs with the thread budget of each of the 2 workers on 2 CPUs: float sums
    split over another number of threads round differently, and the comparisons are bytes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _arrays(avg) -> list[bytes]:
    """Every number an AverageTrace holds, as raw bytes (NaN included)."""
    return [t.numpy().tobytes() for t in (*avg.effects, *avg.low_scores, avg.high_scores)]


def _results(d: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in d.rglob("*.npz")}


def _ray_workers() -> list[int]:
    """Pids of this test run's Ray actor processes (descendants of this process only)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    found = []
    for pid in parent:
        try:
            title = (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]).decode()
        except OSError:
            continue
        if title.startswith("ray::_Worker") and mine(pid):
            found.append(pid)
    return found


def _when_results(d: Path, action, at_least: int = 2) -> threading.Thread:
    """Run ``action()`` in a thread as soon as ``d`` holds ``at_least`` result files."""

    def wait():
        deadline = time.time() + 300
        while time.time() < deadline and len(_results(d)) < at_least:
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_ray_survives_a_killed_worker_and_equals_local(fm, tmp_path, ray_cluster):
    facts = list(fm.facts[:8])
    local = trace_dataset(fm.model, facts, cache_dir=tmp_path / "local", **KW)
    killed = []

    def kill_one():
        pids = _ray_workers()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    _when_results(tmp_path / "ray", kill_one)
    remote = trace_dataset(fm.model, facts, cache_dir=tmp_path / "ray", executor="ray",
                           workers=2, **KW)
    assert killed, "no Ray worker was found to kill"
    assert _arrays(remote) == _arrays(local)  # byte for byte, the killed unit redone
    assert remote.conditions == local.conditions and remote.prompts == local.prompts
    # the per-fact files too, including which model they name
    for name in _results(tmp_path / "local"):
        a = TraceResult.load(next((tmp_path / "local").rglob(name)))
        b = TraceResult.load(next((tmp_path / "ray").rglob(name)))
        assert torch.equal(a.scores.nan_to_num(-9), b.scores.nan_to_num(-9))
        assert (a.model_name, a.low_score) == (b.model_name, b.low_score)


def test_ctrl_c_leaves_whole_files_and_a_rerun_does_only_the_rest(fm, tmp_path, ray_cluster):
    facts = list(fm.facts[:8])
    local = trace_dataset(fm.model, facts, cache_dir=tmp_path / "local", **KW)
    out = tmp_path / "ray"
    _when_results(out, _thread.interrupt_main, at_least=3)
    with pytest.raises(KeyboardInterrupt):
        trace_dataset(fm.model, facts, cache_dir=out, executor="ray", workers=2, **KW)
    before = _results(out)
    assert 3 <= len(before) < 2 * len(facts)
    for p in out.rglob("*.npz"):
        if p.name in before:
            TraceResult.load(p)  # every file left is whole
    assert not list(out.rglob("*.part"))
    again = trace_dataset(fm.model, facts, cache_dir=out, executor="ray", workers=2, **KW)
    after = _results(out)
    assert {k: after[k] for k in before} == before  # untouched: not traced again
    assert len(after) == 2 * len(facts)
    assert _arrays(again) == _arrays(local)


def _records(fm) -> list[EditRecord]:
    facts = [f for f in fm.facts if f.relation == "city"][:5]
    return [EditRecord(case_id=i, prompt=f.template, subject=f.subject, target_true=f.attribute,
                       target_new=next(c for c in CITIES if c != f.attribute),
                       paraphrases=tuple(p.format(f.subject) for p in f.paraphrases))
            for i, f in enumerate(facts)]


def _timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "info_seconds")} for r in rows]


def test_evaluate_on_ray_equals_the_in_process_run(fm, tmp_path, ray_cluster):
    recs = _records(fm)
    flipped = EditRecord(**{**recs[1].to_dict(), "target_new": recs[1].target_true,
                            "target_true": recs[1].target_new, "case_id": "x"})
    order = [recs[0], flipped, *recs[1:]]
    kw = dict(method="ft", n=3, progress=False, steps=3, layer=1)
    here = evaluate(fm.model, order, **kw)
    remote = evaluate(fm.model, order, executor="ray", workers=2, results_dir=tmp_path, **kw)
    assert _timeless(remote.rows) == json.loads(json.dumps(_timeless(here.rows)))
    assert remote.skipped == here.skipped and [r["case_id"] for r in remote.rows] == [0, 1, 2]
    assert remote.info["n_requested"] == 3 and not remote.info["interrupted"]
    # a rerun finds every result it needs: nothing is edited again, no worker starts
    again = evaluate(fm.model, order, executor="ray", workers=2, results_dir=tmp_path, **kw)
    assert again.rows == remote.rows and again.info["resumed_from"] == 3


def test_corrupt_or_foreign_result_files_are_redone(fm, tmp_path, monkeypatch):
    facts = list(fm.facts[:3])
    first = trace_dataset(fm.model, facts, cache_dir=tmp_path, **KW)
    files = sorted(tmp_path.rglob("*.npz"))
    files[0].write_bytes(files[0].read_bytes()[:200])  # half-written
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the zip's CRC catches it
    files[1].write_bytes(bytes(data))
    files[2].write_bytes(files[3].read_bytes())  # another unit's (valid) result
    files[4].unlink()
    calls = []
    real = T.trace
    monkeypatch.setattr(T, "trace", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    again = trace_dataset(fm.model, facts, cache_dir=tmp_path, **KW)
    assert len(calls) == 4
    assert _arrays(again) == _arrays(first)


def test_built_in_models_are_named_not_saved(fm, tmp_path):
    """A built-in model travels to workers by its name (each loads its own install): nothing
    is written beside the results, which would put a gigabyte of weights there."""
    from interp_edit.models import Model

    named = Model(fm.model.bridge, fm.model.tokenizer, "gemma-3-270m")
    spec = ModelSpec.of(named, tmp_path)
    assert spec.source == "gemma-3-270m" and spec.fingerprint == named.fingerprint
    assert not list(tmp_path.iterdir())


def test_plan_round_trips_and_checks_what_it_holds(fm, tmp_path):
    spec = ModelSpec.of(fm.model, tmp_path)  # a model built in memory is saved for workers
    assert Path(spec.source).is_dir() and (Path(spec.source) / "model.safetensors").exists()
    rebuilt = spec.load()
    assert rebuilt.fingerprint == spec.fingerprint
    fact = fm.facts[0]
    assert torch.equal(rebuilt.last_logits([fact.prompt]), fm.model.last_logits([fact.prompt]))
    plan = Plan("trace", spec, {"samples": 1}, (Unit("a.npz", {"x": 1}),), str(tmp_path))
    assert Plan.load(plan.save()) == plan
    with pytest.raises(ModelMismatchError, match="install the same model"):
        ModelSpec(spec.source, spec.dtype, "0" * 16).load()
    with pytest.raises(InterpEditError, match="plain JSON"):
        Plan("trace", spec, {"bad": object()}, (), str(tmp_path))
    with pytest.raises(InterpEditError, match="distinct"):
        Plan("trace", spec, {}, (Unit("a", {}), Unit("a", {})), str(tmp_path))
    with pytest.raises(InterpEditError, match="built in memory"):
        ModelSpec.of(fm.model, None).load()
    # a result file is whole or absent, and a rejected one is removed
    path = tmp_path / "r.json"
    write_atomic(path, b"{}")
    assert read_result(path, lambda d: None) == b"{}"
    assert read_result(path, lambda d: json.loads(d)["missing"]) is None
    assert not path.exists() and not list(tmp_path.glob(".*part"))


def test_executor_choices_are_checked(fm, tmp_path):
    with pytest.raises(InterpEditError, match="unknown executor"):
        trace_dataset(fm.model, fm.facts[:1], cache_dir=tmp_path, executor="dask", **KW)
    with pytest.raises(InterpEditError, match="for executor='ray'"):
        trace_dataset(fm.model, fm.facts[:1], cache_dir=tmp_path, workers=2, **KW)
    with pytest.raises(InterpEditError, match="resume= is for in-process runs"):
        evaluate(fm.model, _records(fm)[:1], method="none", executor="ray", progress=False,
                 resume=evaluate(fm.model, _records(fm)[:1], method="none", progress=False))


def test_ray_warns_when_openmp_threads_would_spin(monkeypatch):
    """OMP_WAIT_POLICY=ACTIVE makes the driver's idle OpenMP threads spin beside the workers:
    the Ray executor says so before it starts anything."""
    from interp_edit.jobs import executors

    class Stop(Exception):
        pass

    class FakeRay:
        @staticmethod
        def is_initialized():
            raise Stop

    monkeypatch.setattr(executors, "_ray", lambda: FakeRay)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    with pytest.warns(UserWarning, match="OMP_WAIT_POLICY=ACTIVE"), pytest.raises(Stop):
        executors.RayExecutor(None)
