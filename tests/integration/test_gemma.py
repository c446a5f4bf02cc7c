"""Gemma-3-270M, the second built-in model: it loads offline from its packages, knows facts,
traces exactly, and ROME rewrites a fact with paraphrase and neighbourhood measured."""

import pytest
import torch

import interp_edit as ie
from interp_edit import _builtin
from interp_edit._cache import cache_dir
from interp_edit.evaluation.metrics import measure
from interp_edit.evaluation.records import EditRecord

pytestmark = pytest.mark.integration

NEEDLE = EditRecord(
    case_id="space-needle", prompt="{} is located in the city of", subject="The Space Needle",
    target_new="Rome", target_true="Seattle",
    paraphrases=("The Space Needle is in the city of",
                 "The Space Needle stands in the city of"),
    neighborhood=(("The Eiffel Tower is located in the city of", "Paris"),
                  ("The Brandenburg Gate is located in the city of", "Berlin"),
                  ("The Sydney Opera House is located in the city of", "Sydney")),
)


def _top1(model, prompt):
    return model.top_k(prompt, 1)[0][0].strip()


def test_loads_offline_from_the_dequantized_cache(gemma):
    b = _builtin.GEMMA_3_270M
    assert gemma.name == "gemma-3-270m" and (gemma.n_layers, gemma.d_model) == (18, 640)
    assert gemma.prepend_bos == b.prepend_bos
    assert (gemma.tokenize("The capital of Japan is")[0] == gemma.tokenizer.bos_token_id) \
        == b.prepend_bos
    cached = cache_dir("models", _builtin.cache_key(b))
    assert (cached / "manifest.json").is_file() and (cached / "model.safetensors").is_file()
    assert not (cache_dir("gguf") / b.gguf).exists()  # the joined file is deleted once used


@pytest.mark.parametrize("prompt,answer", [
    ("The Space Needle is located in the city of", "Seattle"),
    *NEEDLE.neighborhood,
])
def test_knows_facts(gemma, prompt, answer):
    assert _top1(gemma, prompt) == answer


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_fast_trace_equals_reference(gemma, kind):
    args = (NEEDLE.text, NEEDLE.subject)
    opts = dict(kind=kind, samples=2, window=3, progress=False)
    first, end = gemma.subject_range(*args)
    # the subject's tokens and the last one: where the effects are (and a test of minutes)
    opts["positions"] = [*range(first, end), -1] if kind == "resid" else [end - 1]
    fast = ie.trace(gemma, *args, method="fast", **opts)
    ref = ie.trace(gemma, *args, method="reference", **opts)
    assert fast.target.strip() == "Seattle" and fast.high_score > 0.3
    torch.testing.assert_close(fast.scores, ref.scores, atol=1e-5, rtol=0, equal_nan=True)
    assert fast.low_score == pytest.approx(ref.low_score, abs=1e-5)


def test_rome_rewrites_a_fact_with_paraphrase_and_neighbourhood_measured(gemma, shared_data):
    before = measure(gemma, NEEDLE)
    assert before["efficacy"] == 0.0 and before["neighborhood"] == 1.0
    corpus = str(shared_data / "wikitext-2" / "valid.txt")
    with ie.edit(gemma, NEEDLE.request, method="rome", corpus=corpus, stats_tokens=20_000) as edit:
        after = measure(gemma, NEEDLE, edit)
        assert _top1(gemma, NEEDLE.text) == "Rome"
        assert "peak MLP indirect effect" in edit.info["why"] or "fallback" in edit.info["why"]
    print(f"ROME on Gemma-3-270M at layer {edit.info['layer']}: efficacy {after['efficacy']}, "
          f"paraphrase {after['paraphrase']}, neighbourhood {after['neighborhood']}")
    assert after["efficacy"] == 1.0 and after["paraphrase"] >= 0.5
    assert after["neighborhood"] >= 2 / 3
    assert _top1(gemma, NEEDLE.text) == "Seattle"  # undone
