"""Averages of causal traces over many facts: ROME's token groups, average indirect effects
(AIE) and 95% confidence intervals.

A fact's trace is a grid ``scores[token, layer]``; its indirect effect is
``scores - low_score``. Tokens fall into ROME's six groups (Meng et al. 2022, Fig. 2):

    first subject token | middle subject tokens | last subject token |
    first subsequent token | further tokens | last token

(tokens before the subject belong to no group, as in ROME). A group with several tokens is
averaged within the fact first, so every fact counts once and the 95% CI is a Student-t
interval over facts. A fact lacking a group (a one- or two-token subject has no middle tokens)
is left out of that group only; ``n`` says how many facts each mean rests on.

:class:`AverageTrace` keeps the per-fact group effects (not just the means), so it can be
saved, reloaded, merged into a table or re-plotted without tracing again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats as _scipy_stats
from torch import Tensor

from interp_edit import _files, _validate
from interp_edit.errors import InterpEditError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from interp_edit.tracing.results import TraceResult

GROUPS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
KINDS = ("resid", "mlp", "attn")
_FORMAT = "interp_edit.AverageTrace/1"


def token_groups(n_tokens: int, subject_range: tuple[int, int]) -> tuple[tuple[int, ...], ...]:
    """Token positions of each of ROME's six groups (in :data:`GROUPS` order; may be empty).

    As in ROME a one-token subject is both first and last subject token, and when the
    subject is followed by a single token that token is both first subsequent and last.
    """
    start, end = subject_range
    if not 0 <= start < end <= n_tokens:
        raise InterpEditError(f"subject range {subject_range} does not fit {n_tokens} tokens")
    last = n_tokens - 1
    return (
        (start,),
        tuple(range(start + 1, end - 1)),
        (end - 1,),
        (end,) if end <= last else (),
        tuple(range(end + 1, last)),
        (last,),
    )


def group_effects(
    effects: Float[Tensor, "pos layer"], subject_range: tuple[int, int]
) -> Float[Tensor, "group layer"]:
    """Mean indirect effect of each token group (NaN rows for empty groups)."""
    out = torch.full((len(GROUPS), effects.shape[1]), float("nan"), dtype=torch.float64)
    for g, positions in enumerate(token_groups(effects.shape[0], subject_range)):
        if positions:
            out[g] = effects[list(positions)].double().mean(0)
    return out


@dataclass(frozen=True)
class Condition:
    """One way of tracing: which states were restored, which path was severed, which method."""

    kind: str = "resid"
    sever: str | None = None
    method: str = "fast"
    precision: str = "model"  # the multiplies' dtype: "model" | "bfloat16" (attribution only)
    estimate: str | None = None  # the screen's (see trace); None: an exact method
    top: int | None = None  # method "screen+exact": cells confirmed per kind

    @property
    def exact(self) -> bool:
        return self.method in ("fast", "reference")

    @property
    def slug(self) -> str:
        """A file-name-safe name: ``mlp``, ``resid-sever-attn``, ``attn-attribution-logodds``,
        ``attn-attribution-prob-bfloat16``."""
        low = [self.precision] if self.precision != "model" else []
        top = [f"top{self.top}"] if self.top is not None else []
        return "-".join([self.kind, *(["sever", self.sever] if self.sever else []), self.method,
                         *filter(None, [self.estimate]), *low, *top])


@dataclass(frozen=True)
class GroupStats:
    """Mean AIE per token group and layer with its 95% CI; ``n`` facts behind each group."""

    mean: Float[Tensor, "group layer"]
    lo: Float[Tensor, "group layer"]
    hi: Float[Tensor, "group layer"]
    n: Int[Tensor, "group"]


@dataclass(frozen=True)
class Peak:
    """The mean AIE of one condition at one token group and layer (its peak, typically)."""

    condition: Condition
    group: str
    layer: int
    aie: float
    lo: float
    hi: float
    n: int


def summarize(effects: Float[Tensor, "fact group layer"], confidence: float = 0.95) -> GroupStats:
    """Mean over facts (ignoring NaN) and a Student-t confidence interval per cell."""
    x = effects.double()
    present = ~torch.isnan(x)
    n = present.sum(0)  # [group, layer]
    mean = torch.where(present, x, 0).sum(0) / n.clamp(min=1)
    sq = torch.where(present, x - mean, 0).pow(2).sum(0)
    sem = (sq / (n - 1).clamp(min=1)).sqrt() / n.clamp(min=1).sqrt()
    crit = torch.from_numpy(_scipy_stats.t.ppf(0.5 + confidence / 2, (n - 1).clamp(min=1).numpy()))
    half = torch.where(n > 1, crit * sem, float("nan"))
    mean = torch.where(n > 0, mean, float("nan"))
    return GroupStats(mean, mean - half, mean + half, n.max(-1).values)


@dataclass(frozen=True, eq=False)
class AverageTrace:
    """Per-fact group effects for every traced condition, with their averages.

    ``effects[c][f, g, l]`` is fact ``f``'s mean indirect effect over token group ``g`` with
    layer ``l`` restored under ``conditions[c]``; NaN where the group is empty or the fact
    was not traced under that condition (an exact pass on a sample, for instance).
    """

    conditions: tuple[Condition, ...]
    effects: tuple[Float[Tensor, "fact group layer"], ...]
    low_scores: tuple[Float[Tensor, "fact"], ...]  # NaN where not traced
    high_scores: Float[Tensor, "fact"]
    prompts: tuple[str, ...]
    subjects: tuple[str, ...]
    targets: tuple[str, ...]
    n_candidates: int  # facts offered, before keeping those the model predicts top-1
    model_name: str
    noise_std: float
    window: int
    samples: int
    seed: int
    noise_source: str = ""  # how noise_std was chosen, in words
    trace_dir: str | None = None  # where the per-fact TraceResults are cached
    groups: tuple[str, ...] = field(default=GROUPS)

    def __post_init__(self):
        if not len(self.conditions) == len(self.effects) == len(self.low_scores):
            raise InterpEditError("AverageTrace needs effects and low_scores for every condition")

    # ---- looking things up -------------------------------------------------------------
    @property
    def n_facts(self) -> int:
        return len(self.prompts)

    @property
    def n_layers(self) -> int:
        return self.effects[0].shape[-1]

    def _matching(self, kind: str, sever: str | None, method: str | None) -> list[Condition]:
        return [c for c in self.conditions if (c.kind, c.sever) == (kind, sever)
                and method in (None, c.method)]

    def condition(
        self, kind: str = "resid", sever: str | None = None, method: str | None = None
    ) -> Condition:
        """The traced condition matching ``kind``/``sever``; ``method=None`` prefers exact."""
        found = self._matching(kind, sever, method)
        if not found:
            have = ", ".join(c.slug for c in self.conditions)
            raise InterpEditError(
                f"no trace for kind={kind!r}, sever={sever!r}, method={method!r}; this "
                f"AverageTrace has: {have}. Run trace_dataset with those kinds/sever settings."
            )
        return sorted(found, key=lambda c: not c.exact)[0]

    def has(self, kind: str, sever: str | None = None, method: str | None = None) -> bool:
        return bool(self._matching(kind, sever, method))

    def fact_effects(self, kind: str = "resid", sever: str | None = None,
                     method: str | None = None) -> Float[Tensor, "fact group layer"]:
        return self.effects[self.conditions.index(self.condition(kind, sever, method))]

    def stats(self, kind: str = "resid", sever: str | None = None, method: str | None = None,
              confidence: float = 0.95) -> GroupStats:
        """Mean AIE per token group and layer, with its confidence interval."""
        return summarize(self.fact_effects(kind, sever, method), confidence)

    def mean_low_score(self, kind: str = "resid", sever: str | None = None) -> float:
        low = self.low_scores[self.conditions.index(self.condition(kind, sever))]
        return float(low.nanmean())

    @property
    def total_effect(self) -> float:
        """Average total effect: mean over facts of clean minus corrupted p(target)."""
        clean = float(self.high_scores.double().mean())
        return clean - self.mean_low_score(self.conditions[0].kind)

    def peak(self, kind: str = "resid", group: str | None = None, sever: str | None = None,
             method: str | None = None) -> Peak:
        """The (group, layer) of the largest mean AIE; ``group`` restricts to one row."""
        mean = self.stats(kind, sever, method).mean.clone()
        if group is not None:
            mean[torch.arange(len(self.groups)) != self.groups.index(group)] = float("nan")
        g, layer = divmod(int(torch.nan_to_num(mean, nan=-float("inf")).argmax()), mean.shape[1])
        return self.at(kind, self.groups[g], layer, sever, method)

    def at(self, kind: str, group: str, layer: int, sever: str | None = None,
           method: str | None = None) -> Peak:
        """The mean AIE (with CI) of one token group at one layer."""
        cond = self.condition(kind, sever, method)
        if group not in self.groups:
            raise InterpEditError(f"unknown token group {group!r}: choose one of {self.groups}")
        s, g = self.stats(kind, sever, cond.method), self.groups.index(group)
        layer = _validate.index("layer", layer, s.mean.shape[1])
        return Peak(cond, group, layer, float(s.mean[g, layer]), float(s.lo[g, layer]),
                    float(s.hi[g, layer]), int(s.n[g]))

    def fact_trace(self, index: int, kind: str = "resid", sever: str | None = None,
                   method: str | None = None) -> TraceResult:
        """The cached single-fact trace behind row ``index`` (for plotting one example)."""
        from interp_edit.tracing.results import TraceResult

        index = _validate.index("index", index, len(self.prompts), negative=True)
        fact = (self.prompts[index], self.subjects[index], self.targets[index])
        cond = self.condition(kind, sever, method)
        path = Path(self.trace_dir or "") / fact_file(*fact, cond)
        if not self.trace_dir or not path.exists():
            raise InterpEditError(f"the per-fact trace {path} is not cached (any more); rerun "
                                  "trace_dataset with the same settings to recreate it")
        r = TraceResult.load(path)
        if differ := trace_mismatch(r, *fact, cond, window=self.window, samples=self.samples,
                                    seed=self.seed, noise_std=self.noise_std,
                                    model_name=self.model_name):
            raise InterpEditError(f"{path} is not the trace of fact {index} (it differs in "
                                  f"{', '.join(differ)}): rerun trace_dataset to trace it again")
        return r

    # ---- saving ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` file: arrays plus a JSON header (no pickle), atomically."""
        path = Path(path)
        meta = {k: getattr(self, k) for k in (
            "prompts", "subjects", "targets", "n_candidates", "model_name", "noise_std",
            "window", "samples", "seed", "noise_source", "trace_dir", "groups")}
        meta |= {"format": _FORMAT, "conditions": [asdict(c) for c in self.conditions]}
        arrays = {"high_scores": self.high_scores.numpy()}
        for i, (e, low) in enumerate(zip(self.effects, self.low_scores)):
            arrays[f"effects_{i}"], arrays[f"low_scores_{i}"] = e.numpy(), low.numpy()
        return _files.save_npz(path, compress=True, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> AverageTrace:
        """Read a saved average; a damaged or foreign file raises ``CorruptFileError``."""
        with _files.reading(path, "saved AverageTrace",
                            "run trace_dataset again (its per-fact traces are cached) and save"):
            z = _files.read_npz(path)
            meta = json.loads(str(z.pop("meta")))
            _files.require(isinstance(meta, dict) and meta.pop("format", None) == _FORMAT,
                           f"it is not of format {_FORMAT}")
            conds = tuple(Condition(**c) for c in meta.pop("conditions"))
            arrays = {k: torch.from_numpy(v) for k, v in z.items()}
            out = cls(
                conditions=conds,
                effects=tuple(arrays[f"effects_{i}"] for i in range(len(conds))),
                low_scores=tuple(arrays[f"low_scores_{i}"] for i in range(len(conds))),
                high_scores=arrays["high_scores"],
                **{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()},
            )
            n, shape = out.n_facts, (out.n_facts, len(out.groups))
            _files.require(
                len(out.subjects) == len(out.targets) == n and out.high_scores.shape == (n,)
                and all(e.shape[:2] == shape and e.ndim == 3 for e in out.effects)
                and all(low.shape == (n,) for low in out.low_scores),
                "its arrays do not fit its facts and token groups")
            return out

    # ---- plotting ----------------------------------------------------------------------
    def plot(self, **kwargs) -> Figure:
        """AIE by layer for each token group, one panel per kind (ROME Fig. 2)."""
        from interp_edit.plotting.curves import plot_aie

        return plot_aie(self, **kwargs)

    def plot_severed(self, **kwargs) -> Figure:
        """AIE at the last subject token with no / MLP / attention severing (ROME Fig. 3)."""
        from interp_edit.plotting.curves import plot_severed

        return plot_severed(self, **kwargs)

    def plot_heatmaps(self, **kwargs) -> Figure:
        """Mean AIE as token-group x layer heatmaps, one per kind (ROME Fig. 2, left)."""
        from interp_edit.plotting.heatmaps import plot_average_heatmaps

        return plot_average_heatmaps(self, **kwargs)

    def __repr__(self) -> str:
        conds = ", ".join(c.slug for c in self.conditions)
        return (f"AverageTrace({self.model_name!r}, {self.n_facts} of {self.n_candidates} facts, "
                f"{self.n_layers} layers, conditions: {conds})")


def fact_file(prompt: str, subject: str, target: str, condition: Condition) -> str:
    """The cache file name of one fact traced under one condition."""
    from interp_edit._cache import stable_hash

    return f"{stable_hash([prompt, subject, target])}-{condition.slug}.npz"


def trace_mismatch(r: TraceResult, prompt: str, subject: str, target: str,
                   condition: Condition, **settings: object) -> list[str]:
    """What differs between a cached per-fact trace ``r`` and the one asked for (empty: it is
    that trace): the fact, the condition, and ``settings`` (any of ``window``, ``samples``,
    ``seed``, ``noise_std``, ``model_name``, ``n_layers``). A file copied or renamed into a
    trace cache must not be averaged in as another fact's."""
    found = dict(prompt=r.prompt, subject=r.subject, target=r.target, kind=r.kind,
                 sever=r.sever, method=r.method, precision=r.precision, estimate=r.estimate,
                 window=r.window, samples=r.samples, seed=r.seed, noise_std=r.noise_std,
                 model_name=r.model_name, n_layers=r.n_layers)
    want = dict(prompt=prompt, subject=subject, target=target, kind=condition.kind,
                sever=condition.sever, method=condition.method,
                precision=condition.precision, estimate=condition.estimate, **settings)
    differ = [k for k in want if found[k] != want[k]]
    return differ + (["its grid's size"] if len(r.token_ids) != r.n_tokens else [])


def peak_table(avg: AverageTrace) -> str:
    """A markdown table, one row per traced condition: where the mean AIE peaks overall, and
    its peak at the last subject token and at the last token, each with a 95% CI.

    Severed rows (traced at the last subject token only) give the AIE at the layer where the
    unsevered hidden-state effect peaks there, which is where ROME compares them."""

    def cell(p: Peak) -> str:
        return f"{p.aie:.3f} [{p.lo:.3f}, {p.hi:.3f}]"

    rows = ["| restored | n | peak: token group, layer | AIE [95% CI] | last subject token: "
            "layer | AIE [95% CI] | last token: layer | AIE [95% CI] |",
            "|---|---|---|---|---|---|---|---|"]
    for c in avg.conditions:
        name = c.kind + (f", {c.sever} severed" if c.sever else "") + (
            "" if c.exact else f" ({c.method})")
        if c.sever:
            layer = avg.peak("resid", "last subject token", None, c.method).layer
            subj = avg.at(c.kind, "last subject token", layer, c.sever, c.method)
            rows.append(f"| {name} | {subj.n} | | | {layer} | {cell(subj)} | | |")
            continue
        top = avg.peak(c.kind, None, None, c.method)
        subj = avg.peak(c.kind, "last subject token", None, c.method)
        last = avg.peak(c.kind, "last token", None, c.method)
        rows.append(f"| {name} | {top.n} | {top.group}, {top.layer} | {cell(top)} | "
                    f"{subj.layer} | {cell(subj)} | {last.layer} | {cell(last)} |")
    return "\n".join(rows) + "\n"
