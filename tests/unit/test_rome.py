"""ROME on the tiny fact model: the edit works, undoes bit for bit, and its algebra holds."""

import pytest
import torch

import interp_edit as ie
from interp_edit.editing import keys, rome
from interp_edit.editing.stats import second_moment
from interp_edit.errors import InterpEditError
from interp_edit.testing import CITIES



@pytest.fixture(scope="module")
def HP(fact_corpus):
    """Settings for the 4-layer fact model. It knows only its own sentences: no context
    prefixes (it cannot continue them), and key statistics from those sentences."""
    return dict(layer=0, n_prefixes=0, v_steps=100, v_nll_stop=0.01, v_weight_decay=0.01,
                corpus=str(fact_corpus), stats_tokens=2000, precision="fp32")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _req(fm, i=0):
    f = fm.facts[i]
    new = next(c for c in CITIES if c != f.attribute) if f.relation == "city" else "pilot"
    if new == f.attribute:
        new = "chef"
    return ie.EditRequest(f.template, f.subject, new, f.attribute)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


def _probs(model, prompt, req):
    return model.next_token_probs([prompt, prompt], [req.target_true, req.target_new]).tolist()


def test_edit_flips_the_fact_and_undo_is_bit_exact(fm, HP):
    m, req = fm.model, _req(fm)
    before = _weights(m)
    p_true, p_new = _probs(m, req.text, req)
    assert p_true > 0.9 > p_new
    edit = ie.edit(m, req, method="rome", **HP)
    p_true, p_new = _probs(m, req.text, req)
    assert p_new > p_true
    assert list(edit.deltas) == [rome.parameter_name(m, m.mlp_out_proj(0))]
    assert edit.info["layer"] == 0 and edit.info["why"] == "given (layer=0)"
    assert set(edit.info["timings"]) == {"locate", "stats", "k", "v", "update"}
    edit.undo()
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


def test_update_maps_k_star_to_v_star_with_the_same_key(fm, HP):
    """W' k* = v*, and the update's row space is C⁻¹k* for that same k* (PR #44's fix)."""
    m, req = fm.model, _req(fm, 2)
    hp = rome.ROMEHparams(**HP)
    contexts = keys.context_templates(m, hp.n_prefixes, hp.prefix_len, seed=hp.seed)
    step = rome.rome_step(m, req, hp, contexts)
    k_star = keys.key_star(m, 0, req.template, req.subject, contexts)
    torch.testing.assert_close(step.k, k_star)
    w = m.mlp_out_proj(0).weight.detach()
    torch.testing.assert_close((w + step.delta) @ step.k, step.v, rtol=1e-4, atol=1e-4)
    c = second_moment(m, 0, hp.corpus, hp.stats_tokens, precision=hp.precision)
    c_inv_k = torch.linalg.solve(c.double() + hp.mom2_ridge * c.diagonal().mean() * torch.eye(len(c)),
                                 step.k.double())
    s = torch.linalg.svdvals(step.delta.double())
    assert s[1] < 1e-6 * s[0]  # rank one
    row = step.delta.double()[step.delta.double().norm(dim=1).argmax()]
    assert torch.nn.functional.cosine_similarity(row, c_inv_k, dim=0).abs() > 1 - 1e-6


def test_rank_one_update_algebra():
    g = torch.Generator().manual_seed(0)
    w, k, v = torch.randn(5, 7, generator=g), torch.randn(7, generator=g), torch.randn(5, generator=g)
    a = torch.randn(7, 7, generator=g)
    c = a @ a.T + torch.eye(7)
    delta = rome.rank_one_update(w, k, v, c)
    torch.testing.assert_close((w + delta) @ k, v, rtol=1e-5, atol=1e-5)
    # keys C-orthogonal to k* are untouched: (C⁻¹k*)ᵀ x = 0
    x = torch.randn(7, generator=g, dtype=torch.float64)
    u = torch.linalg.solve(c.double(), k.double())
    x = x - (u @ x) / (u @ u) * u
    assert (delta.double() @ x).abs().max() < 1e-5


def test_key_star_is_the_mean_over_contexts(fm):
    m, req = fm.model, _req(fm)
    contexts = keys.context_templates(m, 3, 3)
    assert contexts[0] == "{}" and len(contexts) == 4 and all(c.endswith(". {}") for c in contexts[1:])
    batch = keys.encode_facts(m, [c.format(req.template) for c in contexts], req.subject)
    each = keys.subject_keys(m, 1, batch)
    torch.testing.assert_close(keys.key_star(m, 1, req.template, req.subject, contexts), each.mean(0))
    # the subject's last token, found after the prefix
    for row, ctx in enumerate(contexts):
        text = ctx.format(req.text)
        span = m.subject_range(text, req.subject, text[: len(ctx) - 2].count(req.subject))
        assert int(batch.subject_last[row]) == span[1] - 1


def test_reading_the_subject_a_few_rows_per_pass_changes_no_row(fm):
    """The bounded-memory reader (a large batch in chunks of rows) gives every row what one
    pass over all rows gives: the same padding, and each row's pass is its own."""
    from interp_edit.models import mlp_key_hook, resid_hook

    m, req = fm.model, _req(fm)
    contexts = keys.context_templates(m, 3, 3)
    batch = keys.encode_facts(m, [c.format(req.template) for c in contexts], req.subject)
    names = [mlp_key_hook(1), resid_hook(2)]
    whole = keys.at_subject_last(m, names, batch, 3, rows_per_pass=len(batch.ids))
    chunked = keys.at_subject_last(m, names, batch, 3, rows_per_pass=3)
    assert len(batch.ids) > 3
    for a, b in zip(whole, chunked):
        assert a.shape == (len(batch.ids), a.shape[1])
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert a.abs().sum() > 0


def test_several_requests_apply_sequentially_as_one_edit(fm, HP):
    m = fm.model
    reqs = [_req(fm, 4), _req(fm, 6)]
    before = _weights(m)
    edit = ie.edit(m, reqs, method="rome", **HP)
    for r in reqs:
        p_true, p_new = _probs(m, r.text, r)
        assert p_new > p_true, r
    assert edit.info["layer"] == [0, 0] and len(edit.info["edits"]) == 2
    edit.undo()
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


def test_auto_layer_records_the_trace(fm, HP):
    m, req = fm.model, _req(fm)
    hp = {**HP, "layer": "auto", "auto_search": (0.0, 0.75), "trace_samples": 2, "trace_window": 1,
          "min_effect": -1.0}
    with ie.edit(m, req, method="rome", **hp) as edit:
        info = edit.info["edits"][0]
        assert 0 <= edit.info["layer"] < 3 and "peak MLP indirect effect" in edit.info["why"]
        assert "search range layers 0..2" in edit.info["why"]
        effects = info["trace"]["effects"]
        assert len(effects) == m.n_layers and effects[3] is None  # layer 3 not searched
        assert edit.info["layer"] == max(range(3), key=lambda l: effects[l])
    hp["min_effect"] = 2.0  # no effect is that large: the fallback layer, and why
    with ie.edit(m, req, method="rome", **hp, auto_fallback=0.34) as edit:  # 0.34 x 3 -> 1
        assert edit.info["layer"] == 1 and "fallback layer 1" in edit.info["why"]


def test_save_and_load_roundtrip(fm, HP, tmp_path):
    m, req = fm.model, _req(fm)
    edit = ie.edit(m, req, method="rome", **HP)
    edited = _weights(m)
    edit.save(tmp_path / "rome.safetensors")
    edit.undo()
    loaded = ie.load_edit(tmp_path / "rome.safetensors")
    assert loaded.info["layer"] == 0 and loaded.hparams["layer"] == 0
    with loaded.apply(m):
        assert all(torch.equal(edited[k], v) for k, v in _weights(m).items())


@pytest.mark.parametrize("kw,match", [
    (dict(layer="top"), "layer must be 'auto'"),
    (dict(layer=-1), "layer must be 'auto'"),
    (dict(layer=4), "out of range"),
    (dict(v_lr=0), "v_lr must be positive"),
    (dict(kl_factor=-1.0), "kl_factor must be >= 0"),
    (dict(precision="fp16"), "precision"),
    (dict(trace_method="magic"), "trace_method"),
    (dict(auto_search=(0.75, 0.25)), "search"),
    (dict(auto_search=(0, 10)), "fractions"),
    (dict(auto_fallback=2), "auto_fallback"),
    (dict(corpus="/no/such/file.txt"), "not a text file"),
])
def test_bad_hparams_leave_the_weights_alone(fm, HP, kw, match):
    m = fm.model
    before = _weights(m)
    with pytest.raises(InterpEditError, match=match):
        ie.edit(m, _req(fm), method="rome", **{**HP, **kw})
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


def test_cli_edit_prints_before_after_and_saves(fm, HP, tmp_path, monkeypatch, capsys):
    import json

    from interp_edit.cli import main

    m, req = fm.model, _req(fm)
    monkeypatch.setattr(ie, "load_model", lambda name=None: m)
    before = _weights(m)
    hp = {k: v for k, v in HP.items() if k != "layer"}
    out = tmp_path / "edit.safetensors"
    code = main(["edit", "--prompt", req.prompt, "--subject", req.subject, "--target",
                 req.target_new, "--layer", "0", "--hparams", json.dumps(hp), "--tokens", "3",
                 "--save", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "before" in text and "after" in text and "given (layer=0)" in text
    assert f"p({req.target_true!r})" in text  # the true target defaults to the model's top-1
    assert ie.load_edit(out).requests[0].target_true == req.target_true
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())  # the CLI undoes
