"""compare_activations and the logit lens on the default model, with a real ROME edit."""

import pytest
import torch

import interp_edit as ie
from interp_edit.analysis import compare_activations, probe_prompts
from interp_edit.analysis.logit_lens import lens_probs
from interp_edit.editing.base import AppliedEdit, parameter_name
from interp_edit.hooks import capture, hooked
from interp_edit.models import resid_hook

pytestmark = pytest.mark.integration

REQ = ie.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PROMPTS = probe_prompts(REQ, paraphrase="The Eiffel Tower stands in the heart of the city of",
                        neighborhood="The Louvre is located in the city of")


def test_logit_lens_at_last_layer_is_the_output_distribution(default_model):
    m = default_model
    ids = m.tokenize(REQ.text)[None]
    store = {}
    with hooked(m, [capture(resid_hook(m.n_layers - 1), store)]):
        logits = m.logits(ids)
    torch.testing.assert_close(lens_probs(m, store[resid_hook(m.n_layers - 1)]),
                               logits.softmax(-1), atol=1e-6, rtol=1e-4)


def test_noop_edit_changes_nothing(default_model):
    m = default_model
    name = parameter_name(m, m.mlp_out_proj(4))
    zero = torch.zeros_like(m.parameters_by_name[name])
    with AppliedEdit.from_deltas(m, "noop", [REQ], {}, {name: zero}) as e:
        d = compare_activations(m, e, PROMPTS)
    assert torch.all(d.resid_change.nan_to_num() == 0) and torch.equal(d.lens_before, d.lens_after)


@pytest.fixture(scope="module")
def rome_diff(default_model, shared_data):
    m = default_model
    before = {k: v.clone() for k, v in m.hf_model.state_dict().items()}
    corpus = str(shared_data / "wikitext-2" / "valid.txt")
    with ie.edit(m, REQ, method="rome", layer=4, corpus=corpus) as e:
        d = compare_activations(m, e, PROMPTS)
        p_new = float(m.next_token_probs(REQ.text, "Rome"))
    assert all(torch.equal(before[k], v) for k, v in m.hf_model.state_dict().items())
    return d, p_new


def test_rome_edit_is_local_and_switches_the_answer(rome_diff):
    d, p_new = rome_diff
    assert d.edit_layers == (4,)
    # nothing upstream of the edited layer moves
    assert torch.all(d.resid_change[:, :, :4].nan_to_num() == 0)
    # the final logit lens is the edited model's output; the new answer wins there
    assert d.lens_after[0, -1, 1] == pytest.approx(p_new, rel=1e-4)
    assert d.lens_after[0, -1, 1] > d.lens_after[0, -1, 0] and d.lens_before[0, -1, 0] > 0.3
    # the edit moves the edit prompt's last token far more than the unrelated prompt's
    e, u = d.index("edit"), d.index("unrelated")
    assert d.curve("resid")[e, 10:].mean() > 5 * d.curve("resid")[u, 10:].mean()
    # at the edited layer the MLP output changes most at the subject's last token
    start, end = d.subject_ranges[e]
    assert int(d.mlp_change[e, :, 4].nan_to_num().argmax()) == end - 1
