"""Does localization inform editing? The statistics of Hase et al. (2023) on a grid of
tracing effects and edit successes.

Inputs are ``[fact, layer]`` grids: ``effect[f, j]`` is the causal-tracing effect of fact
``f`` at edit layer ``layers[j]`` and ``success[f, j]`` the success of an edit of fact ``f``
made at that layer. Facts are the independent units: every confidence interval is a
percentile bootstrap that resamples facts (all layers of a resampled fact travel together).

- :func:`pooled_r`: Pearson r over every (fact, layer) pair;
- :func:`per_fact_r`: Pearson r across layers within each fact (NaN if either row is flat);
- :func:`r2_table`: R² of OLS fits of success on the layer alone (one-hot, i.e. categorical),
  on the tracing effect alone, and on both; the gain of adding tracing to layer is Hase et
  al.'s "how much does tracing explain beyond the layer";
- :func:`auto_gain`: mean success of per-fact automatic layer choice minus that of the best
  fixed layer, the best layer chosen again inside every bootstrap resample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.errors import InterpEditError

Grid = Float[Tensor, "fact layer"]
R2_TERMS = ("layer", "tracing", "layer + tracing", "tracing beyond layer")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap confidence interval."""

    value: float
    lo: float
    hi: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


# ---- point statistics ----------------------------------------------------------------------
def pearson(x: Float[Tensor, "n"], y: Float[Tensor, "n"]) -> float:
    """Pearson correlation (NaN when either input is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / den) if den > 0 else float("nan")


def pooled_r(effect: Grid, success: Grid) -> float:
    return pearson(effect.flatten(), success.flatten())


def per_fact_r(effect: Grid, success: Grid) -> Float[Tensor, "fact"]:
    """Correlation across layers, one per fact."""
    return torch.tensor([pearson(e, s) for e, s in zip(effect, success)])


def mean_per_fact_r(effect: Grid, success: Grid) -> float:
    r = per_fact_r(effect, success)
    r = r[~r.isnan()]
    return float(r.mean()) if len(r) else float("nan")


def r2_table(effect: Grid, success: Grid) -> dict[str, float]:
    """R² of OLS fits of success on ``layer`` (categorical: one mean per layer), on
    ``tracing`` (linear in the effect), on ``layer + tracing``, and their difference
    ``tracing beyond layer``, all in closed form.

    By Frisch-Waugh-Lovell, adding the effect to the layer dummies explains the fraction
    ``r_w²`` of what the layer leaves, where ``r_w`` correlates effect and success after
    removing each layer's mean from both.
    """
    y, e = success.double(), effect.double()
    total = (y - y.mean()).square().sum()
    if total == 0:
        return dict.fromkeys(R2_TERMS, float("nan"))
    y_w, e_w = y - y.mean(0), e - e.mean(0)  # within-layer deviations
    layer = float(1 - y_w.square().sum() / total)
    r_w = pearson(e_w.flatten(), y_w.flatten())
    both = layer + (1 - layer) * (0.0 if r_w != r_w else r_w**2)
    tracing = pearson(e.flatten(), y.flatten())
    return {"layer": layer, "tracing": 0.0 if tracing != tracing else tracing**2,
            "layer + tracing": both, "tracing beyond layer": both - layer}


def auto_gain(auto: Float[Tensor, "fact"], success: Grid) -> float:
    """Mean success of the automatic layer minus that of the best fixed layer."""
    return float(auto.double().mean() - success.double().mean(0).max())


# ---- bootstrap -------------------------------------------------------------------------------
def bootstrap(
    stat: Callable[..., float],
    *grids: Tensor,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``stat(*grids)`` with a percentile CI from resampling the facts (dim 0 of every grid)."""
    n = len(grids[0])
    if n < 2 or any(len(g) != n for g in grids):
        raise InterpEditError(
            f"bootstrap needs >= 2 facts and equal-length inputs, got {[len(g) for g in grids]}"
        )
    g = torch.Generator().manual_seed(seed)
    draws = torch.tensor([stat(*(x[idx] for x in grids)) for idx in
                          (torch.randint(n, (n,), generator=g) for _ in range(n_boot))])
    draws = draws[~draws.isnan()]
    alpha = (1 - level) / 2
    lo, hi = (torch.quantile(draws.double(), torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
              if len(draws) else (float("nan"),) * 2)
    return Estimate(stat(*grids), float(lo), float(hi), level)


@dataclass(frozen=True)
class LocalizationStats:
    """Every statistic of the study for one success metric, each with its bootstrap CI."""

    metric: str
    n_facts: int
    n_layers: int
    pooled_r: Estimate
    mean_per_fact_r: Estimate
    r2: dict[str, Estimate]
    best_layer: int
    best_layer_success: float
    auto_success: float | None = None
    auto_gain: Estimate | None = None


def localization_stats(
    effect: Grid,
    success: Grid,
    layers: list[int] | tuple[int, ...],
    *,
    metric: str = "success",
    auto: Float[Tensor, "fact"] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LocalizationStats:
    """All statistics of the study for one metric (see the module docstring)."""
    if effect.shape != success.shape or effect.shape[1] != len(layers):
        raise InterpEditError(
            f"effect {tuple(effect.shape)} and success {tuple(success.shape)} must both be "
            f"[fact, layer] with {len(layers)} layers"
        )
    kw = dict(n_boot=n_boot, seed=seed)
    r2 = {name: bootstrap(lambda e, s, k=name: r2_table(e, s)[k], effect, success, **kw)
          for name in R2_TERMS}
    means = success.double().mean(0)
    return LocalizationStats(
        metric=metric,
        n_facts=len(effect),
        n_layers=len(layers),
        pooled_r=bootstrap(pooled_r, effect, success, **kw),
        mean_per_fact_r=bootstrap(mean_per_fact_r, effect, success, **kw),
        r2=r2,
        best_layer=int(layers[int(means.argmax())]),
        best_layer_success=float(means.max()),
        auto_success=None if auto is None else float(auto.double().mean()),
        auto_gain=None if auto is None else bootstrap(auto_gain, auto, success, **kw),
    )
