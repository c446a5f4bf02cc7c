"""Figures for papers and notebooks. Every function takes results and only draws.

- :mod:`~interp_edit.plotting.heatmaps`: single-fact tracing heatmaps (ROME Fig. 1) and
  averaged token-group heatmaps.
- :mod:`~interp_edit.plotting.curves`: average indirect effect by layer (ROME Fig. 2) and the
  severed-path comparison (ROME Fig. 3).
- :mod:`~interp_edit.plotting.style`: sizes, fonts, colours and label wording, in one place.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot: save them with
``fig.savefig("x.pdf")``; a notebook displays a returned figure once.
"""

from interp_edit.plotting.curves import plot_aie, plot_severed
from interp_edit.plotting.heatmaps import plot_average_heatmaps, plot_trace, plot_trace_set
from interp_edit.plotting.style import COLUMN_WIDTH, TEXT_WIDTH

__all__ = [
    "COLUMN_WIDTH",
    "TEXT_WIDTH",
    "plot_aie",
    "plot_average_heatmaps",
    "plot_severed",
    "plot_trace",
    "plot_trace_set",
]
