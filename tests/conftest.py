"""Shared fixtures. Unit tests use tiny models built in-process; integration tests (marked
``integration``) load the default model once per session, under a socket guard."""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("INTERP_EDIT_DATA", str(SHARED_DATA))  # IKE's default pool


@contextmanager
def no_network():
    """Any socket connection attempt raises: proves a code path is offline."""
    real = socket.socket.connect

    def guard(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    socket.socket.connect = guard
    try:
        yield
    finally:
        socket.socket.connect = real


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"integration data missing: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model():
    import interp_edit as ie

    with no_network():
        return ie.load_model()


@pytest.fixture(scope="session")
def gemma():
    """Gemma-3-270M, the second built-in model (its packages, offline)."""
    import interp_edit as ie

    with no_network():
        return ie.load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def fm():
    """The tiny model trained on synthetic facts (FactModel: .model, .facts)."""
    from interp_edit.testing import fact_model

    return fact_model()


@pytest.fixture(scope="session")
def tiny():
    from interp_edit.testing import random_model

    return random_model()


@pytest.fixture(scope="session")
def fact_corpus(fm, tmp_path_factory) -> Path:
    """A text file of the fact model's own sentences (it knows no other text): the key
    statistics corpus of the locate-then-edit tests."""
    path = tmp_path_factory.mktemp("corpus") / "facts.txt"
    lines = [t.format(f.subject) + " " + f.attribute + " ." for f in fm.facts
             for t in (f.template, *f.paraphrases)]
    path.write_text("\n".join(lines * 4) + "\n")
    return path


@pytest.fixture(scope="session")
def pool(fm, tmp_path_factory):
    """A flattened CounterFact-style file built from the tiny model's own facts: the IKE
    demonstration pool of the tests (its records are usable edit records too)."""
    facts = fm.facts
    rows = [{"case_id": i, "prompt": f.prompt, "subject": f.subject, "target_new": "Oslo",
             "ground_truth": f.attribute, "rephrase_prompt": f.paraphrases[0].format(f.subject),
             "locality_prompt": facts[(i + 3) % len(facts)].prompt,
             "locality_ground_truth": facts[(i + 3) % len(facts)].attribute}
            for i, f in enumerate(facts)]
    path = tmp_path_factory.mktemp("ike") / "pool.json"
    path.write_text(json.dumps(rows))
    return str(path)
