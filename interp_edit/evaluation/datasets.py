"""Loaders for edit-evaluation datasets, all into :class:`EditRecord`.

- :func:`load_counterfact`: CounterFact (Meng et al. 2022) in the official format
  (``requested_rewrite`` with a ``{}`` template, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``generation_prompts``; the neighbours' answer is ``target_true``)
  or the flattened one-prompt-per-field format (``prompt`` containing the subject,
  ``rephrase_prompt``, ``locality_prompt``/``locality_ground_truth``). ``attribute_prompts`` of
  the official format are not used: no metric here reads them.
- :func:`load_zsre`: zsRE question-answer edits in the MEND format (``src`` question,
  ``answers``, ``alt`` = the new answer, ``rephrase``, ``loc``/``loc_ans``).
- :func:`load_probes`: a small hand-written set in this package (``probes.json``) in the
  official CounterFact format plus ``reverse`` and ``portability`` lists of
  ``[prompt, answer-after-the-edit]``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from interp_edit.errors import InterpEditError
from interp_edit.evaluation.records import EditRecord

log = logging.getLogger(__name__)

PROBES_PATH = Path(__file__).with_name("probes.json")
_FLAT_KEYS = {"prompt", "subject", "target_new", "ground_truth"}
_ZSRE_KEYS = {"src", "alt", "answers", "subject"}


def load_counterfact(path: str | os.PathLike) -> list[EditRecord]:
    """CounterFact records from a JSON list in the official or the flattened format."""
    rows = _read_json_list(path)
    keys = set(rows[0]) if rows else set()
    if "requested_rewrite" in keys:
        return [_official(r, i, "counterfact") for i, r in enumerate(rows)]
    if _FLAT_KEYS <= keys:
        return [_flattened(r, i) for i, r in enumerate(rows)]
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
    out, dropped = [], 0
    for i, r in enumerate(rows):
        src, subject = r["src"], r["subject"]
        if subject not in src or not r["answers"] or not str(r["alt"]).strip():
            dropped += 1
            continue
        loc = ((r["loc"], r["loc_ans"]),) if r.get("loc") and r.get("loc_ans") else ()
        out.append(EditRecord(
            case_id=r.get("case_id", i),
            prompt=_template(src, subject),
            subject=subject,
            target_new=r["alt"],
            target_true=r["answers"][0],
            paraphrases=(r["rephrase"],) if r.get("rephrase") else (),
            neighborhood=loc,
            source="zsre",
        ))
    if dropped:
        log.warning("%s: dropped %d zsRE records (subject not in the question, or no answer/alt)",
                    path, dropped)
    return out


def load_probes(path: str | os.PathLike | None = None) -> list[EditRecord]:
    """The hand-written CounterFact-style facts with reverse and portability probes."""
    rows = _read_json_list(PROBES_PATH if path is None else path)
    return [_official(r, i, "probes") for i, r in enumerate(rows)]


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
    path = Path(path).expanduser()
    if not path.exists():
        raise InterpEditError(
            f"dataset file {str(path)!r} does not exist: pass the path to a CounterFact or "
            "zsRE JSON file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InterpEditError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InterpEditError(f"{path}: expected a JSON list of records (objects)")
    return data
