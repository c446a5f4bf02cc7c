"""``method="screen+exact"``: screen the whole grid, then confirm its best cells exactly.

The attribution screen (:mod:`.attribution`, any ``estimate=``) scores every cell from one
gradient pass; the fast engine (:mod:`.engine`) then computes the exact score of the
screen's ``top`` cells of each kind and of any cells asked for (``exact_cells``), then
climbs: on the three tokens whose best exact cells are highest, while a cell near a token's
best exact cell (up to three layers up or down, or the same layer one token over) is not
exact, it is confirmed too (:func:`_climb`), so that the reported peak is a peak of the
exact grid, not only the best of the screen's guesses (the exact grid has plateaus of
near-equal cells that no screen orders reliably). The result holds the
screen's estimates elsewhere and marks the exact cells (``TraceResult.exact``); its peak
(:meth:`TraceResult.top_cells`) is taken among them.
Confirmed cells are the exact trace's values bit for bit: the engine computes each cell
from the same cached clean and corrupted runs whatever else it computes with it.
``low_score`` and ``high_score`` are the exact ones.
"""

from __future__ import annotations

from typing import Sequence

import torch

from interp_edit.tracing import attribution, engine
from interp_edit.tracing.inputs import DEFAULT_TOP, TraceInputs, Traced

CLIMB_ROWS = 3  # tokens climbed from: those whose best exact cells are highest
CLIMB_LAYERS = 3  # how far along the layers a climb looks from a token's best exact cell


def run(inputs: TraceInputs, kinds, *, window, sever, cells, progress, precision=None,
        estimate="logodds", top: int = DEFAULT_TOP,
        exact_cells: Sequence[tuple[int, int]] = ()) -> Traced:
    """``inputs`` come with prepare's clean pass (the engine reads it; the screen runs the
    clean prompt in its own batch and uses the same target)."""
    screen = attribution.run(inputs, kinds, window=window, sever=None, cells=cells,
                             progress=progress, precision=precision, estimate=estimate)
    grids, exact, low = {}, {}, screen.low_score
    for kind in kinds:
        grid = screen.grids[kind].clone()
        done = (screen.exact or {}).get(kind, torch.zeros_like(grid, dtype=torch.bool))
        chosen = _chosen(grid, done, top, exact_cells)
        while chosen:
            confirmed = engine.run(inputs, (kind,), window=window, sever=sever, cells=chosen,
                                   progress=progress)
            mask = ~confirmed.grids[kind].isnan()
            grid[mask] = confirmed.grids[kind][mask]
            done, low = done | mask, confirmed.low_score
            chosen = _climb(grid, done, cells) if top else []
        grids[kind], exact[kind] = grid, done
    return Traced(grids, low, inputs if inputs.high_score is not None else screen.inputs,
                  exact)


def _climb(grid: torch.Tensor, done: torch.Tensor, cells) -> list[tuple[int, int]]:
    """The cells near the best exact cell of each of the :data:`CLIMB_ROWS` tokens whose
    best exact cells are highest (the same token up to :data:`CLIMB_LAYERS` layers up or
    down, the same layer one token over) that are not exact yet, among the cells asked
    for. Confirming them until there are none climbs to a peak of the exact grid on each
    of those tokens: the exact grids are smooth along layers but bumpy on their plateaus, and
    the exact peak is often on another of the screen's best tokens than its top cell."""
    exact = torch.nan_to_num(grid.masked_fill(~done, float("nan")), nan=-float("inf"))
    row_best, row_layer = exact.max(1)
    allowed, out = set(map(tuple, cells)), []
    for t in row_best.argsort(descending=True)[:CLIMB_ROWS].tolist():
        if row_best[t] == -float("inf"):
            break
        layer = int(row_layer[t])
        near = [(t, layer + d) for d in range(-CLIMB_LAYERS, CLIMB_LAYERS + 1) if d]
        near += [(t - 1, layer), (t + 1, layer)]
        out += [c for c in near if c in allowed and not done[c] and c not in out]
    return out


def _chosen(grid: torch.Tensor, done: torch.Tensor, top: int,
            asked: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ``top`` best screened cells not yet exact, and the asked-for ones."""
    n_layers = grid.shape[1]
    flat = torch.nan_to_num(grid.masked_fill(done, float("nan")), nan=-float("inf")).flatten()
    free = int((flat > -float("inf")).sum())
    best = flat.topk(min(top, free)).indices.tolist() if top and free else []
    cells = {(i // n_layers, i % n_layers) for i in best}
    cells |= {(int(t), int(layer)) for t, layer in asked if not done[t, layer]}
    return sorted(cells)
