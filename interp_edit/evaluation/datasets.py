"""Loaders for edit-evaluation datasets, all into :class:`EditRecord`.

- :func:`load_counterfact`: CounterFact (Meng et al. 2022) in the official format
  (``requested_rewrite`` with a ``{}`` template, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``generation_prompts``; the neighbours' answer is ``target_true``)
  or the flattened one-prompt-per-field format (``prompt`` containing the subject,
  ``rephrase_prompt``, ``locality_prompt``/``locality_ground_truth``). ``attribute_prompts`` of
  the official format are not used: no metric here reads them.
- :func:`load_zsre`: zsRE question-answer edits in the MEND format (``src`` question,
  ``answers``, ``alt`` = the new answer, ``rephrase``, ``loc``/``loc_ans``).
- :func:`load_probes`: a reverse and portability probe set built from the data for one model
  (``analyses/build_probes.py``, ``probe_builder.py``); the sets of the built-in models ship in
  this package (``probe_sets/``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from interp_edit import _validate
from interp_edit.errors import InterpEditError
from interp_edit.evaluation.records import EditRecord

log = logging.getLogger(__name__)

PROBE_SETS = Path(__file__).with_name("probe_sets")
PROBE_SET_FORMAT = "interp_edit.ProbeSet/1"
_FLAT_KEYS = {"prompt", "subject", "target_new", "ground_truth"}
_ZSRE_KEYS = {"src", "alt", "answers", "subject"}


def load_counterfact(path: str | os.PathLike) -> list[EditRecord]:
    """CounterFact records from a JSON list in the official or the flattened format."""
    rows = _read_json_list(path)
    keys = set(rows[0]) if rows else set()
    if "requested_rewrite" in keys:
        return [_record(path, i, _official, r, i, "counterfact") for i, r in enumerate(rows)]
    if _FLAT_KEYS <= keys:
        return [_record(path, i, _flattened, r, i) for i, r in enumerate(rows)]
    hint = " (it looks like zsRE: use load_zsre)" if _ZSRE_KEYS <= keys else ""
    raise InterpEditError(
        f"{path}: unknown CounterFact format{hint}; records have keys {sorted(keys)}, expected "
        f"'requested_rewrite' (official) or {sorted(_FLAT_KEYS)} (flattened)"
    )


def load_zsre(path: str | os.PathLike) -> list[EditRecord]:
    """zsRE records in the MEND format. Records whose subject is not in the question, or with
    no answer or an empty ``alt``, are dropped (with a logged count)."""
    rows = _read_json_list(path)
    keys = set(rows[0]) if rows else set()
    if not _ZSRE_KEYS <= keys:
        raise InterpEditError(
            f"{path}: unknown zsRE format; records have keys {sorted(keys)}, expected at least "
            f"{sorted(_ZSRE_KEYS)} (the MEND format)"
        )
    out = [rec for i, r in enumerate(rows) if (rec := _record(path, i, _zsre, r, i))]
    dropped = len(rows) - len(out)
    if dropped:
        log.warning("%s: dropped %d zsRE records (subject not in the question, or no answer/alt)",
                    path, dropped)
    return out


def load_probes(source: str | os.PathLike | None = None) -> list[EditRecord]:
    """A probe set: ``source`` is a probe-set JSON file, or a model name (the set built for it
    that ships in ``probe_sets/``); ``None``: the default model's set."""
    path = Path(source) if source is not None and str(source).endswith(".json") else \
        probe_set_path(source)
    doc = _load_json(path)
    if not isinstance(doc, dict) or doc.get("format") != PROBE_SET_FORMAT:
        raise InterpEditError(f"{path} is not a probe set (build one with "
                              "analyses/build_probes.py)")
    return [EditRecord.from_dict(r) for r in doc["records"]]


def probe_set_path(model_name: str | os.PathLike | None = None) -> Path:
    """Where the probe set of a model lives in this package (``None``: the default model)."""
    from interp_edit.models import DEFAULT_MODEL

    name = str(model_name) if model_name is not None else DEFAULT_MODEL
    return PROBE_SETS / (re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower() + ".json")


def _record(path, i: int, build, *args) -> EditRecord | None:
    """``build(*args)``, with a record that lacks a field or has one of the wrong type
    reported as an InterpEditError naming the file and the record."""
    try:
        return build(*args)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        if isinstance(exc, InterpEditError):
            raise InterpEditError(f"{path}: record {i}: {exc}") from None
        what = f"lacks the field {exc}" if isinstance(exc, KeyError) else f"is malformed ({exc})"
        raise InterpEditError(f"{path}: record {i} {what}; fix or remove it") from None


# ---- formats --------------------------------------------------------------------------------
def _official(r: dict[str, Any], i: int, source: str) -> EditRecord:
    rw = r["requested_rewrite"]
    true = _str(rw["target_true"])
    return EditRecord(
        case_id=r.get("case_id", i),
        prompt=_template(rw["prompt"], rw["subject"]),
        subject=rw["subject"],
        target_new=_str(rw["target_new"]),
        target_true=true,
        paraphrases=tuple(r.get("paraphrase_prompts", ())),
        neighborhood=tuple((p, true) for p in r.get("neighborhood_prompts", ())),
        reverse=tuple(tuple(x) for x in r.get("reverse", ())),
        portability=tuple(tuple(x) for x in r.get("portability", ())),
        generation_prompts=tuple(r.get("generation_prompts", ())),
        source=source,
    )


def _zsre(r: dict[str, Any], i: int) -> EditRecord | None:
    """A zsRE record, or None (dropped) when its subject is not in the question, or it has
    no answer or an empty ``alt``."""
    src, subject = r["src"], r["subject"]
    if subject not in src or not r["answers"] or not str(r["alt"]).strip():
        return None
    loc = ((r["loc"], r["loc_ans"]),) if r.get("loc") and r.get("loc_ans") else ()
    return EditRecord(
        case_id=r.get("case_id", i),
        prompt=_template(src, subject),
        subject=subject,
        target_new=r["alt"],
        target_true=r["answers"][0],
        paraphrases=(r["rephrase"],) if r.get("rephrase") else (),
        neighborhood=loc,
        source="zsre",
    )


def _flattened(r: dict[str, Any], i: int) -> EditRecord:
    loc = ()
    if r.get("locality_prompt") and r.get("locality_ground_truth"):
        loc = ((r["locality_prompt"], r["locality_ground_truth"]),)
    return EditRecord(
        case_id=r.get("case_id", i),
        prompt=_template(r["prompt"], r["subject"]),
        subject=r["subject"],
        target_new=r["target_new"],
        target_true=r["ground_truth"],
        paraphrases=(r["rephrase_prompt"],) if r.get("rephrase_prompt") else (),
        neighborhood=loc,
        source="counterfact",
    )


def _str(target: Any) -> str:
    """CounterFact targets are ``{"str": ..., "id": ...}`` dicts; accept plain strings too."""
    return target["str"] if isinstance(target, dict) else str(target)


def _template(prompt: str, subject: str) -> str:
    """A ``{}`` template: kept if the prompt has one, else the subject's first occurrence."""
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise InterpEditError(f"subject {subject!r} is not in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def _read_json_list(path: str | os.PathLike) -> list[dict[str, Any]]:
    data = _load_json(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InterpEditError(f"{path}: expected a JSON list of records (objects)")
    return data


def _load_json(path: str | os.PathLike) -> Any:
    """A JSON file's content, with errors that say which file is missing or broken."""
    path = Path(_validate.path("path", path)).expanduser()
    if not path.exists():
        raise InterpEditError(
            f"dataset file {str(path)!r} does not exist: pass the path to a CounterFact or "
            "zsRE JSON file"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InterpEditError(f"{path} is not valid JSON: {exc}") from exc
