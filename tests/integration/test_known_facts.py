"""Known facts on the default model: the loader, and a dataset trace of a few facts through the
CLI (filtering, averaging, saved outputs)."""

from __future__ import annotations

import pytest

import interp_edit as ie
from interp_edit.errors import InterpEditError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def known(shared_data):
    return ie.load_known_facts(shared_data / "known_1000.json")


def test_load_known_facts(known):
    assert len(known) == 1209
    first = known[0]
    assert (first.known_id, first.subject, first.attribute) == (0, "Vinson Massif", "Antarctica")
    assert first.prompt == "Vinson Massif is located in the continent of"
    assert all(f.subject in f.prompt for f in known)
    with pytest.raises(InterpEditError, match="known_1000"):
        ie.load_known_facts("no/such/known_1000.json")


def test_trace_dataset_on_a_few_known_facts(default_model, known, tmp_path):
    # 6 and 21 the model predicts top-1 ("Catalonia ... Europe", "Roman Republic ... Rome");
    # 0 ("Vinson Massif ... Antarctica") it does not
    facts = [f for f in known if f.known_id in (0, 6, 21)]
    avg = ie.trace_dataset(default_model, facts, kinds=("resid", "mlp"), samples=3,
                           cache_dir=tmp_path, progress=False)
    assert (avg.n_candidates, avg.n_facts) == (3, 2)
    assert avg.subjects == ("Catalonia", "Roman Republic")
    s = avg.stats("resid")
    assert s.mean.shape == (6, default_model.n_layers)
    # restoring the last token's final hidden state restores the clean output exactly
    last = avg.groups.index("last token")
    assert float(s.mean[last, -1]) == pytest.approx(avg.total_effect, abs=1e-3)
    assert avg.total_effect > 0.2
    assert avg.peak("mlp").aie > 0


def test_trace_dataset_cli(shared_data, tmp_path, capsys):
    from interp_edit.cli import main

    out = tmp_path / "known"
    code = main(["trace-dataset", "--path", str(shared_data / "known_1000.json"), "--limit", "8",
                 "--kinds", "resid", "--samples", "2", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    avg = ie.AverageTrace.load(out / "average.npz")
    assert (avg.n_candidates, avg.n_facts) == (8, 2)
    assert (out / "aie.png").stat().st_size > 10_000 and (out / "aie.pdf").exists()
    assert "| resid | 2 | " in (out / "peaks.md").read_text()
    assert "2 of 8 facts" in capsys.readouterr().out
