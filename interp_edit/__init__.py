"""interp_edit: locate facts in transformer language models (causal tracing), rewrite them
(ROME, MEND, IKE, fine-tuning), measure the edit, and draw what changed inside the model.

The public API is re-exported here; see README.md. Data files are passed as paths (IKE's
default demonstration pool is looked up in the folder named by ``INTERP_EDIT_DATA``); caches
live in the user cache directory (``INTERP_EDIT_CACHE``). Nothing is read from the source tree.

    import interp_edit as ie
    model = ie.load_model()                       # SmolLM2-135M-Instruct, offline, fp32
    r = ie.trace(model, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower")
    r.plot()
"""

from __future__ import annotations

import importlib

from interp_edit.errors import (
    CorruptFileError,
    HookNestingError,
    InterpEditError,
    ModelMismatchError,
    ModelNotAvailableError,
    SubjectNotFoundError,
)
from interp_edit.models import DEFAULT_MODEL, Model, load_model

__version__ = "0.1.0"

# Heavier parts are imported on first use, so `import interp_edit` stays fast.
_LAZY = {
    "trace": "interp_edit.tracing",
    "trace_all": "interp_edit.tracing",
    "TraceResult": "interp_edit.tracing",
    "AverageTrace": "interp_edit.tracing",
    "trace_dataset": "interp_edit.tracing",
    "locate": "interp_edit.tracing",
    "Location": "interp_edit.tracing",
    "load_known_facts": "interp_edit.evaluation",
    "EditRequest": "interp_edit.editing",
    "AppliedEdit": "interp_edit.editing",
    "edit": "interp_edit.editing",
    "load_edit": "interp_edit.editing",
    "evaluate": "interp_edit.evaluation",
    "load_counterfact": "interp_edit.evaluation",
    "load_zsre": "interp_edit.evaluation",
    "compare_activations": "interp_edit.analysis",
}

__all__ = [
    "CorruptFileError",
    "DEFAULT_MODEL",
    "HookNestingError",
    "InterpEditError",
    "Model",
    "ModelMismatchError",
    "ModelNotAvailableError",
    "SubjectNotFoundError",
    "load_model",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'interp_edit' has no attribute {name!r}")
