"""The shared-prefix path of ``Model.logits`` (interp_edit.arch.prefix) against plain passes:
families, padding, BOS, and an IKE evaluation measured both ways."""

import pytest
import torch

import interp_edit as ie
from interp_edit import hooks
from interp_edit.arch import prefix
from interp_edit.arch.tiny import tiny_model
from interp_edit.editing import ike
from interp_edit.errors import InterpEditError
from interp_edit.evaluation import metrics
from interp_edit.models import Model


def plain(model):
    """A no-op hook: the layer stepper stands down, so every pass is the bridge's own."""
    return hooks.hook_path(model)


def _batch(model, n_prefix=40, tails=(3, 7, 1, 12), seed=0):
    """Right-padded rows: one random prefix, then random tails of different lengths."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.bridge.cfg.d_vocab
    head = torch.randint(vocab, (n_prefix,), generator=g).tolist()
    return model.batch_ids([head + torch.randint(vocab, (k,), generator=g).tolist()
                            for k in tails])[0]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt", "gpt_neox"])
def test_cached_logits_equal_plain_pass(family):
    model = tiny_model(family)
    ids = _batch(model)  # gemma3: 40 shared tokens span many of its 3-token sliding windows
    assert prefix.split(model, ids) == 40
    columns = [-1, 41, 5, 39]  # after the prefix, inside it, its last token
    cached, cached_at = model.logits(ids), model.logits(ids, columns)
    with plain(model):
        assert prefix.split(model, ids) == 0
        want, want_at = model.logits(ids), model.logits(ids, columns)
    assert cached.shape == want.shape and cached_at.shape == want_at.shape == (4, 4, want.shape[-1])
    torch.testing.assert_close(cached, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached_at, want_at, atol=1e-5, rtol=0)


def test_plain_pass_where_the_prefix_does_not_pay():
    model = tiny_model("llama")
    assert prefix.split(model, _batch(model, n_prefix=prefix.MIN_SHARED - 1)) == 0
    assert prefix.split(model, _batch(model, tails=(5,))) == 0  # one row
    same = _batch(model, tails=(5, 5), seed=1)
    same[1] = same[0]
    assert prefix.split(model, same) == same.shape[1] - 1  # the last column stays per row
    assert prefix.split_sequences(model, [[1] * 30, [1] * 20 + [2] * 5]) == 20


def test_bad_inputs():
    model = tiny_model("llama")
    ids = _batch(model)
    with pytest.raises(InterpEditError, match="shared tokens"):
        prefix.logits(model, ids, 41)  # row tails differ at column 40
    with pytest.raises(InterpEditError, match="shared tokens"):
        prefix.logits(model, ids, ids.shape[1])
    with pytest.raises(InterpEditError, match="positions"):
        model.logits(ids, [ids.shape[1]])
    with pytest.raises(InterpEditError, match=r"\[batch, pos\]"):
        prefix.shared_length(ids[0])


def test_scores_with_bos_and_a_shared_context(fm):
    """Prompts after one context, on the fact model with a BOS token prepended: the scores
    that go through Model.logits are those of plain passes."""
    bos = Model(fm.model.bridge, fm.model.tokenizer, "fact-model+bos", prepend_bos=True)
    context = " ".join(f.prompt + " " + f.attribute + " ." for f in fm.facts[:4]) + " "
    prompts = [context + f.prompt for f in fm.facts[4:9]]
    targets = [f.attribute for f in fm.facts[4:9]]
    assert bos.tokenize(prompts[0])[0] == bos.tokenizer.bos_token_id
    rows = [bos.tokenize(p).tolist() for p in prompts]
    assert prefix.split_sequences(bos, rows) >= prefix.MIN_SHARED

    def scores():
        s = metrics.score_targets(bos, prompts, targets)
        return (bos.next_token_probs(prompts, targets), bos.target_logprobs(prompts, targets),
                bos.last_logits(prompts), s.logprob, s.first_prob, s.token_acc)

    cached = scores()
    with plain(bos):
        want = scores()
    for a, b in zip(cached, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_ike_evaluation_is_the_same_with_and_without_the_cache(fm, pool):
    m = fm.model
    records = list(ike.load_pool(pool)[0][:3])
    settings = dict(method="ike", demos=1, pool=pool, embedder="model", progress=False)
    e = ie.edit(m, [records[0].request], method="ike", demos=1, pool=pool, embedder="model")
    wrapped = [m.tokenize(metrics.wrap(e, p)).tolist() for p in records[0].paraphrases * 2]
    assert prefix.split_sequences(m, wrapped) >= prefix.MIN_SHARED  # the cache is in use

    def measured():
        return (metrics.measure(m, records[0], e), metrics.top1(m, [r.text for r in records], e),
                ie.evaluate(m, records, **settings).rows)

    cached = measured()
    with plain(m):
        want = measured()
    e.undo()
    (got_record, got_top1, got_rows), (want_record, want_top1, want_rows) = cached, want
    assert got_record == pytest.approx(want_record, abs=1e-5) and got_top1 == want_top1
    assert len(got_rows) == len(want_rows) == 3
    timings = {"seconds", "info_seconds"}
    for got, row in zip(got_rows, want_rows):
        got, row = ({k: v for k, v in r.items() if k not in timings} for r in (got, row))
        numbers = [k for k, v in row.items() if isinstance(v, float)]
        assert numbers and {k: got[k] for k in numbers} == pytest.approx(
            {k: row[k] for k in numbers}, abs=1e-5)
        assert {k: v for k, v in got.items() if k not in numbers} == {
            k: v for k, v in row.items() if k not in numbers}
