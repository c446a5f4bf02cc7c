"""Dataset-level tracing: token groups, AIE and CIs by hand, save/load, filtering, resuming."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from interp_edit.errors import InterpEditError
from interp_edit.tracing import dataset as D
from interp_edit.tracing import api as T  # the per-unit trace runs through it
from interp_edit.tracing.average import (
    GROUPS,
    AverageTrace,
    Condition,
    group_effects,
    peak_table,
    summarize,
    token_groups,
)

# ---- token groups and statistics, by hand --------------------------------------------------


def test_token_groups_follow_rome():
    # "The [Eif fel Tower] is in the city of": 9 tokens, subject tokens 1..3
    assert token_groups(9, (1, 4)) == ((1,), (2,), (3,), (4,), (5, 6, 7), (8,))
    # one-token subject right before the last token: shared rows, empty groups
    assert token_groups(3, (1, 2)) == ((1,), (), (1,), (2,), (), (2,))
    # subject ends the prompt: no subsequent tokens
    assert token_groups(3, (0, 3)) == ((0,), (1,), (2,), (), (), (2,))
    with pytest.raises(InterpEditError):
        token_groups(3, (2, 5))


def test_group_effects_average_within_a_fact():
    ie = torch.arange(12.0).reshape(6, 2)  # 6 tokens x 2 layers; subject is tokens 1..2
    got = group_effects(ie, (1, 3))
    want = torch.tensor([
        [2.0, 3.0],  # first subject token = token 1
        [float("nan")] * 2,  # a two-token subject has no middle
        [4.0, 5.0],  # last subject token = token 2
        [6.0, 7.0],  # first subsequent = token 3
        [8.0, 9.0],  # further = token 4 only
        [10.0, 11.0],  # last = token 5
    ], dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(got, want, equal_nan=True)


def test_aie_and_95pct_ci_by_hand():
    # three facts, one group, one layer: 0.1, 0.2, 0.6; a second group misses one fact
    x = torch.tensor([[[0.1], [1.0]], [[0.2], [float("nan")]], [[0.6], [3.0]]],
                     dtype=torch.float64)
    s = summarize(x)
    # mean 0.3; sd = sqrt((0.04 + 0.01 + 0.09) / 2) = 0.264575; sem = sd / sqrt(3) = 0.152753
    # t(0.975, df=2) = 4.302653 -> half width 0.657241
    assert float(s.mean[0, 0]) == pytest.approx(0.3)
    assert float(s.lo[0, 0]) == pytest.approx(0.3 - 0.657241, abs=1e-6)
    assert float(s.hi[0, 0]) == pytest.approx(0.3 + 0.657241, abs=1e-6)
    # second group: n = 2, mean 2, sd = sqrt(2), sem = 1, t(0.975, df=1) = 12.706205
    assert s.n.tolist() == [3, 2]
    assert float(s.mean[1, 0]) == pytest.approx(2.0)
    assert float(s.hi[1, 0]) == pytest.approx(2.0 + 12.706205, abs=1e-5)


def test_a_single_fact_has_no_interval():
    s = summarize(torch.tensor([[[0.5]]], dtype=torch.float64))
    assert float(s.mean[0, 0]) == 0.5 and torch.isnan(s.lo).all() and torch.isnan(s.hi).all()


def _average(n: int = 3) -> AverageTrace:
    effects = torch.zeros(n, len(GROUPS), 4, dtype=torch.float64)
    effects[:, GROUPS.index("last subject token"), 2] = torch.tensor([0.5, 0.6, 0.7])[:n]
    return AverageTrace(
        conditions=(Condition("mlp"),), effects=(effects,),
        low_scores=(torch.full((n,), 0.1, dtype=torch.float64),),
        high_scores=torch.full((n,), 0.9, dtype=torch.float64), prompts=("a", "b", "c")[:n],
        subjects=("A", "B", "C")[:n], targets=("x", "y", "z")[:n], n_candidates=5,
        model_name="m", noise_std=0.3, window=10, samples=2, seed=1,
    )


def test_peak_and_total_effect():
    avg = _average()
    p = avg.peak("mlp")
    assert (p.group, p.layer, p.n) == ("last subject token", 2, 3)
    assert p.aie == pytest.approx(0.6) and p.lo < 0.6 < p.hi
    assert avg.peak("mlp", group="last token").aie == 0
    assert avg.total_effect == pytest.approx(0.8)
    with pytest.raises(InterpEditError, match="no trace for kind='attn'"):
        avg.stats("attn")
    table = peak_table(avg)
    assert "| mlp | 3 | last subject token, 2 | 0.600 [" in table


def test_average_trace_save_load_roundtrip(tmp_path):
    avg = _average()
    path = avg.save(tmp_path / "avg.npz")
    back = AverageTrace.load(path)
    assert back.conditions == avg.conditions and back.prompts == avg.prompts
    assert (back.n_candidates, back.noise_std, back.window) == (5, 0.3, 10)
    torch.testing.assert_close(back.effects[0], avg.effects[0])
    torch.testing.assert_close(back.high_scores, avg.high_scores)


# ---- tracing a dataset on the tiny fact model ------------------------------------------------


@dataclass(frozen=True)
class Fact:
    prompt: str
    subject: str
    attribute: str


def _facts(fm, n: int = 3) -> list:
    """n facts the tiny model knows, plus one whose attribute it does not predict."""
    known = list(fm.facts[:n])
    wrong = next(c for c in ("Paris", "Rome") if c != known[0].attribute)
    return known + [Fact(known[0].prompt, known[0].subject, wrong)]


def _run(fm, facts, tmp_path, **kw):
    kw = dict(kinds=("resid", "mlp"), samples=2, window=2, cache_dir=tmp_path, progress=False) | kw
    return D.trace_dataset(fm.model, facts, **kw)


def test_trace_dataset_keeps_predicted_facts(fm, tmp_path):
    facts = _facts(fm)
    avg = _run(fm, facts, tmp_path, sever=True)
    assert (avg.n_candidates, avg.n_facts) == (4, 3)  # the wrong attribute is dropped
    assert [c.slug for c in avg.conditions] == [
        "resid-fast", "mlp-fast", "resid-sever-mlp-fast", "resid-sever-attn-fast"]
    assert avg.effects[0].shape == (3, len(GROUPS), fm.model.n_layers)
    assert (avg.high_scores > 0.5).all()
    # severed traces are computed at the last subject token only
    severed = avg.fact_effects("resid", "mlp")
    g = GROUPS.index("last subject token")
    assert not severed[:, g].isnan().any() and severed[:, GROUPS.index("last token")].isnan().all()
    # the noise is 3 x the embedding std of the set's subjects
    from interp_edit.tracing.noise import embedding_std

    assert avg.noise_std == pytest.approx(3 * embedding_std(fm.model, [f.subject for f in facts]))
    # each fact's cached trace is reachable for plotting
    r = avg.fact_trace(1, "mlp")
    assert r.prompt == facts[1].prompt and r.kind == "mlp"
    # ... and says which subjects its noise std came from (the set's, not the built-in list)
    assert r.noise_source == avg.noise_source and "dataset's 4 subjects" in r.noise_source
    assert float(avg.effects[1][1, 0, 0]) == pytest.approx(
        float(r.indirect_effect[r.subject_range[0], 0]))
    # the whole thing loads back
    back = AverageTrace.load(avg.save(tmp_path / "avg.npz"))
    torch.testing.assert_close(back.stats("mlp").mean, avg.stats("mlp").mean, equal_nan=True)


def test_resuming_after_an_interruption_gives_identical_aggregates(fm, tmp_path, monkeypatch):
    facts = list(fm.facts[:3])
    fresh = _run(fm, facts, tmp_path / "fresh")

    real, calls = T.trace, []

    def flaky(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the 4th trace
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "trace", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(fm, facts, tmp_path / "resumed")
    assert len(calls) == 3
    monkeypatch.setattr(T, "trace", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    resumed = _run(fm, facts, tmp_path / "resumed")
    assert len(calls) == 3 + len(facts) * 2 - 3  # only the missing traces ran
    assert not list((tmp_path / "resumed").rglob("*.part*"))
    for kind in ("resid", "mlp"):
        a, b = fresh.stats(kind), resumed.stats(kind)
        for x, y in ((a.mean, b.mean), (a.lo, b.lo), (a.hi, b.hi)):
            assert torch.equal(x.nan_to_num(-9), y.nan_to_num(-9))


def test_limit_and_settings_share_the_cache(fm, tmp_path, monkeypatch):
    facts = list(fm.facts[:3])
    _run(fm, facts, tmp_path, limit=2)
    real, calls = T.trace, []
    monkeypatch.setattr(T, "trace", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    avg = _run(fm, facts, tmp_path)
    assert avg.n_facts == 3 and calls == [facts[2].prompt] * 2  # only the new fact traced
    _run(fm, facts, tmp_path, samples=3)  # other settings: a separate cache entry
    assert len(calls) == 2 + 6


def test_bad_inputs_explain_themselves(fm, tmp_path):
    with pytest.raises(InterpEditError, match="needs .prompt"):
        _run(fm, ["just a string"], tmp_path)
    with pytest.raises(InterpEditError, match="unknown kinds"):
        _run(fm, fm.facts[:1], tmp_path, kinds=("mlps",))
    with pytest.raises(InterpEditError, match="unknown noise"):
        _run(fm, fm.facts[:1], tmp_path, noise="x3")
    with pytest.raises(InterpEditError, match="predicts none"):
        _run(fm, _facts(fm)[-1:], tmp_path)


def test_attribution_screen_with_an_exact_sample(fm, tmp_path):
    facts = list(fm.facts[:4])
    avg = _run(fm, facts, tmp_path, kinds=("resid",), method="attribution", exact_sample=2,
               precision="model")
    assert [c.slug for c in avg.conditions] == ["resid-attribution-logodds", "resid-fast"]
    assert avg.condition("resid").method == "fast"  # exact preferred when both exist
    screened = avg.fact_effects("resid", method="attribution")
    exact = avg.fact_effects("resid")
    assert not screened[:, -1].isnan().any()  # every fact screened
    assert exact[:, -1, 0].isnan().sum() == 2  # two facts traced exactly
    assert avg.stats("resid").n[-1] == 2 and avg.stats("resid", method="attribution").n[-1] == 4
    with pytest.raises(InterpEditError, match="exact_sample"):
        _run(fm, facts, tmp_path, exact_sample=2)


def test_bf16_screen_is_cached_apart_from_the_fp32_one(fm, tmp_path):
    """precision="bfloat16" screens with bf16 multiplies; the precision is part of each cached
    trace's name, so the fp32 screen in the same cache directory is computed, not reused, and
    the two differ by rounding only. The exact methods refuse it."""
    facts = list(fm.facts[:3])
    fp32 = _run(fm, facts, tmp_path, kinds=("resid",), method="attribution",
                precision="model")
    bf16 = _run(fm, facts, tmp_path, kinds=("resid",), method="attribution",
                precision="bfloat16")
    assert [c.slug for c in bf16.conditions] == ["resid-attribution-logodds-bfloat16"]
    assert [c.slug for c in fp32.conditions] == ["resid-attribution-logodds"]
    a = fp32.fact_effects("resid", method="attribution")
    b = bf16.fact_effects("resid", method="attribution")
    keep = ~a.isnan()
    assert torch.equal(keep, ~b.isnan()) and not torch.equal(a[keep], b[keep])
    assert torch.corrcoef(torch.stack([a[keep], b[keep]]))[0, 1] > 0.98
    files = sorted(p.name for p in tmp_path.rglob("*.npz"))
    assert sum(f.endswith("-resid-attribution-logodds-bfloat16.npz") for f in files) == 3
    assert sum(f.endswith("-resid-attribution-logodds.npz") for f in files) == 3
    with pytest.raises(InterpEditError, match="attribution' only"):
        _run(fm, facts, tmp_path, precision="bfloat16")
