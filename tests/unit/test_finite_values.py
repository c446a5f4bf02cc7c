"""No non-finite number reaches the weights or the results: deltas are checked before they
are applied, NaN/inf noise and out-of-range hparams raise, and the model is left bit for bit
as it was."""

from __future__ import annotations

import pytest
import torch

import interp_edit as ie
from interp_edit.editing.base import AppliedEdit, parameter_name
from interp_edit.errors import InterpEditError
from interp_edit.tracing import dataset as D

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "cache"))


def _bits(model) -> dict[str, torch.Tensor]:
    """Every weight's bytes (NaN-safe exact comparison)."""
    return {k: v.detach().clone().view(torch.int32) for k, v in
            model.hf_model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in _bits(model).items())


def _req(fm):
    f = fm.facts[0]
    return ie.EditRequest(f.template, f.subject, "pilot" if f.attribute != "pilot" else "chef",
                          f.attribute)


def _nan_delta(model, layer=1):
    proj = model.mlp_out_proj(layer)
    delta = torch.zeros_like(proj.weight)
    delta[0, 0] = NAN
    delta[1, 1] = INF
    return parameter_name(model, proj), delta


def test_a_non_finite_delta_is_refused_before_it_is_applied(fm):
    m = fm.model
    before = _bits(m)
    name, delta = _nan_delta(m)
    with pytest.raises(InterpEditError, match="non-finite"):
        AppliedEdit.from_deltas(m, "toy", [], {}, {name: delta})
    assert _unchanged(m, before) and not m._applied_edits


def test_nan_deltas_in_a_loaded_edit_file_are_refused(fm, tmp_path):
    m = fm.model
    before = _bits(m)
    name, delta = _nan_delta(m)
    req = ie.EditRequest("{} is a", "Paris", "city")  # a saved edit holds its requests
    saved = AppliedEdit(model=None, method="toy", requests=[req], hparams={},
                        deltas={name: delta}, model_name=m.name, fingerprint=m.fingerprint)
    saved.save(tmp_path / "nan.safetensors")
    loaded = ie.load_edit(tmp_path / "nan.safetensors")
    with pytest.raises(InterpEditError, match="non-finite"):
        loaded.apply(m)
    assert _unchanged(m, before) and not loaded.applied


def test_an_editor_that_added_a_non_finite_delta_gets_the_weights_put_back(fm):
    """``added_to``: the editor (MEND's passes) set the weights itself before handing over."""
    m = fm.model
    before = _bits(m)
    name, delta = _nan_delta(m)
    p = m.parameters_by_name[name]
    original = p.detach().clone()
    with torch.no_grad():
        torch.add(original, delta, out=p)
    with pytest.raises(InterpEditError, match="non-finite"):
        AppliedEdit.from_deltas(m, "toy", [], {}, {name: delta}, owned=True,
                                added_to={name: original})
    assert _unchanged(m, before)


def test_a_nan_weight_gives_an_error_not_a_nan_edit(fm):
    """Fine-tuning a layer that holds a NaN: its delta is NaN, and is refused."""
    m = fm.model
    w = m.mlp_out_proj(1).weight
    keep = w.detach().clone()
    with torch.no_grad():
        w[3, 3] = NAN
    try:
        before = _bits(m)
        with pytest.raises(InterpEditError, match="non-finite"):
            ie.edit(m, _req(fm), method="ft", layer=1, steps=2)
        assert _unchanged(m, before)
    finally:
        with torch.no_grad():
            w.copy_(keep)


@pytest.mark.parametrize("method,kw,match", [
    ("rome", dict(kl_factor=NAN), "kl_factor must be a finite"),
    ("rome", dict(clamp_norm_factor=-1), "clamp_norm_factor must be positive"),
    ("rome", dict(clamp_norm_factor=INF), "clamp_norm_factor must be a finite"),
    ("rome", dict(v_lr=INF), "v_lr must be a finite"),
    ("rome", dict(v_weight_decay=-0.5), "v_weight_decay must be >= 0"),
    ("rome", dict(mom2_ridge=NAN), "mom2_ridge must be a finite"),
    ("rome", dict(min_effect=NAN), "min_effect must be a finite"),
    ("ft", dict(lr=INF), "lr must be a finite"),
    ("ft", dict(lr=NAN), "lr must be a finite"),
    ("ft", dict(weight_decay=-1), "weight_decay must be >= 0"),
    ("ft-l", dict(norm_constraint=INF), "norm_constraint must be a finite"),
    ("ike", dict(mix=(1, NAN, 1)), "mix weight must be a finite"),
    ("memit", dict(kl_factor=NAN), "kl_factor must be a finite"),
    ("memit", dict(clamp_norm_factor=-1), "clamp_norm_factor must be positive"),
    ("memit", dict(mom2_update_weight=INF), "mom2_update_weight must be a finite"),
    ("memit", dict(v_lr="0.5"), "v_lr must be a number"),
    ("memit", dict(layers=(1.5, 2.5)), "layers entry must be an integer"),
    ("memit", dict(trace_samples=10**6), "trace_samples must be in 1..1024"),
    ("alphaedit", dict(alpha=NAN), "alpha must be a finite"),
    ("alphaedit", dict(null_threshold=0), "null_threshold must be positive"),
])
def test_non_finite_or_out_of_range_hparams_raise_and_touch_nothing(fm, method, kw, match):
    m = fm.model
    before = _bits(m)
    with pytest.raises(InterpEditError, match=match):
        ie.edit(m, _req(fm), method=method, **kw)
    assert _unchanged(m, before)


def test_mend_training_config_refuses_non_finite_numbers():
    from interp_edit.editing.mend_train import TrainConfig

    for kw in (dict(lr=NAN), dict(grad_clip=INF), dict(c_loc=-1.0), dict(init_step=0.0)):
        with pytest.raises(InterpEditError):
            TrainConfig(**kw)


@pytest.mark.parametrize("noise", [INF, NAN, -1.0, "s1e999", "s" + "9" * 400])
def test_non_finite_noise_stds_raise(fm, noise):
    f = fm.facts[0]
    with pytest.raises(InterpEditError, match="noise"):
        ie.trace(fm.model, f.prompt, f.subject, samples=2, noise=noise)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_noise_tensors_with_nan_or_inf_raise(fm, bad):
    m, f = fm.model, fm.facts[0]
    start, end = m.subject_range(f.prompt, f.subject)
    noise = torch.zeros(2, end - start, m.d_model)
    noise[1, 0, 3] = bad
    with pytest.raises(InterpEditError, match="noise tensor holds 1 non-finite"):
        ie.trace(m, f.prompt, f.subject, samples=2, noise=noise)


@pytest.mark.parametrize("noise", [INF, NAN, -0.5])
def test_dataset_noise_must_be_finite(fm, noise, tmp_path):
    with pytest.raises(InterpEditError, match="noise std"):
        D.trace_dataset(fm.model, fm.facts[:2], "resid", samples=2, noise=noise,
                        cache_dir=tmp_path, progress=False)


def test_a_trace_of_a_model_with_a_nan_weight_is_an_error_not_a_nan_grid(fm):
    m, f = fm.model, fm.facts[0]
    w = m.mlp_out_proj(2).weight
    keep = w.detach().clone()
    with torch.no_grad():
        w[:, 0] = NAN
    try:
        with pytest.raises(InterpEditError, match="output is not finite"):
            ie.trace(m, f.prompt, f.subject, samples=2, layers=[0])
    finally:
        with torch.no_grad():
            w.copy_(keep)
