"""The "known facts" dataset of Meng et al. 2022 (ROME): 1,209 facts that GPT-2 XL knows,
used for causal tracing. The file is public (https://rome.baulab.info/data/dsets/known_1000.json)
and is read from a path the user gives; nothing is downloaded here.

    facts = load_known_facts("../shared/data/known_1000.json")
    facts[0].prompt, facts[0].subject, facts[0].attribute
    # ('Vinson Massif is located in the continent of', 'Vinson Massif', 'Antarctica')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from interp_edit import _validate
from interp_edit.errors import InterpEditError

KNOWN_1000_URL = "https://rome.baulab.info/data/dsets/known_1000.json"


@dataclass(frozen=True)
class KnownFact:
    """One record of known_1000.json. ``prompt`` contains ``subject``; ``attribute`` is the
    answer (the tracing target); ``prediction`` is GPT-2 XL's greedy continuation."""

    known_id: int
    subject: str
    attribute: str
    template: str
    prediction: str
    prompt: str
    relation_id: str


def load_known_facts(path: str | os.PathLike) -> list[KnownFact]:
    """Read known_1000.json (a JSON list of records with the :class:`KnownFact` fields)."""
    path = Path(_validate.path("path", path)).expanduser()
    if not path.is_file():
        raise InterpEditError(
            f"known facts file {str(path)!r} not found: pass the path to known_1000.json "
            f"(public at {KNOWN_1000_URL})"
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InterpEditError(f"{path} is not valid JSON: {exc}") from None
    names = [f.name for f in fields(KnownFact)]
    if not isinstance(records, list):
        raise InterpEditError(f"{path} should hold a JSON list of known-fact records")
    facts = []
    for i, rec in enumerate(records):
        missing = [n for n in names if not isinstance(rec, dict) or n not in rec]
        if missing:
            raise InterpEditError(f"record {i} of {path} lacks {missing}: is this known_1000.json?")
        facts.append(KnownFact(**{n: rec[n] for n in names}))
    return facts
