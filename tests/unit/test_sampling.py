"""Text sampled from the model. The promise: plain top-k sampling at temperature 1 from the
model's next-token distribution, seeded, the global RNG untouched. The layer-stepper sampler
(key/value cache) is checked against the project's own reference, one full forward pass per
token (the same seed, the same scores up to float rounding, the same RNG calls), and the draw
itself against the top-k softmax it promises. Nothing here depends on Hugging Face
``generate``, whose sampling internals change between releases."""

import pytest
import torch

from interp_edit.arch.stepper import Stepper
from interp_edit.editing.keys import _draw, sample_token_ids


@pytest.mark.parametrize("exact", [False, True])
def test_stepper_sampler_draws_what_the_reference_draws(tiny, monkeypatch, exact):
    kw = dict(n=12, length=9, seed=4, exact=exact, batch_size=5, starters=("the", "a", "of"))
    assert Stepper.supports(tiny)
    state = torch.random.get_rng_state()
    fast = sample_token_ids(tiny, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    monkeypatch.setattr(Stepper, "supports", staticmethod(lambda model: False))
    assert fast == sample_token_ids(tiny, **kw)  # one full forward pass per token
    assert len(fast) == 12 and all(tiny.tokenizer.eos_token_id not in row for row in fast)
    if exact:  # never stopped: the starter token and 9 new ones
        assert all(len(row) == 1 + 9 for row in fast)
    assert len({tuple(row) for row in fast}) > 1  # sampled, not greedy


def test_the_models_own_sampling_settings_do_not_apply(tiny, monkeypatch):
    """Plain top-k at temperature 1 on both paths, whatever temperature / top-p / repetition
    penalty an instruct model's generation config asks for."""
    kw = dict(n=6, length=8, seed=2, starters=("the",))
    plain = sample_token_ids(tiny, **kw)
    for name, value in dict(temperature=0.3, top_p=0.5, repetition_penalty=1.5).items():
        monkeypatch.setattr(tiny.hf_model.generation_config, name, value)
    assert sample_token_ids(tiny, **kw) == plain
    monkeypatch.setattr(Stepper, "supports", staticmethod(lambda model: False))
    assert sample_token_ids(tiny, **kw) == plain


def test_decode_stops_once_every_row_has_chosen_the_stop_token(tiny):
    picks = iter([[9, 7], [7, 9], [8, 8]])
    seen = []

    def choose(scores):
        seen.append(scores.shape)
        return torch.tensor(next(picks))[:, None]

    stepper = Stepper(tiny, 8)
    out = stepper.decode(torch.tensor([[3, 4], [5, 6]]), 5, choose, stop=9)
    assert out.tolist() == [[3, 4, 9, 7], [5, 6, 7, 9]]  # row 0 stopped first, row 1 next
    assert seen == [(2, len(tiny.tokenizer))] * 2
    greedy = stepper.decode(torch.tensor([[3, 4]]), 4, lambda s: s.argmax(-1, keepdim=True))
    assert greedy.shape == (1, 6)  # no stop token: every step


def test_draw_is_top_k_softmax_sampling():
    """Frequencies over many draws match the softmax of the k largest scores; tokens outside
    the top k and banned tokens are never drawn; the draw is seeded by the global RNG."""
    scores = torch.tensor([0.3, 2.0, -1.0, 1.5, 1.0, 0.9, -3.0])
    rows, k, banned = 200_000, 3, [3]
    torch.manual_seed(0)
    picks = _draw(scores.repeat(rows, 1), k, banned)[:, 0]
    allowed = torch.tensor([1, 4, 5])  # the 3 largest once token 3 is banned
    expected = torch.zeros_like(scores)
    expected[allowed] = scores[allowed].softmax(-1)
    freq = torch.bincount(picks, minlength=len(scores)).float() / rows
    assert set(picks.unique().tolist()) == set(allowed.tolist())
    assert torch.allclose(freq, expected, atol=4 * (0.25 / rows) ** 0.5)  # 4 sigma at worst
    torch.manual_seed(0)
    assert torch.equal(_draw(scores.repeat(rows, 1), k, banned)[:, 0], picks)
