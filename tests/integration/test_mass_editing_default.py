"""MEMIT and AlphaEdit on the default model: the same-template failure of sequential edits
(capitals), and a small batch."""

import pytest
import torch

import interp_edit as ie

pytestmark = pytest.mark.integration

CAPITALS = [("France", "Lisbon", "Paris"), ("Germany", "Vienna", "Berlin"),
            ("Italy", "Athens", "Rome"), ("Spain", "Dublin", "Madrid")]


@pytest.fixture(scope="module")
def corpus(shared_data):
    return str(shared_data / "wikitext-2" / "valid.txt")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


def _holds(model, r):
    return bool(model.next_token_probs([r.text, r.text], [r.target_true, r.target_new]).diff() > 0)


def test_sequential_alphaedit_capitals_keep_the_earlier_ones(default_model, corpus):
    """"The capital of X is": four AlphaEdit calls, one capital each, all on one template;
    France -> Lisbon still holds after Germany, Italy and Spain (and so does every other)."""
    m = default_model
    before = _weights(m)
    reqs = [ie.EditRequest("The capital of {} is", c, new, old) for c, new, old in CAPITALS]
    assert not any(_holds(m, r) for r in reqs)
    stream = []
    for r in reqs:
        stream.append(ie.edit(m, r, method="alphaedit", corpus=corpus))
        assert _holds(m, r), r
    assert all(_holds(m, r) for r in reqs), [(r.subject, _holds(m, r)) for r in reqs]
    assert stream[-1].info["protected_keys"] == {layer: 3 for layer in stream[-1].info["layers"]}
    for e in reversed(stream):
        e.undo()
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


def test_memit_batch_of_capitals(default_model, corpus):
    m = default_model
    reqs = [ie.EditRequest("The capital of {} is", c, new, old) for c, new, old in CAPITALS]
    with ie.edit(m, reqs, method="memit", corpus=corpus) as e:
        assert all(_holds(m, r) for r in reqs)
        assert e.info["layers"] == [3, 4, 5, 6, 7] and e.info["target_reached"] > 0.5
