"""Errors raised by interp_edit.

Every error is an :class:`InterpEditError` (a ``ValueError``) whose message says what was
wrong and how to fix it. Subclasses exist only where a caller may want to catch one case.
"""

from __future__ import annotations


class InterpEditError(ValueError):
    """Base class: a bad input or an impossible request, with a message saying what to do."""


class ModelNotAvailableError(InterpEditError):
    """The model cannot be loaded here (missing path, not cached while offline)."""


class SubjectNotFoundError(InterpEditError):
    """The subject string does not occur in the prompt (or not that many times)."""


class HookNestingError(InterpEditError):
    """Two hook contexts were opened on one hook point; the inner exit would drop the outer
    hooks."""


class ModelMismatchError(InterpEditError):
    """An artifact (edit, editor, statistics) was made for a different model."""


class CorruptFileError(InterpEditError):
    """A file (a saved edit, trace, report, editor, checkpoint) is damaged, truncated or of
    another kind; the message names it and says what to do."""
