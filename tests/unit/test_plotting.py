"""Figures: contents (labels, grid shape, subject marks, colour limits) and headless rendering.

Traces and averages are built by hand, so these tests never run a model.
"""

from __future__ import annotations

import math

import pytest
import torch

from interp_edit.plotting import (
    COLUMN_WIDTH,
    plot_aie,
    plot_average_heatmaps,
    plot_severed,
    plot_trace,
    plot_trace_set,
)
from interp_edit.tracing.average import GROUPS, AverageTrace, Condition
from interp_edit.tracing.results import TraceResult, TraceSet

TOKENS = ["The", " Eiffel", " Tower", " is", " in", "\n", " of"]
N_LAYERS = 5


def make_trace(kind: str = "resid", sever: str | None = None, low: float = 0.05) -> TraceResult:
    scores = torch.linspace(low, 0.7, len(TOKENS) * N_LAYERS).reshape(len(TOKENS), N_LAYERS)
    return TraceResult(
        scores=scores, low_score=low, high_score=0.8, prompt="".join(TOKENS),
        subject="Eiffel Tower", tokens=TOKENS, token_ids=list(range(len(TOKENS))),
        subject_range=(1, 3), target=" Paris", target_id=99, kind=kind, window=10,
        noise_std=0.1, noise_source="fixed std", samples=3, seed=1, model_name="test-model",
        method="fast", sever=sever,
    )


def make_average(n_facts: int = 4) -> AverageTrace:
    gen = torch.Generator().manual_seed(0)
    conds = (Condition("resid"), Condition("mlp"), Condition("attn"),
             Condition("resid", "mlp"), Condition("resid", "attn"))
    effects = tuple(torch.rand(n_facts, len(GROUPS), N_LAYERS, generator=gen, dtype=torch.float64)
                    for _ in conds)
    effects[1][0, 1] = float("nan")  # one fact without middle subject tokens
    return AverageTrace(
        conditions=conds, effects=effects,
        low_scores=tuple(torch.full((n_facts,), 0.1, dtype=torch.float64) for _ in conds),
        high_scores=torch.full((n_facts,), 0.7, dtype=torch.float64),
        prompts=tuple(f"p{i}" for i in range(n_facts)), subjects=("s",) * n_facts,
        targets=("t",) * n_facts, n_candidates=n_facts + 2, model_name="org/test-model",
        noise_std=0.12, window=10, samples=3, seed=1,
    )


def test_heatmap_grid_labels_and_colour_limits():
    r = make_trace()
    fig = plot_trace(r)
    ax, cax = fig.axes  # heatmap and its colourbar
    image = ax.images[0]
    assert image.get_array().shape == (len(TOKENS), N_LAYERS)  # rows tokens, columns layers
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == len(TOKENS)
    assert [lab.endswith("*") for lab in labels] == [False, True, True, False, False, False, False]
    assert labels[5] == "\\n"  # a newline token is shown escaped
    vmin, vmax = image.get_clim()
    assert vmin == pytest.approx(r.low_score) and vmax == pytest.approx(float(r.scores.max()))
    assert image.get_cmap().name == "Purples"
    assert ax.get_xlabel().startswith("layer")
    assert cax.get_ylabel() == "p(Paris)"
    assert "Restoring hidden states" in ax.get_title()
    assert "corrupted 0.05" in ax.get_title() and "clean 0.80" in ax.get_title()
    assert fig.get_figwidth() == pytest.approx(COLUMN_WIDTH)


@pytest.mark.parametrize(("kind", "cmap", "words"), [
    ("mlp", "Greens", "Restoring MLP outputs, window 10"),
    ("attn", "Reds", "Restoring attention outputs, window 10"),
])
def test_heatmap_kinds_say_what_was_restored(kind, cmap, words):
    fig = plot_trace(make_trace(kind))
    ax = fig.axes[0]
    assert ax.images[0].get_cmap().name == cmap
    assert ax.get_title().startswith(words)
    assert "10 restored" in ax.get_xlabel()


def test_heatmap_title_mentions_severing_and_attribution():
    r = make_trace("resid", sever="mlp")
    assert "MLP severed" in plot_trace(r).axes[0].get_title()


def test_trace_result_plots_itself_into_a_given_axis():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert make_trace().plot(ax=ax) is fig
    assert ax.images


def test_trace_set_has_three_panels_and_one_token_axis():
    ts = TraceSet(make_trace("resid"), make_trace("mlp", low=0.1), make_trace("attn", low=0.2))
    fig = ts.plot()
    heatmaps = [a for a in fig.axes if a.images]
    assert [a.images[0].get_cmap().name for a in heatmaps] == ["Purples", "Greens", "Reds"]
    assert [a.images[0].get_clim()[0] for a in heatmaps] == pytest.approx([0.05, 0.1, 0.2])
    assert len(fig.axes) == 6  # three colourbars
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()][1] == " Eiffel*"
    assert not any(t.get_visible() and t.get_text() for t in heatmaps[1].get_yticklabels())
    assert "p(Paris)" in fig.get_suptitle()


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_figures_render_headless(tmp_path, fmt):
    ts = TraceSet(make_trace("resid"), make_trace("mlp"), make_trace("attn"))
    avg = make_average()
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}[fmt]
    for name, fig in [("one", plot_trace(ts.mlp)), ("three", plot_trace_set(ts)),
                      ("aie", plot_aie(avg)), ("severed", plot_severed(avg)),
                      ("avgmap", plot_average_heatmaps(avg))]:
        path = tmp_path / f"{name}.{fmt}"
        fig.savefig(path)
        assert path.read_bytes()[:5].startswith(magic), name


def test_aie_curves_one_panel_per_kind_with_bands():
    avg = make_average()
    fig = avg.plot()
    axes = fig.axes
    titles = ["Hidden states", "MLP, window 10", "Attention, window 10"]
    assert [a.get_title() for a in axes] == titles
    assert axes[0].get_ylabel() == "average indirect effect"
    for ax, kind in zip(axes, ("resid", "mlp", "attn")):
        assert len(ax.lines) == len(GROUPS) + 1  # six groups and the zero line
        assert len(ax.collections) == len(GROUPS)  # one CI band each
        mean = avg.stats(kind).mean
        assert ax.lines[0].get_ydata() == pytest.approx(mean[0].numpy())
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "first subject token" and legend[-1] == "last token"
    assert "4 of 6 facts" in fig.get_suptitle()
    # the MLP panel says that one mean rests on fewer facts
    assert any("(n=3)" in lab for lab in axes[1].get_legend_handles_labels()[1])


def test_severed_comparison_lines():
    avg = make_average()
    fig = plot_severed(avg)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["no severing", "MLP severed", "attention severed"]
    g = GROUPS.index("last subject token")
    want = avg.stats("resid", "attn").mean[g].numpy()
    assert ax.lines[2].get_ydata() == pytest.approx(want)
    assert "last subject token" in ax.get_title()
    assert not any(math.isnan(v) for v in ax.lines[0].get_ydata())


def test_average_heatmaps_rows_are_token_groups():
    fig = make_average().plot_heatmaps()
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (len(GROUPS), N_LAYERS)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(GROUPS)
    assert ax.images[0].get_clim()[0] == 0
