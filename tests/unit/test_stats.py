"""Key statistics on tiny models: the value, the single pass over layers, the cache and its key."""

import pytest
import torch
from einops import einsum

from interp_edit import hooks
from interp_edit.editing import stats
from interp_edit.errors import InterpEditError
from interp_edit.models import mlp_key_hook
from conftest import no_network

SEQ = 8  # tokens per chunk in these tests


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path, fm):
    """A small text file in the fact model's vocabulary: its facts, one per line."""
    lines = [f.prompt + " " + f.attribute + " ." for f in fm.facts for _ in range(2)]
    path = tmp_path / "facts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _direct(model, path, layer, n_tokens):
    """E[k kᵀ] by brute force: one full forward pass per chunk, sum of outer products."""
    ids = model.tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    n = min(len(ids), n_tokens) // SEQ * SEQ
    d_mlp = model.mlp_out_proj(layer).in_features
    total = torch.zeros(d_mlp, d_mlp, dtype=torch.float64)
    for start in range(0, n, SEQ):
        store = {}
        with hooks.hooked(model, [hooks.capture(mlp_key_hook(layer), store)]):
            model.logits(torch.tensor([ids[start : start + SEQ]]))
        k = store[mlp_key_hook(layer)][0].double()
        total += einsum(k, k, "p d, p e -> d e")
    return total / n


def test_matches_direct_computation(fm, corpus):
    m = fm.model
    c = stats.second_moment(m, 1, corpus, 200, seq_len=SEQ, batch_size=3, precision="fp32")
    assert c.shape == (m.mlp_out_proj(1).in_features,) * 2
    torch.testing.assert_close(c.double(), _direct(m, corpus, 1, 200), rtol=1e-4, atol=1e-6)
    assert torch.equal(c, c.T)  # symmetric
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-6  # positive semi-definite


def test_one_pass_for_several_layers_equals_one_layer_at_a_time(fm, corpus):
    m = fm.model
    both = stats.second_moments(m, [0, 2], corpus, 96, seq_len=SEQ, precision="fp32",
                                refresh=True)
    for layer in (0, 2):
        alone = stats.second_moment(m, layer, corpus, 96, seq_len=SEQ, precision="fp32",
                                    refresh=True)
        torch.testing.assert_close(both[layer], alone)


def test_bf16_pass_is_close_to_fp32(fm, corpus):
    m = fm.model
    exact = stats.second_moment(m, 1, corpus, 200, seq_len=SEQ, precision="fp32")
    fast = stats.second_moment(m, 1, corpus, 200, seq_len=SEQ, precision="bf16")
    assert (fast - exact).norm() / exact.norm() < 0.05


def test_cache_is_reused_and_described(fm, corpus, monkeypatch):
    m = fm.model
    first = stats.second_moment(m, 1, corpus, 96, seq_len=SEQ)
    info = stats.stats_info(m, 1, corpus, 96, seq_len=SEQ)
    assert info["n_tokens"] == 96 and info["layer"] == 1 and info["fingerprint"] == m.fingerprint
    stats._LOADED.clear()  # force a read from disk, and forbid a rebuild

    def boom(*a, **k):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(stats, "_accumulate", boom)
    torch.testing.assert_close(stats.second_moment(m, 1, corpus, 96, seq_len=SEQ), first)


def test_cache_key_depends_on_corpus_model_and_size(fm, tiny, corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("Paris", "Rome"))
    stats.second_moment(fm.model, 1, corpus, 96, seq_len=SEQ)
    assert stats.stats_info(fm.model, 1, other, 96, seq_len=SEQ) is None
    assert stats.stats_info(tiny, 1, corpus, 96, seq_len=SEQ) is None
    assert stats.stats_info(fm.model, 1, corpus, 104, seq_len=SEQ) is None
    assert stats.stats_info(fm.model, 2, corpus, 96, seq_len=SEQ) is None
    a = stats.second_moment(fm.model, 1, corpus, 96, seq_len=SEQ)
    b = stats.second_moment(fm.model, 1, other, 96, seq_len=SEQ)
    assert not torch.equal(a, b)


def test_generated_corpus_is_offline_and_seeded(fm):
    m = fm.model
    with no_network():
        a = stats.second_moment(m, 1, "generated", 64, seq_len=SEQ)
    stats._LOADED.clear()
    b = stats.second_moment(m, 1, "generated", 64, seq_len=SEQ, refresh=True)
    c = stats.second_moment(m, 1, "generated", 64, seq_len=SEQ, seed=1)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_bad_corpora_and_arguments(fm, tmp_path, monkeypatch):
    m = fm.model
    with pytest.raises(InterpEditError, match="not a text file"):
        stats.second_moment(m, 1, tmp_path / "missing.txt", 64, seq_len=SEQ)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InterpEditError, match="needs the network.*generated"):
        stats.second_moment(m, 1, "wikitext:wikitext-103-raw-v1", 64, seq_len=SEQ)
    with pytest.raises(InterpEditError, match="out of range"):
        stats.second_moment(m, 9, "generated", 64, seq_len=SEQ)
    with pytest.raises(InterpEditError, match="precision"):
        stats.second_moment(m, 1, "generated", 64, seq_len=SEQ, precision="fp16")
    with pytest.raises(InterpEditError, match="less than one chunk"):
        stats.second_moment(m, 1, "generated", 4, seq_len=SEQ)


def test_solve_mom2_and_singular_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    c = a @ a.T + 0.1 * torch.eye(6)
    k = torch.randn(6, generator=g)
    torch.testing.assert_close(stats.solve_mom2(c, k), torch.linalg.solve(c.double(), k.double()))
    singular = torch.zeros(6, 6)
    with pytest.raises(InterpEditError, match="singular"):
        stats.solve_mom2(singular, k)
    ridged = torch.eye(6).index_fill(0, torch.tensor([5]), 0.0)  # one dead key direction
    assert torch.isfinite(stats.solve_mom2(ridged, k, ridge=1e-3)).all()
