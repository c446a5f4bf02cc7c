"""Reverse and portability probes built from (subject, relation, object) facts in the data.

For an edit ``(s, r, o_true -> o_new)`` of a relation in the :class:`Schema`:

- **reverse**: when ``r`` has an inverse prompt, ``inverse(o_new)`` should now answer ``s``
  ("Paris is the capital of" -> the edited country). Before the edit it answered another
  subject ``x`` with ``(x, r, o_new)`` in the facts (the most frequent such ``x``, ties in data
  order); edits with no such ``x`` get no reverse probe.
- **portability**: for each chain of known facts (hops) that may follow ``r``
  (:meth:`Schema.chains`, one or two hops), the question about ``s`` through the chain
  (:meth:`Schema.question`) should now answer the chain's end from ``o_new``; before the edit it
  answered the chain's end from ``o_true``. A chain is used only when every hop from ``o_new``
  is a fact the model knows (teacher-forced, every answer token is the model's top-1 after the
  hop's query), the chain from ``o_true`` is in the facts too, and the two ends differ.

Each probe is ``(prompt, answer after the edit, answer before it)``; the metrics report the
teacher-forced accuracy of the first and p(after) - p(before) (``metrics.py``).

Facts come from CounterFact (a record's subject, its template's relation, ``target_true``)
and known_1000 (``relation_id``). A (subject, relation) may have several objects in the data
(London is the capital of several historical states): a hop takes the first the model knows,
most frequent first; the chain from ``o_true`` falls back on the most frequent. Edits are kept only when the model prefers ``target_true`` to
``target_new`` (the harness skips the others), so every record of a set can be evaluated.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from interp_edit import _files
from interp_edit.evaluation.datasets import PROBE_SET_FORMAT
from interp_edit.evaluation.metrics import score_targets
from interp_edit.evaluation.probe_schema import COUNTERFACT, Schema
from interp_edit.evaluation.records import EditRecord
from interp_edit.models import Model


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class KnowledgeBase:
    """``forward[(subject, relation)]``: the objects the facts give, most frequent first
    (facts read backwards, ``Schema.derived``, after the direct ones); ``backward[(relation,
    object)]``: the subjects that have it, most frequent first (ties in data order)."""

    forward: dict[tuple[str, str], tuple[str, ...]]
    backward: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, facts: Iterable[Fact], schema: Schema = COUNTERFACT) -> "KnowledgeBase":
        direct: dict[tuple[str, str], Counter] = defaultdict(Counter)
        derived: dict[tuple[str, str], Counter] = defaultdict(Counter)
        back: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for f in facts:
            direct[f.subject, f.relation][f.object] += 1
            back[f.relation, f.object][f.subject] += 1
            for src, dst in schema.derived:
                if f.relation == src:
                    derived[f.object, dst][f.subject] += 1
        forward = {}
        for key in {*direct, *derived}:
            first = [o for o, _ in direct[key].most_common()]
            forward[key] = (*first, *(o for o, _ in derived[key].most_common() if o not in first))
        backward = {k: tuple(s for s, _ in c.most_common()) for k, c in back.items()}
        return cls(forward, backward)


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe set was built (saved with it)."""

    max_hops: int = 2
    require_known_edit: bool = True
    # the model checks only the first this many edits (in data order) that could get a probe
    # of each kind (None: all); they cost a forward pass each, the kinds' sizes differ tenfold
    candidates_per_kind: int | None = 400


def facts_from_records(records: Iterable[EditRecord], schema: Schema = COUNTERFACT) -> list[Fact]:
    """The true fact of each record whose template names a relation of ``schema``."""
    out = []
    for r in records:
        rid = schema.relation_of(r.prompt)
        if rid is not None:
            out.append(Fact(r.subject, rid, r.target_true))
    return out


def facts_from_known(known: Iterable, schema: Schema = COUNTERFACT) -> list[Fact]:
    """known_1000 facts (anything with ``subject``, ``relation_id``, ``attribute``) of
    relations in ``schema``."""
    ids = {r.rid for r in schema.relations}
    return [Fact(k.subject, k.relation_id, k.attribute) for k in known if k.relation_id in ids]


def build_probes(
    model: Model,
    edits: Sequence[EditRecord],
    kb: KnowledgeBase,
    schema: Schema = COUNTERFACT,
    settings: ProbeSettings = ProbeSettings(),
) -> list[EditRecord]:
    """``edits`` (of schema relations) with their reverse and portability probes, in the
    order of :func:`interleave`; edits with neither, or (``require_known_edit``) that the
    model does not know, are dropped."""
    schema = replace(schema, max_hops=settings.max_hops)
    edits = [(r, rid) for r in edits if (rid := schema.relation_of(r.prompt)) is not None
             and r.target_new != r.target_true]
    edits = _candidates(edits, kb, schema, settings.candidates_per_kind)
    if settings.require_known_edit:
        edits = [e for e, ok in zip(edits, knows_edit(model, [r for r, _ in edits])) if ok]
    hop = _Hops(model, kb, schema)
    chains = [(r, rid, c) for r, rid in edits for c in schema.chains(rid)]
    for depth in range(settings.max_hops):  # resolve every entity's next hop, level by level
        hop.resolve([(e, c[depth]) for r, _, c in chains if depth < len(c)
                     for e in (hop.end(r.target_new, c[:depth]),
                               hop.end(r.target_true, c[:depth], strict=False))
                     if e is not None])
    out = []
    for rec, rid in edits:
        port = tuple(p for c in schema.chains(rid) if (p := _portable(rec, rid, c, hop)))
        rev = _reverse(rec, rid, kb, schema)
        if rev or port:
            out.append(replace(rec, reverse=rev, portability=port))
    return interleave(out)


def _candidates(edits: list[tuple[EditRecord, str]], kb: KnowledgeBase, schema: Schema,
                limit: int | None) -> list[tuple[EditRecord, str]]:
    """The edits that could get a reverse probe, or a portability probe (the data have the
    first hop from both objects), at most ``limit`` of each kind, in their order."""
    def portable(rec: EditRecord, rid: str) -> bool:
        return any((rec.target_new, c[0]) in kb.forward and (rec.target_true, c[0]) in kb.forward
                   for c in schema.chains(rid))

    rev = [i for i, (r, rid) in enumerate(edits) if _reverse(r, rid, kb, schema)][:limit]
    port = [i for i, (r, rid) in enumerate(edits) if portable(r, rid)][:limit]
    return [edits[i] for i in sorted({*rev, *port})]


def interleave(records: Sequence[EditRecord]) -> list[EditRecord]:
    """Records with portability probes alternating with the others (each group in its order),
    so the first ``n`` of a set measure both kinds."""
    port = [r for r in records if r.portability]
    rest = [r for r in records if not r.portability]
    out = [r for pair in zip(port, rest) for r in pair]
    k = min(len(port), len(rest))
    return out + port[k:] + rest[k:]


class _Hops:
    """Hops along chains: ``known[(entity, relation)]`` is the first of the facts' objects
    the model knows (None if it knows none), filled by :meth:`resolve` in batched passes."""

    def __init__(self, model: Model, kb: KnowledgeBase, schema: Schema) -> None:
        self.model, self.kb, self.schema = model, kb, schema
        self.known: dict[tuple[str, str], str | None] = {}

    def resolve(self, pairs: Iterable[tuple[str, str]]) -> None:
        todo = sorted({p for p in pairs if p not in self.known})
        facts = [Fact(e, r, o) for e, r in todo for o in self.kb.forward.get((e, r), ())]
        ok = dict(zip(facts, knows(self.model, facts, self.schema)))
        for e, r in todo:
            self.known[e, r] = next((o for o in self.kb.forward.get((e, r), ())
                                     if ok[Fact(e, r, o)]), None)

    def end(self, entity: str | None, chain: Sequence[str], strict: bool = True) -> str | None:
        """Where ``chain`` leads from ``entity``: through hops the model knows, or (not
        ``strict``) where it does not know one, through the data's likeliest object."""
        for rid in chain:
            if entity is None:
                return None
            obj = self.known.get((entity, rid))
            if obj is None and not strict:
                obj = next(iter(self.kb.forward.get((entity, rid), ())), None)
            entity = obj
        return entity


def knows(model: Model, facts: Sequence[Fact], schema: Schema = COUNTERFACT) -> list[bool]:
    """Whether the model answers each fact's query with every object token as its top-1."""
    if not facts:
        return []
    prompts = [schema[f.relation].query.replace("{}", f.subject) for f in facts]
    scores = score_targets(model, prompts, [f.object for f in facts])
    return (scores.token_acc == 1).tolist()


def knows_edit(model: Model, edits: Sequence[EditRecord]) -> list[bool]:
    """Whether the model prefers ``target_true`` to ``target_new`` on each edit prompt (mean
    per-token log-probability, as the harness's check)."""
    if not edits:
        return []
    prompts = [r.text for r in edits for _ in (0, 1)]
    targets = [t for r in edits for t in (r.target_true, r.target_new)]
    lp = score_targets(model, prompts, targets).logprob
    return (lp[0::2] > lp[1::2]).tolist()


def _reverse(rec: EditRecord, rid: str, kb: KnowledgeBase,
             schema: Schema) -> tuple[tuple[str, str, str], ...]:
    inverse = schema[rid].inverse
    if inverse is None:
        return ()
    before = [x for x in kb.backward.get((rid, rec.target_new), ()) if x != rec.subject]
    if not before:
        return ()
    return ((inverse.replace("{}", rec.target_new), rec.subject, before[0]),)


def _portable(rec: EditRecord, rid: str, chain: tuple[str, ...],
              hop: _Hops) -> tuple[str, str, str] | None:
    new = hop.end(rec.target_new, chain)
    old = hop.end(rec.target_true, chain, strict=False)
    if new is None or old is None or new == old:
        return None
    return hop.schema.question(rid, chain).replace("{}", rec.subject), new, old


def save_probe_set(path: str | os.PathLike, records: Sequence[EditRecord], model_name: str,
                   settings: ProbeSettings, sources: dict[str, Any]) -> Path:
    """Write a probe set (records, the model it was filtered for, how it was built) as JSON,
    atomically (:func:`interp_edit._files.write_json`)."""
    doc = {
        "format": PROBE_SET_FORMAT,
        "model": model_name,
        "settings": dataclasses.asdict(settings),
        "sources": sources,
        "counts": {"records": len(records),
                   "reverse": sum(bool(r.reverse) for r in records),
                   "portability": sum(bool(r.portability) for r in records)},
        "records": [r.to_dict() for r in records],
    }
    return _files.write_json(path, doc, indent=0, ensure_ascii=False)
