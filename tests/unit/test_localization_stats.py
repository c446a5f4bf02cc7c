"""The localization-vs-editing statistics on synthetic grids whose answer is known."""

import math

import pytest
import torch

from interp_edit.analysis.localization import (
    bootstrap,
    localization_stats,
    pearson,
    per_fact_r,
    r2_table,
)
from interp_edit.errors import InterpEditError

F, L = 60, 8


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pearson_known_values():
    x = torch.arange(10.0)
    assert pearson(x, 3 * x - 2) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, torch.ones(10)))
    # r = a sd_x / sqrt(a^2 sd_x^2 + sd_n^2) in expectation: 1/sqrt(2) for a = 1, sd_x = sd_n
    g = _gen()
    big = torch.randn(200_000, generator=g)
    assert pearson(big, big + torch.randn(200_000, generator=g)) == pytest.approx(2**-0.5, abs=0.01)


def test_layer_only_success_is_explained_by_layer_not_tracing():
    """success = f(layer) + noise, tracing effect independent of it: the layer explains
    var(f) / (var(f) + sigma^2) of the variance, tracing adds nothing, r is about 0."""
    g = _gen(1)
    layer_mean = torch.linspace(0, 1, L)  # population variance 0.1111 * (L+1)/(L-1)
    sigma = 0.2
    effect = torch.rand(F, L, generator=g)
    success = layer_mean + sigma * torch.randn(F, L, generator=g)
    r2 = r2_table(effect, success)
    expected = layer_mean.var(unbiased=False) / (layer_mean.var(unbiased=False) + sigma**2)
    assert r2["layer"] == pytest.approx(float(expected), abs=0.05)
    assert abs(r2["tracing"]) < 0.02
    assert 0 <= r2["tracing beyond layer"] < 0.02
    stats = localization_stats(effect, success, list(range(L)), n_boot=200)
    assert stats.pooled_r.lo < 0 < stats.pooled_r.hi
    assert stats.mean_per_fact_r.lo < 0 < stats.mean_per_fact_r.hi
    assert stats.r2["layer"].lo < expected < stats.r2["layer"].hi
    assert stats.best_layer == L - 1


def test_tracing_driven_success_is_explained_by_tracing():
    g = _gen(2)
    effect = torch.rand(F, L, generator=g)
    success = 2 * effect + 0.01 * torch.randn(F, L, generator=g)
    r2 = r2_table(effect, success)
    assert r2["tracing"] > 0.99 and r2["layer + tracing"] > 0.99 and r2["layer"] < 0.05
    assert r2["tracing beyond layer"] > 0.9
    assert per_fact_r(effect, success).min() > 0.99
    # the exact case: success is an affine function of the effect
    exact = r2_table(effect, 3 * effect + 1)
    assert exact["tracing"] == pytest.approx(1.0) and exact["layer + tracing"] == pytest.approx(1.0)


def _ols_r2(x, y):
    x = torch.cat([torch.ones(len(y), 1, dtype=torch.float64), x.double()], 1)
    fit = x @ torch.linalg.lstsq(x, y.double()[:, None]).solution
    y = y.double()
    return float(1 - (y - fit[:, 0]).square().sum() / (y - y.mean()).square().sum())


def test_closed_form_r2_matches_explicit_least_squares():
    g = _gen(5)
    effect = torch.rand(F, L, generator=g)
    success = torch.linspace(0, 1, L) + 0.5 * effect + 0.3 * torch.randn(F, L, generator=g)
    onehot = torch.eye(L)[:, 1:].repeat(F, 1)  # rows in (fact, layer) order, like flatten()
    trace = effect.reshape(-1, 1)
    r2 = r2_table(effect, success)
    y = success.flatten()
    assert r2["layer"] == pytest.approx(_ols_r2(onehot, y), abs=1e-9)
    assert r2["tracing"] == pytest.approx(_ols_r2(trace, y), abs=1e-9)
    both = _ols_r2(torch.cat([onehot, trace], 1), y)
    assert r2["layer + tracing"] == pytest.approx(both, abs=1e-9)


def test_per_fact_r_is_flat_row_nan():
    effect = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    r = per_fact_r(effect, torch.tensor([[0.0, 2.0, 4.0], [0.0, 1.0, 2.0]]))
    assert r[0] == pytest.approx(1.0) and math.isnan(r[1])


def test_auto_gain_known_difference():
    g = _gen(3)
    success = torch.rand(F, L, generator=g) * 0.1
    success[:, 3] += 0.5  # best fixed layer: 3, mean about 0.55
    auto = success[:, 3] + 0.1  # automatic choice is 0.1 better on every fact
    stats = localization_stats(torch.rand(F, L, generator=g), success, [2 * i for i in range(L)],
                               auto=auto, n_boot=200)
    assert stats.best_layer == 6
    assert stats.auto_gain.value == pytest.approx(0.1, abs=1e-6)
    # the best layer is re-chosen inside every resample; here it is always layer 3, so the
    # gain is exactly 0.1 in every resample
    assert stats.auto_gain.lo == pytest.approx(0.1, abs=1e-6) == stats.auto_gain.hi


def test_bootstrap_is_seeded_and_validates():
    x = torch.randn(30, 4, generator=_gen(4))
    a = bootstrap(lambda e: float(e.mean()), x, n_boot=100, seed=7)
    b = bootstrap(lambda e: float(e.mean()), x, n_boot=100, seed=7)
    assert a == b and a.lo <= a.value <= a.hi
    with pytest.raises(InterpEditError):
        bootstrap(lambda e: 0.0, x[:1])
    with pytest.raises(InterpEditError, match="layers"):
        localization_stats(x, x, [0, 1])


def test_study_runs_resumes_saves_and_reports_on_the_fact_model(fm, tmp_path):
    """The whole pipeline on two tiny facts and two layers (ROME with small settings)."""
    pytest.importorskip("interp_edit.editing.rome")
    from interp_edit.analysis.localization_study import LocalizationStudy, run_study
    from interp_edit.evaluation.records import EditRecord

    city = [f for f in fm.facts if f.relation == "city"][:3]
    recs = [EditRecord(i, f.template, f.subject, "Rome" if f.attribute != "Rome" else "Oslo",
                       f.attribute, paraphrases=(f.paraphrases[0].format(f.subject),),
                       neighborhood=((city[2].prompt, city[2].attribute),))
            for i, f in enumerate(city[:2])]
    kw = dict(window=3, samples=2, rome={"stats_tokens": 1000, "n_prefixes": 2, "v_steps": 3},
              cache=tmp_path / "rows.jsonl", progress=None)
    study = run_study(fm.model, recs, [1, 3], **kw)
    assert study.effect.shape == (2, fm.model.n_layers) and study.success.shape == (3, 2, 2)
    assert set(study.auto_layer.tolist()) <= set(range(fm.model.n_layers))
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    again = run_study(fm.model, recs, [1, 3], **kw)  # resumed from the cache: same numbers
    assert torch.equal(again.success, study.success)
    back = LocalizationStudy.load(study.save(tmp_path / "study"))
    assert back.layers == (1, 3) and torch.equal(back.effect, study.effect)
    table = back.to_markdown(n_boot=20)
    assert table.count("\n") == 4 and "efficacy magnitude" in table
    for what in ("scatter", "layers"):
        back.plot(what).savefig(tmp_path / f"{what}.png")
