"""Batch and sequential protocols of ``evaluate`` with MEMIT/AlphaEdit on the tiny fact model:
rows per record, checkpoints over the stream, bit-exact undo, and resume after Ctrl-C."""

import pytest
import torch

from interp_edit.errors import InterpEditError
from interp_edit.evaluation import EditRecord, evaluate, streams
from interp_edit.testing import CITIES


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def HP(fact_corpus):
    return dict(layers=(0,), mom2_update_weight=1.0, n_prefixes=0, v_steps=100, v_nll_stop=0.01, v_weight_decay=0.01,
                corpus=str(fact_corpus), stats_tokens=2000, precision="fp32")


def _records(fm, n=6):
    facts = [f for f in fm.facts if f.relation == "city"][:n]
    return [EditRecord(case_id=i, prompt=f.template, subject=f.subject,
                       target_new=CITIES[(CITIES.index(f.attribute) + 1) % len(CITIES)],
                       target_true=f.attribute,
                       paraphrases=tuple(p.format(f.subject) for p in f.paraphrases),
                       neighborhood=((facts[i - 1].prompt, facts[i - 1].attribute),))
            for i, f in enumerate(facts)]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


def test_batch_protocol_measures_each_batch_then_undoes(fm, HP):
    m, recs = fm.model, _records(fm)
    before = _weights(m)
    rep = evaluate(m, recs, method="memit", batch_size=4, progress=False, **HP)
    assert [r["batch"] for r in rep.rows] == [0, 0, 0, 0, 1, 1]
    assert rep.info["protocol"] == "batch" and rep.info["undo_bit_exact"]
    assert all(r["pre_efficacy"] == 0 for r in rep.rows)
    assert sum(r["efficacy"] for r in rep.rows) >= 4  # the batch edits take
    assert all(0 <= r["unchanged_top1"] <= 1 for r in rep.rows)
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())
    # each batch's edit summarised in the report: its range, how far it got, its time
    assert [e["batch"] for e in rep.info["edit_info"]] == [0, 1]
    assert all(e["layers"] == [0] and e["n_facts"] in (4, 2) and 0 < e["target_reached"] <= 1
               and e["seconds"] > 0 for e in rep.info["edit_info"])


def test_sequential_stream_curve_undo_and_resume(fm, HP, fact_corpus, tmp_path, monkeypatch):
    m, recs = fm.model, _records(fm)
    before = _weights(m)
    kw = dict(method="alphaedit", batch_size=2, sequential=True, progress=False,
              perplexity_text=str(fact_corpus), null_threshold=0.1, alpha=1e-3, **HP)
    full = evaluate(m, recs, edits_dir=str(tmp_path / "full"), **kw)
    curve = full.info["curve"]
    assert [p["edits"] for p in curve] == [0, 2, 4, 6]
    assert curve[0]["efficacy"] is None and curve[-1]["efficacy"] > 0.5
    assert all(p["perplexity"] > 1 for p in curve)
    assert len(full.rows) == 6 and [r["batch"] for r in full.rows] == [0, 0, 1, 1, 2, 2]
    assert full.info["undo_bit_exact"] and len(list((tmp_path / "full").iterdir())) == 3
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())

    calls = {"n": 0}
    real = streams.edit

    def flaky(*a, **k):  # Ctrl-C during the second batch's edit
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(streams, "edit", flaky)
    part = evaluate(m, recs, edits_dir=str(tmp_path / "part"), **kw)
    assert part.info["interrupted"] and part.info["batches_done"] == 1 and not part.rows
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())
    monkeypatch.setattr(streams, "edit", real)
    resumed = evaluate(m, recs, edits_dir=str(tmp_path / "part"), resume=part, **kw)
    assert [p["efficacy"] for p in resumed.info["curve"]] == [p["efficacy"] for p in curve]
    assert [p["perplexity"] for p in resumed.info["curve"]] == [p["perplexity"] for p in curve]
    assert resumed.rows == full.rows
    assert [e["batch"] for e in resumed.info["edit_info"]] == [0, 1, 2]
    with pytest.raises(InterpEditError, match="cannot resume"):
        evaluate(m, recs, edits_dir=str(tmp_path / "part"), resume=part,
                 **{**kw, "batch_size": 3})


def test_bad_protocol_inputs(fm, HP):
    m, recs = fm.model, _records(fm)
    with pytest.raises(InterpEditError, match="batch_size"):
        evaluate(m, recs, method="memit", batch_size=0, progress=False, **HP)
    with pytest.raises(InterpEditError, match="not a file"):
        evaluate(m, recs, method="memit", batch_size=2, sequential=True,
                 perplexity_text="/no/such.txt", progress=False, **HP)
    with pytest.raises(InterpEditError, match="need an edit method"):
        evaluate(m, recs, method="none", batch_size=2, progress=False)


def test_cli_protocol_options():
    from interp_edit.cli import build_parser

    args = build_parser().parse_args([
        "evaluate", "--method", "alphaedit", "--path", "cf.json", "--n", "100",
        "--batch-size", "20", "--sequential", "--every", "2", "--perplexity-text", "wt.txt"])
    assert (args.batch_size, args.sequential, args.every, args.perplexity_text) == (
        20, True, 2, "wt.txt")
