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


def test_resuming_from_a_block_matches_the_full_pass(default_model):
    """MEND's second pass runs only the edited blocks (interp_edit.resume): a recorded bridge
    input replays bit for bit, the layer stepper's input agrees to float rounding, and logits
    at chosen positions equal those columns of the full logits."""
    from interp_edit.resume import block_input, logits_from, record_block_input

    m = default_model
    ids = m.batch_ids([m.tokenize("The Eiffel Tower is located in the city of").tolist(),
                       m.tokenize("The capital of Japan is").tolist()])[0]
    cols = torch.tensor([5, ids.shape[1] - 1])
    with torch.no_grad():
        with record_block_input(m, 27) as rec:
            full = m.logits(ids)
        assert torch.equal(logits_from(m, rec.value), full)
        stepped = logits_from(m, block_input(m, ids, 27), cols)
        kept = m.logits(ids, cols)
    torch.testing.assert_close(stepped, full[:, cols], rtol=0, atol=1e-3)
    torch.testing.assert_close(kept, full[:, cols], rtol=0, atol=1e-3)
