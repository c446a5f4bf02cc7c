"""Caches never serve a result computed on other weights: every cache is keyed by
``Model.weights_key`` (the fingerprint plus the applied edits), and a cached per-fact trace is
checked against its fact and settings when it is read."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import interp_edit as ie
from interp_edit.editing import keys
from interp_edit.editing.base import AppliedEdit, parameter_name
from interp_edit.editing.stats import second_moment
from interp_edit.tracing import dataset as D
from interp_edit.tracing.average import Condition, fact_file


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(fm, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "facts.txt"
    path.write_text("\n".join(f.prompt + " " + f.attribute + " ." for f in fm.facts * 8))
    return str(path)


def _shift(model, layer: int, scale: float, seed: int = 0) -> AppliedEdit:
    """A weight edit of ``layer``'s MLP output projection by a seeded random delta."""
    proj = model.mlp_out_proj(layer)
    g = torch.Generator().manual_seed(seed)
    delta = scale * torch.randn(proj.weight.shape, generator=g)
    return AppliedEdit.from_deltas(model, "shift", [], {}, {parameter_name(model, proj): delta})


def _same(a, b) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_weights_key_follows_the_applied_edits(fm):
    m = fm.model
    assert m.weights_key == m.fingerprint
    with _shift(m, 1, 0.1) as a:
        key_a = m.weights_key
        assert key_a != m.fingerprint
        with _shift(m, 2, 0.1):  # stacked: a new key
            assert m.weights_key not in (key_a, m.fingerprint)
        assert m.weights_key == key_a
        with AppliedEdit.in_context(m, "ctx", [], {}, context="the "):  # no weight changed
            assert m.weights_key == key_a
    assert m.weights_key == m.fingerprint
    with _shift(m, 1, 0.1):  # the same deltas again: the same weights, the same key
        assert m.weights_key == key_a
    with m.weights_changed("in-flight"):  # an editor's temporary in-place change
        assert m.weights_key != m.fingerprint
    assert m.weights_key == m.fingerprint


def test_statistics_built_under_an_edit_are_not_served_to_the_unedited_model(fm, corpus):
    m, layer = fm.model, 2
    with _shift(m, 0, 0.2):  # changes every later layer's keys
        edited = second_moment(m, layer, corpus, 2000, precision="fp32").clone()
        again = second_moment(m, layer, corpus, 2000, precision="fp32")
        assert torch.equal(again, edited)  # the edited weights reuse their own entry
    plain = second_moment(m, layer, corpus, 2000, precision="fp32").clone()
    fresh = second_moment(m, layer, corpus, 2000, precision="fp32", refresh=True)
    assert torch.equal(plain, fresh)
    assert float((edited - plain).norm() / plain.norm()) > 1e-2


def test_prefixes_sampled_under_an_edit_are_kept_apart(fm):
    m = fm.model
    plain = keys.context_templates(m, 2, 4, seed=3)
    with _shift(m, 0, 2.0):
        edited = keys.context_templates(m, 2, 4, seed=3)
    assert plain != edited
    assert keys.context_templates(m, 2, 4, seed=3) == plain


def test_trace_dataset_on_an_edited_model_never_mixes_in_unedited_rows(fm, tmp_path):
    m, facts = fm.model, list(fm.facts[:4])
    kw = dict(kinds="mlp", samples=2, window=2, progress=False)
    plain = D.trace_dataset(m, facts, cache_dir=tmp_path / "shared", **kw)
    with _shift(m, 1, 0.02):
        edited = D.trace_dataset(m, facts, cache_dir=tmp_path / "shared", **kw)
        alone = D.trace_dataset(m, facts, cache_dir=tmp_path / "fresh", **kw)
    assert edited.trace_dir != plain.trace_dir
    assert _same(edited.effects[0], alone.effects[0])
    assert not _same(edited.effects[0], plain.effects[0])
    again = D.trace_dataset(m, facts, cache_dir=tmp_path / "shared", **kw)
    assert _same(again.effects[0], plain.effects[0])


def test_a_cached_trace_of_another_fact_is_traced_again(fm, tmp_path, caplog):
    m, facts = fm.model, list(fm.facts[:3])
    kw = dict(kinds="resid", samples=2, cache_dir=tmp_path, progress=False)
    first = D.trace_dataset(m, facts, **kw)
    trace_dir = tmp_path / first.trace_dir.rsplit("/", 1)[-1]
    name = [fact_file(f.prompt, f.subject, f.attribute, Condition("resid")) for f in facts]
    shutil.copy(trace_dir / name[0], trace_dir / name[1])  # fact 1's file is now fact 0's
    with pytest.raises(ie.InterpEditError, match="is not the trace of fact 1"):
        first.fact_trace(1, "resid")
    with pytest.warns(UserWarning, match="another unit's .*differs in prompt"):
        second = D.trace_dataset(m, facts, **kw)
    assert _same(second.effects[0], first.effects[0])
    # and the file was replaced by the right trace
    assert ie.TraceResult.load(trace_dir / name[1]).prompt == facts[1].prompt


def test_a_cached_trace_with_other_settings_is_traced_again(fm, tmp_path, caplog):
    m, facts = fm.model, list(fm.facts[:2])
    kw = dict(kinds="resid", samples=2, cache_dir=tmp_path, progress=False)
    first = D.trace_dataset(m, facts, **kw)
    trace_dir = tmp_path / first.trace_dir.rsplit("/", 1)[-1]
    f = facts[0]
    path = trace_dir / fact_file(f.prompt, f.subject, f.attribute, Condition("resid"))
    r = ie.TraceResult.load(path)
    import dataclasses

    dataclasses.replace(r, samples=3, scores=r.scores + 0.5).save(path)
    with pytest.warns(UserWarning, match="another unit's .*samples"):
        second = D.trace_dataset(m, facts, **kw)
    assert _same(second.effects[0], first.effects[0])


def test_the_generated_corpus_is_sampled_from_the_loaded_weights(fm, tmp_path, monkeypatch):
    """While an edit is applied it is lifted for the sampling (and put back bit for bit), so a
    ROME edit on top of others reuses the model's one corpus instead of sampling another."""
    from interp_edit.editing import stats

    m = fm.model
    with _shift(m, 0, 2.0):
        edited = {k: v.detach().clone() for k, v in m.hf_model.named_parameters()}
        under_edit = keys.sample_token_ids(m, 4, 8, seed=5)
        lifted = stats._generated(m, 4, 9, seed=5, progress=False)
        assert all(torch.equal(edited[k], v) for k, v in m.hf_model.named_parameters())
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "other-cache"))
    plain = stats._generated(m, 4, 9, seed=5, progress=False)
    assert torch.equal(lifted, plain)
    assert [r[:9] for r in under_edit] != plain.tolist()


def test_rome_keys_its_later_requests_by_the_earlier_ones(fm, corpus, monkeypatch):
    """Several requests in one call: each is computed with the earlier ones added in place,
    and every cache it reads meanwhile sees those weights (Model.weights_changed)."""
    from interp_edit.editing import rome

    m, seen = fm.model, []
    real = rome.second_moment

    def spy(model, *args, **kwargs):
        seen.append(model.weights_key)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rome, "second_moment", spy)
    facts = [f for f in fm.facts if f.relation == "job"][:2]
    reqs = [ie.EditRequest(f.template, f.subject, "pilot" if f.attribute != "pilot" else "chef",
                           f.attribute) for f in facts]
    hp = dict(layer=0, n_prefixes=0, v_steps=10, corpus=corpus, stats_tokens=2000,
              precision="fp32")
    with ie.edit(m, reqs, method="rome", **hp):
        edited = m.weights_key
    assert seen[0] == m.fingerprint and seen[1] not in (m.fingerprint, edited)
    assert m.weights_key == m.fingerprint and not m._weight_marks
