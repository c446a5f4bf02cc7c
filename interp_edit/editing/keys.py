"""Keys of a fact, shared by the locate-then-edit methods (ROME now; MEND and FT can reuse it).

A *key* is the input of an MLP's output projection (``mlp_key_hook(layer)``, ``d_mlp`` wide)
at the subject's last token. ROME's k* is the mean key over the edit prompt and a few short
*context prefixes* sampled from the model itself ("The city was ... . {}"), so the edit holds
whatever text precedes the subject (Meng et al. 2022, §3.1).

- :func:`sample_token_ids`: seeded top-k sampling from the model (prefixes, generated corpora);
- :func:`context_templates`: ``("{}", "<prefix>. {}", ...)``, cached per model on disk;
- :func:`encode_facts`: tokenized prompts with the subject's last token and target positions;
- :func:`at_subject_last`: any activations at the subject's last token, a bounded number of
  rows per forward pass;
- :func:`subject_keys` / :func:`key_star` / :func:`keys_star`: the keys at the subject's last
  token and their mean over the contexts, for one fact or for a batch of facts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp_edit import _files
from interp_edit._cache import cache_dir
from interp_edit.arch import adapter
from interp_edit.arch.stepper import Stepper
from interp_edit.hooks import capture, hooked
from interp_edit.models import Model, mlp_key_hook

# Sentence starters for sampled text (as in MEMIT's context templates).
STARTERS = ("The", "Therefore", "Because", "I", "You")
_TEMPLATES: dict[tuple, tuple[str, ...]] = {}  # in-memory cache of context_templates


@torch.no_grad()
def sample_token_ids(
    model: Model, n: int, length: int, *, seed: int = 0, top_k: int = 5, exact: bool = False,
    batch_size: int = 64, starters: Sequence[str] = STARTERS, progress: bool | None = False,
) -> list[list[int]]:
    """``n`` token sequences sampled from the model, each opened by one of ``starters`` in
    turn and continued by ``length`` new tokens (``exact``: never stop at the end-of-text
    token; otherwise a sequence ends there). Generation starts after a document-start token
    (see :func:`document_start`), which the returned rows omit.

    The promise: plain top-k sampling at temperature 1 from the model's own next-token
    distribution (:func:`_draw`; none of the model's generation-config settings apply),
    seeded, with the global RNG state left untouched. Models the layer stepper runs
    (:class:`~interp_edit.arch.stepper.Stepper`) decode on it with a key/value cache; every other model on :func:`_sample_by_recompute`,
    the project's reference (one full forward pass per new token). Both make the same RNG
    calls, so they draw the same tokens up to float rounding of the scores. Neither depends
    on Hugging Face ``generate``, whose sampling internals change between releases."""
    from tqdm.auto import tqdm

    devices = [model.device] if model.device.type == "cuda" else []
    eos = model.tokenizer.eos_token_id
    banned = _eos_ids(model) if exact else []
    doc = document_start(model)
    jobs = []  # (starter index, rows): starters take turns, at most batch_size rows a call
    for i in range(len(starters)):
        count = n // len(starters) + (i < n % len(starters))
        jobs += [(i, min(batch_size, count - lo)) for lo in range(0, count, batch_size)]
    out: list[list[int]] = []
    for j, (i, rows) in enumerate(tqdm(jobs, desc="sampling text", disable=not progress)):
        ids = torch.tensor([doc + model.tokenize(starters[i]).tolist()] * rows, device=model.device)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 100_003 + j)
            if Stepper.supports(model):  # the weights only: bridge hooks do not apply
                gen = _sample_on_stepper(model, ids, length, top_k, banned)
            else:
                gen = _sample_by_recompute(model, ids, length, top_k, banned)
        for row in gen[:, len(doc):].tolist():
            out.append(row if exact or eos not in row else row[: row.index(eos)])
    return out


def _eos_ids(model: Model) -> list[int]:
    """The tokens that end a sequence: the model's generation config, else the tokenizer's."""
    eos = model.hf_model.generation_config.eos_token_id
    eos = model.tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _draw(scores: Float[Tensor, "rows d_vocab"], top_k: int,
          banned: Sequence[int]) -> Int[Tensor, "rows 1"]:
    """One token per row: ``banned`` tokens at -inf, every score below the k-th largest at
    -inf, softmax, then one ``torch.multinomial`` call on the global RNG. Changes ``scores``."""
    scores[:, list(banned)] = -math.inf
    kth = scores.topk(min(top_k, scores.shape[-1])).values[:, -1:]
    scores.masked_fill_(scores < kth, -math.inf)
    return torch.multinomial(scores.softmax(-1), 1)


def _sample_on_stepper(model: Model, ids: Int[Tensor, "rows prompt"], length: int, top_k: int,
                       banned: Sequence[int]) -> Int[Tensor, "rows total"]:
    """``length`` tokens after ``ids`` drawn by :func:`_draw` from the fp32 scores of the last
    position, on the layer stepper with a key/value cache. A sequence that draws the end
    token goes on (the caller cuts it there), which changes no other row."""
    return Stepper(model, ids.shape[1] + length).decode(
        ids, length, lambda scores: _draw(scores, top_k, banned))


def _sample_by_recompute(model: Model, ids: Int[Tensor, "rows prompt"], length: int,
                         top_k: int, banned: Sequence[int]) -> Int[Tensor, "rows total"]:
    """The reference sampler: ``length`` tokens after ``ids``, each drawn by :func:`_draw`
    from the fp32 scores of one full forward pass of the whole sequence so far (no cache).
    Slow (quadratic in the length) but plain enough to check any faster sampler against."""
    for _ in range(length):
        logits = model.hf_model(ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, _draw(logits[:, -1].float(), top_k, banned)], 1)
    return ids


def document_start(model: Model) -> list[int]:
    """The token that opens a plain document (:meth:`interp_edit.arch.Adapter.document_start`:
    the end-of-text token where the tokenizer has one, else a non-chat BOS, else none).
    After a bare "The" with no such token, SmolLM2 continues with code-like fragments."""
    return adapter(model).document_start()


def context_templates(
    model: Model, n: int = 10, length: int = 10, *, seed: int = 0
) -> tuple[str, ...]:
    """``"{}"`` followed by ``n`` templates ``"<sampled prefix>. {}"`` of about ``length``
    tokens each. Seeded and cached per model (in memory and under the cache directory)."""
    key = (model.weights_key, n, length, seed)
    if key in _TEMPLATES:
        return _TEMPLATES[key]
    path = cache_dir("prefixes", key[0]) / f"v2-n{n}-len{length}-seed{seed}.json"
    prefixes = _files.load_cached(path, functools.partial(_read_prefixes, n=n))
    if prefixes is None:
        texts = [model.tokenizer.decode(ids) for ids in
                 sample_token_ids(model, n, length, seed=seed)] if n else []
        prefixes = [" ".join(t.replace("{", " ").replace("}", " ").split()) for t in texts]
        _files.write_json(path, {"model": model.name, "prefixes": prefixes}, indent=1)
    _TEMPLATES[key] = ("{}", *(f"{p}. {{}}" for p in prefixes))
    return _TEMPLATES[key]


def _read_prefixes(path: Path, n: int) -> list[str]:
    """Cached template prefixes, checked: ``n`` strings without braces."""
    prefixes = _files.read_json(path)["prefixes"]
    _files.require(isinstance(prefixes, list) and len(prefixes) == n
                   and all(isinstance(p, str) and "{" not in p and "}" not in p
                           for p in prefixes), f"not {n} template prefixes")
    return prefixes


@dataclass(frozen=True)
class FactBatch:
    """Right-padded prompts, each containing the subject, optionally followed by a target."""

    ids: Int[Tensor, "batch pos"]
    subject_last: Int[Tensor, "batch"]  # index of the subject's last token in each row
    target_labels: Int[Tensor, "batch pos"]  # token that the logits at each position should
    target_mask: Bool[Tensor, "batch pos"]  # predict, where target_mask (teacher forcing)

    def at_subject_last(self) -> Bool[Tensor, "batch pos"]:
        """Mask of the subject's last token in each row."""
        pos = torch.arange(self.ids.shape[1], device=self.ids.device)
        return pos[None, :] == self.subject_last[:, None]

    def select(self, rows: Int[Tensor, "k"]) -> "FactBatch":
        """The batch of ``rows`` only (right padding stays exact for causal attention)."""
        return FactBatch(self.ids[rows], self.subject_last[rows], self.target_labels[rows],
                         self.target_mask[rows])


def encode_facts(
    model: Model,
    templates: Sequence[str],
    subject: str | Sequence[str],
    targets: str | None | Sequence[str | None] = None,
) -> FactBatch:
    """Fill the subject into each template (one ``{}`` each, e.g. a context template applied
    to the request's prompt) and append all but the last token of the row's target, so that
    the logits at the masked positions predict every target token. ``subject``: one for all
    rows, or one per row; ``targets``: one for all rows, or one per row (``None``: the prompt
    alone)."""
    if targets is None or isinstance(targets, str):
        targets = [targets] * len(templates)
    subjects = [subject] * len(templates) if isinstance(subject, str) else list(subject)
    seqs, subj_last, spans = [], [], []
    for tpl, subject, target in zip(templates, subjects, targets, strict=True):
        text = tpl.format(subject)
        # the subject occurrence that replaces "{}" (a prefix may mention the subject too)
        occurrence = _count_occurrences(text[: tpl.index("{}")], subject)
        ids = model.tokenize(text).tolist()
        tgt = model.target_ids(target) if target is not None else []
        subj_last.append(model.subject_range(text, subject, occurrence)[1] - 1)
        spans.append((len(ids) - 1, tgt))
        seqs.append(ids + tgt[:-1])
    ids, _ = model.batch_ids(seqs)
    labels = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, (start, tgt) in enumerate(spans):
        labels[row, start : start + len(tgt)] = torch.as_tensor(tgt, dtype=torch.long)
        mask[row, start : start + len(tgt)] = True
    return FactBatch(ids, torch.tensor(subj_last, device=ids.device), labels, mask)


def _count_occurrences(text: str, sub: str) -> int:
    count, at = 0, text.find(sub)
    while at >= 0:
        count, at = count + 1, text.find(sub, at + 1)
    return count


ROWS_PER_PASS = 512  # rows of one forward pass when reading activations at the subject


@torch.no_grad()
def at_subject_last(model: Model, names: Sequence[str], batch: FactBatch, stop_at_layer: int,
                    rows_per_pass: int = ROWS_PER_PASS) -> list[Float[Tensor, "batch d"]]:
    """Each hook point of ``names`` at every row's subject-last token, from forward passes
    that stop before block ``stop_at_layer``, over at most ``rows_per_pass`` rows at a time:
    a batch of a thousand facts in eleven contexts would otherwise hold every position's
    activation of 11,000 rows at once (gigabytes). The rows keep the batch's padding, and
    each row's pass is causal and row-independent, so the chunking changes no row's result."""
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    for lo in range(0, len(batch.ids), rows_per_pass):
        ids = batch.ids[lo:lo + rows_per_pass]
        store: dict[str, Tensor] = {}
        with hooked(model, [capture(name, store) for name in names]):
            model.bridge(ids, return_type=None, stop_at_layer=stop_at_layer)
        rows = torch.arange(len(ids), device=ids.device)
        last = batch.subject_last[lo:lo + rows_per_pass]
        for name in names:
            out[name].append(store[name][rows, last])
    return [torch.cat(out[name]) for name in names]


def subject_keys(model: Model, layer: int, batch: FactBatch) -> Float[Tensor, "batch d_mlp"]:
    """The MLP keys at ``layer`` at each row's subject-last token (the forward stops there)."""
    model._check_layer(layer)
    return at_subject_last(model, [mlp_key_hook(layer)], batch, layer + 1)[0]


def key_star(
    model: Model, layer: int, template: str, subject: str, contexts: Sequence[str]
) -> Float[Tensor, "d_mlp"]:
    """k*: the mean key at the subject's last token over ``template`` in every context."""
    return keys_star(model, layer, [(template, subject)], contexts)[0]


def context_batch(
    model: Model, facts: Sequence[tuple[str, str]], contexts: Sequence[str]
) -> FactBatch:
    """Every fact ``(template, subject)`` in every context, fact-major: row ``i * len(contexts)
    + j`` is fact i in context j (context 0 is ``"{}"``, the prompt alone)."""
    rows = [(c.format(tpl), subj) for tpl, subj in facts for c in contexts]
    return encode_facts(model, [t for t, _ in rows], [s for _, s in rows])


def keys_star(
    model: Model, layer: int, facts: Sequence[tuple[str, str]], contexts: Sequence[str]
) -> Float[Tensor, "n_facts d_mlp"]:
    """k* of each fact ``(template, subject)``: its mean key over the contexts, in one pass."""
    keys = subject_keys(model, layer, context_batch(model, facts, contexts))
    return rearrange(keys, "(f c) d -> f c d", c=len(contexts)).mean(1)
