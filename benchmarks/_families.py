"""``bench_trace.py --model``: the fast engine against the reference on any model, side by
side in one process (CPU seconds, one torch thread as the caller sets it).

``--model FAMILY`` builds the tiny random model of that family (:mod:`interp_edit.arch.tiny`,
6 layers x 128 wide, so the multiplies are not all overhead), ``--model tiny`` every family in
turn, ``default`` the default model, anything else is passed to ``ie.load_model`` (a path or
a name). A tiny model traces
its synthetic prompt with the subject at token 0 (as the default model's benchmark fact);
other models the given ``--prompt``/``--subject``.
"""

from __future__ import annotations

import time


import interp_edit as ie
from interp_edit.arch import adapter
from interp_edit.arch.stepper import Stepper
from interp_edit.arch.tiny import TINY_FAMILIES, tiny_model
from interp_edit.testing import _subjects

KINDS = ("resid", "mlp", "attn")


def cpu_seconds(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def models(spec: str, prompt: str, subject: str):
    """``(model, prompt, subject)`` for each model ``spec`` names."""
    if spec not in (*TINY_FAMILIES, "tiny"):
        yield ie.load_model(None if spec == "default" else spec), prompt, subject
        return
    tiny_subject = _subjects(16, 0)[0]
    for family in TINY_FAMILIES if spec == "tiny" else (spec,):
        yield (tiny_model(family, n_layers=6, d_model=128), f"{tiny_subject} lives in the city of",
               tiny_subject)


def side_by_side(spec: str, prompt: str, subject: str, samples: int) -> list[str]:
    """One row per model and kind: reference and fast CPU seconds, their ratio, the largest
    difference between the two grids."""
    lines = ["| model | family | fast path | kind | reference (s) | fast (s) | fast vs reference "
             "| max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for model, p, s in models(spec, prompt, subject):
        ad = adapter(model)
        kw = dict(samples=samples, progress=False)
        ie.trace(model, p, s, method="fast", **kw)  # warm-up: lazy imports, first allocations
        for kind in KINDS:
            ref, rc = cpu_seconds(lambda: ie.trace(model, p, s, kind=kind, method="reference",
                                                   **kw))
            fast, fc = cpu_seconds(lambda: ie.trace(model, p, s, kind=kind, method="fast", **kw))
            diff = float((fast.scores - ref.scores).abs().max())
            lines.append(f"| {model.name} | {ad.name} | {'yes' if Stepper.supports(model) else 'no'}"
                         f" | {kind} | {rc:.2f} | {fc:.2f} | {rc / fc:.1f}x | {diff:.1e} |")
            print(lines[-1], flush=True)
    return lines


