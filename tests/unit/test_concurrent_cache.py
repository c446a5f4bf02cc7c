"""Concurrent first runs are safe: two processes that fill the same fresh cache at once (the
dequantized model of ``load_model(<.gguf>)``, then key statistics and their sampled corpus)
both succeed, agree, and leave no temporary file; a writer that fails leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from interp_edit import _loading

ROOT = Path(__file__).resolve().parents[2]

# Both processes stop inside the model conversion until the other one is there too, so both
# write the same entry at once (before, they shared one '<key>.tmp' directory).
SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    import interp_edit as ie
    from interp_edit import _loading
    from interp_edit.editing import stats
    from interp_edit.testing import save_random_model

    meet, me, gguf = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def together(stage):
        (meet / f"{stage}-{me}").touch()
        deadline = time.time() + 300
        while len(list(meet.glob(stage + "-*"))) < 2:
            if time.time() > deadline:
                sys.exit("the other process never came")
            time.sleep(0.01)

    def dequantize(path, out):
        together("convert")
        save_random_model(out)

    _loading._dequantize = dequantize
    model = ie.load_model(gguf)
    together("stats")
    mom2 = stats.second_moments(model, [1], "generated", 64, seq_len=16, batch_size=4,
                                precision="fp32")[1]
    weights = sum(float(p.double().sum()) for p in model.hf_model.parameters())
    print(repr(float(mom2.double().sum())), repr(weights))
""")


def _leftovers(root: Path) -> list[str]:
    """Temporary files or directories under ``root`` (names of _files' temporaries)."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def test_two_first_runs_at_once(tmp_path):
    cache, meet = tmp_path / "cache", tmp_path / "meet"
    meet.mkdir()
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    env = os.environ | {"INTERP_EDIT_CACHE": str(cache), "OMP_NUM_THREADS": "1",
                        "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                 "")])}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(meet), str(i), str(gguf)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0] == outs[1][0] and outs[0][0].strip()
    assert sorted(p.name for p in meet.iterdir()) == ["convert-0", "convert-1", "stats-0",
                                                      "stats-1"]
    assert _leftovers(cache) == []
    (entry,) = (cache / "models").iterdir()
    assert {"config.json", "model.safetensors", "source.txt"} <= {p.name for p in entry.iterdir()}


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "cache"))

    def dequantize(path, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C half way through

    monkeypatch.setattr(_loading, "_dequantize", dequantize)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(KeyboardInterrupt):
        _loading._load_gguf(gguf, torch.float32)
    assert list((tmp_path / "cache" / "models").iterdir()) == []
