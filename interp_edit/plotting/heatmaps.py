"""Causal-tracing heatmaps in the style of ROME's Fig. 1 (Meng et al. 2022).

Rows are the prompt's tokens (subject tokens marked ``*``), columns are layers, colour is
p(target) with that cell restored; the colour scale starts at the corrupted score, so white
means "restoring this state does not help at all". These functions only draw: they take
``TraceResult`` / ``TraceSet`` objects and never run the model.

    fig = plot_trace(result)                 # one kind, 3.5 in wide (a paper column)
    fig = plot_trace_set(ie.trace_all(...))  # hidden states | MLP | attention, 7 in wide
    fig.savefig("trace.pdf")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from interp_edit.plotting import style as st

if TYPE_CHECKING:
    from interp_edit.tracing.average import AverageTrace
    from interp_edit.tracing.results import TraceResult, TraceSet

_ROW_HEIGHT = 0.13  # inches per token row
_MARGIN = 0.75  # title, x label and ticks


def plot_trace(
    result: TraceResult,
    ax: Axes | None = None,
    *,
    title: str | None = None,
    colorbar: bool = True,
    show_tokens: bool = True,
    vmax: float | None = None,
    width: float = st.COLUMN_WIDTH,
) -> Figure:
    """Draw one trace as a heatmap; returns the figure (a new one unless ``ax`` is given).

    ``title`` defaults to what was restored plus the corrupted and clean p(target);
    ``vmax`` defaults to the largest restored score (``vmin`` is always the corrupted score).
    """
    with st.style():
        if ax is None:
            fig = st.new_figure(width, figure_height(result.n_tokens))
            ax = fig.add_subplot()
        if title is None:
            restored = st.restored_title(result.kind, result.window, result.sever, result.method)
            title = f"{restored}\n{score_line(result)}"
        tokens = subject_marked_tokens(result.tokens, result.subject_range)
        draw_grid(
            ax,
            _numpy(result.scores),
            row_labels=tokens if show_tokens else None,
            cmap=st.KIND_CMAP[result.kind],
            vmin=float(result.low_score),
            vmax=vmax,
            xlabel=st.layer_axis_label(result.kind, result.window),
            title=title,
            colorbar_label=st.target_label(result.target) if colorbar else None,
        )
        return ax.figure


def plot_trace_set(
    traces: TraceSet, *, width: float = st.TEXT_WIDTH, vmax: float | None = None
) -> Figure:
    """Hidden states | MLP | attention side by side (ROME Fig. 1); token labels on the left."""
    results = [r for r in (traces.resid, traces.mlp, traces.attn) if r is not None]
    first = results[0]
    with st.style():
        fig = st.new_figure(width, figure_height(first.n_tokens) + 0.2)
        axes = fig.subplots(1, len(results))
        for i, (ax, r) in enumerate(zip(np.atleast_1d(axes), results)):
            short = st.KIND_SHORT[r.kind] + ("" if r.kind == "resid" else f", window {r.window}")
            if r.sever:
                short += f"; {st.SEVER_NAME[r.sever]}"
            plot_trace(r, ax, title=short, show_tokens=i == 0, vmax=vmax)
        method = " (attribution estimate)" if first.method == "attribution" else ""
        fig.suptitle(f"Restoring one state at a time{method}; {score_line(first)}")
    return fig


def plot_average_heatmaps(
    avg: AverageTrace, kinds: Sequence[str] | None = None, *, width: float = st.TEXT_WIDTH
) -> Figure:
    """Mean AIE per token group (rows) and layer, one panel per kind (ROME Fig. 2, left).

    White is no effect (``vmin=0``); each panel has its own colour scale.
    """
    kinds = [k for k in ("resid", "mlp", "attn") if avg.has(k)] if kinds is None else list(kinds)
    with st.style():
        fig = st.new_figure(width, figure_height(len(avg.groups)) + 0.2)
        axes = np.atleast_1d(fig.subplots(1, len(kinds)))
        for i, (ax, kind) in enumerate(zip(axes, kinds)):
            draw_grid(
                ax,
                avg.stats(kind).mean.numpy(),
                row_labels=list(avg.groups) if i == 0 else None,
                cmap=st.KIND_CMAP[kind],
                vmin=0.0,
                vmax=None,
                xlabel=st.layer_axis_label(kind, avg.window),
                title=st.KIND_SHORT[kind] + ("" if kind == "resid" else f", window {avg.window}"),
                colorbar_label="AIE",
            )
        fig.suptitle(f"Average indirect effect over {avg.n_facts} facts")
    return fig


def draw_grid(
    ax: Axes,
    values: np.ndarray,
    *,
    row_labels: Sequence[str] | None,
    cmap: str,
    vmin: float | None,
    vmax: float | None,
    xlabel: str,
    title: str,
    colorbar_label: str | None,
) -> None:
    """The shared heatmap drawing: rows top to bottom, one column per layer, integer ticks.

    Also used for averaged heatmaps, whose rows are token groups instead of tokens.
    """
    n_rows, n_cols = values.shape
    if vmax is None:
        vmax = float(np.nanmax(values))
    if vmin is not None and vmax <= vmin:  # nothing restored anything: keep a valid scale
        vmax = vmin + 1e-6
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_rows))
    if row_labels is not None:
        ax.set_yticklabels(row_labels)
    else:  # a panel to the right of one that has the labels
        ax.tick_params(axis="y", labelleft=False, length=0)
    step = _layer_step(n_cols)
    ax.set_xticks(range(0, n_cols, step))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.tick_params(
        axis="both", labelsize=st.RC["xtick.labelsize"], width=st.RC["xtick.major.width"],
        length=st.RC["xtick.major.size"],
    )
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(st.RC["axes.linewidth"])
    if colorbar_label is not None:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.06, pad=0.02, aspect=25)
        cb.set_label(colorbar_label)
        cb.ax.tick_params(labelsize=st.RC["xtick.labelsize"], width=0.5, length=2)
        cb.outline.set_linewidth(0.5)


def subject_marked_tokens(tokens: Sequence[str], subject_range: tuple[int, int]) -> list[str]:
    """Tick labels: each token as decoded, subject tokens followed by ``*`` (as in ROME)."""
    start, end = subject_range
    return [st.token_label(t) + ("*" if start <= i < end else "") for i, t in enumerate(tokens)]


def score_line(result: TraceResult) -> str:
    """``p(Paris): corrupted 0.03, clean 0.71`` for a title."""
    return (
        f"{st.target_label(result.target)}: corrupted {result.low_score:.2f}, "
        f"clean {result.high_score:.2f}"
    )


def figure_height(n_rows: int) -> float:
    return _MARGIN + _ROW_HEIGHT * max(n_rows, 4)


def _layer_step(n_layers: int) -> int:
    return next(s for s in (1, 2, 5, 10, 20, 50) if n_layers / s <= 8)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, float)
