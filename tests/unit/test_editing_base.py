"""The editor framework with a toy registered editor (no real method needed)."""

from dataclasses import dataclass

import pytest
import torch

import interp_edit as ie
from interp_edit.arch import hf_name
from interp_edit.editing.base import AppliedEdit, parameter_name, register_editor
from interp_edit.errors import InterpEditError, ModelMismatchError


@dataclass(frozen=True)
class _ToyHparams:
    layer: int = 1
    scale: float = 0.01


@register_editor("toy", _ToyHparams)
def _toy(model, requests, hp):
    name = parameter_name(model, model.mlp_out_proj(hp.layer))
    w = model.parameters_by_name[name]
    g = torch.Generator().manual_seed(len(requests))
    return AppliedEdit.from_deltas(model, "toy", requests, hp,
                                   {name: hp.scale * torch.randn(w.shape, generator=g)},
                                   info={"layer": hp.layer})


def _req(fm, i=0, **kw):
    f = fm.facts[i]
    base = dict(prompt=f.template, subject=f.subject, target_new="Rome", target_true=f.attribute)
    base.update(kw)
    return ie.EditRequest(**base)


def _weights(model):
    return {hf_name(k): v.detach().clone() for k, v in model.hf_model.named_parameters()}


def test_request_template_and_text(fm):
    f = fm.facts[0]
    a = ie.EditRequest(f.template, f.subject, "Rome")
    b = ie.EditRequest(f.prompt, f.subject, "Rome")
    assert a.template == b.template == f.template and a.text == b.text == f.prompt


def test_undo_is_bit_exact_and_ordered(fm):
    m = fm.model
    before = _weights(m)
    e1 = ie.edit(m, [_req(fm)], method="toy")
    e2 = ie.edit(m, [_req(fm, 1)], method="toy", layer=2)
    assert any(not torch.equal(before[k], v) for k, v in _weights(m).items())
    with pytest.raises(InterpEditError, match="reverse order"):
        e1.undo()
    e2.undo()
    e1.undo()
    after = _weights(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(InterpEditError, match="not applied"):
        e1.undo()


def test_weights_added_by_the_editor_are_kept_for_undo(fm):
    """from_deltas(added_to=...): the editor already wrote before + delta; the edit equals
    one applied the ordinary way, keeps the editor's copy for undo and undoes bit for bit."""
    m = fm.model
    name = parameter_name(m, m.mlp_out_proj(1))
    w = m.parameters_by_name[name]
    before, delta = w.detach().clone(), 0.01 * torch.randn_like(w)
    plain = AppliedEdit.from_deltas(m, "toy", [_req(fm)], _ToyHparams(), {name: delta})
    edited = w.detach().clone()
    plain.undo()
    with torch.no_grad():
        torch.add(before, delta, out=w)
    e = AppliedEdit.from_deltas(m, "toy", [_req(fm)], _ToyHparams(), {name: delta},
                                added_to={name: before})
    assert torch.equal(w, edited)
    assert e._originals[name] is before  # no second copy
    e.undo()
    assert torch.equal(w, before)
    e.apply(m)  # re-applied the ordinary way
    assert torch.equal(w, edited)
    e.undo()
    with pytest.raises(InterpEditError, match="exactly the edited parameters"):
        AppliedEdit.from_deltas(m, "toy", [_req(fm)], _ToyHparams(), {name: delta},
                                added_to={})
    assert torch.equal(w, before)


def test_save_load_apply_roundtrip(fm, tmp_path, tiny):
    m = fm.model
    before = _weights(m)
    e = ie.edit(m, [_req(fm)], method="toy", scale=0.5)
    edited = _weights(m)
    e.save(tmp_path / "e.safetensors")
    e.undo()
    loaded = ie.load_edit(tmp_path / "e.safetensors")
    assert loaded.hparams == {"layer": 1, "scale": 0.5} and loaded.requests == e.requests
    with loaded.apply(m):
        assert all(torch.equal(edited[k], v) for k, v in _weights(m).items())
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        ie.load_edit(tmp_path / "e.safetensors").apply(tiny)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(target_new=""), "target_new is empty"),
        (dict(target_new="   "), "target_new is empty"),
        (dict(subject="Nobody Here"), "not in prompt"),
        (dict(target_true=""), "target_true is empty"),
    ],
)
def test_validation_before_weights_change(fm, kw, match):
    m = fm.model
    before = _weights(m)
    with pytest.raises(InterpEditError, match=match):
        ie.edit(m, [_req(fm, prompt=fm.facts[0].prompt, **kw)], method="toy")
    assert all(torch.equal(before[k], v) for k, v in _weights(m).items())


def test_unknown_method_and_hparams(fm):
    with pytest.raises(InterpEditError, match="unknown edit method 'nope'.*rome"):
        ie.edit(fm.model, [_req(fm)], method="nope")
    with pytest.raises(InterpEditError, match="unknown hparams.*bogus"):
        ie.edit(fm.model, [_req(fm)], method="toy", bogus=1)
    with pytest.raises(InterpEditError, match="no edit requests"):
        ie.edit(fm.model, [], method="toy")
