"""Loaders: both CounterFact formats, zsRE (MEND format), the probe set; EditRecord itself."""

import dataclasses
import json

import pytest

from interp_edit.errors import InterpEditError
from interp_edit.evaluation import EditRecord, load_counterfact, load_zsre

OFFICIAL = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux, a native", "Danielle Darrieux spoke"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Jacques Chirac, a native"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
FLAT = {
    "case_id": 42,
    "prompt": "The profession of Arun Nehru is",
    "target_new": "actor",
    "subject": "Arun Nehru",
    "ground_truth": "politician",
    "rephrase_prompt": "Arun Nehru is known for",
    "locality_prompt": "George Washington's profession is a",
    "locality_ground_truth": "politician",
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


def _write(tmp_path, rows, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_counterfact_official_format(tmp_path):
    (r,) = load_counterfact(_write(tmp_path, [OFFICIAL]))
    assert (r.case_id, r.prompt, r.subject) == (0, "The mother tongue of {} is", "Danielle Darrieux")
    assert (r.target_new, r.target_true) == ("English", "French")
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert r.paraphrases == tuple(OFFICIAL["paraphrase_prompts"])
    # CounterFact neighbours share the true object with the edited fact
    assert r.neighborhood == tuple((p, "French") for p in OFFICIAL["neighborhood_prompts"])
    assert r.generation_prompts == ("Danielle Darrieux's mother tongue is",)
    assert r.reverse == r.portability == () and r.source == "counterfact"


def test_counterfact_flattened_format_recovers_template(tmp_path):
    twice = dict(FLAT, case_id=7, prompt="Arun Nehru, son of Arun Nehru, works as a")
    a, b = load_counterfact(_write(tmp_path, [FLAT, twice]))
    assert a.prompt == "The profession of {} is" and a.text == FLAT["prompt"]
    assert (a.target_new, a.target_true) == ("actor", "politician")
    assert a.paraphrases == ("Arun Nehru is known for",)
    assert a.neighborhood == (("George Washington's profession is a", "politician"),)
    assert b.prompt == "{}, son of Arun Nehru, works as a"  # first occurrence only


def test_zsre_mend_format(tmp_path, caplog):
    missing = dict(ZSRE, subject="Nobody")
    (r,) = load_zsre(_write(tmp_path, [ZSRE, missing]))
    assert "dropped 1 zsRE records" in caplog.text
    assert r.prompt == "What is the product made by {}?" and r.subject == "UniFirst"
    assert (r.target_new, r.target_true) == ("unmanned aircraft", "uniform")
    assert r.paraphrases == ("What will be the product of UniFirst?",)
    assert r.neighborhood == ((ZSRE["loc"], "Walter Sobchak"),)
    assert r.source == "zsre" and r.case_id == 0


def test_loader_errors(tmp_path):
    with pytest.raises(InterpEditError, match="does not exist"):
        load_counterfact(tmp_path / "nope.json")
    with pytest.raises(InterpEditError, match="unknown CounterFact format.*load_zsre"):
        load_counterfact(_write(tmp_path, [ZSRE]))
    with pytest.raises(InterpEditError, match="unknown CounterFact format"):
        load_counterfact(_write(tmp_path, [{"foo": 1}]))
    with pytest.raises(InterpEditError, match="unknown zsRE format"):
        load_zsre(_write(tmp_path, [FLAT]))
    with pytest.raises(InterpEditError, match="expected a JSON list"):
        load_counterfact(_write(tmp_path, {"a": 1}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InterpEditError, match="not valid JSON"):
        load_zsre(tmp_path / "bad.json")


def test_record_is_frozen_and_validated():
    r = EditRecord(1, "{} lives in", "Ada", "Rome", "Paris", neighborhood=[["x is in", "Paris"]])
    assert r.neighborhood == (("x is in", "Paris"),)
    assert r.request.text == r.text == "Ada lives in" and r.request.target_true == "Paris"
    assert EditRecord.from_dict(r.to_dict()) == r
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.subject = "Bob"
    with pytest.raises(InterpEditError, match="exactly one"):
        EditRecord(1, "Ada lives in", "Ada", "Rome", "Paris")
    with pytest.raises(InterpEditError, match="target_new is empty"):
        EditRecord(1, "{} lives in", "Ada", " ", "Paris")
