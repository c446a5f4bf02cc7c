"""Edit metrics: one definition each, shared by every editor.

Every measurement takes an ``edit`` (an :class:`AppliedEdit`, or ``None`` for the model as it is)
and scores ``edit.wrap(prompt)``: weight editors leave prompts alone, in-context editors (IKE)
prepend their context, so "the model after the edit" is measured by the same code for all.

Scoring a target (:func:`score_targets`, one batched teacher-forced pass):

- ``logprob``: the mean over target tokens of log p(token | prompt, previous target tokens).
  This is ROME's evaluation (``test_batch_prediction`` divides the summed NLL by the target's
  length); its sum equals ``Model.target_logprobs``. ``prob = exp(logprob)``.
- ``first_prob``: p(first target token | prompt), as ``Model.next_token_probs``.
- ``token_acc``: the fraction of target tokens that are the argmax, teacher-forced (EasyEdit's
  accuracy).

The metrics of one record (:func:`measure`; keys of the returned dict):

- ``efficacy``: 1 if p(new) > p(true) on the edit prompt; ``efficacy_gap`` = p(new) - p(true);
  ``efficacy_first`` compares first-token probabilities instead.
- ``paraphrase`` (+ ``_gap``, ``_first``): the same, averaged over paraphrase prompts.
- ``neighborhood`` (+ ``_gap``, ``_first``): the fraction of neighbour prompts where
  p(neighbour's true answer) > p(new); the gap is p(true) - p(new).
- ``reverse`` / ``portability`` (probes ``(prompt, answer, answer_before)``, see
  ``probe_builder.py``): the teacher-forced token accuracy of the answer after the edit;
  ``reverse_gap`` / ``portability_gap``: p(answer) - p(answer_before), averaged over probes
  (how far the question moved from the old answer to the new one, also when the accuracy is 0
  on both sides, as it often is on a small model).

Outside a record: :func:`unchanged_top1` (the share of unrelated prompts whose top-1 next token
is unchanged by the edit) and :func:`fluency` (ROME's weighted bi/tri-gram entropy of greedy
generations, :func:`ngram_entropy`). A metric with no probes in a record is ``None``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.arch import prefix
from interp_edit.errors import InterpEditError
from interp_edit.models import Model

if TYPE_CHECKING:
    from interp_edit.editing.base import AppliedEdit
    from interp_edit.evaluation.records import EditRecord

# padded tokens per forward pass: bounds the [batch, pos, d_vocab] logits (~200 MB at 49k vocab)
_TOKENS_PER_BATCH = 1024


def wrap(edit: "AppliedEdit | None", prompt: str) -> str:
    """The prompt as the edited model sees it (unchanged when ``edit`` is None)."""
    return prompt if edit is None else edit.wrap(prompt)


# ---- scoring targets ------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetScores:
    """Scores of (prompt, target) pairs; see the module docstring."""

    logprob: Float[Tensor, "n"]
    first_prob: Float[Tensor, "n"]
    token_acc: Float[Tensor, "n"]

    @property
    def prob(self) -> Float[Tensor, "n"]:
        return self.logprob.exp()

    def __len__(self) -> int:
        return len(self.logprob)

    def __getitem__(self, idx: slice) -> "TargetScores":
        return TargetScores(self.logprob[idx], self.first_prob[idx], self.token_acc[idx])


@torch.no_grad()
def score_targets(
    model: Model,
    prompts: Sequence[str],
    targets: Sequence[str],
    edit: "AppliedEdit | None" = None,
) -> TargetScores:
    """Teacher-forced scores of each target after its (wrapped) prompt, in batched passes."""
    if len(prompts) != len(targets):
        raise InterpEditError(f"{len(prompts)} prompts but {len(targets)} targets")
    seqs, spans = [], []
    for p, t in zip(prompts, targets):
        pid, tid = model.tokenize(wrap(edit, p)).tolist(), model.target_ids(t)
        seqs.append(pid + tid)
        spans.append((len(pid), len(tid)))
    out = torch.zeros(3, len(seqs))  # rows: mean logprob, first-token prob, token accuracy
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad less
    # a prefix every sequence shares (an in-context edit's) is run once per batch
    # (Model.logits): batches are sized by the tokens after it, and only the positions that
    # predict targets are unembedded, which bounds the logits as the padded tokens did
    shared = prefix.split_sequences(model, seqs)
    for chunk in _chunks(order, [len(s) - shared for s in seqs]):
        ids, _ = model.batch_ids([seqs[i] for i in chunk])
        wanted = [torch.arange(spans[i][0] - 1, sum(spans[i]) - 1) for i in chunk]
        columns = torch.unique(torch.cat(wanted))  # sorted
        logits = model.logits(ids, columns)  # [batch, columns, d_vocab]
        for row, i in enumerate(chunk):
            start, n = spans[i]
            pos = torch.searchsorted(columns, wanted[row]).to(ids.device)
            logp = logits[row, pos].float().log_softmax(-1)  # [n, d_vocab]
            tgt = ids[row, start : start + n]
            tok_logp = logp.gather(-1, tgt[:, None])[:, 0]
            out[0, i] = tok_logp.mean()
            out[1, i] = tok_logp[0].exp()
            out[2, i] = (logp.argmax(-1) == tgt).float().mean()
    return TargetScores(out[0], out[1], out[2])


def _chunks(order: list[int], lengths: list[int]) -> list[list[int]]:
    """Split indices (sorted by length) into batches of at most ~_TOKENS_PER_BATCH padded tokens."""
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= _TOKENS_PER_BATCH:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


# ---- the record metrics -----------------------------------------------------------------------
def _contrast(s: TargetScores) -> dict[str, float]:
    """Pairs laid out (preferred, other) alternately: does the preferred target win?"""
    a, b = s[0::2], s[1::2]
    return {
        "": _mean(a.logprob > b.logprob),
        "_gap": _mean(a.prob - b.prob),
        "_first": _mean(a.first_prob > b.first_prob),
    }


def _recall(s: TargetScores) -> dict[str, float]:
    """Pairs laid out (answer, answer before the edit) alternately: is the answer produced
    (token accuracy), and how much likelier is it than the old one?"""
    a, b = s[0::2], s[1::2]
    return {"": _mean(a.token_acc), "_gap": _mean(a.prob - b.prob)}


def _probe_pairs(probes) -> list[tuple[str, str]]:
    return [x for p, new, old in probes for x in ((p, new), (p, old))]


def _efficacy_pairs(r: "EditRecord") -> list[tuple[str, str]]:
    return [(r.text, r.target_new), (r.text, r.target_true)]


def _paraphrase_pairs(r: "EditRecord") -> list[tuple[str, str]]:
    return [x for p in r.paraphrases for x in ((p, r.target_new), (p, r.target_true))]


def _neighborhood_pairs(r: "EditRecord") -> list[tuple[str, str]]:
    return [x for p, true in r.neighborhood for x in ((p, true), (p, r.target_new))]


@dataclass(frozen=True)
class _Metric:
    pairs: Callable[["EditRecord"], list[tuple[str, str]]]  # (prompt, target) pairs to score
    reduce: Callable[[TargetScores], dict[str, float]]  # their scores -> {suffix: value}
    suffixes: tuple[str, ...]


_CONTRAST = ("", "_gap", "_first")
METRICS: dict[str, _Metric] = {
    "efficacy": _Metric(_efficacy_pairs, _contrast, _CONTRAST),
    "paraphrase": _Metric(_paraphrase_pairs, _contrast, _CONTRAST),
    "neighborhood": _Metric(_neighborhood_pairs, _contrast, _CONTRAST),
    "reverse": _Metric(lambda r: _probe_pairs(r.reverse), _recall, ("", "_gap")),
    "portability": _Metric(lambda r: _probe_pairs(r.portability), _recall, ("", "_gap")),
}


def measure(
    model: Model,
    record: "EditRecord",
    edit: "AppliedEdit | None" = None,
    metrics: Sequence[str] = tuple(METRICS),
) -> dict[str, float | None]:
    """The probability metrics of one record, from one batched pass over all its probes."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise InterpEditError(f"unknown metrics {unknown}; available: {sorted(METRICS)}")
    pairs = {name: METRICS[name].pairs(record) for name in metrics}
    flat = [x for name in metrics for x in pairs[name]]
    scores = score_targets(model, [p for p, _ in flat], [t for _, t in flat], edit)
    out: dict[str, float | None] = {}
    start = 0
    for name in metrics:
        n = len(pairs[name])
        if n:
            for suffix, value in METRICS[name].reduce(scores[start : start + n]).items():
                out[name + suffix] = value
        else:
            out.update({name + suffix: None for suffix in METRICS[name].suffixes})
        start += n
    return out


def efficacy(model: Model, record: "EditRecord", edit: "AppliedEdit | None" = None) -> dict:
    """``efficacy``, ``efficacy_gap``, ``efficacy_first`` of one record."""
    return measure(model, record, edit, ("efficacy",))


def paraphrase_score(model: Model, record: "EditRecord", edit: "AppliedEdit | None" = None) -> dict:
    return measure(model, record, edit, ("paraphrase",))


def neighborhood_score(
    model: Model, record: "EditRecord", edit: "AppliedEdit | None" = None
) -> dict:
    return measure(model, record, edit, ("neighborhood",))


def reverse_score(model: Model, record: "EditRecord", edit: "AppliedEdit | None" = None) -> dict:
    return measure(model, record, edit, ("reverse",))


def portability_score(
    model: Model, record: "EditRecord", edit: "AppliedEdit | None" = None
) -> dict:
    return measure(model, record, edit, ("portability",))


# ---- outside a record: unrelated prompts and fluency -------------------------------------------
@torch.no_grad()
def top1(model: Model, prompts: Sequence[str], edit: "AppliedEdit | None" = None) -> list[int]:
    """The argmax next token of each (wrapped) prompt."""
    out: list[int] = []
    for i in range(0, len(prompts), 32):
        out += model.last_logits([wrap(edit, p) for p in prompts[i : i + 32]]).argmax(-1).tolist()
    return out


def unchanged_top1(
    model: Model,
    prompts: Sequence[str],
    before: Sequence[int],
    edit: "AppliedEdit | None" = None,
) -> float | None:
    """The share of ``prompts`` whose top-1 next token is still ``before`` (from :func:`top1`
    on the unedited model). ``None`` when there are no prompts."""
    if len(prompts) != len(before):
        raise InterpEditError(f"{len(prompts)} prompts but {len(before)} reference tokens")
    if not prompts:
        return None
    after = top1(model, prompts, edit)
    return sum(a == b for a, b in zip(after, before)) / len(prompts)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency measure of one text: the weighted mean of its n-gram entropies (bits).

    Words and punctuation are split by a regex (ROME uses nltk.word_tokenize); a text with
    fewer than n words has entropy 0 for that n. Repetitive text scores low.
    """
    words = _WORD.findall(text)
    ents = []
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        ents.append(w * h)
    return sum(ents) / len(ents)


def fluency(
    model: Model,
    prompts: Sequence[str],
    edit: "AppliedEdit | None" = None,
    max_new_tokens: int = 40,
) -> float | None:
    """Mean :func:`ngram_entropy` of prompt + greedy continuation, over ``prompts``."""
    if not prompts:
        return None
    texts = [p + model.generate(wrap(edit, p), max_new_tokens) for p in prompts]
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def _mean(x: Tensor) -> float:
    return float(x.float().mean())
