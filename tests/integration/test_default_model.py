import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "prompt,answer",
    [
        ("The Eiffel Tower is located in the city of", " Paris"),
        ("The capital of Japan is", " Tokyo"),
        ("The Colosseum is located in the city of", " Rome"),
    ],
)
def test_default_model_knows_landmarks(default_model, prompt, answer):
    tok, _ = default_model.top_k(prompt, 1)[0]
    assert tok == answer


def test_default_model_shape_and_bos(default_model):
    m = default_model
    assert (m.n_layers, m.d_model) == (30, 576)
    assert not m.prepend_bos
    assert m.tokenizer.bos_token_id not in m.tokenize("The capital of Japan is").tolist()


def test_bridge_logits_equal_hf_logits(default_model):
    m = default_model
    ids = m.tokenize("The Eiffel Tower is located in the city of")[None]
    with torch.no_grad():
        hf = m.hf_model(ids).logits
        br = m.logits(ids)
    assert (hf - br).abs().max().item() <= 1e-4


def test_subject_range_bpe(default_model):
    m = default_model
    prompt = "The Eiffel Tower is located in the city of"
    s, e = m.subject_range(prompt, "Eiffel Tower")
    toks = m.to_str_tokens(m.tokenize(prompt))
    assert "".join(toks[s:e]).strip() == "Eiffel Tower"
    assert m.subject_range(prompt, "The Eiffel Tower") == (0, e)
    # a subject that ends inside a token still covers that token
    s2, e2 = m.subject_range(prompt, "The Eiff")
    assert (s2, e2) == (0, e - 1) or "Eiff" in "".join(toks[s2:e2])
