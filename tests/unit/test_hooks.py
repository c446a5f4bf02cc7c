import pytest
import torch

from interp_edit import hooks as H
from interp_edit.errors import HookNestingError, InterpEditError
from interp_edit.models import mlp_out_hook, resid_hook


def _ids(m, prompt):
    return m.tokenize(prompt)[None]


def test_add_noise_only_touches_chosen_positions(fm):
    m = fm.model
    ids = _ids(m, fm.facts[0].prompt).repeat(3, 1)
    noise = torch.randn(3, 2, m.d_model)
    emb = {}
    with H.hooked(m, [H.add_noise([0, 1], noise), H.capture("blocks.0.hook_resid_pre", emb)]):
        m.logits(ids)
    clean = {}
    with H.hooked(m, [H.capture("blocks.0.hook_resid_pre", clean)]):
        m.logits(ids)
    diff = emb["blocks.0.hook_resid_pre"] - clean["blocks.0.hook_resid_pre"]
    assert torch.allclose(diff[:, :2], noise, atol=1e-6)
    assert diff[:, 2:].abs().max() == 0


def test_patch_with_clean_values_restores_clean_logits(fm):
    m = fm.model
    ids = _ids(m, fm.facts[1].prompt).repeat(2, 1)
    clean_acts = {}
    with H.hooked(m, [H.capture(resid_hook(1), clean_acts)]):
        clean = m.logits(ids)
    noise = torch.randn(2, 2, m.d_model) * 3
    with H.hooked(m, [H.add_noise(slice(0, 2), noise)]):
        corrupt = m.logits(ids)
    assert (corrupt - clean).abs().max() > 1e-2
    restore = H.patch(resid_hook(1), slice(None), clean_acts[resid_hook(1)])
    with H.hooked(m, [H.add_noise(slice(0, 2), noise), restore]):
        patched = m.logits(ids)
    assert torch.allclose(patched, clean, atol=1e-5)


def test_patch_rows_and_callable(fm):
    m = fm.model
    ids = _ids(m, fm.facts[2].prompt).repeat(3, 1)
    seen = {}
    zero = H.patch(mlp_out_hook(0), [1, 2], lambda x: x * 0, rows=[0, 2])
    with H.hooked(m, [zero, H.capture(mlp_out_hook(0), seen)]):
        m.logits(ids)
    out = seen[mlp_out_hook(0)]
    assert out[[0, 2]][:, [1, 2]].abs().max() == 0
    assert out[1, 1:3].abs().min() > 0


def test_add_delta_gradients_flow(fm):
    m = fm.model
    f = fm.facts[0]
    ids = _ids(m, f.prompt)
    delta = torch.zeros(m.d_model, requires_grad=True)
    with H.hooked(m, [H.add_delta(mlp_out_hook(1), 1, delta)]):
        logp = m.logits(ids)[0, -1].log_softmax(-1)[m.target_ids(f.attribute)[0]]
    logp.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    # a zero delta leaves the output unchanged
    assert torch.allclose(logp.detach(), m.logits(ids)[0, -1].log_softmax(-1)[m.target_ids(f.attribute)[0]])


def test_nesting_on_one_point_is_refused_and_hooks_are_cleaned(fm):
    m = fm.model
    ids = _ids(m, fm.facts[0].prompt)
    store = {}
    with H.hooked(m, [H.capture(resid_hook(0), store)]):
        with pytest.raises(HookNestingError, match="single hooked"):
            with H.hooked(m, [H.capture(resid_hook(0), {})]):
                pass
        # the outer hook survived the refused inner context
        m.logits(ids)
        assert resid_hook(0) in store
        # a different point may be hooked inside
        with H.hooked(m, [H.capture(resid_hook(1), store)]):
            m.logits(ids)
        assert resid_hook(1) in store
    # the alias and its canonical name are the same point
    with H.hooked(m, [H.capture("blocks.0.hook_out", {})]):
        with pytest.raises(HookNestingError):
            with H.hooked(m, [H.capture(resid_hook(0), {})]):
                pass
    # after leaving, no hook remains anywhere
    assert all(len(hp.fwd_hooks) == 0 for hp in m.bridge.hook_dict.values())


def test_unknown_hook_point(fm):
    with pytest.raises(InterpEditError, match="unknown hook point"):
        with H.hooked(fm.model, [H.capture("blocks.0.nope", {})]):
            pass
