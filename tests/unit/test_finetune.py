"""FT and FT-L on the tiny fact model: they reach the new fact, FT-L stays in its L-inf ball,
only the chosen weight changes, and undo is bit-exact."""

import pytest
import torch

import interp_edit as ie
from interp_edit.arch import hf_name
from interp_edit.editing.base import parameter_name
from interp_edit.editing.finetune import FTHparams, FTLHparams
from interp_edit.errors import InterpEditError

LAYER = 1  # the tiny model has 4 layers; the default layer (4) is for SmolLM2


def _req(fm, i=0):
    f = fm.facts[i]
    new = "Rome" if f.attribute != "Rome" else "Paris"
    return ie.EditRequest(f.template, f.subject, new, f.attribute)


def _weights(model):
    return {hf_name(k): v.detach().clone() for k, v in model.hf_model.named_parameters()}


def test_ft_moves_p_new_above_p_true(fm):
    m, req = fm.model, _req(fm)
    p_new, p_true = m.next_token_probs([req.text] * 2, [req.target_new, req.target_true])
    assert p_true > p_new
    with ie.edit(m, [req], method="ft", layer=LAYER) as e:
        p_new, p_true = m.next_token_probs([req.text] * 2, [req.target_new, req.target_true])
        assert p_new > 0.5 > p_true
        assert e.info["losses"][0] > e.info["losses"][-1] and e.info["layer"] == LAYER


@pytest.mark.parametrize("method,kw", [("ft", {}), ("ft-l", {}), ("ft-l", {"norm_constraint": 1e-2})])
def test_only_the_layer_changes_and_undo_is_bit_exact(fm, method, kw):
    m = fm.model
    before = _weights(m)
    name = parameter_name(m, m.mlp_out_proj(LAYER))
    e = ie.edit(m, [_req(fm), _req(fm, 1)], method=method, layer=LAYER, **kw)
    after = _weights(m)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [name] and list(e.deltas) == [name]
    assert not m.mlp_out_proj(LAYER).weight.requires_grad
    e.undo()
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


@pytest.mark.parametrize("eps", [5e-4, 1e-2])
def test_ft_l_respects_its_norm_bound(fm, eps):
    m = fm.model
    w = m.mlp_out_proj(LAYER).weight
    before = w.detach().clone()
    with ie.edit(m, [_req(fm)], method="ft-l", layer=LAYER, norm_constraint=eps) as e:
        (delta,) = e.deltas.values()
        assert delta.abs().max() <= eps
        realised = (w.detach() - before).abs().max()
        assert realised <= eps * (1 + 1e-5) + 1e-7  # float rounding of before + delta
        assert realised > 0.5 * eps  # the constraint is active, not trivially satisfied


def test_ft_l_changes_less_than_ft(fm):
    m, req = fm.model, _req(fm)
    with ie.edit(m, [req], method="ft", layer=LAYER) as e:
        ft = next(iter(e.deltas.values())).abs().max()
    with ie.edit(m, [req], method="ft-l", layer=LAYER) as e:
        ftl = next(iter(e.deltas.values())).abs().max()
    assert ftl <= FTLHparams().norm_constraint < ft


def test_hparams_are_frozen_and_validated(fm):
    assert FTHparams().norm_constraint is None and FTLHparams().norm_constraint > 0
    with pytest.raises(Exception):
        FTHparams().lr = 1.0
    for kw, match in [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"),
                      ({"norm_constraint": -1.0}, "norm_constraint"), ({"layer": 99}, "layer")]:
        with pytest.raises(InterpEditError, match=match):
            ie.edit(fm.model, [_req(fm)], method="ft", **kw)
