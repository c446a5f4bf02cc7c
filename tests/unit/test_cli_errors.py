"""The command line: a wrong argument is one line on stderr and a non-zero exit, checked before
the model loads or the work runs; Ctrl-C is one line and exit 130, also in ``evaluate``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import interp_edit
import interp_edit.models
from interp_edit.cli import INTERRUPTED, main
from interp_edit.editing.base import AppliedEdit, register_editor

REPO = Path(interp_edit.__file__).resolve().parents[1]


def _cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "interp_edit", *argv], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _one_line_error(stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A path no one can write: its parent is a regular file (fails for root too)."""
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "out"


WRONG = [
    (["trace", "--prompt", "a", "--subject", "a", "--noise", "abc"], "--noise 'abc'"),
    (["trace-dataset", "--path", "x.json", "--out", "o", "--noise", "1e"], "--noise '1e'"),
    (["trace-dataset", "--path", "x.json", "--out", "o", "--limit", "-1"], "--limit must be"),
    (["trace-dataset", "--path", "x.json", "--out", "o", "--limit", "0"], "--limit must be"),
    (["edit", "--prompt", "{} a", "--subject", "s", "--target", "t", "--layer", "abc"],
     "--layer 'abc'"),
    (["edit", "--prompt", "{} a", "--subject", "s", "--target", "t", "--hparams", "{bad"],
     "--hparams is not valid JSON"),
    (["edit", "--prompt", "{} a", "--subject", "s", "--target", "t", "--hparams", "[1]"],
     "--hparams must be a JSON object"),
    (["edit", "--prompt", "{} a", "--subject", "s", "--target", "t", "--tokens", "-3"],
     "--tokens must be"),
    (["evaluate", "--n", "0"], "--n must be"),
    (["mend-train", "--train", "t.json", "--val", "v.json", "--out", "e.safetensors",
      "--config", "{nope"], "--config is not valid JSON"),
    (["mend-train", "--train", "t.json", "--val", "v.json", "--out", "e.safetensors",
      "--layers", "1,x"], "--layers '1,x'"),
]
UNWRITABLE = [
    ["trace", "--prompt", "a", "--subject", "a", "--out", "{}/x.pdf"],
    ["trace-dataset", "--path", "x.json", "--out", "{}/dir"],
    ["edit", "--prompt", "{{}} a", "--subject", "s", "--target", "t", "--save", "{}/e.st"],
    ["evaluate", "--method", "none", "--out", "{}/results"],
]


def test_as_a_process_a_wrong_argument_is_one_line_and_exit_2(blocked):
    """The real console path (``python -m interp_edit``); the other cases run in-process."""
    out = _cli(*WRONG[0][0])
    assert out.returncode == 2 and _one_line_error(out.stderr), out.stderr
    assert WRONG[0][1] in out.stderr
    out = _cli(*[a.format(blocked) for a in UNWRITABLE[0]])
    assert out.returncode == 2 and _one_line_error(out.stderr), out.stderr
    assert "cannot write" in out.stderr


@pytest.mark.parametrize("argv,match", WRONG)
def test_wrong_arguments_are_one_line_and_exit_2(no_model, capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and _one_line_error(err) and match in err, err


@pytest.mark.parametrize("argv", UNWRITABLE)
def test_an_unwritable_output_is_refused_before_the_work(no_model, capsys, blocked, argv):
    code = main([a.format(blocked) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and _one_line_error(err) and "cannot write" in err, err


def test_ctrl_c_is_one_line_and_exit_130():
    """A real SIGINT to a running command (the model load is replaced by a wait)."""
    code = ("import sys, time, interp_edit.models as M\n"
            "def slow(name=None):\n"
            "    print('loading', flush=True); time.sleep(60)\n"
            "M.load_model = slow\n"
            "from interp_edit.cli import main\n"
            "sys.exit(main(['predict', 'a b']))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "loading"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == INTERRUPTED and err.strip() == "interrupted", err


@pytest.fixture
def no_model(monkeypatch):
    """These commands must fail before they load a model."""
    def refuse(name=None):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(interp_edit.models, "load_model", refuse)
    monkeypatch.setattr(interp_edit, "load_model", refuse)


# ---- in-process: the tiny model -------------------------------------------------------------
@pytest.fixture
def tiny_cli(fm, monkeypatch, tmp_path):
    monkeypatch.setattr(interp_edit.models, "load_model", lambda name=None: fm.model)
    monkeypatch.setattr(interp_edit, "load_model", lambda name=None: fm.model)
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "cache"))
    return fm


def _counterfact(fm, path: Path, n: int = 3) -> Path:
    facts = [f for f in fm.facts if f.relation == "job"][:n]
    rows = [{"case_id": i, "requested_rewrite": {
        "prompt": f.template, "subject": f.subject,
        "target_new": {"str": "pilot" if f.attribute != "pilot" else "chef"},
        "target_true": {"str": f.attribute}}} for i, f in enumerate(facts)]
    path.write_text(json.dumps(rows))
    return path


def test_evaluate_with_a_wrong_configuration_exits_2_without_a_report(tiny_cli, tmp_path,
                                                                     capsys):
    data = _counterfact(tiny_cli, tmp_path / "cf.json")
    code = main(["evaluate", "--method", "ft", "--path", str(data), "--hparam", "layer=99",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and _one_line_error(err) and "FTHparams.layer must be in 0..3" in err
    assert not (tmp_path / "out" / "ft.json").exists()


@dataclass(frozen=True)
class _StopHparams:
    after: int = 1


_SEEN: list[str] = []


@register_editor("test-ctrl-c", _StopHparams)
def _stop_after(model, requests, hp):
    """Edits nothing; the user presses Ctrl-C during the edit after ``after`` of them."""
    _SEEN.append(requests[0].subject)
    if len(_SEEN) > hp.after:
        raise KeyboardInterrupt
    return AppliedEdit.in_context(model, "test-ctrl-c", requests, hp, context="")


def test_evaluate_interrupted_saves_and_exits_130(tiny_cli, tmp_path, capsys):
    data = _counterfact(tiny_cli, tmp_path / "cf.json")
    _SEEN.clear()
    code = main(["evaluate", "--method", "test-ctrl-c", "--path", str(data),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == INTERRUPTED and "interrupted after 1 records" in err
    saved = json.loads((tmp_path / "out" / "test-ctrl-c.json").read_text())
    assert saved["info"]["interrupted"] is True and len(saved["rows"]) == 1


def test_trace_with_samples_out_of_range_exits_2(tiny_cli, tmp_path, capsys):
    f = tiny_cli.facts[0]
    code = main(["trace", "--prompt", f.prompt, "--subject", f.subject, "--samples", "1000000",
                 "--out", str(tmp_path / "t.pdf")])
    err = capsys.readouterr().err
    assert code == 2 and _one_line_error(err) and "samples must be in 1..1024" in err
