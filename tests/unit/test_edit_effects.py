"""compare_activations, the logit lens and the edit-effect figures on the tiny fact model."""

import pytest
import torch

import interp_edit as ie
from interp_edit.analysis import ActivationDiff, before_after, compare_activations, probe_prompts
from interp_edit.analysis.logit_lens import lens_probs
from interp_edit.editing.base import AppliedEdit, parameter_name
from interp_edit.errors import InterpEditError
from interp_edit.hooks import capture, hooked
from interp_edit.models import resid_hook


def _req(fm, i=0):
    f = fm.facts[i]
    new = "Rome" if f.attribute != "Rome" else "Oslo"
    return ie.EditRequest(f.template, f.subject, new, f.attribute)


def _prompts(fm, i=0):
    f = fm.facts[i]
    return probe_prompts(_req(fm, i), paraphrase=f.paraphrases[0].format(f.subject),
                         neighborhood=fm.facts[i + 2].prompt, unrelated="the job of a pilot is a")


def _weight_edit(fm, layer, scale, seed=0):
    m = fm.model
    name = parameter_name(m, m.mlp_out_proj(layer))
    shape = m.parameters_by_name[name].shape
    delta = scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return AppliedEdit.from_deltas(m, "toy", [_req(fm)], {}, {name: delta})


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


def test_logit_lens_at_last_layer_is_the_output_distribution(fm):
    m = fm.model
    ids = m.tokenize(fm.facts[0].prompt)[None]
    store = {}
    with hooked(m, [capture(resid_hook(m.n_layers - 1), store)]):
        logits = m.logits(ids)
    lens = lens_probs(m, store[resid_hook(m.n_layers - 1)])
    torch.testing.assert_close(lens, logits.softmax(-1), atol=1e-6, rtol=1e-5)


def test_noop_edit_gives_zero_differences_and_keeps_state(fm):
    m = fm.model
    e = _weight_edit(fm, layer=1, scale=0.0)
    w0 = _weights(m)
    d = compare_activations(m, e, _prompts(fm))
    assert e.applied and all(torch.equal(w0[k], v) for k, v in _weights(m).items())
    for field in ("resid_change", "mlp_change", "attn_change"):
        x = getattr(d, field)
        assert torch.all(x.nan_to_num() == 0), field
    valid = ~d.resid_cos.isnan()
    torch.testing.assert_close(d.resid_cos[valid], torch.ones(int(valid.sum())))
    assert torch.equal(d.lens_before, d.lens_after)
    assert d.kinds == ("edit", "paraphrase", "neighborhood", "unrelated") and d.edit_layers == (1,)
    e.undo()


@pytest.mark.parametrize("applied", [True, False])
def test_weight_edit_moves_only_from_its_layer_on_and_restores_state(fm, applied):
    m = fm.model
    w0 = _weights(m)
    e = _weight_edit(fm, layer=2, scale=0.05)
    w_edit = _weights(m)
    if not applied:
        e.undo()
    d = compare_activations(m, e, _prompts(fm))
    assert e.applied is applied
    now = _weights(m)
    assert all(torch.equal((w_edit if applied else w0)[k], v) for k, v in now.items())
    assert torch.all(d.resid_change[:, :, :2].nan_to_num() == 0)  # upstream of the edit
    assert torch.all(d.mlp_change[:, :, :2].nan_to_num() == 0)
    assert d.curve("resid")[0, 2:].min() > 0 and d.curve("mlp")[0, 2] > 0
    # the final logit lens is the output distribution of the model in the matching state
    ids = [m.target_ids(t)[0] for t in d.targets]
    probs = m.last_logits([d.prompts[0]]).softmax(-1)[0, ids]
    torch.testing.assert_close((d.lens_after if applied else d.lens_before)[0, -1], probs,
                               atol=1e-5, rtol=1e-4)
    if applied:
        e.undo()


def test_in_context_edit_compares_aligned_final_tokens(fm):
    m = fm.model
    req = _req(fm)
    ctx = f"new fact : {req.subject} lives in the city of {req.target_new} . "
    e = AppliedEdit.in_context(m, "ike", [req], {}, context=ctx)
    prompts = _prompts(fm)
    d = compare_activations(m, e, prompts)
    assert d.in_context and d.context == ctx and d.edit_layers == ()
    for i, text in enumerate(prompts.values()):
        assert list(d.tokens[i]) == m.to_str_tokens(m.tokenize(text))
        # after: the last aligned token of context + prompt; before: the prompt alone
        ids = [m.target_ids(t)[0] for t in d.targets]
        wrapped = m.last_logits([e.wrap(text)]).softmax(-1)[0, ids]
        torch.testing.assert_close(d.lens_after[i, -1], wrapped, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(d.lens_before[i, -1], m.last_logits([text]).softmax(-1)[0, ids],
                                   atol=1e-5, rtol=1e-4)
    assert d.subject_ranges[0] == m.subject_range(req.text, req.subject)
    assert d.resid_change.nan_to_num().max() > 0
    e.undo()


def test_before_after_restores_the_edit_when_a_run_raises(fm):
    m = fm.model
    w0 = _weights(m)
    e = _weight_edit(fm, layer=1, scale=0.05)
    w_edit = _weights(m)

    def run(after):
        if not after:
            raise RuntimeError("boom")
        return 1

    with pytest.raises(RuntimeError):
        before_after(m, e, run)
    assert e.applied and all(torch.equal(w_edit[k], v) for k, v in _weights(m).items())
    e.undo()
    assert all(torch.equal(w0[k], v) for k, v in _weights(m).items())


def test_diff_saves_loads_and_plots(fm, tmp_path):
    m = fm.model
    e = _weight_edit(fm, layer=2, scale=0.05)
    d = compare_activations(m, e, _prompts(fm))
    e.undo()
    path = d.save(tmp_path / "diff")
    back = ActivationDiff.load(path)
    assert back.tokens == d.tokens and back.targets == d.targets and back.edit_layers == (2,)
    torch.testing.assert_close(back.resid_change, d.resid_change, equal_nan=True)
    for what in ("curves", "heatmap", "lens"):
        fig = back.plot(what)
        fig.savefig(tmp_path / f"{what}.png")
        assert "TOY edit at layer 2" in fig._suptitle.get_text()
    with pytest.raises(InterpEditError):
        back.plot("nope")
    with pytest.raises(InterpEditError):
        back.curve("resid", position="middle")
