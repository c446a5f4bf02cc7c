"""The one record type every evaluation dataset is loaded into.

An :class:`EditRecord` is a CounterFact-style case: the fact to rewrite (``prompt`` template,
``subject``, ``target_true`` -> ``target_new``) plus the probes that measure the edit:

- ``paraphrases``: prompts whose answer should become ``target_new``;
- ``neighborhood``: ``(prompt, answer)`` pairs about *other* subjects whose answer must not change
  (in CounterFact the answer is ``target_true``: same relation, same object, another subject);
- ``reverse``: ``(prompt, answer, answer_before)`` probes that ask the edited fact backwards,
  answered by the subject after the edit ("Paris is the capital of" -> the edited country;
  before it, "France");
- ``portability``: ``(prompt, answer, answer_before)`` probes whose answer follows from the new
  fact through facts the model knows ("The city where {s} worked is located in the country
  of" -> the new city's country; before it, the true city's);
- ``generation_prompts``: prompts for free generation (fluency).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from interp_edit import _validate
from interp_edit.editing.base import EditRequest
from interp_edit.errors import InterpEditError

Pairs = tuple[tuple[str, str], ...]
# (prompt, answer after the edit, answer before it)
Probes = tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class EditRecord:
    """One edit case and its probes. ``prompt`` is a template with one ``{}`` for the subject."""

    case_id: str | int
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrases: tuple[str, ...] = ()
    neighborhood: Pairs = ()
    reverse: Probes = ()
    portability: Probes = ()
    generation_prompts: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.case_id, bool) or not isinstance(self.case_id, (str, int)):
            raise InterpEditError(f"record case_id must be a string or an integer, not "
                                  f"{self.case_id!r}")
        _validate.text(f"record {self.case_id!r}: prompt", self.prompt)
        if self.prompt.count("{}") != 1:
            raise InterpEditError(
                f"record {self.case_id!r}: prompt {self.prompt!r} must be a template with "
                "exactly one '{}' where the subject goes"
            )
        for name in ("subject", "target_new", "target_true"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InterpEditError(f"record {self.case_id!r}: {name} is empty")
        # accept lists from JSON and store tuples, so records stay hashable and immutable
        for name in ("paraphrases", "generation_prompts"):
            values = _sequence(self.case_id, name, getattr(self, name))
            for p in values:
                _validate.text(f"record {self.case_id!r}: an entry of {name}", p)
            object.__setattr__(self, name, values)
        pairs = _sequence(self.case_id, "neighborhood", self.neighborhood)
        if any(isinstance(p, (str, bytes)) or len(_sequence(self.case_id, "neighborhood", p)) != 2
               for p in pairs):
            raise InterpEditError(f"record {self.case_id!r}: neighborhood must be a list of "
                                  "[prompt, answer] pairs")
        object.__setattr__(self, "neighborhood", tuple((str(p), str(a)) for p, a in pairs))
        for name in ("reverse", "portability"):
            probes = _sequence(self.case_id, name, getattr(self, name))
            if any(isinstance(x, (str, bytes)) or len(_sequence(self.case_id, name, x)) != 3
                   or not all(str(y).strip() for y in x) for x in probes):
                raise InterpEditError(f"record {self.case_id!r}: each {name} probe is "
                                      "[prompt, answer, answer_before], none empty")
            object.__setattr__(self, name, tuple(tuple(str(y) for y in x) for x in probes))

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def request(self) -> EditRequest:
        """The edit this record asks for, ready for ``ie.edit``."""
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _sequence(case_id: str | int, name: str, value: Any) -> tuple:
    """A list/tuple field as a tuple (a lone string is not a list of prompts)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise InterpEditError(f"record {case_id!r}: {name} must be a list, not {value!r}")
    return tuple(value)
