"""Tracing inputs: bad input errors, noise resolution, cell plans."""

import pytest
import torch

import interp_edit as ie
from interp_edit.errors import InterpEditError, SubjectNotFoundError
from interp_edit.tracing import noise as N
from interp_edit.tracing.inputs import Restore, plan, window_layers


@pytest.fixture(scope="module")
def fact(fm):
    return fm.facts[0]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(subject="Nobody Here"), "not found"),
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(samples=0), "samples must be"),
        (dict(window=0), "window must be"),
        (dict(kind="neurons"), "unknown kind"),
        (dict(method="magic"), "unknown method"),
        (dict(sever="both"), "unknown sever"),
        (dict(sever="mlp", kind="mlp"), "kind='resid' only"),
        (dict(noise=torch.zeros(3, 5, 64)), r"expected \[samples, subject_len, d_model\]"),
        (dict(noise="x3"), "unknown noise"),
        (dict(noise=-1.0), ">= 0"),
        (dict(positions=[99]), "positions"),
        (dict(layers=[4]), "layers"),
        (dict(target=""), "target is empty"),
    ],
)
def test_bad_inputs_raise_a_named_error(fm, fact, change, match):
    kw = dict(prompt=fact.prompt, subject=fact.subject, samples=2) | change
    with pytest.raises(InterpEditError, match=match):
        ie.trace(fm.model, kw.pop("prompt"), kw.pop("subject"), **kw)


def test_subject_absent_is_a_subject_error(fm, fact):
    with pytest.raises(SubjectNotFoundError):
        ie.trace(fm.model, fact.prompt, "Nobody Here")


def test_prompt_longer_than_the_context(fm, fact):
    long = " ".join([fact.prompt] * 20)
    assert len(fm.model.tokenize(fact.prompt)) * 20 > fm.model.n_ctx
    with pytest.raises(InterpEditError, match="context"):
        ie.trace(fm.model, long, fact.subject)


def test_noise_is_seeded_and_shaped(fm):
    a, std, src = N.resolve_noise(fm.model, "s2", 4, 3, seed=5)
    b, _, _ = N.resolve_noise(fm.model, "s2", 4, 3, seed=5)
    assert a.shape == (4, 3, fm.model.d_model) and torch.equal(a, b)
    base, n = N.reference_std(fm.model)
    assert std == pytest.approx(2 * base) and n == len(N.REFERENCE_SUBJECTS) >= 50
    assert f"n={n}" in src
    subjects = [f.subject for f in fm.facts]
    assert N.embedding_std(fm.model, subjects) > 0


def test_noise_spec_multiplier():
    assert N.spec_multiplier("s3") == 3.0 and N.spec_multiplier(" s2.5 ") == 2.5
    assert N.spec_multiplier("s.5") == 0.5
    for bad in ("3", "s", "sx", "s-1", "S3"):
        assert N.spec_multiplier(bad) is None, bad


def test_reference_std_is_cached(fm, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path))
    first, _ = N.reference_std(fm.model)
    assert list((tmp_path / "noise").glob(f"{fm.model.fingerprint}-*.json"))
    monkeypatch.setattr(N, "embedding_std", lambda *a: pytest.fail("not cached"))
    assert N.reference_std(fm.model)[0] == first


def test_plans_follow_rome():
    assert list(window_layers(0, 10, 30)) == list(range(0, 5))
    assert list(window_layers(12, 10, 30)) == list(range(7, 17))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(5, 1, 30)) == [5]
    assert plan("mlp", 1, 3, 4) == tuple(Restore(j, "mlp", "clean") for j in (0, 1, 2))
    assert plan("resid", 1, 10, 4, sever="attn") == (
        Restore(1, "resid", "clean"),
        Restore(2, "attn", "corrupted"),
        Restore(3, "attn", "corrupted"),
    )
