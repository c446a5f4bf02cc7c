"""IKE: in-context knowledge editing (Zheng et al. 2023, "Can We Edit Factual Knowledge by
In-Context Learning?"). No weight changes: the new fact goes into the prompt, after
demonstrations that show the model how to use a new fact.

Each demonstration comes from a record of a training pool (a CounterFact file: ``pool=``, else
``counterfact-train.json`` in the folder named by ``INTERP_EDIT_DATA``) and is one of three
kinds:

- **copy** (reliability):      ``New Fact: <fact>\\nPrompt: <fact>``
- **update** (generalization): ``New Fact: <fact>\\nPrompt: <paraphrase> <new target>``
- **retain** (locality):       ``New Fact: <fact>\\nPrompt: <unrelated prompt> <its true answer>``

The pool records nearest to the new fact (cosine similarity of sentence embeddings, see
``_embed``) are retrieved, given kinds in the ``mix`` proportions (shuffled with ``seed``), and
ordered least similar first, so the most similar demonstration sits next to the query. The
edit's context is ``<demonstrations>New Fact: <new fact>\\nPrompt: ``, and
``AppliedEdit.wrap(prompt)`` appends the question; ``demos=0`` is the bare-fact variant.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from interp_edit import _validate
from interp_edit._cache import file_digest
from interp_edit._files import data_file
from interp_edit.editing import _embed
from interp_edit.editing.base import AppliedEdit, EditRequest, register_editor
from interp_edit.errors import InterpEditError
from interp_edit.evaluation.datasets import load_counterfact
from interp_edit.evaluation.records import EditRecord
from interp_edit.models import Model

KINDS = ("copy", "update", "retain")
_PROMPT_ROOM = 32  # tokens the context must leave for the prompt and its target
DEFAULT_POOL = "counterfact-train.json"  # looked up in $INTERP_EDIT_DATA when pool is None


@dataclass(frozen=True)
class IKEHparams:
    """``demos``: number of demonstrations (0: the new fact alone). ``mix``: copy:update:retain
    proportions (the paper: 4:12:16 of 32). ``pool``: a CounterFact-style JSON file (default:
    ``counterfact-train.json`` in the folder ``INTERP_EDIT_DATA`` names). ``embedder``: "auto",
    "minilm" or "model" (see ``_embed``). ``seed``: which retrieved record gets which kind.

    Default 8 at 1:1:2 (measured on SmolLM2-135M with ``analyses/compare_editors.py``; README
    "Comparing editors"). On 16 CounterFact-val facts, 4, 8 and 16 demonstrations scored alike
    (efficacy 0.69-0.75, neighbourhood 0.44-0.56) and the paper's 32 at 4:12:16 only raised
    paraphrase accuracy (0.94 vs 0.69), at four times the context (~1000 tokens, which every
    later query pays). Retain demonstrations are what protect neighbours: 8 retain-only ones
    raise neighbourhood accuracy from 0.50 (no demonstrations) to 0.75, at a cost in efficacy.
    """

    demos: int = 8
    mix: tuple[float, float, float] = (1, 1, 2)
    pool: str | None = None
    embedder: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "demos", _validate.count("IKEHparams.demos", self.demos, 0))
        _validate.fields(self, seeds=("seed",))
        if isinstance(self.mix, (str, bytes)) or not hasattr(self.mix, "__len__"):
            raise InterpEditError(f"mix must be three copy:update:retain weights, not {self.mix!r}")
        # a list from JSON stays hashable
        object.__setattr__(self, "mix", tuple(self.mix))
        for m in self.mix:
            _validate.number("mix weight", m, 0.0)
        if self.pool is not None:
            _validate.path("IKEHparams.pool", self.pool)
        kind_counts(self.demos, self.mix)  # validates the mix
        if self.embedder not in _embed.EMBEDDERS:
            raise InterpEditError(f"unknown IKE embedder {self.embedder!r}; choose one of "
                                  f"{_embed.EMBEDDERS}")


    def check_model(self, model: Model) -> None:
        """The pool and the embedder are there (before any work of an edit)."""
        if self.demos:
            load_pool(self.pool)
        if self.embedder == "minilm":
            _embed.get_embedder(self.embedder, model)


def _fact(prompt: str, target: str) -> str:
    return f"{prompt.rstrip()} {target.strip()}"


def _demo(new_fact: str, prompt_line: str) -> str:
    return f"New Fact: {new_fact}\nPrompt: {prompt_line}\n\n"


def demonstration(record: EditRecord, kind: str) -> str:
    """The demonstration of ``kind`` built from one pool record."""
    fact = _fact(record.text, record.target_new)
    line = {"copy": fact,
            "update": _fact(record.paraphrases[0], record.target_new),
            "retain": _fact(*record.neighborhood[0])}
    return _demo(fact, line[kind])


def context_for(requests: Sequence[EditRequest], demos: Sequence[str] = ()) -> str:
    """The text prepended to every prompt: demonstrations, the new fact(s), ``Prompt: ``."""
    facts = "".join(f"New Fact: {_fact(r.text, r.target_new)}\n" for r in requests)
    return "".join(demos) + facts + "Prompt: "


def kind_counts(n: int, mix: Sequence[float]) -> dict[str, int]:
    """Split ``n`` demonstrations by ``mix`` (largest remainder, ties to the later kind)."""
    if len(mix) != 3 or any(m < 0 for m in mix) or sum(mix) <= 0:
        raise InterpEditError(f"mix must be three non-negative copy:update:retain weights, "
                              f"not {tuple(mix)}")
    exact = [n * m / sum(mix) for m in mix]
    counts = [int(e) for e in exact]
    by_rest = sorted(range(3), key=lambda i: (exact[i] - counts[i], i), reverse=True)
    for i in by_rest[: n - sum(counts)]:
        counts[i] += 1
    return dict(zip(KINDS, counts))


# ---- the pool -----------------------------------------------------------------------------
def pool_path(pool: str | None) -> Path:
    """The pool file: ``pool``, else :data:`DEFAULT_POOL` in ``$INTERP_EDIT_DATA``."""
    if not pool:
        return data_file(DEFAULT_POOL, "the IKE demonstration pool", "pool=")
    path = Path(pool).expanduser()
    if not path.is_file():
        raise InterpEditError(
            f"IKE demonstration pool {str(path)!r} not found: pass pool='path/to/"
            "counterfact-train.json' (a CounterFact file), or demos=0 for no demonstrations"
        )
    return path


@functools.lru_cache(maxsize=8)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    return file_digest(path)


@functools.lru_cache(maxsize=4)
def _read_pool(path: Path, digest: str) -> tuple[EditRecord, ...]:
    """Records that give all three kinds (a paraphrase and a neighbour)."""
    return tuple(r for r in load_counterfact(path) if r.paraphrases and r.neighborhood)


def load_pool(pool: str | None = None) -> tuple[tuple[EditRecord, ...], str]:
    """The pool's usable records and a cache key (the file's name and digest)."""
    path = pool_path(pool).resolve()
    stat = path.stat()
    digest = _digest(path, stat.st_size, stat.st_mtime_ns)
    records = _read_pool(path, digest)
    if not records:
        raise InterpEditError(f"{path} has no record with a paraphrase and a neighbour prompt")
    return records, f"{path.stem}-{digest}"


def retrieve(
    model: Model, requests: Sequence[EditRequest], hp: IKEHparams
) -> list[tuple[EditRecord, str, float]]:
    """The demonstrations for ``requests``: (record, kind, similarity), in context order."""
    if hp.demos <= 0:
        return []
    records, key = load_pool(hp.pool)
    embedder = _embed.get_embedder(hp.embedder, model)
    facts = [_fact(r.text, r.target_new) for r in records]
    keys = _embed.pool_embeddings(facts, embedder, key)  # [n_pool, d]
    query = embedder.embed([_fact(r.text, r.target_new) for r in requests]).mean(0)
    query = torch.nn.functional.normalize(query, dim=-1)
    subjects = {r.subject for r in requests}
    hits = [i for i in _embed.nearest(query, keys, hp.demos + 4 * len(subjects))
            if records[i].subject not in subjects][: hp.demos]  # never leak the edited fact
    counts = kind_counts(len(hits), hp.mix)
    kinds = [k for k in KINDS for _ in range(counts[k])]
    random.Random(hp.seed).shuffle(kinds)
    chosen = [(records[i], kind, float(keys[i] @ query)) for i, kind in zip(hits, kinds)]
    return chosen[::-1]  # least similar first: the nearest demonstration ends next to the query


@register_editor("ike", IKEHparams)
def apply_ike(model: Model, requests: Sequence[EditRequest], hp: IKEHparams) -> AppliedEdit:
    chosen = retrieve(model, requests, hp)
    context = context_for(requests, [demonstration(rec, kind) for rec, kind, _ in chosen])
    n_tokens = len(model.tokenize(context))
    if n_tokens + _PROMPT_ROOM > model.n_ctx:
        raise InterpEditError(
            f"the IKE context has {n_tokens} tokens, leaving less than {_PROMPT_ROOM} of the "
            f"model's {model.n_ctx} for the prompt: lower demos (now {hp.demos})"
        )
    info = {
        "demonstrations": [{"case_id": rec.case_id, "kind": kind, "similarity": round(s, 4)}
                           for rec, kind, s in chosen],
        "context_tokens": n_tokens,
    }
    return AppliedEdit.in_context(model, "ike", requests, hp, context, info)
