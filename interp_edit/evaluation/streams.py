"""Batch and sequential editing protocols: ``evaluate(..., batch_size=B, sequential=...)``.

The records that qualify (valid for the model, the model prefers ``target_true`` on the edit
prompt, and not the same fact, prompt and subject, as an earlier record) are cut, in order,
into batches of ``batch_size``; each batch is one ``edit(model, batch, method, **hparams)``
call (a method that takes one fact at a time, like ROME, applies the batch's facts one after
another inside that call).

- **batch** (``sequential=False``): each batch is edited, its records measured, and the edit
  undone; a row per record as in the one-at-a-time protocol (``pre_*`` and post metrics,
  unchanged top-1 on unrelated prompts), plus the batch index and the batch's edit time.
- **sequential** (``sequential=True``): batch after batch is applied without undo. After every
  ``every`` batches (and the last) a checkpoint measures efficacy, paraphrase and neighbourhood
  of *all* records edited so far, perplexity on a text (``perplexity_text``: e.g. WikiText-2),
  and with ``fluency`` ROME's n-gram entropy of generations; the checkpoints are
  ``report.info["curve"]``. Rows hold each record's metrics at the end of the stream. Then the
  whole stream is undone, newest first, and every parameter is compared bit for bit with its
  value before the stream (``info["undo_bit_exact"]``; a mismatch raises).

Resumable: with ``edits_dir`` each batch's edit is saved there as it is made; Ctrl-C returns
the report so far (``info["interrupted"]``), and ``resume=that_report`` re-applies the saved
edits of a sequential stream (bit for bit the weights the stream had) and goes on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from interp_edit import _validate
from interp_edit.editing.base import AppliedEdit, edit, load_edit
from interp_edit.errors import InterpEditError
from interp_edit.evaluation import metrics
from interp_edit.evaluation.records import EditRecord
from interp_edit.evaluation.report import EvalReport
from interp_edit.models import Model

log = logging.getLogger(__name__)
_CURVE = ("efficacy", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class StreamOptions:
    """How records become batches and what a sequential checkpoint measures."""

    batch_size: int
    sequential: bool = False
    every: int = 1  # sequential: a checkpoint after every this many batches (and the last)
    perplexity_text: str | None = None  # a text file (e.g. WikiText-2 test) for perplexity
    perplexity_tokens: int = 1024  # tokens of it scored (windows of 256 at most)
    fluency_prompts: int = 5  # generation prompts of the first records, for n-gram entropy
    edits_dir: str | None = None  # save each batch's edit here (needed to resume a stream)

    def __post_init__(self) -> None:
        _validate.fields(self, counts=("batch_size", "every"))
        object.__setattr__(self, "perplexity_tokens", _validate.count(
            "perplexity_tokens", self.perplexity_tokens, 2))
        object.__setattr__(self, "fluency_prompts", _validate.count(
            "fluency_prompts", self.fluency_prompts, 0))
        if not isinstance(self.sequential, bool):
            raise InterpEditError(f"sequential must be True or False, not {self.sequential!r}")
        if self.perplexity_text is not None and not Path(self.perplexity_text).is_file():
            raise InterpEditError(f"perplexity_text {self.perplexity_text!r} is not a file")

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the report it resumes."""
        return {"batch_size": self.batch_size, "sequential": self.sequential,
                "every": self.every, "perplexity_text": self.perplexity_text,
                "perplexity_tokens": self.perplexity_tokens}


def select(model: Model, records: Sequence[EditRecord], n: int | None,
           skip_reason) -> tuple[list[tuple[EditRecord, dict]], list[dict[str, Any]]]:
    """The first ``n`` qualifying records with their pre-edit metrics, and the skipped ones."""
    chosen, skipped, facts = [], [], set()
    for rec in records:
        if n is not None and len(chosen) >= n:
            break
        why = skip_reason(model, rec)
        fact = (rec.request.template, rec.subject)
        if why is None and fact in facts:
            why = ("duplicate", "the same prompt and subject as an earlier record")
        pre = metrics.measure(model, rec) if why is None else None
        if pre is not None and pre["efficacy"] > 0:
            why = ("unknown", "the model does not prefer target_true to target_new")
        if why is not None:
            skipped.append({"case_id": rec.case_id, "kind": why[0], "reason": why[1]})
            continue
        facts.add(fact)
        chosen.append((rec, pre))
    return chosen, skipped


def run_stream(model: Model, chosen: list[tuple[EditRecord, dict]], method: str,
               hparams: dict[str, Any], opts: StreamOptions, pool: list[tuple[str, str]],
               pool_top1: list[int], fluency_tokens: int, seed: int,
               resume: EvalReport | None) -> tuple[list[dict], dict[str, Any]]:
    """The rows and the protocol's info (see the module docstring)."""
    batches = [chosen[i:i + opts.batch_size] for i in range(0, len(chosen), opts.batch_size)]
    done = int(resume.info.get("batches_done", 0)) if resume is not None else 0
    rows = list(resume.rows) if resume is not None else []
    curve = list(resume.info.get("curve", [])) if resume is not None else []
    edits = list(resume.info.get("edit_info", [])) if resume is not None else []
    run = _Stream(model, opts, fluency_tokens, chosen)
    before = {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}
    applied: list[AppliedEdit] = []
    interrupted = False
    try:
        if opts.sequential:
            applied += run.reapply(done)
            if not curve:
                curve.append(run.checkpoint(0, 0.0))
        for b in range(done, len(batches)):
            batch = batches[b]
            torch.manual_seed(seed + b)
            t0 = time.perf_counter()
            e = edit(model, [r.request for r, _ in batch], method, **hparams)
            seconds = time.perf_counter() - t0
            run.save(e, b)
            edits.append(edit_summary(e, b, seconds))
            if opts.sequential:
                applied.append(e)
                if (b + 1) % opts.every == 0 or b == len(batches) - 1:
                    curve.append(run.checkpoint(b + 1, seconds))
                if b == len(batches) - 1:
                    rows = [_row(rec, pre, metrics.measure(model, rec), i // opts.batch_size)
                            for i, (rec, pre) in enumerate(chosen)]
            else:
                try:
                    subjects = {r.subject for r, _ in batch}
                    unrelated = [(p, t) for (s, p), t in zip(pool, pool_top1) if s not in subjects]
                    # the same prompts for every record of the batch: measured once
                    kept = metrics.unchanged_top1(
                        model, [p for p, _ in unrelated], [t for _, t in unrelated], e)
                    for rec, pre in batch:
                        post = {**metrics.measure(model, rec, e), "unchanged_top1": kept}
                        rows.append({**_row(rec, pre, post, b), "seconds": seconds / len(batch),
                                     "batch_seconds": seconds})
                finally:
                    e.undo()
            done = b + 1
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted after %d of %d batches", done, len(batches))
    finally:
        for e in reversed(applied):
            e.undo()
    exact = all(torch.equal(before[k], v) for k, v in model.hf_model.named_parameters())
    if not exact:
        raise InterpEditError("undoing the stream did not restore the weights bit for bit")
    info = {"protocol": "sequential" if opts.sequential else "batch", **opts.settings(),
            "batches": len(batches), "batches_done": done, "interrupted": interrupted,
            "undo_bit_exact": exact, "edits_dir": opts.edits_dir, "edit_info": edits}
    if opts.sequential:
        info["curve"] = curve
    return rows, info


def edit_summary(e: AppliedEdit, batch: int, seconds: float) -> dict[str, Any]:
    """What a batch's edit recorded about itself, small enough for a report: its scalar
    details (MEMIT's ``target_reached``, ROME's ``layer``), the layer range and why, and the
    editor's timings."""
    info = {k: v for k, v in e.info.items() if isinstance(v, (bool, int, float, str))}
    for key in ("layers", "timings", "resid_norm"):
        if key in e.info:
            info[key] = e.info[key]
    return {"batch": batch, "seconds": round(seconds, 2), **info}


def _row(rec: EditRecord, pre: dict, post: dict, batch: int) -> dict[str, Any]:
    return {"case_id": rec.case_id, "subject": rec.subject, "target_true": rec.target_true,
            "target_new": rec.target_new, "source": rec.source, "batch": batch,
            **{"pre_" + k: v for k, v in pre.items()}, **post}


class _Stream:
    """A sequential stream's checkpoints, saved edits and their re-application."""

    def __init__(self, model: Model, opts: StreamOptions, fluency_tokens: int,
                 chosen: list[tuple[EditRecord, dict]]) -> None:
        self.model, self.opts, self.chosen = model, opts, chosen
        self.fluency_tokens = fluency_tokens
        self.text_ids = None
        if opts.perplexity_text is not None:
            text = Path(opts.perplexity_text).read_text(encoding="utf-8", errors="replace")
            ids = model.tokenizer(text[: 20 * opts.perplexity_tokens],
                                  add_special_tokens=False)["input_ids"]
            self.text_ids = torch.tensor(ids[: opts.perplexity_tokens])
        gen = [p for rec, _ in chosen[: opts.fluency_prompts]
               for p in (rec.generation_prompts or (rec.text,))[:1]]
        self.gen = gen if fluency_tokens else []

    def checkpoint(self, n_batches: int, seconds: float) -> dict[str, Any]:
        """Means over every record edited so far, perplexity and fluency, now."""
        upto = min(n_batches * self.opts.batch_size, len(self.chosen))
        point: dict[str, Any] = {"batches": n_batches, "edits": upto,
                                 "batch_seconds": round(seconds, 2)}
        scores = [metrics.measure(self.model, rec, None, _CURVE) for rec, _ in self.chosen[:upto]]
        for name in _CURVE:
            vals = [s[name] for s in scores if s.get(name) is not None]
            point[name] = sum(vals) / len(vals) if vals else None
        if self.text_ids is not None:
            point["perplexity"] = perplexity(self.model, self.text_ids)
        if self.gen:
            point["fluency"] = metrics.fluency(self.model, self.gen, None, self.fluency_tokens)
        log.info("checkpoint %s", point)
        return point

    def _path(self, b: int) -> Path | None:
        return None if self.opts.edits_dir is None else Path(self.opts.edits_dir) / f"batch_{b:04d}.safetensors"

    def save(self, e: AppliedEdit, b: int) -> None:
        path = self._path(b)
        if path is not None:
            e.save(path)  # atomic: a stream stopped half way leaves no half-written batch

    def reapply(self, n: int) -> list[AppliedEdit]:
        """The first ``n`` saved edits, applied again in order (a resumed stream)."""
        if n and self.opts.edits_dir is None:
            raise InterpEditError("resuming a sequential stream needs edits_dir, where its "
                                  "batches' edits were saved")
        out = []
        for b in range(n):
            path = self._path(b)
            if not path.exists():
                raise InterpEditError(f"cannot resume: {path} (batch {b}'s edit) is missing")
            out.append(load_edit(path).apply(self.model))
        return out


@torch.no_grad()
def perplexity(model: Model, ids: torch.Tensor, window: int = 256) -> float:
    """exp of the mean next-token NLL of ``ids``, scored in windows of ``window`` tokens (at
    most the model's context)."""
    window = min(window, model.n_ctx - 1)
    total, count = 0.0, 0
    for lo in range(0, len(ids) - 1, window):
        chunk = ids[lo: lo + window + 1].to(model.device)
        if len(chunk) < 2:
            break
        logp = model.logits(chunk[None]).float().log_softmax(-1)[0, :-1]
        total -= float(logp.gather(-1, chunk[1:, None]).sum())
        count += len(chunk) - 1
    return math.exp(total / count)

