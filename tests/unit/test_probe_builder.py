"""The probe builder on a tiny synthetic knowledge base (the tiny fact model knows each
subject's city), the schema's chains and questions, the metric by hand, and probe-set files."""

import math

import pytest
import torch

from interp_edit.errors import InterpEditError
from interp_edit.evaluation import EditRecord, load_probes, metrics
from interp_edit.evaluation.metrics import METRICS, TargetScores
from interp_edit.evaluation.probe_builder import (
    Fact, KnowledgeBase, ProbeSettings, build_probes, facts_from_records, knows, save_probe_set)
from interp_edit.evaluation.probe_schema import COUNTERFACT, Relation, Schema
from interp_edit.testing import CITIES, JOBS

# a friend is a person; the fact model knows where each person lives and what they do
TINY = Schema(
    relations=(
        Relation("friend", "person", "person", "{} is a friend of", "the friend of {}",
                 ("{} is a friend of",), inverse="{} has a friend called"),
        Relation("city", "person", "city", "{} lives in the city of", "the home of {}",
                 ("{} lives in the city of",)),
        Relation("job", "person", "job", "{} works as a", "the job of {}", ("{} works as a",)),
    ),
    hops=("city", "job"),
)


def _top1(model, prompt: str) -> str:
    logits = model.logits(model.tokenize(prompt)[None])[0, -1]
    return model.tokenizer.decode([int(logits.argmax())]).strip()


def _people(fm):
    """Subjects whose city and job the model answers top-1, and their (city, job)."""
    out = {}
    for f in fm.facts:
        if _top1(fm.model, f.prompt) == f.attribute:
            out.setdefault(f.subject, {})[f.relation] = f.attribute
    return {s: d for s, d in out.items() if len(d) == 2}


def test_generator_on_a_tiny_knowledge_base(fm):
    people = _people(fm)
    names = sorted(people)
    a, d = names[:2]
    # b and c live in different cities, so the portability answer moves with the edit
    b, c = next((x, y) for x in names[2:] for y in names[2:]
                if people[x]["city"] != people[y]["city"])
    wrong_job = next(j for j in JOBS if j != people[b]["job"])
    facts = [Fact(d, "friend", b),  # before the edit, b's friend is d: the reverse's old answer
             Fact(b, "city", people[b]["city"]), Fact(c, "city", people[c]["city"]),
             Fact(b, "job", wrong_job), Fact(c, "job", people[c]["job"])]
    kb = KnowledgeBase.build(facts, TINY)
    edit = EditRecord(7, "{} is a friend of", a, b, c)
    (got,) = build_probes(fm.model, [edit], kb, TINY, ProbeSettings(require_known_edit=False))
    assert got.reverse == ((f"{b} has a friend called", a, d),)
    # the job hop is dropped: the data say wrong_job, which the model does not answer
    assert got.portability == ((f"The friend of {a} lives in the city of",
                                people[b]["city"], people[c]["city"]),)
    assert knows(fm.model, [Fact(b, "job", wrong_job), Fact(b, "job", people[b]["job"])],
                 TINY) == [False, True]


def test_hops_the_model_does_not_know_are_filtered_out(fm):
    people = _people(fm)
    a, b, c = sorted(people)[:3]
    city_b = next(x for x in CITIES if x not in (people[b]["city"], people[c]["city"]))
    kb = KnowledgeBase.build([Fact(b, "city", city_b), Fact(c, "city", people[c]["city"])], TINY)
    edit = EditRecord(0, "{} is a friend of", a, b, c)
    # no reverse (no old friend of b in the data), no portability (b's city unknown): dropped
    assert build_probes(fm.model, [edit], kb, TINY,
                        ProbeSettings(require_known_edit=False)) == []


def test_edits_the_model_does_not_know_are_dropped(fm):
    people = _people(fm)
    a, b, c = sorted(people)[:3]
    kb = KnowledgeBase.build([Fact(c, "city", people[c]["city"])], TINY)
    wrong = next(x for x in CITIES if x != people[a]["city"])
    other = next(x for x in CITIES if x not in (wrong, people[a]["city"]))
    known = EditRecord(1, "{} lives in the city of", a, other, people[a]["city"])
    unknown = EditRecord(2, "{} lives in the city of", a, other, wrong)
    schema = Schema(TINY.relations[1:], hops=("city",), derived=())
    got = build_probes(fm.model, [known, unknown], kb, schema)
    assert got == []  # city has no inverse and no hop follows it: nothing to probe
    from interp_edit.evaluation.probe_builder import knows_edit

    assert knows_edit(fm.model, [known, unknown]) == [True, False]


def test_knowledge_base_orders_objects_and_reads_capitals_backwards():
    facts = [Fact("France", "P36", "Paris"), Fact("Paris Commune", "P36", "Paris"),
             Fact("Kingdom of France", "P36", "Paris"), Fact("France", "P36", "Paris"),
             Fact("Paris", "P17", "Texas"), Fact("Lyon", "P17", "France")]
    kb = KnowledgeBase.build(facts)
    assert kb.forward["France", "P36"] == ("Paris",)
    # direct facts first, then capitals read backwards, most frequent first
    assert kb.forward["Paris", "P17"] == ("Texas", "France", "Paris Commune", "Kingdom of France")
    assert kb.backward["P36", "Paris"] == ("France", "Paris Commune", "Kingdom of France")
    rec = EditRecord(0, "The capital of {} is", "Germany", "Paris", "Berlin")
    assert facts_from_records([rec, EditRecord(1, "{} likes", "x", "a", "b")]) == [
        Fact("Germany", "P36", "Berlin")]


def test_counterfact_chains_and_questions():
    assert COUNTERFACT.chains("P937") == [("P17",), ("P17", "P36"), ("P17", "P37"),
                                          ("P17", "P30")]
    assert COUNTERFACT.chains("P176") == [("P159",), ("P159", "P17")]
    assert ("P36", "P17") not in COUNTERFACT.chains("P27")  # a capital's country: no news
    assert COUNTERFACT.question("P937", ("P17", "P36")) == \
        "The capital of the country of the city where {} worked is"
    assert COUNTERFACT.question("P27", ("P30",)) == \
        "The country {} is a citizen of is located in the continent of"
    assert COUNTERFACT.relation_of("{} worked in the city of") == "P937"
    assert COUNTERFACT.relation_of("{} is located in") is None  # shared by two relations


def test_probe_metric_by_hand():
    # probes (answer, answer before) alternate: p = 0.5 / 0.2 and 0.1 / 0.3
    p = torch.tensor([0.5, 0.2, 0.1, 0.3])
    s = TargetScores(p.log(), p, torch.tensor([1.0, 0.0, 0.5, 1.0]))
    got = METRICS["reverse"].reduce(s)
    assert got[""] == pytest.approx((1.0 + 0.5) / 2)
    assert got["_gap"] == pytest.approx(((0.5 - 0.2) + (0.1 - 0.3)) / 2)


def test_probe_metric_on_the_model(fm):
    f = fm.facts[0]
    other = next(x for x in CITIES if x != f.attribute)
    rec = EditRecord(0, f.template, f.subject, other, f.attribute,
                     reverse=((f.prompt, f.attribute, other), (f.prompt, other, f.attribute)))
    got = metrics.measure(fm.model, rec, metrics=("reverse",))
    p_true, p_other = fm.model.next_token_probs([f.prompt] * 2, [f.attribute, other]).tolist()
    top = _top1(fm.model, f.prompt)
    assert got["reverse"] == pytest.approx(((top == f.attribute) + (top == other)) / 2)
    assert got["reverse_gap"] == pytest.approx(0.0, abs=1e-6)  # the two probes cancel
    one = metrics.measure(fm.model, EditRecord(0, f.template, f.subject, other, f.attribute,
                                               reverse=((f.prompt, f.attribute, other),)))
    assert one["reverse_gap"] == pytest.approx(p_true - p_other, abs=1e-6)
    assert not math.isnan(one["reverse"])


def test_probe_set_file_round_trip(tmp_path):
    recs = [EditRecord(3, "The capital of {} is", "Germany", "Paris", "Berlin",
                       reverse=(("Paris is the capital of", "Germany", "France"),))]
    path = save_probe_set(tmp_path / "m.json", recs, "m", ProbeSettings(), {"edits": []})
    assert load_probes(path) == recs
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(InterpEditError, match="not a probe set"):
        load_probes(tmp_path / "other.json")
    with pytest.raises(InterpEditError, match="answer_before"):
        EditRecord(0, "{} x", "a", "b", "c", portability=(("p", "b"),))


def test_shipped_probe_set_of_the_default_model():
    recs = load_probes()
    assert sum(bool(r.reverse) for r in recs) >= 100
    assert sum(bool(r.portability) for r in recs) >= 100
    for r in recs:
        for prompt, new, old in r.portability:
            assert r.subject in prompt and new != old
        for prompt, new, old in r.reverse:
            assert prompt.startswith(r.target_new) or r.target_new in prompt
            assert new == r.subject != old


def test_interleave_alternates_the_kinds():
    from interp_edit.evaluation.probe_builder import interleave

    probe = (("p", "x", "y"),)
    recs = [EditRecord(i, "{} x", "s", "a", "b", portability=probe if port else (),
                       reverse=() if port else probe)
            for i, port in enumerate([True, False, True, True, False])]
    assert [r.case_id for r in interleave(recs)] == [0, 1, 2, 4, 3]
