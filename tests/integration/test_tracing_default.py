"""Causal tracing on the default model (SmolLM2-135M): fast vs reference, attribution vs exact."""

import pytest
import torch

import interp_edit as ie

pytestmark = pytest.mark.integration

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_fast_equals_reference_on_the_default_model(default_model, kind):
    kw = dict(kind=kind, samples=3, positions=[1, 3, 9], layers=[0, 7, 18, 29])
    fast = ie.trace(default_model, PROMPT, SUBJECT, **kw)
    ref = ie.trace(default_model, PROMPT, SUBJECT, method="reference", **kw)
    assert fast.target == " Paris" and fast.subject_range == (0, 4)
    assert fast.high_score > 0.5 and fast.low_score < 0.1
    assert (fast.scores - ref.scores).nan_to_num().abs().max() <= 1e-5
    assert fast.scores.isnan().sum() == fast.scores.numel() - 12


def test_severed_fast_equals_reference_on_the_default_model(default_model):
    kw = dict(samples=2, sever="mlp", positions=[3], layers=[2, 15])
    fast = ie.trace(default_model, PROMPT, SUBJECT, **kw)
    ref = ie.trace(default_model, PROMPT, SUBJECT, method="reference", **kw)
    assert (fast.scores - ref.scores).nan_to_num().abs().max() <= 1e-5


def test_attribution_screen_correlates_with_the_exact_grid(default_model, shared_data):
    """The gradient screen ranks cells like the exact trace on real facts (pooled over a few
    known facts the model predicts, every third layer, cells from the subject's first token
    on), in fp32 and at the default precision (bf16 on CPUs that multiply it natively)."""
    from interp_edit.tracing.dataset import predicted_facts

    facts = ie.load_known_facts(shared_data / "known_1000.json")[:40]
    kept, _ = predicted_facts(default_model, facts)
    assert len(kept) >= 3
    screens = ("model", "auto")
    pooled = {(p, k): ([], []) for p in screens for k in ("resid", "mlp", "attn")}
    for f in kept[:3]:
        kw = dict(target=f.attribute, samples=3, layers=range(0, 30, 3), progress=False)
        exact = ie.trace_all(default_model, f.prompt, f.subject, **kw)
        start = exact.resid.subject_range[0]
        for p in screens:
            approx = ie.trace_all(default_model, f.prompt, f.subject, method="attribution",
                                  precision=p, **kw)
            for kind in ("resid", "mlp", "attn"):
                low, exact_low = approx[kind].low_score, exact[kind].low_score
                if approx[kind].precision == "model":
                    assert low == pytest.approx(exact_low, abs=1e-5)
                else:  # bf16 multiplies move it by rounding
                    assert low == pytest.approx(exact_low, rel=0.05, abs=1e-4)
                a, e = pooled[p, kind]
                a.append(approx[kind].indirect_effect[start:, ::3].flatten())
                e.append(exact[kind].indirect_effect[start:, ::3].flatten())
    for key, (a, e) in pooled.items():
        r = float(torch.corrcoef(torch.stack([torch.cat(a), torch.cat(e)]))[0, 1])
        assert r > 0.3, (key, r)
