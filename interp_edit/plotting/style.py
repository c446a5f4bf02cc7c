"""The one place for figure style: sizes, fonts, colours and the wording of labels.

Every plotting function draws inside :func:`style` and creates its figure with
:func:`new_figure`, so fonts and sizes agree across figures. Figures are built without
pyplot (``matplotlib.figure.Figure``): they never leak into a script's global state, and a
notebook shows a returned figure exactly once.

Sizes are for papers: :data:`COLUMN_WIDTH` (one column, 3.5 in) and :data:`TEXT_WIDTH`
(two columns, 7 in). Text is 7-8 pt at those widths; figures carry ``dpi=150`` so they are
also legible in a notebook.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import matplotlib
from matplotlib.figure import Figure

COLUMN_WIDTH = 3.5  # inches
TEXT_WIDTH = 7.0
SAVE_DPI = 200

RC = {
    "font.family": "DejaVu Sans",
    "font.size": 7.5,
    "axes.titlesize": 8,
    "axes.labelsize": 7.5,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 6.5,
    "figure.titlesize": 8.5,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.2,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "figure.dpi": 150,
    "savefig.dpi": SAVE_DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
    "svg.fonttype": "none",
}

# ---- kinds of restored state -------------------------------------------------------------
KIND_CMAP = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_COLOR = {"resid": "#6a51a3", "mlp": "#238b45", "attn": "#cb181d"}  # dark end of each cmap
KIND_NAME = {"resid": "hidden states", "mlp": "MLP outputs", "attn": "attention outputs"}
KIND_SHORT = {"resid": "Hidden states", "mlp": "MLP", "attn": "Attention"}
SEVER_NAME = {None: "no severing", "mlp": "MLP severed", "attn": "attention severed"}
SEVER_COLOR = {None: KIND_COLOR["resid"], "mlp": KIND_COLOR["mlp"], "attn": KIND_COLOR["attn"]}

# ---- token groups of ROME's average plots (Okabe-Ito colours, colour-blind safe) ----------
GROUP_COLOR = {
    "first subject token": "#56B4E9",
    "middle subject tokens": "#999999",
    "last subject token": "#0072B2",
    "first subsequent token": "#E69F00",
    "further tokens": "#CC79A7",
    "last token": "#D55E00",
}
EMPHASISED_GROUPS = ("last subject token", "last token")


@contextmanager
def style() -> Iterator[None]:
    """Apply the house rc parameters for the duration of a drawing."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float, **kwargs) -> Figure:
    """A pyplot-free figure with constrained layout; call inside :func:`style`."""
    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def target_label(target: str) -> str:
    """How a target token is written in labels: ``p(Paris)`` style, spaces made visible
    only when the token is nothing but whitespace."""
    text = target.strip()
    return f"p({text})" if text else f"p({target!r})"


def token_label(token: str) -> str:
    """A token as a tick label: newlines and tabs escaped, the rest as decoded."""
    return token.replace("\n", "\\n").replace("\t", "\\t") or "''"


def layer_axis_label(kind: str, window: int) -> str:
    """x-axis label: what a column means for this kind of restoration."""
    if kind == "resid":
        return "layer (single restored hidden state)"
    return f"centre of {window} restored {'MLP' if kind == 'mlp' else 'attention'} layers"


def restored_title(kind: str, window: int, sever: str | None = None, method: str = "fast") -> str:
    """An honest short title: what was restored, over how many layers, and how it was scored."""
    what = f"Restoring {KIND_NAME[kind]}"
    if kind != "resid":
        what += f", window {window}"
    if sever:
        what += f"; {SEVER_NAME[sever]}"
    if method == "attribution":
        what += " (attribution estimate)"
    return what


def save_figure(fig: Figure, stem, formats=("png", "pdf")) -> list:
    """Save ``fig`` as ``stem.png``, ``stem.pdf``, ... (directories created, each file written
    atomically); returns the paths."""
    from pathlib import Path

    from interp_edit._files import atomic_path

    stem = Path(stem)
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    for path in paths:
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    return paths
