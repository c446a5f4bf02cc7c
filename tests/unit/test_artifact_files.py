"""Saved artifacts fail safely: a damaged, truncated, foreign or tampered file raises a
CorruptFileError that names the file and says what to do (never a parser's own exception),
and every write is atomic (interp_edit._files)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import interp_edit as ie
from interp_edit import _files
from interp_edit.editing.base import AppliedEdit, EditRequest, parameter_name
from interp_edit.editing.mend import MENDConfig, MENDEditor
from interp_edit.errors import CorruptFileError, InterpEditError
from interp_edit.evaluation.report import EvalReport
from interp_edit.tracing.average import GROUPS, AverageTrace, Condition
from interp_edit.tracing.results import TraceResult, TraceSet


def _damaged(path) -> dict[str, bytes]:
    """The ways a file breaks on disk: random bytes, cut in half, emptied, one byte of its
    content flipped (two thirds in: past the headers, before an archive's directory)."""
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) * 2 // 3] ^= 0xFF
    return {"random": np.random.default_rng(0).bytes(4096), "truncated": data[: len(data) // 2],
            "empty": b"", "flipped": bytes(flipped)}


def _refused(load, path, contents: bytes, fix: str) -> None:
    path.write_bytes(contents)
    with pytest.raises(CorruptFileError) as err:
        load(path)
    assert str(path) in str(err.value) and fix in str(err.value)


def _trace(kind: str = "resid") -> TraceResult:
    return TraceResult(
        scores=torch.rand(5, 4), low_score=0.1, high_score=0.9, prompt="a b c d e",
        subject="b c", tokens=list("abcde"), token_ids=[1, 2, 3, 4, 5], subject_range=(1, 3),
        target="x", target_id=7, kind=kind, window=2, noise_std=0.3, noise_source="fixed std",
        samples=2, seed=1, model_name="m", method="fast")


def _average() -> AverageTrace:
    return AverageTrace(
        conditions=(Condition("mlp"),), effects=(torch.rand(2, len(GROUPS), 4).double(),),
        low_scores=(torch.full((2,), 0.1).double(),), high_scores=torch.full((2,), 0.9).double(),
        prompts=("a", "b"), subjects=("A", "B"), targets=("x", "y"), n_candidates=2,
        model_name="m", noise_std=0.3, window=2, samples=2, seed=1)


def _report() -> EvalReport:
    return EvalReport(method="rome", model_name="m", hparams={"layer": 1},
                      rows=({"case_id": 1, "efficacy": 1.0}, {"case_id": 2, "efficacy": 0.0}))


def _edit(model):
    """A saved weight edit of the tiny model (applied, then undone)."""
    req = EditRequest("{} lives in the city of", "Someone", "Rome")
    name = parameter_name(model, model.mlp_out_proj(1))
    delta = torch.full_like(model.parameters_by_name[name], 1e-3)
    e = AppliedEdit.from_deltas(model, "rome", [req], {"layer": 1}, {name: delta})
    e.undo()
    return e


# ---- each artifact: its own damage, a foreign file and a tampered one -------------------------
def test_saved_edit(tiny, tmp_path):
    path = _edit(tiny).save(tmp_path / "edit.safetensors")
    back = ie.load_edit(path).apply(tiny)  # the intact file works
    back.undo()
    fix = "save the edit again"
    for contents in _damaged(path).values():
        _refused(ie.load_edit, tmp_path / "bad.safetensors", contents, fix)
    # a valid safetensors file of another kind, a MEND editor, a saved trace
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    _refused(ie.load_edit, tmp_path / "bad.safetensors",
             (tmp_path / "other.safetensors").read_bytes(), "no interp_edit metadata")
    editor = MENDEditor(MENDConfig.for_model(tiny, (2, 3), "given", rank=2))
    _refused(ie.load_edit, tmp_path / "bad.safetensors",
             editor.save(tmp_path / "mend.safetensors").read_bytes(), "not of format")
    _trace().save(tmp_path / "t.npz")
    _refused(ie.load_edit, tmp_path / "bad.safetensors", (tmp_path / "t.npz").read_bytes(), fix)
    # tampered metadata: a request that is not a request, a field of the wrong type
    meta = json.loads(_files.read_safetensors(path)[1]["interp_edit"])
    deltas = _files.read_safetensors(path)[0]
    for key, value in (("requests", [{"prompt": 5}]), ("requests", "x"), ("hparams", [1]),
                       ("method", None), ("format", "interp_edit.AppliedEdit/0")):
        bad = tmp_path / f"tampered-{key}.safetensors"
        save_file(deltas, str(bad), metadata={"interp_edit": json.dumps(meta | {key: value})})
        with pytest.raises(CorruptFileError, match=str(bad)):
            ie.load_edit(bad)
    # tampered deltas: integer deltas, or a delta of the wrong shape (refused at apply)
    bad = tmp_path / "tampered-deltas.safetensors"
    save_file({k: v.long() for k, v in deltas.items()}, str(bad),
              metadata={"interp_edit": json.dumps(meta)})
    with pytest.raises(CorruptFileError, match="floating-point"):
        ie.load_edit(bad)
    save_file({k: v[:1] for k, v in deltas.items()}, str(bad),
              metadata={"interp_edit": json.dumps(meta)})
    before = {k: v.clone() for k, v in tiny.parameters_by_name.items()}
    with pytest.raises(InterpEditError, match="shape"):
        ie.load_edit(bad).apply(tiny)
    assert all(torch.equal(before[k], v) for k, v in tiny.parameters_by_name.items())
    with pytest.raises(InterpEditError, match="does not exist"):
        ie.load_edit(tmp_path / "missing.safetensors")


def test_trace_result_and_trace_set(tmp_path):
    path, saved = tmp_path / "t.npz", _trace()
    saved.save(path)
    assert torch.equal(TraceResult.load(path).scores, saved.scores)
    tset = TraceSet(*(_trace(k) for k in ("resid", "mlp", "attn")))
    tset.save(tmp_path / "set.npz")
    assert TraceSet.load(tmp_path / "set.npz").mlp.kind == "mlp"
    for load, good in ((TraceResult.load, path), (TraceSet.load, tmp_path / "set.npz")):
        for contents in _damaged(good).values():
            _refused(load, tmp_path / "bad.npz", contents, "trace the fact again")
    # foreign: each loaded as the other, an AverageTrace, an npz of other arrays
    _refused(TraceSet.load, tmp_path / "bad.npz", path.read_bytes(), "trace the fact again")
    _refused(TraceResult.load, tmp_path / "bad.npz", _average().save(tmp_path / "a.npz")
             .read_bytes(), "trace the fact again")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    _refused(TraceResult.load, tmp_path / "bad.npz", (tmp_path / "other.npz").read_bytes(),
             "trace the fact again")
    # an object array (needs pickle: refused, never unpickled)
    np.savez(tmp_path / "pickled.npz", scores=np.array([{"a": 1}], dtype=object),
             meta=np.array("{}"))
    _refused(TraceResult.load, tmp_path / "bad.npz", (tmp_path / "pickled.npz").read_bytes(),
             "trace the fact again")
    # tampered metadata: a subject range outside the prompt, tokens that do not fit the grid
    arrays = dict(np.load(path))
    for change in ({"subject_range": [3, 9]}, {"tokens": ["a"]}, {"kind": "mlpx"},
                   {"token_ids": ["a", "b", "c", "d", "e"]}):
        meta = json.loads(str(arrays["meta"])) | change
        np.savez(tmp_path / "bad.npz", scores=arrays["scores"], meta=np.array(json.dumps(meta)))
        with pytest.raises(CorruptFileError, match="bad.npz"):
            TraceResult.load(tmp_path / "bad.npz")


def test_average_trace(tmp_path):
    path = _average().save(tmp_path / "avg.npz")
    assert AverageTrace.load(path).n_facts == 2
    fix = "run trace_dataset again"
    for contents in _damaged(path).values():
        _refused(AverageTrace.load, tmp_path / "bad.npz", contents, fix)
    _trace().save(tmp_path / "t.npz")
    _refused(AverageTrace.load, tmp_path / "bad.npz", (tmp_path / "t.npz").read_bytes(), fix)
    arrays = dict(np.load(path))
    np.savez(tmp_path / "bad.npz", **arrays | {"high_scores": np.zeros(5)})  # tampered
    with pytest.raises(CorruptFileError, match="do not fit"):
        AverageTrace.load(tmp_path / "bad.npz")


def test_eval_report(tmp_path):
    path = _report().save(tmp_path)
    assert EvalReport.load(path).rows == _report().rows
    fix = "run `interp-edit evaluate"
    for contents in _damaged(path).values():
        _refused(EvalReport.load, tmp_path / "bad.json", contents, fix)
    # foreign JSON: a dataset (a list), another object; tampered: rows or metrics of the
    # wrong kind
    d = json.loads(path.read_text())
    for foreign in ([{"case_id": 1}], {"format": "x"}, d | {"rows": [1, 2]},
                    d | {"rows": [{"case_id": 1, "efficacy": "high"}]}, d | {"seed": "0"},
                    {k: v for k, v in d.items() if k != "rows"}):
        _refused(EvalReport.load, tmp_path / "bad.json", json.dumps(foreign).encode(), fix)


def test_mend_editor(tiny, tmp_path):
    editor = MENDEditor(MENDConfig.for_model(tiny, (2, 3), "given", rank=2))
    path = editor.save(tmp_path / "mend.safetensors")
    assert MENDEditor.load(path, tiny).config == editor.config
    fix = "train it again"
    for contents in _damaged(path).values():
        _refused(MENDEditor.load, tmp_path / "bad.safetensors", contents, fix)
    edit_file = _edit(tiny).save(tmp_path / "edit.safetensors")
    _refused(MENDEditor.load, tmp_path / "bad.safetensors", edit_file.read_bytes(), fix)
    # tampered: a weight missing, a weight of another shape, a NaN weight
    tensors, meta = _files.read_safetensors(path)
    first = sorted(tensors)[0]
    for changed in ({k: v for k, v in tensors.items() if k != first},
                    tensors | {first: torch.zeros(3, 3)},
                    tensors | {first: torch.full_like(tensors[first], float("nan"))}):
        save_file(changed, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(CorruptFileError, match=fix):
            MENDEditor.load(tmp_path / "bad.safetensors")


def test_npz_dataclasses(tmp_path):
    from interp_edit.analysis.localization_study import LocalizationStudy

    _trace().save(tmp_path / "t.npz")
    with pytest.raises(CorruptFileError, match="t.npz"):
        LocalizationStudy.load(tmp_path / "t.npz")
    (tmp_path / "r.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptFileError, match="r.npz"):
        LocalizationStudy.load(tmp_path / "r.npz")


# ---- atomic writes ------------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    _files.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        _files.write_json(path, {"a": object()})  # fails half way through
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(RuntimeError), _files.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["x.json"]


def test_published_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    _files.write_text(tmp_path / "x.txt", "hi")
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o666 & ~umask


def test_saves_write_through_the_atomic_helper(tiny, tmp_path, monkeypatch):
    """Every artifact's save goes through atomic_path: fail it, and nothing is written."""
    real = _files.atomic_path

    def failing(path, suffix=""):
        with real(path, suffix) as tmp:
            yield tmp
            raise OSError("disk full")

    monkeypatch.setattr(_files, "atomic_path", __import__("contextlib").contextmanager(failing))
    saves = [lambda: _edit(tiny).save(tmp_path / "e.safetensors"),
             lambda: _trace().save(tmp_path / "t.npz"),
             lambda: TraceSet(*(_trace(k) for k in ("resid", "mlp", "attn"))).save(
                 tmp_path / "s.npz"),
             lambda: _average().save(tmp_path / "a.npz"),
             lambda: _report().save(tmp_path),
             lambda: MENDEditor(MENDConfig.for_model(tiny, (3,), "given", rank=2)).save(
                 tmp_path / "m.safetensors")]
    for save in saves:
        with pytest.raises(OSError, match="disk full"):
            save()
    assert os.listdir(tmp_path) == []
