"""Causal tracing over a dataset of facts, resumably, averaged into an :class:`AverageTrace`.

    facts = ie.load_known_facts("../shared/data/known_1000.json")
    avg = ie.trace_dataset(model, facts, kinds="all", sever=True, limit=100)
    avg.plot(); avg.plot_severed(); avg.peak("mlp")

What it does, in order (following kmeng01/rome ``experiments/causal_trace.py``):

1. ``noise="sK"``: K x the std of the token embeddings of *all* the set's subjects (ROME's
   ``collect_embedding_std`` over known_1000), measured before ``limit`` applies, so a
   quick run and a full run use the same noise and share cached traces. This differs on
   purpose from a single :func:`~interp_edit.tracing.api.trace`, whose ``"sK"`` is measured
   over a fixed built-in subject list (:data:`~interp_edit.tracing.noise.REFERENCE_SUBJECTS`)
   so that one fact's trace does not depend on what it is traced with. Every result says
   which: ``AverageTrace.noise_source`` and each cached fact's ``TraceResult.noise_source``
   name the list ("over the dataset's N subjects" here, "built-in reference subjects" there).
2. Keeps the facts whose target (``fact.attribute``, scored by its first token) is the
   model's top-1 next token, and reports how many it kept.
3. Traces every kept fact under every condition (kind, severed path, method), saving each
   result as its own ``.npz`` under ``cache_dir`` (default: the user cache), keyed by the
   model's fingerprint and the settings. A rerun, or a run after an interruption, loads those
   files and traces only what is missing.
4. Averages the indirect effects per token group (see :mod:`interp_edit.tracing.average`).

``method="attribution"`` screens the whole set with the gradient estimate;
``exact_sample=N`` adds the exact (``"fast"``) trace of a seeded random sample of N kept facts,
so the two can be compared in one AverageTrace.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import sys
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp_edit import _cache, _files, _validate
from interp_edit.errors import InterpEditError, SubjectNotFoundError
from interp_edit.models import Model
from interp_edit.tracing import noise as _noise
from interp_edit.tracing.api import trace
from interp_edit.tracing.inputs import check_fact, check_options, screen_precision
from interp_edit.tracing.average import (
    GROUPS,
    KINDS,
    AverageTrace,
    Condition,
    fact_file,
    group_effects,
)
from interp_edit.tracing.results import TraceResult

__all__ = ["AverageTrace", "Condition", "predicted_facts", "trace_dataset"]

log = logging.getLogger(__name__)


class Fact(Protocol):
    """Anything with these attributes can be traced: a KnownFact, a SyntheticFact, ..."""

    prompt: str
    subject: str
    attribute: str


def trace_dataset(
    model: Model,
    facts: Iterable[Fact],
    kinds: Sequence[str] | str = KINDS,
    *,
    samples: int = 10,
    noise: str | float = "s3",
    window: int = 10,
    seed: int = 1,
    method: str = "fast",
    precision: str = "auto",
    estimate: str = "logodds",
    sever: bool = False,
    limit: int | None = None,
    exact_sample: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 32,
) -> AverageTrace:
    """Trace the facts the model knows and average their indirect effects per token group.

    ``kinds``: any of ``"resid"``, ``"mlp"``, ``"attn"`` (or ``"all"``). ``sever=True`` adds
    the hidden-state traces with the MLP and with the attention path severed (ROME Fig. 3),
    computed at the last subject token only (other groups are NaN for those conditions).
    ``limit`` keeps the first ``limit`` facts. ``precision`` (``method="attribution"`` only:
    ``"auto"``, the default, screens with bf16 multiplies where the hardware has them,
    ``"bfloat16"`` always, ``"model"`` in the model's dtype; see :func:`trace`) is resolved
    once and is part of each cached trace's name, so an fp32 and a bf16 screen never reuse
    each other's files; so is ``estimate`` (``"logodds"`` or ``"prob"``, how the screen scores
    cells, see :func:`trace`).
    Other arguments are passed to :func:`trace`.
    """
    _validate.instance("model", model, Model)
    facts = _validate.items("facts", facts)
    _check_facts(facts)
    check_fact("-", "-", None, samples, seed)  # (the facts' own text was checked above)
    limit = _validate.optional_count("limit", limit)
    exact_sample = _validate.optional_count("exact_sample", exact_sample, 0)
    batch_size = _validate.count("batch_size", batch_size)
    if not isinstance(sever, bool):
        raise InterpEditError(f"sever must be True or False, not {sever!r}")
    kinds = KINDS if kinds == "all" else (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if bad := [k for k in kinds if k not in KINDS]:
        raise InterpEditError(f"unknown kinds {bad}: choose from {KINDS} or 'all'")
    check_options(kinds, method, window, None, precision, estimate)
    ran = screen_precision(model, method, precision)  # what the traces run (a cache key)
    if exact_sample and method != "attribution":
        raise InterpEditError("exact_sample adds an exact pass to method='attribution'; "
                              f"with method={method!r} every fact is already traced exactly")
    std, source = dataset_noise(model, noise, [f.subject for f in facts])
    candidates = facts if limit is None else facts[:limit]
    kept, high = predicted_facts(model, candidates, batch_size=batch_size)
    _say(progress, f"tracing {len(kept)} of {len(candidates)} facts: those whose target is "
                   f"the model's top-1 prediction")
    if not kept:
        raise InterpEditError("the model predicts none of these facts' targets top-1: "
                              "nothing to trace (check the targets, or raise limit)")

    # the weights in use (with any applied edit): an edited model never reuses, nor leaves
    # behind, traces of the unedited one
    settings = dict(model=model.weights_key, noise_std=repr(std), samples=samples,
                    window=window, seed=seed)
    root = Path(cache_dir) if cache_dir is not None else _cache.cache_dir("traces")
    model_slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name)
    trace_dir = root / f"{model_slug}-{_cache.stable_hash(settings)}"
    trace_dir.mkdir(parents=True, exist_ok=True)

    conditions = _conditions(kinds, sever, method, ran, estimate)
    jobs = [(i, c) for i in range(len(kept)) for c in conditions]
    if exact_sample:
        sample = sorted(random.Random(seed).sample(range(len(kept)), min(exact_sample, len(kept))))
        exact = _conditions(kinds, sever, "fast")
        conditions += exact
        jobs += [(i, c) for i in sample for c in exact]

    def path_of(i: int, c: Condition) -> Path:
        f = kept[i]
        return trace_dir / fact_file(f.prompt, f.subject, f.attribute, c)

    expect = dict(window=window, samples=samples, seed=seed, noise_std=std,
                  model_name=model.name, n_layers=model.n_layers)
    done = {(i, c): r for i, c in jobs
            if (r := _cached(path_of(i, c), kept[i], c, expect)) is not None}
    todo = [(i, c) for i, c in jobs if (i, c) not in done]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="trace", desc="tracing",
               disable=not progress, dynamic_ncols=True)
    with bar:
        for i, c in todo:
            f = kept[i]
            bar.set_postfix_str(f"{c.slug}: {f.subject[:24]}", refresh=False)
            # a severed trace is only read at the last subject token (ROME Fig. 3)
            last_subject = [model.subject_range(f.prompt, f.subject)[1] - 1] if c.sever else None
            r = trace(model, f.prompt, f.subject, target=f.attribute, kind=c.kind,
                      window=window, samples=samples, noise=std, seed=seed, method=c.method,
                      precision=c.precision, estimate=c.estimate or "logodds", sever=c.sever,
                      positions=last_subject, progress=False)
            # the trace saw a float std: record where it came from (the dataset's subjects)
            done[i, c] = dataclasses.replace(r, noise_source=source)
            _save_atomic(done[i, c], path_of(i, c))
            bar.update()

    effects, lows = [], []
    for c in conditions:
        e, low = _collect([done.get((i, c)) for i in range(len(kept))], model.n_layers)
        effects.append(e)
        lows.append(low)
    return AverageTrace(
        conditions=tuple(conditions), effects=tuple(effects), low_scores=tuple(lows),
        high_scores=high, prompts=tuple(f.prompt for f in kept),
        subjects=tuple(f.subject for f in kept), targets=tuple(f.attribute for f in kept),
        n_candidates=len(candidates), model_name=model.name, noise_std=std, window=window,
        samples=samples, seed=seed, noise_source=source, trace_dir=str(trace_dir),
    )


def dataset_noise(model: Model, noise: str | float, subjects: Sequence[str]) -> tuple[float, str]:
    """The noise std for a dataset: ``"sK"`` is K x the embedding std of its subjects."""
    if isinstance(noise, str):
        k = _noise.spec_multiplier(noise)
        if k is None:
            raise InterpEditError(f"unknown noise {noise!r}: use 'sK' (e.g. 's3') or a float std")
        std = k * _noise.embedding_std(model, subjects)
        return std, (f"{k:g} x std of subject-token embeddings over the "
                     f"dataset's {len(subjects)} subjects")
    if isinstance(noise, (int, float)) and not isinstance(noise, bool):
        return _validate.number("the noise std", noise, 0.0), "fixed std"
    raise InterpEditError(f"a dataset trace takes noise='sK' or a float std >= 0, not {noise!r}")


@torch.no_grad()
def predicted_facts(
    model: Model, facts: Sequence[Fact], *, batch_size: int = 32
) -> tuple[list[Fact], Float[Tensor, "kept"]]:
    """The facts whose target's first token is the model's top-1 next token, and its
    clean probability. Facts whose subject is not in the prompt are skipped with a warning."""
    usable = []
    for f in facts:
        try:
            model.subject_range(f.prompt, f.subject)
            usable.append(f)
        except SubjectNotFoundError:
            log.warning("skipping %r: subject %r not in the prompt", f.prompt, f.subject)
    kept, probs = [], []
    for start in range(0, len(usable), batch_size):
        chunk = usable[start : start + batch_size]
        p = model.last_logits([f.prompt for f in chunk]).softmax(-1)
        first = torch.tensor([model.target_ids(f.attribute)[0] for f in chunk], device=p.device)
        hit = p.argmax(-1) == first
        kept += [f for f, h in zip(chunk, hit) if h]
        probs.append(p[torch.arange(len(chunk)), first][hit].double().cpu())
    return kept, torch.cat(probs) if probs else torch.zeros(0, dtype=torch.float64)


def _conditions(kinds: Sequence[str], sever: bool, method: str, precision: str = "model",
                estimate: str = "logodds") -> list[Condition]:
    est = estimate if method == "attribution" else None
    conds = [Condition(k, None, method, precision, est) for k in kinds]
    if sever:
        conds += [Condition("resid", s, method, precision, est) for s in ("mlp", "attn")]
    return conds


def _collect(
    results: Sequence[TraceResult | None], n_layers: int
) -> tuple[Float[Tensor, "fact group layer"], Float[Tensor, "fact"]]:
    """Group effects and corrupted scores of the traces; NaN for facts not traced."""
    effects = torch.full((len(results), len(GROUPS), n_layers), float("nan"),
                         dtype=torch.float64)
    low = torch.full((len(results),), float("nan"), dtype=torch.float64)
    for i, r in enumerate(results):
        if r is not None:
            effects[i] = group_effects(r.indirect_effect, r.subject_range)
            low[i] = r.low_score
    return effects, low


def _cached(path: Path, fact: Fact, c: Condition, expect: dict) -> TraceResult | None:
    """The cached trace at ``path`` if it is this fact's, traced under this condition and
    these settings; ``None`` (traced again, with a warning) when it is missing, unreadable
    (then removed) or another trace (a file copied or renamed into the cache must not be
    averaged in)."""
    r = _files.load_cached(path, TraceResult.load)
    if r is None:
        return None
    found = dict(prompt=r.prompt, subject=r.subject, target=r.target, kind=r.kind,
                 sever=r.sever, method=r.method, precision=r.precision, estimate=r.estimate,
                 window=r.window, samples=r.samples, seed=r.seed, noise_std=r.noise_std,
                 model_name=r.model_name, n_layers=r.n_layers)
    want = dict(prompt=fact.prompt, subject=fact.subject, target=fact.attribute, kind=c.kind,
                sever=c.sever, method=c.method, precision=c.precision, estimate=c.estimate,
                **expect)
    differ = [k for k in want if found[k] != want[k]]
    if not differ and len(r.token_ids) == r.n_tokens:
        return r
    log.warning("%s is not the trace of %r under %s (it differs in %s): tracing again", path,
                fact.prompt, c.slug, ", ".join(differ) or "its grid's size")
    return None


def _save_atomic(result: TraceResult, path: Path) -> None:
    """An interrupted run leaves no partial file (``TraceResult.save`` is atomic)."""
    result.save(path)


def _check_facts(facts: Sequence[object]) -> None:
    for i, f in enumerate(facts):
        missing = [a for a in ("prompt", "subject", "attribute") if not hasattr(f, a)]
        if missing:
            raise InterpEditError(
                f"a fact needs .prompt, .subject and .attribute; {type(f).__name__} lacks "
                f"{missing} (use ie.load_known_facts, or any object with those attributes)"
            )
        for a in ("prompt", "subject", "attribute"):
            _validate.text(f"fact {i}'s {a}", getattr(f, a))


def _say(progress: bool, message: str) -> None:
    log.info(message)
    if progress:
        tqdm.write(message, file=sys.stderr)
