"""Causal tracing on the default model (SmolLM2-135M): a short fast-vs-reference check."""

import pytest

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
