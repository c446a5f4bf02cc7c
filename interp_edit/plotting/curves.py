"""Average-indirect-effect curves over a dataset (ROME Figs. 2 and 3), drawn from an
:class:`~interp_edit.tracing.average.AverageTrace`; nothing is recomputed.

    plot_aie(avg)        # AIE by layer per token group, one panel per kind, 95% CI bands
    plot_severed(avg)    # AIE at the last subject token: no / MLP / attention severing
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from interp_edit.plotting import style as st

if TYPE_CHECKING:
    from interp_edit.tracing.average import AverageTrace, GroupStats


def plot_aie(
    avg: AverageTrace,
    kinds: Sequence[str] | None = None,
    *,
    groups: Sequence[str] | None = None,
    method: str | None = None,
    width: float = st.TEXT_WIDTH,
    height: float = 2.1,
    title: str | None = None,
) -> Figure:
    """AIE by layer for each token group with 95% CI bands, one panel per kind.

    ``kinds`` defaults to every kind traced without severing; ``groups`` to all six of ROME's
    token groups; ``method=None`` uses an exact trace where there is one.
    """
    kinds = [k for k in ("resid", "mlp", "attn") if avg.has(k)] if kinds is None else list(kinds)
    groups = list(avg.groups if groups is None else groups)
    with st.style():
        fig = st.new_figure(width, height)
        axes = np.atleast_1d(fig.subplots(1, len(kinds)))
        for i, (ax, kind) in enumerate(zip(axes, kinds)):
            cond = avg.condition(kind, None, method)
            s = avg.stats(kind, None, cond.method)
            for group in groups:
                g = avg.groups.index(group)
                label = group if int(s.n[g]) == avg.n_facts else f"{group} (n={int(s.n[g])})"
                _band(ax, s, g, st.GROUP_COLOR.get(group, "k"), label,
                      emphasis=group in st.EMPHASISED_GROUPS)
            panel = st.KIND_SHORT[kind] + ("" if kind == "resid" else f", window {avg.window}")
            if not cond.exact:
                panel += f" ({cond.method})"
            _finish(ax, panel, st.layer_axis_label(kind, avg.window),
                    "average indirect effect" if i == 0 else None)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3))
        fig.suptitle(title if title is not None else _dataset_line(avg))
    return fig


def plot_severed(
    avg: AverageTrace,
    *,
    group: str = "last subject token",
    ax: Axes | None = None,
    width: float = st.COLUMN_WIDTH,
    height: float = 2.2,
    title: str | None = None,
) -> Figure:
    """AIE of restoring one hidden state at ``group`` by layer, with the MLP or attention
    outputs of the later layers at that token held at their corrupted values (ROME Fig. 3).

    Lines are drawn for whichever of no / MLP / attention severing were traced.
    """
    severs = [s for s in (None, "mlp", "attn") if avg.has("resid", s)]
    g = avg.groups.index(group)
    with st.style():
        if ax is None:
            fig = st.new_figure(width, height)
            ax = fig.add_subplot()
        for sever in severs:
            s = avg.stats("resid", sever)
            _band(ax, s, g, st.SEVER_COLOR[sever], st.SEVER_NAME[sever], emphasis=True)
        model = avg.model_name.rsplit("/", 1)[-1]
        default = (f"Restoring the hidden state at the {group}\n"
                   f"{model}, n = {avg.n_facts} facts, 95% CI")
        _finish(ax, title if title is not None else default,
                "layer of the restored hidden state", "average indirect effect")
        ax.legend(loc="best")
    return ax.figure


def _band(ax: Axes, s: GroupStats, g: int, color: str, label: str, *, emphasis: bool) -> None:
    """One mean line with its CI as a shaded band."""
    layers = np.arange(s.mean.shape[1])
    mean, lo, hi = (t[g].numpy() for t in (s.mean, s.lo, s.hi))
    ax.plot(layers, mean, color=color, label=label, lw=1.5 if emphasis else 1.0,
            ls="-" if emphasis else (0, (4, 1.5)))
    ax.fill_between(layers, lo, hi, color=color, alpha=0.18, lw=0)


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str | None) -> None:
    ax.axhline(0, color="0.6", lw=0.5, zorder=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.margins(x=0.01)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=st.RC["xtick.labelsize"])


def _dataset_line(avg: AverageTrace) -> str:
    """``SmolLM2-135M-Instruct, n = 87 of 100 facts, noise std 0.13, 10 samples`` for titles."""
    model = avg.model_name.rsplit("/", 1)[-1]
    return (f"{model}: {avg.n_facts} of {avg.n_candidates} facts predicted top-1, "
            f"noise std {avg.noise_std:.3g}, {avg.samples} samples; 95% CI")
