"""Result objects of causal tracing: :class:`TraceResult` (one grid) and :class:`TraceSet`
(the three kinds of one fact, sharing the clean and corrupted runs).

Both save to a single ``.npz`` file (arrays plus one JSON metadata string, loadable with
``allow_pickle=False``) and plot themselves through :mod:`interp_edit.plotting.heatmaps`;
plotting never recomputes anything.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp_edit import _files, _validate
from interp_edit.errors import InterpEditError

KINDS = ("resid", "mlp", "attn")
_FORMAT = "interp_edit.TraceResult/1"
_ARRAYS = ("scores", "exact")  # saved as arrays, not in the JSON metadata
_RETRACE = "trace the fact again (ie.trace) and save the result"


@dataclass(frozen=True, eq=False)
class TraceResult:
    """One causal trace: p(target) with each (token, layer) cell restored to its clean value.

    ``scores[t, l]`` is the probability of the target's first token at the last position,
    averaged over the noise samples, with the subject embeddings corrupted and the cell
    (token ``t``, layer ``l``) restored. For ``kind="resid"`` the cell is block ``l``'s output
    (``hook_resid_post``); for ``"mlp"``/``"attn"`` it is the window of MLP/attention outputs
    of layers ``max(0, l - window//2) .. min(L, l - (-window//2)) - 1`` at token ``t``.
    Cells left out with ``positions=``/``layers=`` hold NaN.
    ``method="attribution"`` scores are estimates (see :mod:`interp_edit.tracing.attribution`;
    ``estimate`` says which), not measured probabilities, except the cells ``exact`` marks
    (``method="screen+exact"``'s confirmed cells, ``estimate="atpstar"``'s last token).
    """

    scores: Float[Tensor, "n_tokens n_layers"]
    low_score: float  # corrupted, nothing restored
    high_score: float  # clean run
    prompt: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]  # [start, end) token span of the subject
    target: str
    target_id: int
    kind: str  # "resid" | "mlp" | "attn"
    window: int
    noise_std: float
    noise_source: str  # how noise_std was chosen, in words
    samples: int
    seed: int
    model_name: str
    method: str  # "fast" | "reference" | "attribution"
    sever: str | None = None  # None | "mlp" | "attn" (kind "resid" only)
    precision: str = "model"  # the multiplies' dtype: "model" | "bfloat16" (attribution only)
    estimate: str | None = None  # the screen's (see trace); None: an exact method
    # which cells hold exact scores where only some do (a screen's confirmed or exactly
    # computed cells); None: all (the exact methods) or none (a screen without any)
    exact: Bool[Tensor, "n_tokens n_layers"] | None = None

    @property
    def indirect_effect(self) -> Float[Tensor, "n_tokens n_layers"]:
        """``scores - low_score``: how much restoring each cell brings the answer back."""
        return self.scores - self.low_score

    @property
    def n_tokens(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    def top_cells(self, k: int = 5, exact: bool | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` cells with the largest score, as ``(token, layer, score)``. ``exact``:
        rank only the cells marked exact (``None``: so where the result marks some, as a
        confirmed screen does: its peak is an exact cell)."""
        k = _validate.count("k", k, 0)
        scores = self.scores
        if exact or (exact is None and self.exact is not None):
            mask = self.exact if self.exact is not None else torch.zeros_like(scores).bool()
            scores = scores.masked_fill(~mask, float("nan"))
        flat = torch.nan_to_num(scores, nan=-float("inf")).flatten()
        n = min(k, int((flat > -float("inf")).sum()))
        idx = flat.topk(n).indices
        return [(int(i) // self.n_layers, int(i) % self.n_layers, float(flat[i])) for i in idx]

    def plot(self, ax=None, **kw):
        """Heatmap of the scores (see :func:`interp_edit.plotting.heatmaps.plot_trace`)."""
        from interp_edit.plotting.heatmaps import plot_trace

        return plot_trace(self, ax=ax, **kw)

    # ---- persistence ---------------------------------------------------------------------
    def _arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        fields = [f.name for f in dataclasses.fields(self) if f.name not in _ARRAYS]
        meta = {name: getattr(self, name) for name in fields}
        meta["format"] = _FORMAT
        arrays = {
            prefix + "scores": self.scores.detach().cpu().to(torch.float32).numpy(),
            prefix + "meta": np.array(json.dumps(meta)),
        }
        if self.exact is not None:  # an optional array: files without it load as before
            arrays[prefix + "exact"] = self.exact.cpu().numpy()
        return arrays

    @classmethod
    def _from_arrays(cls, data: Mapping[str, Any], prefix: str = "") -> TraceResult:
        """The trace in ``data`` (call inside :func:`interp_edit._files.reading`: a missing
        array or a field of the wrong kind raises)."""
        meta = json.loads(str(data[prefix + "meta"]))
        scores = torch.from_numpy(np.array(data[prefix + "scores"]))
        _files.require(isinstance(meta, dict) and meta.pop("format", None) == _FORMAT,
                       f"it is not of format {_FORMAT}")
        meta["subject_range"] = tuple(meta["subject_range"])
        exact = data[prefix + "exact"] if prefix + "exact" in data else None
        exact = None if exact is None else torch.from_numpy(np.array(exact, dtype=bool))
        r = cls(scores=scores, exact=exact, **meta)
        start, end = r.subject_range
        _files.require(
            scores.ndim == 2 and scores.is_floating_point() and r.kind in KINDS
            and len(r.tokens) == len(r.token_ids) == r.n_tokens
            and all(isinstance(x, int) for x in (start, end, r.target_id, *r.token_ids))
            and 0 <= start < end <= r.n_tokens
            and (exact is None or exact.shape == scores.shape),
            "its scores, tokens and subject range do not fit together")
        return r

    def save(self, path: str | os.PathLike) -> None:
        """Write one ``.npz`` file (scores + JSON metadata; no pickle), atomically."""
        _files.save_npz(_npz(path), **self._arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TraceResult:
        """Read a saved trace; a damaged or foreign file raises ``CorruptFileError``."""
        with _files.reading(_npz(path), "saved trace", _RETRACE):
            return cls._from_arrays(_files.read_npz(_npz(path)))

    def to_bytes(self) -> bytes:
        """The ``.npz`` file :meth:`save` writes, as bytes (to send it between processes)."""
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TraceResult:
        """Read :meth:`to_bytes`' output; a truncated or corrupt one raises InterpEditError."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                return cls._from_arrays(arrays)
        except InterpEditError:
            raise
        except Exception as exc:  # zipfile, json, a missing array: not a trace
            raise InterpEditError(f"not a saved trace ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True, eq=False)
class TraceSet:
    """The hidden-state, MLP and attention traces of one fact (``trace(..., kind="all")``)."""

    resid: TraceResult
    mlp: TraceResult
    attn: TraceResult

    def __getitem__(self, kind: str) -> TraceResult:
        if kind not in KINDS:
            raise InterpEditError(f"unknown kind {kind!r}: choose one of {KINDS}")
        return getattr(self, kind)

    def __iter__(self):
        return iter((self.resid, self.mlp, self.attn))

    def plot(self, **kw):
        """The three heatmaps side by side (see ``plotting.heatmaps.plot_trace_set``)."""
        from interp_edit.plotting.heatmaps import plot_trace_set

        return plot_trace_set(self, **kw)

    def save(self, path: str | os.PathLike) -> None:
        arrays: dict[str, np.ndarray] = {}
        for kind in KINDS:
            arrays |= self[kind]._arrays(prefix=f"{kind}_")
        _files.save_npz(_npz(path), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TraceSet:
        """Read a saved set; a damaged or foreign file raises ``CorruptFileError``."""
        with _files.reading(_npz(path), "saved TraceSet", _RETRACE):
            data = _files.read_npz(_npz(path))
            return cls(**{k: TraceResult._from_arrays(data, prefix=f"{k}_") for k in KINDS})


def _npz(path: str | os.PathLike) -> str:
    """``np.savez`` appends ``.npz`` to other names; do the same on load so both agree."""
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"
