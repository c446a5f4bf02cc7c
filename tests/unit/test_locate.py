"""tracing.locate: the one "which layer recalls this fact" step, on tiny models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import interp_edit as ie
from interp_edit.errors import InterpEditError
from interp_edit.tracing.locate import choose, default_window, search_layers
from interp_edit.tracing import api


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path))


def _reference_effects(model, facts, window, samples, tokens="last"):
    """Mean MLP indirect effect per layer from the one-pass-per-cell reference trace."""
    rows = []
    for f in facts:
        r = ie.trace(model, f.prompt, f.subject, target=f.attribute, kind="mlp", window=window,
                     samples=samples, method="reference", progress=False)
        first, end = r.subject_range
        e = r.indirect_effect[first:end].double()
        rows.append(e[-1] if tokens == "last" else e.mean(0))
    return torch.stack(rows).mean(0)


def test_effects_equal_the_reference_trace_and_the_peak_is_chosen(fm):
    facts = fm.facts[:3]
    loc = ie.locate(fm.model, facts, search=(0.0, 1.0), window=1, samples=2, every_token=True)
    ref = _reference_effects(fm.model, facts, 1, 2)
    torch.testing.assert_close(loc.effects, ref, atol=1e-5, rtol=0)
    ref_tokens = _reference_effects(fm.model, facts, 1, 2, tokens="all")
    torch.testing.assert_close(loc.token_effects, ref_tokens, atol=1e-5, rtol=0)
    assert loc.layer == int(ref.argmax()) and loc.layers == (loc.layer,)
    assert loc.n_facts == 3 and loc.fact_effects.shape == (3, fm.model.n_layers)
    assert [t.strip() for t in loc.targets] == [f.attribute for f in facts]
    assert f"layer {loc.layer}: peak MLP indirect effect" in loc.reason
    assert "mean over 3 facts" in loc.reason and "search range layers 0..3" in loc.reason


@pytest.fixture
def planted(monkeypatch):
    """Plant effects: the fact model's real traces, plus ``bump[subject]`` (a per-layer
    profile) on every cell. The tiny model's own MLP effects are flat (|e| < 0.01: its subjects
    reach the answer through attention), so a known peak is added on top of real traces."""
    real, bumps = api.trace, {}

    def trace(model, prompt, subject, **kw):
        r = real(model, prompt, subject, **kw)
        traced = ~torch.isnan(r.scores)
        scores = torch.where(traced, r.scores + bumps.get(subject, 0.0), r.scores)
        return dataclasses.replace(r, scores=scores)

    monkeypatch.setattr(api, "trace", trace)
    return bumps


def test_a_fact_whose_effect_peaks_at_a_known_layer_gets_that_layer(fm, planted):
    f = fm.facts[8]
    planted[f.subject] = torch.tensor([0.0, 0.0, 0.5, 0.1])
    loc = ie.locate(fm.model, f, search=(0.0, 1.0), samples=2)
    assert loc.layer == 2 and loc.layers == (2,) and loc.effects[2] > 0.45
    assert ie.locate(fm.model, f, search=(0.0, 0.5), samples=2).layer in (0, 1)  # 2 not searched
    assert ie.locate(fm.model, f, span=2, search=(0.0, 1.0), samples=2).layers == (2, 3)
    # several facts: the mean decides (0.3 at layer 1 in both beats 0.5 at layer 3 in one)
    g = fm.facts[9]
    planted[f.subject] = torch.tensor([0.0, 0.3, 0.0, 0.5])
    planted[g.subject] = torch.tensor([0.0, 0.3, 0.0, 0.0])
    loc = ie.locate(fm.model, [f, g], search=(0.0, 1.0), samples=2, seed=3)
    assert loc.layer == 1 and "mean over 2 facts" in loc.reason


def test_span_picks_the_contiguous_range_of_largest_summed_effect():
    e = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.0, 0.3])
    assert choose(e, 0, 6, 1) == (3, (3,))
    assert choose(e, 0, 6, 2) == (3, (2, 3))  # 1.1 beats 0.9 (3, 4)
    assert choose(e, 0, 6, 3) == (3, (1, 2, 3))
    assert choose(e, 4, 6, 1) == (5, (5,))  # only the searched layers count
    assert choose(e, 0, 6, 6) == (3, (0, 1, 2, 3, 4, 5))
    nan = torch.tensor([float("nan"), 0.2, 0.1, float("nan")])
    assert choose(nan, 1, 3, 2) == (1, (1, 2))


def test_span_on_a_model(fm):
    loc = ie.locate(fm.model, fm.facts[:2], span=2, search=(0.0, 1.0), window=1, samples=2)
    e = loc.effects
    sums = [float(e[i] + e[i + 1]) for i in range(3)]
    start = max(range(3), key=lambda i: (sums[i], -i))
    assert loc.layers == (start, start + 1) and "largest summed effect of 2" in loc.reason
    with pytest.raises(InterpEditError, match="span=3 is longer than the 2 searched"):
        ie.locate(fm.model, fm.facts[:1], span=3, search=(0.0, 0.5))


def test_search_is_a_fraction_of_the_depth(fm):
    assert search_layers(4, (0.0, 0.5)) == (0, 2)
    assert search_layers(30, (0.0, 0.5)) == (0, 15)
    assert search_layers(18, (0.25, 0.75)) == (4, 14)
    assert search_layers(4, (0.9, 1.0)) == (3, 4)
    assert default_window(30) == 5 and default_window(4) == 1
    loc = ie.locate(fm.model, fm.facts[:2], search=(0.5, 1.0), samples=2)
    assert loc.search == (2, 4) and loc.layer in (2, 3)
    assert torch.isnan(loc.effects[:2]).all() and not torch.isnan(loc.effects[2:]).any()
    assert loc.settings["window"] == 1  # 1/6 of 4 layers, at least one


def test_cache_returns_identical_results_and_traces_only_what_is_missing(fm, monkeypatch,
                                                                        tmp_path):
    facts = fm.facts[4:6]
    first = ie.locate(fm.model, facts, search=(0.0, 0.5), samples=2)
    assert len(list((tmp_path / "locate").rglob("*.json"))) == 2
    calls = []
    real = api.trace

    def counting(*args, **kw):
        calls.append(kw["layers"])
        return real(*args, **kw)

    monkeypatch.setattr(api, "trace", counting)
    again = ie.locate(fm.model, facts, search=(0.0, 0.5), samples=2)
    assert calls == []  # all from the cache
    for name in ("effects", "fact_effects", "high_scores", "low_scores"):
        torch.testing.assert_close(getattr(first, name), getattr(again, name), rtol=0, atol=0,
                                   equal_nan=True)
    assert (again.layer, again.reason) == (first.layer, first.reason)
    wider = ie.locate(fm.model, facts, search=(0.0, 1.0), samples=2)
    assert calls == [[2, 3], [2, 3]]  # the layers not traced before, per fact
    assert torch.equal(wider.effects[:2], first.effects[:2])
    other = ie.locate(fm.model, facts, search=(0.0, 0.5), samples=3)  # other settings
    assert len(calls) == 4 and not torch.equal(other.effects[:2], first.effects[:2])


def test_edited_weights_are_never_cached(fm, tmp_path):
    m, f = fm.model, fm.facts[7]
    with ie.edit(m, ie.EditRequest(f.template, f.subject, "Rome"), method="ft", layer=1):
        ie.locate(m, f, samples=2)
    assert not list((tmp_path / "locate").rglob("*.json"))


@pytest.mark.parametrize("kw,match", [
    (dict(kind="logits"), "unknown kind"),
    (dict(span=0), "span must be"),
    (dict(samples=0), "samples must be"),
    (dict(window=0), "window must be"),
    (dict(method="magic"), "unknown method"),
    (dict(search=(0.5, 0.2)), "fractions"),
    (dict(search=(0, 10)), "fractions"),
    (dict(search="early"), "fractions"),
])
def test_bad_options_raise(fm, kw, match):
    with pytest.raises(InterpEditError, match=match):
        ie.locate(fm.model, fm.facts[0], **kw)


@pytest.mark.parametrize("facts", [[], "a string", [object()], 3])
def test_bad_facts_raise(fm, facts):
    with pytest.raises(InterpEditError):
        ie.locate(fm.model, facts)
