"""Figures of the localization-vs-editing study (Hase et al. 2023), drawn from a
:class:`~interp_edit.analysis.localization_study.LocalizationStudy`; no model is run.

    plot_effect_vs_success(study)   # tracing effect vs edit success, one point per (fact, layer)
    plot_layerwise(study)           # per layer: mean tracing effect (left) and edit success (right)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from interp_edit.plotting import style as st

if TYPE_CHECKING:
    from interp_edit.analysis.localization_study import LocalizationStudy

METRIC_SHORT = {"efficacy_gap": "efficacy", "paraphrase_gap": "paraphrase",
                "neighborhood_gap": "neighbourhood"}
METRIC_COLOR = {"efficacy_gap": "#D55E00", "paraphrase_gap": "#E69F00",
                "neighborhood_gap": "#0072B2"}
METRIC_AXIS = {"efficacy_gap": "p(new) \u2212 p(true) on the edit prompt",
               "paraphrase_gap": "p(new) \u2212 p(true) on paraphrases",
               "neighborhood_gap": "p(true) \u2212 p(new) on neighbours"}


def _subtitle(study: LocalizationStudy) -> str:
    return (f"{study.model_name}: {study.n_facts} facts, ROME at layers {_layers(study.layers)}\n"
            f"tracing effect: MLP window {study.window}, {study.samples} noise samples, "
            "last subject token")


def plot_effect_vs_success(
    study: LocalizationStudy,
    metrics: Sequence[str] | None = None,
    *,
    n_boot: int = 500,
    width: float = st.TEXT_WIDTH,
    height: float = 2.8,
) -> Figure:
    """Scatter of the tracing effect at the edit layer against edit success, coloured by the
    edit layer, one panel per success metric, with the pooled r and the R² of layer vs
    layer + tracing (95% bootstrap CIs over facts) in each panel."""
    metrics = list(study.metrics if metrics is None else metrics)
    cmap, norm = colormaps["viridis"], Normalize(min(study.layers), max(study.layers))
    with st.style():
        fig = st.new_figure(width, height)
        axes = np.atleast_1d(fig.subplots(1, len(metrics)))
        for ax, m in zip(axes, metrics):
            effect, success = (x.numpy() for x in study.grid(m))
            colors = np.broadcast_to(np.asarray(study.layers), effect.shape)
            sc = ax.scatter(effect.ravel(), success.ravel(), c=colors.ravel(), cmap=cmap, norm=norm,
                            s=5, alpha=0.7, linewidths=0)
            s = study.stats(m, n_boot=n_boot)
            r = s.pooled_r
            ax.set_title(f"{METRIC_AXIS.get(m, m)}\n"
                         f"pooled r = {r.value:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}]\n"
                         f"R² layer {s.r2['layer'].value:.2f}, layer + tracing "
                         f"{s.r2['layer + tracing'].value:.2f}")
            ax.set_xlabel("tracing effect at the edit layer")
            ax.set_ylabel(METRIC_AXIS.get(m, m).split(" on ")[0])
        cb = fig.colorbar(sc, ax=axes, fraction=0.03, pad=0.01, aspect=30)
        cb.set_label("edit layer")
        fig.suptitle(f"Does the tracing effect predict edit success?\n{_subtitle(study)}")
    return fig


def plot_layerwise(
    study: LocalizationStudy,
    metrics: Sequence[str] | None = None,
    *,
    width: float = st.TEXT_WIDTH * 0.8,
    height: float = 2.8,
) -> Figure:
    """Per layer: the mean MLP tracing effect (left axis, every layer) and the mean edit
    success (right axis, edited layers), each with a 95% normal CI band over facts; ticks on
    the top edge count how often ``layer="auto"`` chose each layer."""
    metrics = list(study.metrics if metrics is None else metrics)
    n_layers = study.effect.shape[1]
    with st.style():
        fig = st.new_figure(width, height)
        ax = fig.add_subplot()
        ax.spines["right"].set_visible(True)
        color = st.KIND_COLOR["mlp"]
        _band(ax, np.arange(n_layers), study.effect.numpy(), color, "tracing effect (MLP)")
        ax.set_xlabel('layer (numbers above the axes: facts for which layer="auto" chose it)')
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("mean MLP indirect effect", color=color)
        ax.tick_params(axis="y", colors=color)
        right = ax.twinx()
        for m in metrics:
            _band(right, np.asarray(study.layers), study.success[study.metrics.index(m)].numpy(),
                  METRIC_COLOR.get(m), f"{METRIC_SHORT.get(m, m)} (ROME at that layer)", marker="o")
        right.set_ylabel("mean edit success (magnitude)")
        counts = np.bincount(study.auto_layer.numpy(), minlength=n_layers)
        for layer, c in enumerate(counts):
            if c:
                ax.annotate(str(c), (layer, 1.0), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=5.5, color="0.3")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = right.get_legend_handles_labels()
        fig.legend(h1 + h2, l1 + l2, loc="outside lower center", ncol=2)
        fig.suptitle("Tracing effect and edit success by layer (mean, 95% CI)\n" + _subtitle(study))
    return fig


def _band(
    ax, x: np.ndarray, values: np.ndarray, color, label: str, marker: str | None = None
) -> None:
    """Mean over facts (rows) with a mean ± 1.96 SE band."""
    mean = np.nanmean(values, axis=0)
    se = np.nanstd(values, axis=0, ddof=1) / np.sqrt(np.sum(~np.isnan(values), axis=0))
    ax.plot(x, mean, color=color, label=label, marker=marker, ms=2.5)
    ax.fill_between(x, mean - 1.96 * se, mean + 1.96 * se, color=color, alpha=0.18, lw=0)


def _layers(layers: Sequence[int]) -> str:
    layers = list(layers)
    step = layers[1] - layers[0] if len(layers) > 1 else 1
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1, step)):
        span = f"{layers[0]}..{layers[-1]}"
        return f"{span} (every {step})" if step > 1 else span
    return ", ".join(map(str, layers))
