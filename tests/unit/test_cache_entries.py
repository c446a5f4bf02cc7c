"""Cache entries are validated on load: a damaged one is rebuilt with a warning, never used,
and the rebuilt value is the one a fresh cache gives."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from interp_edit import _loading
from interp_edit._files import read_safetensors
from interp_edit.analysis.localization_study import read_rows
from interp_edit.editing import _embed, keys, stats
from interp_edit.testing import random_hf, save_random_model
from interp_edit.tracing import dataset as D
from interp_edit.tracing import noise

DAMAGED = "damaged.*rebuilding it"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(root))
    monkeypatch.setattr(stats, "_LOADED", {})
    monkeypatch.setattr(keys, "_TEMPLATES", {})
    monkeypatch.setattr(_embed, "_LOADED", {})
    return root


def _rebuilt(build, path, contents: bytes, clear=None):
    """``build()`` after ``path`` was overwritten with ``contents``: it warns, and the entry
    on disk is whole again."""
    path.write_bytes(contents)
    if clear is not None:
        clear()
    with pytest.warns(UserWarning, match=DAMAGED):
        value = build()
    assert path.exists() and path.read_bytes() != contents
    return value


def _only(root, pattern: str):
    found = list(root.rglob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_key_statistics_and_sampled_corpus(tiny, cache):
    def build():
        return stats.second_moments(tiny, [1], "generated", 64, seq_len=16, batch_size=4,
                                    precision="fp32")[1]

    first = build()
    path = _only(cache / "stats", "*.safetensors")
    good = path.read_bytes()
    d = first.shape[0]
    save_file({"mom2": torch.eye(d + 1)}, str(path.with_name("x")))
    wrong_shape = path.with_name("x").read_bytes()
    save_file({"mom2": torch.full((d, d), float("nan"))}, str(path.with_name("x")))
    nan = path.with_name("x").read_bytes()
    path.with_name("x").unlink()
    for contents in (b"\x00" * 100, good[: len(good) // 2], wrong_shape, nan):
        again = _rebuilt(build, path, contents, clear=stats._LOADED.clear)
        assert torch.equal(again, first)
    # the sidecar and the sampled corpus the statistics came from
    sidecar = path.with_suffix(".json")
    sidecar.write_text("{not json")
    with pytest.warns(UserWarning, match=DAMAGED):
        assert stats.stats_info(tiny, 1, "generated", 64, seq_len=16, precision="fp32") is None
    ids_path = _only(cache / "corpora", "*.safetensors")
    ids = read_safetensors(ids_path)[0]["ids"]
    save_file({"ids": ids + len(tiny.tokenizer)}, str(ids_path))  # ids outside the vocabulary
    again = _rebuilt(lambda: stats._generated(tiny, 4, 16, 0, False), ids_path,
                     ids_path.read_bytes())
    assert torch.equal(again, ids)


def test_ike_pool_embeddings(tiny, cache):
    calls = []
    emb = _embed.get_embedder("model", tiny)
    counting = _embed.Embedder(emb.key, lambda t: calls.append(len(t)) or emb.embed(t))
    texts = [f"fact {i}" for i in range(4)]
    first = _embed.pool_embeddings(texts, counting, "pool")
    path = _only(cache / "ike", "*.safetensors")
    save_file({"embeddings": first * 2}, str(path))  # not unit vectors
    again = _rebuilt(lambda: _embed.pool_embeddings(texts, counting, "pool"), path,
                     path.read_bytes(), clear=_embed._LOADED.clear)
    assert calls == [4, 4] and torch.equal(again, first)


def test_context_templates_and_noise(tiny, cache):
    first = keys.context_templates(tiny, 2, 3)
    path = _only(cache / "prefixes", "*.json")
    for contents in (b"\xff\xfe", b'{"prefixes": ["{} a", "b"]}', b'{"prefixes": ["a"]}'):
        assert _rebuilt(lambda: keys.context_templates(tiny, 2, 3), path, contents,
                        clear=keys._TEMPLATES.clear) == first
    std, _ = noise.reference_std(tiny)
    path = _only(cache / "noise", "*.json")
    for contents in (b"", b'{"std": NaN, "list": "x"}', b'{"std": -1.0}'):
        assert _rebuilt(lambda: noise.reference_std(tiny)[0], path, contents) == std


def test_dequantized_model(cache, tmp_path, monkeypatch):
    """The model cache: a truncated weights file, or one missing a weight (which Hugging Face
    would fill with random values), is rebuilt."""
    builds = []

    def dequantize(path, out):  # stands in for the GGUF conversion: the tiny model's weights
        builds.append(path)
        save_random_model(out)

    monkeypatch.setattr(_loading, "_dequantize", dequantize)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    hf, _ = _loading._load_gguf(gguf, torch.float32)
    weights = _only(cache / "models", "model.safetensors")
    whole = weights.read_bytes()
    tensors = read_safetensors(weights)[0]
    save_file({k: v for k, v in list(tensors.items())[1:]}, str(weights),
              metadata={"format": "pt"})
    missing = weights.read_bytes()
    for contents in (whole[: len(whole) // 2], missing):
        weights.write_bytes(contents)
        with pytest.warns(UserWarning, match=DAMAGED):
            hf, _ = _loading._load_gguf(gguf, torch.float32)
        weights = _only(cache / "models", "model.safetensors")
        assert weights.read_bytes() == whole
    assert len(builds) == 3
    reference = random_hf()[0].state_dict()
    assert hf.state_dict().keys() == reference.keys()
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in reference.items())
    assert [p.name for p in (cache / "models").iterdir()] == [weights.parent.name]


@dataclass(frozen=True)
class Fact:
    prompt: str
    subject: str
    attribute: str


def test_dataset_traces(fm, tmp_path):
    facts = [Fact(f.prompt, f.subject, f.attribute) for f in fm.facts[:2]]

    def run():
        return D.trace_dataset(fm.model, facts, kinds=("resid",), samples=2, window=2,
                               cache_dir=tmp_path, progress=False)

    first = run()
    path = sorted(tmp_path.rglob("*.npz"))[0]
    again = _rebuilt(run, path, path.read_bytes()[:100])
    torch.testing.assert_close(again.effects[0], first.effects[0], rtol=0, atol=0,
                               equal_nan=True)


def test_study_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"case_id": 1, "config": {}}\n{"case_id": 2, "conf')
    with pytest.warns(UserWarning, match=DAMAGED):
        assert read_rows(path) == {}
    assert not path.exists()
