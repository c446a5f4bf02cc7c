"""What an edit asks for: :class:`EditRequest`, one fact to rewrite, checked against a model
before any weight changes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from interp_edit import _validate
from interp_edit.errors import InterpEditError
from interp_edit.models import Model


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt`` is a template with ``{}`` for the subject, or a string
    that contains the subject (its first occurrence becomes ``{}``)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def template(self) -> str:
        if "{}" in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, "{}", 1)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.format(self.subject)

    def validate(self, model: Model) -> None:
        """Raise InterpEditError if this request cannot be applied to ``model``."""
        _validate.text("EditRequest.prompt", self.prompt)
        _validate.text("EditRequest.subject", self.subject)
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise InterpEditError(
                f"subject {self.subject!r} is not in prompt {self.prompt!r}: "
                "use a template with '{}' or a prompt that contains the subject"
            )
        if self.template.count("{}") != 1:
            raise InterpEditError(f"prompt template {self.template!r} must contain one '{{}}'")
        try:
            self.text
        except (KeyError, IndexError, ValueError):
            raise InterpEditError(
                f"prompt template {self.template!r} has braces other than the one '{{}}' for "
                "the subject: write a literal brace as '{{' or '}}'") from None
        for name in ("target_new", "target_true"):
            value = getattr(self, name)
            if value is None and name == "target_true":
                continue
            if not isinstance(value, str) or not value.strip():
                raise InterpEditError(f"EditRequest.{name} is empty: give the answer text")
            model.target_ids(value)  # raises if it tokenizes to nothing
        if self.target_true is not None and (
                model.target_ids(self.target_new) == model.target_ids(self.target_true)):
            raise InterpEditError(f"target_new {self.target_new!r} is target_true "
                                  f"{self.target_true!r}: an edit must change the answer")
        model.subject_range(self.text, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def requests_from(items: Iterable[Any]) -> list[EditRequest]:
    """EditRequests from records that have ``prompt``, ``subject``, ``target_new`` and
    ``target_true`` attributes (e.g. evaluation records)."""
    return [EditRequest(i.prompt, i.subject, i.target_new, getattr(i, "target_true", None))
            for i in items]
