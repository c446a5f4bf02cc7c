"""The package stands alone: built as a wheel, installed into a fresh virtual environment and
run from another directory, it traces, edits with ROME and with IKE, and opens no file of the
source checkout. Data paths come from arguments or ``INTERP_EDIT_DATA``."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from interp_edit.editing import ike
from interp_edit.errors import InterpEditError
from interp_edit.testing import save_random_model

ROOT = Path(__file__).resolve().parents[2]

# Run by the installed package, from a temporary directory. Every file opened is recorded (an
# audit hook) and none may lie in the source checkout.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    opened = []
    sys.addaudithook(lambda event, args: event == "open" and isinstance(args[0], (str, os.PathLike))
                     and opened.append(os.fspath(args[0])))

    import interp_edit as ie

    venv, model_dir, corpus, fact = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    model = ie.load_model(model_dir)
    r = ie.trace(model, fact["prompt"], fact["subject"], samples=2, window=2)
    req = ie.EditRequest(fact["template"], fact["subject"], fact["new"], fact["attribute"])
    weight = model.mlp_out_proj(1).weight
    before = weight.detach().clone()
    rome = ie.edit(model, req, method="rome", layer=1, n_prefixes=0, v_steps=5, corpus=corpus,
                   stats_tokens=300, precision="fp32")
    changed = float((weight - before).abs().max())
    rome.undo()
    restored = bool((weight == before).all())
    ik = ie.edit(model, req, method="ike", demos=1, embedder="model")
    print(json.dumps({"package": ie.__file__, "scores": list(r.scores.shape),
                      "tokens": len(r.tokens), "layers": model.n_layers, "changed": changed,
                      "restored": restored, "demos": len(ik.info["demonstrations"]),
                      "context": ik.context, "opened": opened}))
""")


def _flat_pool(facts) -> list[dict]:
    """A CounterFact-style (flattened) pool from the tiny model's facts."""
    return [{"case_id": i, "prompt": f.prompt, "subject": f.subject, "target_new": "Oslo",
             "ground_truth": f.attribute, "rephrase_prompt": f.paraphrases[0].format(f.subject),
             "locality_prompt": facts[(i + 3) % len(facts)].prompt,
             "locality_ground_truth": facts[(i + 3) % len(facts)].attribute}
            for i, f in enumerate(facts)]


def _install(tmp: Path) -> Path:
    """Build the wheel from a copy of the package's files and install it (``--no-deps``) into
    a fresh virtual environment that sees the test environment's packages; its python."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "interp_edit", src / "interp_edit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("interp_edit-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    # the test environment's packages (torch, transformers ...) as plain path entries: its
    # .pth files are not run, so an editable install of interp_edit there cannot shadow the
    # wheel
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    Path(purelib, "_test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_wheel_in_a_fresh_environment(fm, tmp_path):
    python = _install(tmp_path)
    data, run_dir = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    run_dir.mkdir()
    (data / "counterfact-train.json").write_text(json.dumps(_flat_pool(fm.facts)))
    model_dir = save_random_model(tmp_path / "tiny-model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t.format(f.subject) + " " + f.attribute + " ." for f in fm.facts
                                for t in (f.template, *f.paraphrases)) * 3)
    f = fm.facts[0]
    fact = {"prompt": f.prompt, "template": f.template, "subject": f.subject,
            "attribute": f.attribute, "new": "Oslo" if f.attribute != "Oslo" else "Rome"}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"INTERP_EDIT_DATA": str(data), "INTERP_EDIT_CACHE": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(python), "-c", SCRIPT, str(tmp_path / "venv"), str(model_dir),
                           str(corpus), json.dumps(fact)], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(tmp_path / "venv"))
    assert out["scores"] == [out["tokens"], out["layers"]]
    assert out["changed"] > 0 and out["restored"]
    assert out["demos"] == 1 and out["context"].count("New Fact:") == 2
    test_env = str(Path(sys.prefix).resolve())
    from_checkout = [p for p in out["opened"] if str(Path(p).resolve()).startswith(str(ROOT))
                     and not str(Path(p).resolve()).startswith(test_env)]
    assert from_checkout == []
    assert any(p.startswith(str(data)) for p in out["opened"])  # the pool came from there


def test_the_default_pool_comes_from_interp_edit_data(tmp_path, monkeypatch):
    monkeypatch.delenv("INTERP_EDIT_DATA", raising=False)
    with pytest.raises(InterpEditError, match="INTERP_EDIT_DATA is not set") as err:
        ike.pool_path(None)
    assert "pool=" in str(err.value) and "counterfact-train.json" in str(err.value)
    monkeypatch.setenv("INTERP_EDIT_DATA", str(tmp_path))
    with pytest.raises(InterpEditError, match="has no counterfact-train.json"):
        ike.pool_path(None)
    (tmp_path / "counterfact-train.json").write_text("[]")
    assert ike.pool_path(None) == tmp_path / "counterfact-train.json"
    assert ike.pool_path(str(tmp_path / "counterfact-train.json")).is_file()  # an argument
