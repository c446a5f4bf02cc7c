"""Editors behind one entry point:
``edit(model, requests, method="rome"|"mend"|"ike"|"ft"|"ft-l")``."""

from interp_edit.editing.base import (
    AppliedEdit,
    EditRequest,
    available_methods,
    edit,
    load_edit,
    make_hparams,
    register_editor,
)

__all__ = [
    "AppliedEdit",
    "EditRequest",
    "available_methods",
    "edit",
    "load_edit",
    "make_hparams",
    "register_editor",
]
