"""The evaluation harness on the default model and the shared CounterFact/zsRE files."""

import pytest

from interp_edit.evaluation import evaluate, load_counterfact, load_probes, load_zsre

pytestmark = pytest.mark.integration


def test_shared_files_load(shared_data):
    cf = load_counterfact(shared_data / "counterfact-val.json")
    assert len(cf) == 1919 and all(r.subject in r.text for r in cf[:50])
    assert all(len(r.paraphrases) == len(r.neighborhood) == 1 for r in cf[:50])
    zs = load_zsre(shared_data / "zsre_mend_train-1k.json")
    assert 990 <= len(zs) < 1000 and zs[0].neighborhood[0][0].startswith("nq question:")


def test_baseline_on_counterfact_val(default_model, shared_data):
    records = load_counterfact(shared_data / "counterfact-val.json")[:6]
    rep = evaluate(default_model, records, method="none", progress=False)
    assert rep.n + len(rep.skipped) == 6 and rep.n >= 1
    assert set(rep.skip_reasons()) <= {"unknown"}
    for row in rep.rows:  # records the model knows, measured twice on the same model
        assert row["pre_efficacy"] == row["efficacy"] == 0.0
        assert row["efficacy_gap"] == pytest.approx(row["pre_efficacy_gap"], abs=1e-6)
        assert row["unchanged_top1"] == 1.0
    assert "| efficacy |" in rep.to_markdown()


def test_probe_set_is_known_to_the_default_model(default_model):
    rep = evaluate(default_model, load_probes(), method="none", n=5, progress=False)
    # the set keeps only edits the default model knows: none is skipped
    assert rep.n == 5 and not rep.skipped
    assert rep.summary("reverse_gap") is not None or rep.summary("portability_gap") is not None
