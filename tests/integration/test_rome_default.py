"""ROME on the default model: the Eiffel Tower moves to Rome, and undo restores every bit."""

import pytest
import torch

import interp_edit as ie

pytestmark = pytest.mark.integration

EIFFEL = ie.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


@pytest.fixture(scope="module")
def corpus(shared_data):
    return str(shared_data / "wikitext-2" / "valid.txt")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


def _top1(model, prompt):
    return model.top_k(prompt, 1)[0][0].strip()


def test_eiffel_tower_to_rome_and_back(default_model, corpus):
    m = default_model
    before = _weights(m)
    assert _top1(m, EIFFEL.text) == "Paris"
    neighbour = "The capital of Japan is"
    top_neighbour = _top1(m, neighbour)
    edit = ie.edit(m, EIFFEL, method="rome", corpus=corpus)
    assert _top1(m, EIFFEL.text) == "Rome"
    assert _top1(m, "The Eiffel Tower is in the city of") == "Rome"  # a paraphrase
    assert _top1(m, neighbour) == top_neighbour
    info = edit.info
    assert isinstance(info["layer"], int) and info["why"]
    assert info["edits"][0]["v"]["nll"][1] < info["edits"][0]["v"]["nll"][0]
    edit.undo()
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())
    assert _top1(m, EIFFEL.text) == "Paris"


def test_auto_layer_traces_the_fact(default_model, corpus):
    m = default_model
    with ie.edit(m, EIFFEL, method="rome", layer="auto", corpus=corpus) as edit:
        trace = edit.info["edits"][0]["trace"]
        assert trace["targets"][0].strip() == "Paris" and "MLP indirect effect" in edit.info["why"]
        assert len(trace["effects"]) == m.n_layers
        assert _top1(m, EIFFEL.text) == "Rome"
