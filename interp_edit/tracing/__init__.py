"""Causal tracing (Meng et al. 2022): where in the network does the model recall a fact?

    import interp_edit as ie
    r = ie.trace(model, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    r.scores          # [n_tokens, n_layers]: p(target) with that cell restored
    s = ie.trace_all(model, prompt, subject)   # TraceSet: .resid, .mlp, .attn

Modules: ``noise`` (the corruption), ``reference`` (one pass per cell, the yardstick),
``engine`` (fast and exact), ``attribution`` (gradient estimate), ``results`` (result types),
``dataset`` (many facts, averaged), ``locate`` (which layer recalls these facts).
"""

from __future__ import annotations

import importlib

from interp_edit.tracing.api import trace, trace_all
from interp_edit.tracing.locate import Location, locate  # binds the name over the submodule
from interp_edit.tracing.results import TraceResult, TraceSet

__all__ = ["AverageTrace", "Location", "TraceResult", "TraceSet", "locate", "trace", "trace_all",
           "trace_dataset"]

_LAZY = {name: "interp_edit.tracing.dataset" for name in ("AverageTrace", "trace_dataset")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interp_edit.tracing' has no attribute {name!r}")
