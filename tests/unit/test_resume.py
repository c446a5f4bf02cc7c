"""Resuming a forward pass from a block's recorded input (interp_edit.resume)."""

import pytest
import torch

from interp_edit.errors import InterpEditError
from interp_edit.hooks import add_delta, capture, hooked
from interp_edit.models import mlp_key_hook, mlp_out_hook
from interp_edit.resume import block_input, logits_from, record_block_input, supports_resume


@pytest.fixture
def ids(fm):
    m = fm.model
    return m.batch_ids([m.tokenize(fm.facts[0].prompt).tolist(),
                        m.tokenize(fm.facts[7].paraphrases[0]).tolist()])[0]


def test_resumed_logits_equal_the_full_pass_bit_for_bit(fm, ids):
    m = fm.model
    assert supports_resume(m)
    with torch.no_grad():
        for layer in range(m.n_layers):
            with record_block_input(m, layer) as rec:
                full = m.logits(ids)
            assert rec.value.layer == layer and rec.value.hidden.shape[:2] == ids.shape
            assert torch.equal(logits_from(m, rec.value), full)


def test_positions_and_model_logits_agree(fm, ids):
    m = fm.model
    cols = torch.tensor([1, ids.shape[1] - 1])
    with torch.no_grad(), record_block_input(m, 1) as rec:
        full = m.logits(ids)
        kept = m.logits(ids, cols)
    assert kept.shape == (ids.shape[0], 2, full.shape[-1])
    torch.testing.assert_close(kept, full[:, cols], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits_from(m, rec.value, cols), full[:, cols], rtol=0, atol=1e-5)


def test_bridge_hooks_run_on_the_resumed_blocks(fm, ids):
    """Capture and add_delta hooks on the resumed blocks see what a full pass sees, and a
    gradient reaches a delta added there."""
    m = fm.model
    layer = m.n_layers - 1
    with torch.no_grad(), record_block_input(m, layer) as rec:
        m.logits(ids)
    seen = []
    for resume in (False, True):
        store, bump = {}, torch.zeros(*ids.shape, m.d_model, requires_grad=True)
        with hooked(m, [capture(mlp_key_hook(layer), store),
                        add_delta(mlp_out_hook(layer), slice(None), bump)]):
            out = logits_from(m, rec.value) if resume else m.logits(ids)
            (grad,) = torch.autograd.grad(out[:, -1].logsumexp(-1).sum(), [bump])
        seen.append((store[mlp_key_hook(layer)], grad))
    (key_full, grad_full), (key_resumed, grad_resumed) = seen
    assert torch.equal(key_full, key_resumed) and torch.equal(grad_full, grad_resumed)
    assert grad_full.abs().sum() > 0


def test_stepper_input_refuses_a_hook_installed_since(fm, ids):
    """A block input from the layer stepper cannot be resumed once a bridge hook is installed
    (the stepper would silently skip it); a recorded bridge input can."""
    m = fm.model
    start = block_input(m, ids, 2)
    assert start.kwargs is None
    with torch.no_grad(), record_block_input(m, 2) as rec:
        full = m.logits(ids)
    torch.testing.assert_close(start.hidden, rec.value.hidden, rtol=0, atol=1e-5)
    with hooked(m, [capture(mlp_key_hook(3), {})]):
        with pytest.raises(InterpEditError, match="layer stepper"):
            logits_from(m, start)
        with torch.no_grad():
            assert torch.equal(logits_from(m, rec.value), full)


def test_record_checks_the_layer(fm):
    with pytest.raises(InterpEditError):
        with record_block_input(fm.model, fm.model.n_layers):
            pass


def test_low_precision_block_input_uses_bf16_copies_that_follow_the_weights(fm, ids):
    """block_input(precision=bf16) multiplies with bf16 copies of the weights (packed for
    oneDNN on CPU: the same numbers as a plain bf16 multiply), close to the fp32 input but not
    equal to it; a copy is made once and remade when its weight changes in place."""
    import torch.nn.functional as F

    from interp_edit.arch.stepper import _parts
    from interp_edit._precision import low_precision_weights

    m = fm.model
    exact = block_input(m, ids, 3).hidden
    low = block_input(m, ids, 3, torch.bfloat16).hidden
    assert low.dtype == exact.dtype and not torch.equal(low, exact)
    assert float((low - exact).norm() / exact.norm()) < 0.02
    up = _parts(m).layers[1].up
    copy = low_precision_weights(up, torch.bfloat16)
    assert low_precision_weights(up, torch.bfloat16) is copy  # kept
    x = torch.randn(5, up.weight.shape[1]).to(torch.bfloat16)
    assert torch.equal(copy(x), F.linear(x, up.weight.to(torch.bfloat16)))
    before = up.weight.detach().clone()
    with torch.no_grad():
        up.weight.add_(1.0)
    try:
        again = low_precision_weights(up, torch.bfloat16)
        assert again is not copy
        assert torch.equal(again(x), F.linear(x, up.weight.to(torch.bfloat16)))
        assert not torch.equal(block_input(m, ids, 3, torch.bfloat16).hidden, low)
    finally:
        with torch.no_grad():
            up.weight.copy_(before)


def test_repeated_rows_run_once_with_the_same_block_input(fm, ids):
    """block_input runs a row that repeats once (an edit's prompt with its new and its old
    answer): the repeats get that row's hidden states, and each equals the row run alone."""
    m = fm.model
    repeated = ids[[0, 1, 0, 0]]
    start = block_input(m, repeated, 3)
    assert start.hidden.shape[:2] == repeated.shape
    assert torch.equal(start.hidden[0], start.hidden[2])
    assert torch.equal(start.hidden[0], start.hidden[3])
    for row in (0, 1):
        alone = block_input(m, ids[row : row + 1], 3).hidden[0]
        torch.testing.assert_close(start.hidden[row], alone, rtol=0, atol=1e-5)


def test_hooks_fixed_answers_from_one_look(fm):
    """Model.hooks_fixed: has_hooks answers from the look taken on entry (nested blocks keep
    the outer one's) and looks again after the block."""
    m = fm.model
    assert not m.has_hooks()
    with m.hooks_fixed():
        with hooked(m, [capture(mlp_key_hook(0), {})]):
            assert not m.has_hooks()  # the look taken on entry
        with m.hooks_fixed():
            assert not m.has_hooks()
    with hooked(m, [capture(mlp_key_hook(0), {})]):
        assert m.has_hooks()
        with m.hooks_fixed():
            assert m.has_hooks()
    assert not m.has_hooks()
