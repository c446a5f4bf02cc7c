"""Edit-effect figures: what an edit changed inside the model. Drawn from an
:class:`~interp_edit.analysis.ActivationDiff` (and, for the side-by-side traces, two
``TraceResult``); nothing is recomputed.

    plot_change_curves(diff)        # per-layer change for each prompt kind, one panel per site
    plot_change_heatmap(diff)       # token x layer change of the residual stream
    plot_logit_lens(diff)           # logit-lens p(old) and p(new) before/after, per prompt kind
    plot_trace_before_after(b, a)   # the edited fact's causal trace before and after the edit

Every change is ``||after - before||`` divided by the pre-edit residual norm ``||h||`` at the
same token and layer, so early and late layers are comparable. A dotted line marks the layer(s)
whose weights the edit changed. In-context edits (IKE) say in the title that "after" had the
demonstrations prepended and that the prompt's aligned final tokens are compared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from interp_edit.plotting import style as st
from interp_edit.plotting.heatmaps import (
    draw_grid,
    figure_height,
    plot_trace,
    subject_marked_tokens,
)

if TYPE_CHECKING:
    from interp_edit.analysis.activations import ActivationDiff
    from interp_edit.tracing.results import TraceResult

# prompt kinds (Okabe-Ito, colour-blind safe): moved prompts warm, controls cool/grey
KIND_COLOR = {"edit": "#D55E00", "paraphrase": "#E69F00", "neighborhood": "#0072B2",
              "unrelated": "#999999"}
KIND_STYLE = {"edit": "-", "paraphrase": (0, (4, 2)), "neighborhood": "-",
              "unrelated": (0, (1, 1.5))}
KIND_LABEL = {"edit": "edit prompt", "paraphrase": "paraphrase", "neighborhood": "neighbourhood",
              "unrelated": "unrelated"}
SITE_TITLE = {"resid": "Residual stream (block output)", "mlp": "MLP output",
              "attn": "Attention output"}
TARGET_COLOR = ("#0072B2", "#D55E00")  # (target_true, target_new)
ALIGNED_NOTE = ("IKE: 'after' has the demonstrations prepended; "
                "compared at the prompt's aligned final tokens")


def edit_title(diff: ActivationDiff) -> str:
    """``ROME edit at layer 5: Eiffel Tower: Paris -> Rome``."""
    where = "in context" if diff.in_context else _layers_text(diff.edit_layers)
    true, new = (t.strip() for t in diff.targets)
    where = f" {where}" if where else ""
    title = f"{diff.method.upper()} edit{where}: {diff.subject}: {true} \u2192 {new}"
    return title + (f"\n{ALIGNED_NOTE}" if diff.in_context else "")


def plot_change_curves(
    diff: ActivationDiff,
    sites: Sequence[str] = ("resid", "mlp", "attn"),
    *,
    position: str = "last",
    width: float = st.TEXT_WIDTH,
    height: float = 2.0,
) -> Figure:
    """Relative change per layer for every prompt kind, one panel per site (all kinds on one
    axis set): an edit should move the edit and paraphrase prompts and leave the others."""
    where = "last token" if position == "last" else "largest over tokens"
    with st.style():
        fig = st.new_figure(width, height)
        axes = np.atleast_1d(fig.subplots(1, len(sites), sharey=True))
        layers = np.arange(diff.n_layers)
        for ax, site in zip(axes, sites):
            curves = diff.curve(site, position).numpy()
            for i, kind in enumerate(diff.kinds):
                ax.plot(layers, curves[i], color=KIND_COLOR.get(kind), ls=KIND_STYLE.get(kind, "-"),
                        label=KIND_LABEL.get(kind, kind))
            _mark_edit_layers(ax, diff)
            ax.set_title(SITE_TITLE[site])
            ax.set_xlabel("layer")
        axes[0].set_ylabel(f"\u2016\u0394\u2016 / \u2016h before\u2016 ({where})")
        _legend_below(fig, axes[0], len(diff.kinds) + 1)
        fig.suptitle(edit_title(diff))
    return fig


def plot_change_heatmap(
    diff: ActivationDiff,
    kinds: Sequence[str] | None = None,
    *,
    width: float = st.TEXT_WIDTH,
) -> Figure:
    """Token x layer relative change of the residual stream, one panel per prompt kind, on one
    colour scale (subject tokens marked ``*``)."""
    kinds = list(diff.kinds if kinds is None else kinds)
    rel = diff.relative("resid").numpy()
    vmax = float(np.nanmax(rel[[diff.index(k) for k in kinds]]))
    n_rows = max(len(diff.tokens[diff.index(k)]) for k in kinds)
    with st.style():
        fig = st.new_figure(width, figure_height(n_rows) + 0.35)
        axes = np.atleast_1d(fig.subplots(1, len(kinds)))
        for ax, kind in zip(axes, kinds):
            i = diff.index(kind)
            labels = subject_marked_tokens(diff.tokens[i], diff.subject_ranges[i])
            pad = n_rows - len(labels)  # blank rows below short prompts: equal row heights
            draw_grid(
                ax, rel[i, :n_rows], row_labels=None, cmap="Purples", vmin=0.0,
                vmax=vmax, xlabel="layer", title=KIND_LABEL.get(kind, kind), colorbar_label=None,
            )
            for layer in diff.edit_layers:  # over the prompt's own rows only
                ax.axvline(layer, ymin=pad / n_rows, color="k", lw=0.6, ls=":")
            ax.set_yticks(range(len(labels)), labels)
            ax.tick_params(axis="y", labelleft=True, length=st.RC["ytick.major.size"])
        cb = fig.colorbar(axes[0].images[0], ax=list(axes), fraction=0.02, pad=0.01, aspect=30)
        cb.set_label("\u2016\u0394h\u2016 / \u2016h before\u2016")
        fig.suptitle(edit_title(diff) + "\nchange of the residual stream at each token and layer")
    return fig


def plot_logit_lens(
    diff: ActivationDiff,
    kinds: Sequence[str] | None = None,
    *,
    width: float = st.TEXT_WIDTH,
    height: float = 2.0,
) -> Figure:
    """Logit-lens probability of the old and new answer at the last token, layer by layer,
    before (dashed) and after (solid) the edit: where does the new answer take over?"""
    kinds = list(diff.kinds if kinds is None else kinds)
    layers = np.arange(diff.n_layers)
    with st.style():
        fig = st.new_figure(width, height)
        axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
        for ax, kind in zip(axes, kinds):
            i = diff.index(kind)
            for t, target in enumerate(diff.targets):
                states = ((diff.lens_before, "--", "before"), (diff.lens_after, "-", "after"))
                for lens, ls, state in states:
                    ax.plot(layers, lens[i, :, t].numpy(), ls=ls, color=TARGET_COLOR[t],
                            label=f"{st.target_label(target)} {state}")
            _mark_edit_layers(ax, diff)
            ax.set_title(KIND_LABEL.get(kind, kind))
            ax.set_xlabel("layer")
            ax.set_ylim(-0.02, 1.02)
        axes[0].set_ylabel("logit-lens probability, last token")
        _legend_below(fig, axes[0], 5)
        fig.suptitle(edit_title(diff))
    return fig


def plot_trace_before_after(
    before: TraceResult,
    after: TraceResult,
    *,
    width: float = st.TEXT_WIDTH,
    title: str | None = None,
) -> Figure:
    """The edited fact's causal trace before the edit (old answer) and after it (new answer),
    side by side: where does the new fact live?"""
    with st.style():
        fig = st.new_figure(width, figure_height(before.n_tokens) + 0.45)
        axes = fig.subplots(1, 2, sharey=True)
        states = ("Before the edit", "After the edit")
        for j, (ax, r, state) in enumerate(zip(axes, (before, after), states)):
            head = (f"{state}: {st.target_label(r.target)}, corrupted {r.low_score:.2f}, "
                    f"clean {r.high_score:.2f}")
            plot_trace(r, ax, title=head, show_tokens=j == 0)
        fig.suptitle(title or st.restored_title(before.kind, before.window, before.sever,
                                                before.method))
    return fig


def _legend_below(fig: Figure, ax: Axes, ncol: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol)


def _mark_edit_layers(ax: Axes, diff: ActivationDiff) -> None:
    for k, layer in enumerate(diff.edit_layers):
        ax.axvline(layer, color="k", lw=0.6, ls=":", label="edited layer" if k == 0 else None)


def _layers_text(layers: Sequence[int]) -> str:
    if not layers:
        return ""
    if len(layers) == 1:
        return f"at layer {layers[0]}"
    contiguous = list(layers) == list(range(layers[0], layers[-1] + 1))
    if contiguous:
        return f"at layers {layers[0]}\u2013{layers[-1]}"
    return f"at layers {', '.join(map(str, layers))}"
