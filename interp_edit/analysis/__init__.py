"""Analyses built on tracing and editing: what an edit changes inside the model
(:mod:`~interp_edit.analysis.activations`, :mod:`~interp_edit.analysis.logit_lens`) and
whether localization informs editing (:mod:`~interp_edit.analysis.localization`).

    diff = ie.compare_activations(model, edit, probe_prompts(request, paraphrase=p))
    diff.plot("curves")
"""

from interp_edit.analysis.activations import (
    PROMPT_KINDS,
    ActivationDiff,
    before_after,
    compare_activations,
    probe_prompts,
    trace_edit,
)
from interp_edit.analysis.logit_lens import lens_logits, lens_probs, target_lens

__all__ = [
    "PROMPT_KINDS",
    "ActivationDiff",
    "before_after",
    "compare_activations",
    "lens_logits",
    "lens_probs",
    "probe_prompts",
    "target_lens",
    "trace_edit",
]
