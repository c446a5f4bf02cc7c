import time

import pytest
import torch

import interp_edit as ie
from interp_edit.errors import InterpEditError, ModelNotAvailableError, SubjectNotFoundError


def test_errors_are_value_errors():
    assert issubclass(InterpEditError, ValueError)
    for cls in (ModelNotAvailableError, SubjectNotFoundError, ie.HookNestingError, ie.ModelMismatchError):
        assert issubclass(cls, InterpEditError)


def test_subject_range_and_occurrence(tiny):
    prompt = "Zorquix Balmera lives in the city of Zorquix Balmera"
    # the tiny tokenizer maps unknown words to <unk>, but offsets still locate them
    assert tiny.subject_range(prompt, "Zorquix Balmera") == (0, 2)
    assert tiny.subject_range(prompt, "Zorquix Balmera", occurrence=1) == (7, 9)
    assert tiny.subject_range(prompt, "Balmera") == (1, 2)
    with pytest.raises(SubjectNotFoundError, match="Nobody"):
        tiny.subject_range(prompt, "Nobody")
    with pytest.raises(SubjectNotFoundError, match="occurrence 2"):
        tiny.subject_range(prompt, "Zorquix Balmera", occurrence=2)


def test_bad_prompts_and_targets(tiny):
    with pytest.raises(InterpEditError, match="empty"):
        tiny.tokenize("")
    with pytest.raises(InterpEditError, match="target is empty"):
        tiny.target_ids("  ")
    with pytest.raises(InterpEditError, match="context"):
        tiny.tokenize(" ".join(["of"] * (tiny.n_ctx + 1)))


def test_target_leading_space_policy(tiny):
    assert tiny.target_ids("Paris") == tiny.target_ids(" Paris")


def test_next_token_probs_batched_equals_single(fm):
    m = fm.model
    prompts = [f.prompt for f in fm.facts[:6]] + ["the job of"]
    targets = [f.attribute for f in fm.facts[:6]] + ["chef"]
    batched = m.next_token_probs(prompts, targets)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ids = m.tokenize(p)[None]
        probs = m.logits(ids)[0, -1].softmax(-1)
        assert torch.allclose(batched[i], probs[m.target_ids(t)[0]], atol=1e-6)
    # the trained model knows its facts
    assert (batched[:6] > 0.9).all()


def test_target_logprobs_matches_manual(fm):
    m = fm.model
    f = fm.facts[0]
    target = f"{f.attribute} and {f.attribute}"  # multi-token target
    got = m.target_logprobs([f.prompt], [target])[0]
    pid, tid = m.tokenize(f.prompt).tolist(), m.target_ids(target)
    logp = m.logits(torch.tensor([pid + tid]))[0].log_softmax(-1)
    want = sum(logp[len(pid) - 1 + j, t] for j, t in enumerate(tid))
    assert len(tid) == 3 and torch.allclose(got, want, atol=1e-5)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelNotAvailableError, match="nope"):
        ie.load_model(missing)


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="not in the local Hugging Face cache"):
        ie.load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - t0 < 30  # "within seconds", generous for a loaded machine


def test_mlp_out_proj_is_the_down_projection(tiny):
    w = tiny.mlp_out_proj(1).weight
    assert w.shape == (tiny.d_model, 2 * tiny.d_model)
    with pytest.raises(InterpEditError, match="out of range"):
        tiny.mlp_out_proj(tiny.n_layers)


def test_fingerprint_distinguishes_models(tiny, fm):
    assert tiny.fingerprint != fm.model.fingerprint
    from interp_edit.testing import random_model

    assert random_model(seed=0).fingerprint == tiny.fingerprint


def test_cli_help_lists_subcommands(capsys):
    from interp_edit.cli import build_parser

    text = build_parser().format_help()
    assert "predict" in text


def test_has_hooks_sees_a_hook_on_any_point(tiny):
    from interp_edit.hooks import capture, hooked
    from interp_edit.models import mlp_key_hook, resid_hook

    assert not tiny.has_hooks()
    for name in (resid_hook(0), mlp_key_hook(tiny.n_layers - 1)):
        with hooked(tiny, [capture(name, {})]):
            assert tiny.has_hooks()
        assert not tiny.has_hooks()
    listed = {id(hp) for hp in tiny.hook_points}  # aliases name the same points
    assert len(listed) == len(tiny.hook_points)
    assert all(id(hp) in listed for hp in tiny.bridge.hook_dict.values())


def test_fingerprint_ignores_where_the_weights_were_read(tiny):
    """A fresh install (or another directory) of the same weights keeps the fingerprint that
    saved edits, MEND editors and cached statistics are keyed by; the weights do not."""
    from interp_edit.models import _fingerprint

    config, before = tiny.hf_model.config, tiny.fingerprint
    old = config._name_or_path
    try:
        config._name_or_path = "/somewhere/else/model"
        assert _fingerprint(tiny) == before
    finally:
        config._name_or_path = old
    w = tiny.mlp_out_proj(0).weight
    original = w.detach().clone()
    with torch.no_grad():
        w[0, 0] += 1.0  # sampled: flatten()[::4099] starts at element 0
        try:
            assert _fingerprint(tiny) != before
        finally:
            w.copy_(original)
    assert _fingerprint(tiny) == before


def test_generate_on_the_stepper_equals_the_hooked_loop(fm, tiny):
    """Greedy decoding with a key/value cache gives the text of one full pass per token
    through the bridge (forced by a hook that does nothing), and ends at the end token."""
    from interp_edit.hooks import capture, hooked
    from interp_edit.models import resid_hook

    for model, prompt in ((fm.model, fm.facts[0].prompt), (fm.model, fm.facts[5].prompt),
                          (tiny, "the a of")):
        fast = model.generate(prompt, 12)
        with hooked(model, [capture(resid_hook(0), {})]):
            assert model.generate(prompt, 12) == fast
    assert fm.model.generate(fm.facts[0].prompt, 0) == ""
    fact = fm.facts[0]
    assert fm.model.generate(fact.prompt, 3).split()[0] == fact.attribute
