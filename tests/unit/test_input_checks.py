"""Every count, index, size and typed argument of the public API is checked before any work
starts, and a wrong one raises an InterpEditError (never a TypeError, a silent wrap-around or
a 9 GB allocation)."""

from __future__ import annotations

import json

import pytest
import torch

import interp_edit as ie
from interp_edit import _validate
from interp_edit.errors import InterpEditError
from interp_edit.evaluation import EditRecord, evaluate, load_counterfact
from interp_edit.tracing import api
from interp_edit.tracing import dataset as D


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "cache"))


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


# ---- the helpers ----------------------------------------------------------------------------
@pytest.mark.parametrize("call,ok", [
    (lambda: _validate.count("n", 3), 3),
    (lambda: _validate.count("n", torch.tensor(3)), 3),
    (lambda: _validate.index("i", -1, 4, negative=True), 3),
    (lambda: _validate.indices("l", [3, -4, 3], 4), [0, 3]),
    (lambda: _validate.number("x", 2), 2.0),
    (lambda: _validate.seed("s", 2**63 - 1), 2**63 - 1),
])
def test_helpers_accept_and_convert(call, ok):
    assert call() == ok


@pytest.mark.parametrize("call", [
    lambda: _validate.count("n", True),
    lambda: _validate.count("n", 1.0),
    lambda: _validate.count("n", "3"),
    lambda: _validate.count("n", None),
    lambda: _validate.count("n", 0),
    lambda: _validate.count("n", 5, 1, 4),
    lambda: _validate.index("i", 4, 4),
    lambda: _validate.index("i", -1, 4),
    lambda: _validate.indices("l", [], 4),
    lambda: _validate.indices("l", "01", 4),
    lambda: _validate.indices("l", 3, 4),
    lambda: _validate.number("x", float("nan")),
    lambda: _validate.number("x", "1.0"),
    lambda: _validate.number("x", False),
    lambda: _validate.number("x", 0.0, 0.0, above=True),
    lambda: _validate.seed("s", 2**63),
    lambda: _validate.seed("s", -1),
    lambda: _validate.text("t", 5),
    lambda: _validate.text("t", "  "),
])
def test_helpers_refuse(call):
    with pytest.raises(InterpEditError):
        call()


# ---- tracing --------------------------------------------------------------------------------
TRACE_CASES = [
    (dict(samples=0), "samples must be"),
    (dict(samples=-1), "samples must be"),
    (dict(samples=10**6), "samples must be in 1..1024"),
    (dict(samples=True), "samples must be an integer"),
    (dict(samples=2.5), "samples must be an integer"),
    (dict(samples="10"), "samples must be an integer"),
    (dict(window=0), "window must be"),
    (dict(window=True), "window must be an integer"),
    (dict(window=1.5), "window must be an integer"),
    (dict(seed="abc"), "seed must be an integer"),
    (dict(seed=-1), "seed must be"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=2**64), "seed must be"),
    (dict(positions=[99]), "positions entry must be"),
    (dict(positions=[-99]), "positions entry must be"),
    (dict(positions=[1.7]), "positions entry must be an integer"),
    (dict(positions=[True]), "positions entry must be an integer"),
    (dict(positions=[]), "positions is empty"),
    (dict(layers=[4]), "layers entry must be in -4..3"),
    (dict(layers=[1.7]), "layers entry must be an integer"),
    (dict(layers=[True]), "layers entry must be an integer"),
    (dict(layers=2), "layers must be a list"),
    (dict(subject=5), "subject must be a string"),
    (dict(subject=None), "subject must be a string"),
    (dict(prompt=5), "prompt must be a string"),
    (dict(target=5), "target must be a string"),
    (dict(target=""), "target is empty"),
    (dict(kind="mlps"), "unknown kind"),
]


@pytest.mark.parametrize("entry,change,match", [
    (entry, change, match) for entry in ("trace", "trace_all") for change, match in TRACE_CASES
    if not (entry == "trace_all" and "kind" in change)  # trace_all fixes the kind
])
def test_trace_arguments_are_checked_before_any_pass(fm, monkeypatch, entry, change, match):
    monkeypatch.setattr(api, "prepare", _no_work)
    f = fm.facts[0]
    kw = dict(prompt=f.prompt, subject=f.subject, samples=2) | change
    with pytest.raises(InterpEditError, match=match):
        getattr(ie, entry)(fm.model, kw.pop("prompt"), kw.pop("subject"), **kw)


@pytest.mark.parametrize("change,match", [
    (dict(limit=-1), "limit must be"),
    (dict(limit=0), "limit must be"),
    (dict(limit=1.5), "limit must be an integer"),
    (dict(limit=True), "limit must be an integer"),
    (dict(samples=10**6), "samples must be in 1..1024"),
    (dict(exact_sample=-1), "exact_sample must be"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(window=0), "window must be"),
    (dict(seed="abc"), "seed must be an integer"),
    (dict(sever="yes"), "sever must be True or False"),
    (dict(kinds="mlps"), "unknown kind"),
    (dict(noise="abc"), "unknown noise"),
])
def test_trace_dataset_arguments_are_checked_before_any_work(fm, monkeypatch, tmp_path,
                                                            change, match):
    monkeypatch.setattr(D, "predicted_facts", _no_work)
    kw = dict(kinds="resid", samples=2, cache_dir=tmp_path, progress=False) | change
    with pytest.raises(InterpEditError, match=match):
        D.trace_dataset(fm.model, fm.facts[:3], **kw)


def test_limit_minus_one_no_longer_drops_the_last_fact(fm, tmp_path):
    with pytest.raises(InterpEditError, match=r"limit must be a positive integer \(>= 1\); -1 is"):
        D.trace_dataset(fm.model, fm.facts[:3], "resid", limit=-1, cache_dir=tmp_path,
                        progress=False)


def test_dataset_facts_must_hold_text(fm, tmp_path):
    class Bad:
        prompt, subject, attribute = "a b c", 5, "x"

    with pytest.raises(InterpEditError, match="fact 0's subject must be a string"):
        D.trace_dataset(fm.model, [Bad()], cache_dir=tmp_path, progress=False)


# ---- editing --------------------------------------------------------------------------------
def _req(fm, **change):
    f = fm.facts[0]
    kw = dict(prompt=f.template, subject=f.subject, target_new="pilot",
              target_true=f.attribute) | change
    return ie.EditRequest(**kw)


@pytest.mark.parametrize("method,kw,match", [
    ("rome", dict(layer=True), "layer must be 'auto' or a layer index"),
    ("rome", dict(layer=1.7), "layer must be 'auto' or a layer index"),
    ("rome", dict(layer=-1), "layer must be 'auto' or a layer index"),
    ("rome", dict(layer=99), "ROMEHparams.layer must be in 0..3"),
    ("rome", dict(auto_fallback=9), "auto_fallback .* must be in 0..1"),
    ("rome", dict(auto_fallback="0.1"), "auto_fallback .* must be a number"),
    ("rome", dict(trace_samples=10**6), "trace_samples must be in 1..1024"),
    ("rome", dict(n_prefixes=-1), "n_prefixes must be >= 0"),
    ("rome", dict(v_steps=0), "v_steps must be a positive integer"),
    ("rome", dict(stats_tokens="many"), "stats_tokens must be an integer"),
    ("rome", dict(v_lr="0.5"), "v_lr must be a number"),
    ("rome", dict(seed="abc"), "seed must be an integer"),
    ("rome", dict(auto_search=(0, "0.5")), "auto_search .* must be a number"),
    ("rome", dict(auto_search=(0, float("nan"))), "auto_search .* must be a finite"),
    ("rome", dict(auto_search="01"), "auto_search="),
    ("rome", dict(trace_window=0), "trace_window must be a positive"),
    ("rome", dict(corpus=5), "corpus must be a string"),
    ("ft", dict(layer=True), "FTHparams.layer must be an integer"),
    ("ft", dict(layer=99), "FTHparams.layer must be in 0..3"),
    ("ft", dict(steps=0), "steps must be a positive integer"),
    ("ft", dict(lr="fast"), "lr must be a number"),
    ("ike", dict(demos=-1), "demos must be >= 0"),
    ("ike", dict(demos=True), "demos must be an integer"),
    ("ike", dict(seed=1.5), "seed must be an integer"),
    ("ike", dict(mix="112"), "mix must be three"),
    ("mend", dict(passes=0), "passes .* must be a positive integer"),
    ("mend", dict(editor="/no/such/editor.safetensors"), "does not exist"),
])
def test_edit_hparams_are_checked_before_any_work(fm, monkeypatch, method, kw, match):
    from interp_edit.editing import rome

    monkeypatch.setattr(rome, "context_templates", _no_work)
    m = fm.model
    before = _weights(m)
    with pytest.raises(InterpEditError, match=match):
        ie.edit(m, _req(fm), method=method, **kw)
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


@pytest.mark.parametrize("change,match", [
    (dict(subject=5), "subject must be a string"),
    (dict(prompt=None), "prompt must be a string"),
    (dict(target_new=5), "target_new is empty"),
    (dict(prompt="{city} {} works as a"), "braces other than"),
    (dict(prompt="{} works as a {0}"), "braces other than"),
    (dict(target_new="painter", target_true="painter"), "an edit must change the answer"),
    (dict(target_new=" painter", target_true="painter"), "an edit must change the answer"),
])
def test_bad_requests_raise(fm, change, match):
    req = _req(fm, **change)
    if "target_true" in change:
        req = _req(fm, **change) if req.target_true else req
    with pytest.raises(InterpEditError, match=match):
        ie.edit(fm.model, req, method="ft", steps=1)


# ---- evaluation -----------------------------------------------------------------------------
def _records(fm, n=3):
    facts = [f for f in fm.facts if f.relation == "job"][:n]
    return [EditRecord(i, f.template, f.subject, "pilot" if f.attribute != "pilot" else "chef",
                       f.attribute) for i, f in enumerate(facts)]


@pytest.mark.parametrize("kw,match", [
    (dict(n=0), "n must be a positive integer"),
    (dict(n=-1), "n must be a positive integer"),
    (dict(n=True), "n must be an integer"),
    (dict(seed="abc"), "seed must be an integer"),
    (dict(n_unrelated=-1), "n_unrelated must be"),
    (dict(fluency_tokens=0), "fluency_tokens must be"),
    # a wrong configuration is an error, not an "edit failed" skip of every record
    (dict(method="rome", layer=99), "ROMEHparams.layer must be in 0..3"),
    (dict(method="ft", layer=7), "FTHparams.layer must be in 0..3"),
    (dict(method="mend", editor="/no/such/editor.safetensors"), "does not exist"),
    (dict(method="ike", pool="/no/such/pool.json"), "not found"),
    (dict(method="rome", corpus="/no/such/corpus.txt"), "not a text file"),
])
def test_evaluate_stops_on_a_wrong_configuration(fm, monkeypatch, kw, match):
    from interp_edit.evaluation import metrics

    monkeypatch.setattr(metrics, "top1", _no_work)  # the first work evaluate does
    kw = dict(method="ft", progress=False) | kw
    with pytest.raises(InterpEditError, match=match):
        evaluate(fm.model, _records(fm), **kw)


def test_evaluate_takes_edit_records(fm):
    with pytest.raises(InterpEditError, match="takes EditRecords"):
        evaluate(fm.model, [object()], method="none", progress=False)


def test_evaluate_still_skips_a_record_whose_own_edit_fails(fm):
    """Per-record failures stay skips: here one record asks for its own answer."""
    good = _records(fm, 2)
    bad = EditRecord(7, good[0].prompt, good[0].subject, " painter", "painter")
    rep = evaluate(fm.model, [bad, *good], method="ft", layer=1, steps=2, progress=False)
    assert rep.skip_reasons().get("invalid") == 1


# ---- records, files, the model -------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(prompt=5), "prompt must be a string"),
    (dict(case_id=[1]), "case_id must be"),
    (dict(paraphrases="one prompt"), "paraphrases must be a list"),
    (dict(paraphrases=[5]), "an entry of paraphrases must be a string"),
    (dict(neighborhood=[("only a prompt",)]), "pairs"),
    (dict(neighborhood=["ab"]), "pairs"),
])
def test_malformed_records_raise(kw, match):
    base = dict(case_id=1, prompt="{} is in", subject="X", target_new="a", target_true="b")
    with pytest.raises(InterpEditError, match=match):
        EditRecord(**(base | kw))


def test_a_malformed_counterfact_record_names_the_file_and_record(tmp_path):
    ok = {"case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "X",
                                              "target_new": {"str": "a"},
                                              "target_true": {"str": "b"}}}
    broken = {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Y"}}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([ok, broken]))
    with pytest.raises(InterpEditError, match=r"cf.json: record 1 lacks the field 'target_true'"):
        load_counterfact(path)
    path.write_text(json.dumps([ok, {"requested_rewrite": "a string"}]))
    with pytest.raises(InterpEditError, match="record 1 is malformed"):
        load_counterfact(path)


def test_a_text_file_named_gguf_is_not_a_model(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a model\n")
    with pytest.raises(InterpEditError, match="not a GGUF file"):
        ie.load_model(path)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.top_k("a b", 0), "k must be"),
    (lambda m: m.top_k("a b", True), "k must be an integer"),
    (lambda m: m.top_k("a b", 10**9), "k must be"),
    (lambda m: m.generate("a b", -1), "max_new_tokens must be"),
])
def test_model_counts(fm, call, match):
    with pytest.raises(InterpEditError, match=match):
        call(fm.model)


@pytest.mark.parametrize("call,match", [
    (lambda fm: ie.load_model(5), "must be a path"),
    (lambda fm: ie.trace(None, "a b", "a"), "model must be of type Model"),
    (lambda fm: ie.trace_dataset(None, fm.facts), "model must be of type Model"),
    (lambda fm: ie.edit(None, _req(fm)), "model must be of type Model"),
    (lambda fm: ie.evaluate(None, _records(fm)), "model must be of type Model"),
    (lambda fm: ie.locate(None, fm.facts[0]), "model must be of type Model"),
    (lambda fm: ie.locate(fm.model, fm.facts[0], samples=10**6), "samples must be in 1..1024"),
    (lambda fm: ie.compare_activations(fm.model, None, ["a b"]), "edit must be of type"),
    (lambda fm: ie.edit(fm.model, 5), "requests must be a list"),
    (lambda fm: ie.edit(fm.model, _req(fm), method=["rome"]), "edit method must be a string"),
    (lambda fm: ie.evaluate(fm.model, 5), "records must be a list"),
    (lambda fm: ie.trace_dataset(fm.model, 5), "facts must be a list"),
    (lambda fm: ie.load_known_facts(5), "must be a path"),
    (lambda fm: ie.load_counterfact(None), "must be a path"),
    (lambda fm: fm.model.next_token_probs(5, "x"), "prompts must be a list"),
    (lambda fm: fm.model.subject_range("a b", "a", -1), "occurrence must be >= 0"),
    (lambda fm: fm.model.subject_range("a b", "a", 1.5), "occurrence must be an integer"),
    (lambda fm: fm.model.subject_range("a b", 5), "subject must be non-empty text"),
])
def test_wrong_types_at_the_entry_points(fm, call, match):
    with pytest.raises(InterpEditError, match=match):
        call(fm)
