"""Metrics against hand computations, and ``evaluate`` with toy editors on the tiny fact model."""

import math
from dataclasses import dataclass

import pytest
import torch

from interp_edit.editing.base import AppliedEdit, parameter_name, register_editor
from interp_edit.errors import InterpEditError
from interp_edit.evaluation import EditRecord, EvalReport, evaluate, metrics, summary_table


@dataclass(frozen=True)
class _SwapHparams:
    scale: float = 2.0


@register_editor("toy-swap", _SwapHparams)
def _toy_swap(model, requests, hp):
    """Make target_new's (tied) embedding row ``scale`` x target_true's: a sure, crude edit."""
    (r,) = requests
    emb = model.hf_model.get_input_embeddings()
    name = parameter_name(model, emb)
    new, true = model.target_ids(r.target_new)[0], model.target_ids(r.target_true)[0]
    delta = torch.zeros_like(emb.weight)
    delta[new] = hp.scale * emb.weight[true] - emb.weight[new]
    return AppliedEdit.from_deltas(model, "toy-swap", requests, hp, {name: delta})


@dataclass(frozen=True)
class _ContextHparams:
    context: str = "the of a . "


@register_editor("toy-context", _ContextHparams)
def _toy_context(model, requests, hp):
    """An IKE-like editor: no weight changes, only a context prepended to every prompt."""
    return AppliedEdit.in_context(model, "toy-context", requests, hp, context=hp.context)


def _other_city(fact):
    from interp_edit.testing import CITIES

    return next(c for c in CITIES if c != fact.attribute)


def _records(fm, relation="city"):
    facts = [f for f in fm.facts if f.relation == relation]
    return [
        EditRecord(
            case_id=i, prompt=f.template, subject=f.subject, target_new=_other_city(f),
            target_true=f.attribute,
            paraphrases=tuple(p.format(f.subject) for p in f.paraphrases),
            neighborhood=((facts[i - 1].prompt, facts[i - 1].attribute),),
            reverse=(("the home of", f.subject, facts[i - 1].subject),),
            portability=((f.prompt, f"{_other_city(f)} {f.attribute}", f.attribute),),
        )
        for i, f in enumerate(facts)
    ]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


# ---- metrics ----------------------------------------------------------------------------------
def test_score_targets_matches_model_scores(fm):
    m = fm.model
    prompts = [f.prompt for f in fm.facts[:5]]
    targets = ["Paris", "Rome Oslo", "pilot", "the of a", "Lima"]  # 1- and multi-token targets
    s = metrics.score_targets(m, prompts, targets)
    n_tok = torch.tensor([len(m.target_ids(t)) for t in targets], dtype=torch.float)
    torch.testing.assert_close(s.logprob * n_tok, m.target_logprobs(prompts, targets))
    torch.testing.assert_close(s.first_prob, m.next_token_probs(prompts, targets))
    # token accuracy by hand: teacher-forced argmax at each target position
    for i, (p, t) in enumerate(zip(prompts, targets)):
        pid, tid = m.tokenize(p).tolist(), m.target_ids(t)
        logits = m.logits(torch.tensor([pid + tid]))[0]
        hits = [int(logits[len(pid) - 1 + j].argmax()) == tok for j, tok in enumerate(tid)]
        assert s.token_acc[i].item() == pytest.approx(sum(hits) / len(hits))


def test_record_metrics_by_hand(fm):
    m, r = fm.model, _records(fm)[0]
    got = metrics.measure(m, r)
    p_new, p_true = m.next_token_probs([r.text] * 2, [r.target_new, r.target_true]).tolist()
    assert got["efficacy"] == float(p_new > p_true) == 0.0
    assert got["efficacy_gap"] == pytest.approx(p_new - p_true, abs=1e-6)
    assert got["efficacy_first"] == got["efficacy"]  # single-token targets
    para = [float(a > b) for p in r.paraphrases
            for a, b in [m.next_token_probs([p, p], [r.target_new, r.target_true]).tolist()]]
    assert got["paraphrase"] == pytest.approx(sum(para) / len(para))
    (nb, ans), = r.neighborhood
    q_true, q_new = m.next_token_probs([nb, nb], [ans, r.target_new]).tolist()
    assert got["neighborhood"] == float(q_true > q_new)
    assert got["neighborhood_gap"] == pytest.approx(q_true - q_new, abs=1e-6)
    (prompt, new, old), = r.portability  # a two-token answer against a one-token one
    p_after = math.exp(m.target_logprobs([prompt], [new]).item() / 2)
    assert got["portability_gap"] == pytest.approx(
        p_after - m.next_token_probs([prompt], [old]).item(), abs=1e-5)
    pid, tid = m.tokenize(prompt).tolist(), m.target_ids(new)
    logits = m.logits(torch.tensor([pid + tid]))[0]
    hits = [int(logits[len(pid) - 1 + j].argmax()) == t for j, t in enumerate(tid)]
    assert got["portability"] == pytest.approx(sum(hits) / 2)
    single = metrics.efficacy(m, r)
    assert single == {k: got[k] for k in ("efficacy", "efficacy_gap", "efficacy_first")}


def test_missing_probes_are_none(fm):
    f = fm.facts[0]
    bare = EditRecord(0, f.template, f.subject, "Rome", f.attribute)
    got = metrics.measure(fm.model, bare)
    assert got["efficacy"] is not None
    assert got["paraphrase"] is got["reverse_gap"] is got["neighborhood_gap"] is None
    with pytest.raises(InterpEditError, match="unknown metrics"):
        metrics.measure(fm.model, bare, metrics=("efficacy", "nope"))


def test_ngram_entropy_by_hand():
    # bigrams (a,b) x2, (b,a) x1; trigrams (a,b,a), (b,a,b)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    distinct = "one two three four five"  # 4 distinct bigrams, 3 distinct trigrams
    assert metrics.ngram_entropy(distinct) == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert metrics.ngram_entropy("word") == 0.0
    assert metrics.ngram_entropy("the the the the the") < metrics.ngram_entropy(distinct)


def test_unchanged_top1_and_fluency(fm):
    m = fm.model
    prompts = [f.prompt for f in fm.facts[:6]]
    before = metrics.top1(m, prompts)
    assert metrics.unchanged_top1(m, prompts, before) == 1.0
    assert metrics.unchanged_top1(m, [], []) is None
    with pytest.raises(InterpEditError, match="reference tokens"):
        metrics.unchanged_top1(m, prompts, before[:2])
    text = prompts[0] + m.generate(prompts[0], 5)
    assert metrics.fluency(m, prompts[:1], None, 5) == pytest.approx(metrics.ngram_entropy(text))


# ---- evaluate ---------------------------------------------------------------------------------
def test_evaluate_weight_editor_and_undo(fm):
    m, recs = fm.model, _records(fm)[:4]
    before = _weights(m)
    rep = evaluate(m, recs, method="toy-swap", progress=False)
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())
    assert rep.n == 4 and not rep.skipped and rep.hparams == {"scale": 2.0}
    for row in rep.rows:
        assert row["pre_efficacy"] == 0.0 and row["efficacy"] == 1.0
        assert row["efficacy_gap"] > 0 > row["pre_efficacy_gap"]
        assert row["seconds"] >= 0 and 0 <= row["unchanged_top1"] <= 1
        assert isinstance(row["info_seconds"], float)
    agg = rep.aggregate()
    assert agg["efficacy"].mean == 1.0 and agg["efficacy"].lo == agg["efficacy"].hi == 1.0
    assert agg["efficacy"].n == 4 and "pre_paraphrase" in agg


def test_evaluate_skips_unknown_records_and_counts_n(fm):
    m, recs = fm.model, _records(fm)[:5]
    flipped = [EditRecord(**{**r.to_dict(), "target_new": r.target_true,
                             "target_true": r.target_new, "case_id": f"x{i}"})
               for i, r in enumerate(recs[:2])]
    rep = evaluate(m, flipped + recs, method="none", n=2, progress=False)
    assert [s["case_id"] for s in rep.skipped] == ["x0", "x1"]
    assert rep.skip_reasons() == {"unknown": 2} and rep.n == 2
    assert [r["case_id"] for r in rep.rows] == [0, 1]
    assert "skipped 2 (unknown: 2)" in rep.headline()
    for row in rep.rows:  # the baseline changes nothing
        assert row["efficacy"] == row["pre_efficacy"] and row["unchanged_top1"] == 1.0


def test_in_context_edit_is_measured_through_wrap(fm):
    m, (r,) = fm.model, _records(fm)[:1]
    ctx = "the of a . "
    rep = evaluate(m, [r], method="toy-context", context=ctx, progress=False)
    (row,) = rep.rows
    p_new, p_true = m.next_token_probs([ctx + r.text] * 2, [r.target_new, r.target_true]).tolist()
    assert row["efficacy_gap"] == pytest.approx(p_new - p_true, abs=1e-6)
    q_new, q_true = m.next_token_probs([r.text] * 2, [r.target_new, r.target_true]).tolist()
    assert row["pre_efficacy_gap"] == pytest.approx(q_new - q_true, abs=1e-6)
    assert row["efficacy_gap"] != pytest.approx(row["pre_efficacy_gap"], abs=1e-6)


@dataclass(frozen=True)
class _InterruptHparams:
    after: int = 1


_CALLS = []


@register_editor("toy-interrupt", _InterruptHparams)
def _toy_interrupt(model, requests, hp):
    """Behaves like toy-swap, then acts as if the user pressed Ctrl-C."""
    _CALLS.append(requests[0].subject)
    if len(_CALLS) > hp.after:
        raise KeyboardInterrupt
    return _toy_swap(model, requests, _SwapHparams())


def test_interrupt_returns_the_records_so_far(fm):
    m, recs = fm.model, _records(fm)[:3]
    before = _weights(m)
    _CALLS.clear()
    rep = evaluate(m, recs, method="toy-interrupt", progress=False)
    assert rep.n == 1 and rep.info["interrupted"] and rep.rows[0]["efficacy"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


def test_evaluate_rejects_bad_arguments_before_editing(fm):
    recs = _records(fm)[:1]
    with pytest.raises(InterpEditError, match="unknown edit method"):
        evaluate(fm.model, recs, method="nope", progress=False)
    with pytest.raises(InterpEditError, match="unknown hparams"):
        evaluate(fm.model, recs, method="toy-swap", bogus=1, progress=False)
    with pytest.raises(InterpEditError, match="takes no hparams"):
        evaluate(fm.model, recs, method="none", scale=1, progress=False)
    with pytest.raises(InterpEditError, match="no records"):
        evaluate(fm.model, [], method="none", progress=False)
    same = EditRecord(9, recs[0].prompt, recs[0].subject, "Rome", "Rome")
    rep = evaluate(fm.model, [same], method="none", progress=False)
    assert rep.n == 0 and rep.skip_reasons() == {"invalid": 1}


def test_report_save_load_and_tables(fm, tmp_path):
    m, recs = fm.model, _records(fm)[:3]
    base = evaluate(m, recs, method="none", progress=False)
    swap = evaluate(m, recs, method="toy-swap", progress=False)
    path = swap.save(tmp_path / "out")
    assert path == tmp_path / "out" / "toy-swap.json"
    assert path.with_suffix(".csv").read_text().startswith("case_id,")
    assert "| efficacy |" in path.with_suffix(".md").read_text()
    loaded = EvalReport.load(path)
    assert loaded.rows == swap.rows and loaded.summary("efficacy") == swap.summary("efficacy")
    table = summary_table([base, swap])
    assert table.count("\n") == 4 and "| none | 3 | 0 |" in table and "| toy-swap |" in table
    with pytest.raises(InterpEditError, match="does not exist"):
        EvalReport.load(tmp_path / "missing.json")


def test_cli_hparam_parsing():
    from interp_edit.cli import build_parser
    from interp_edit.cli.evaluate import parse_hparams

    assert parse_hparams(["layer=4", "corpus=wiki.txt", "lr=0.5", "auto=True"]) == {
        "layer": 4, "corpus": "wiki.txt", "lr": 0.5, "auto": True}
    with pytest.raises(InterpEditError, match="KEY=VALUE"):
        parse_hparams(["layer"])
    args = build_parser().parse_args(["evaluate", "--method", "rome", "--path", "cf.json",
                                      "--n", "200", "--out", "results/", "--hparam", "layer=3"])
    assert (args.method, args.n, args.out, args.hparam) == ("rome", 200, "results/", ["layer=3"])


def _timeless(rows):
    """Rows without their timings (which differ between two runs of the same records)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "info_seconds")} for r in rows]


def test_resume_after_interrupt_equals_one_run(fm, tmp_path):
    """Ctrl-C after 2 records, save, resume from the saved report: only the other records are
    edited, the rows are those of one uninterrupted run, and other settings are refused."""
    m, recs = fm.model, _records(fm)[:4]
    whole = evaluate(m, recs, method="toy-swap", progress=False)
    _CALLS.clear()
    part = evaluate(m, recs, method="toy-interrupt", after=2, progress=False)
    assert part.n == 2 and part.info["interrupted"]
    saved = EvalReport.load(part.save(tmp_path))
    _CALLS.clear()
    done = evaluate(m, recs, method="toy-interrupt", after=2, progress=False, resume=saved)
    assert _CALLS == [r.subject for r in recs[2:]]  # the first two were not edited again
    assert done.n == 4 and not done.info["interrupted"] and done.info["resumed_from"] == 2
    assert done.info["seconds_total"] >= part.info["seconds_total"]
    assert _timeless(done.rows) == _timeless(whole.rows)
    with pytest.raises(InterpEditError, match="cannot resume: the report differs in hparams"):
        evaluate(m, recs, method="toy-interrupt", after=3, progress=False, resume=saved)
    with pytest.raises(InterpEditError, match="method"):
        evaluate(m, recs, method="toy-swap", progress=False, resume=saved)
    with pytest.raises(InterpEditError, match="seed"):
        evaluate(m, recs, method="toy-interrupt", after=2, seed=1, progress=False, resume=saved)


def test_report_head_is_a_shorter_run(fm):
    m = fm.model
    recs = _records(fm)[:5]
    flipped = EditRecord(**{**recs[1].to_dict(), "target_new": recs[1].target_true,
                            "target_true": recs[1].target_new, "case_id": "x"})
    order = [recs[0], flipped, *recs[1:]]
    full = evaluate(m, order, method="none", progress=False)
    head = full.head(2, order)
    short = evaluate(m, order, method="none", n=2, progress=False)
    assert _timeless(head.rows) == _timeless(short.rows) and head.skipped == short.skipped
    assert head.info["n_requested"] == 2 and head.info["sliced_from"] == full.n
    assert full.head(None, order) is full and full.head(10, order) is full
    with pytest.raises(InterpEditError, match="not among the records"):
        full.head(2, recs[:2])
    with pytest.raises(InterpEditError, match="positive"):
        full.head(0, order)
