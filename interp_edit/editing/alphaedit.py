"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2025).

MEMIT's procedure (:func:`~interp_edit.editing.memit.mass_edit`: the same targets, keys,
statistics and layer range) with another update at each layer: ΔW's rows are confined to the
approximate null space of the layer's key statistics C (eigenvectors with eigenvalues below
``null_threshold`` × the mean eigenvalue), so keys of ordinary text, which C summarises, map to
the values they mapped to before (:func:`~interp_edit.editing.update.alphaedit_update`).

Repeated ``edit(model, ..., method="alphaedit")`` calls are sequential editing: each call reads
the keys that the edits still applied to the model wrote at each layer (``AppliedEdit.keys``,
of ROME, MEMIT and AlphaEdit edits alike) and keeps them mapped where they are, in the
objective ‖ΔW K_p‖². Undoing an edit restores the weights bit for bit; once undone, its keys
are no longer protected. Undo goes newest first (the framework enforces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from interp_edit.editing.base import AppliedEdit, EditRequest, applied_edits, parameter_name
from interp_edit.editing.base import register_editor
from interp_edit.editing.memit import MEMITHparams, mass_edit
from interp_edit.editing.update import alphaedit_update, null_basis
from interp_edit.errors import InterpEditError
from interp_edit.models import Model


@dataclass(frozen=True)
class AlphaEditHparams(MEMITHparams):
    """MEMIT's settings plus the null space's cut-off and the update's L2 weight."""

    null_threshold: float = 1e-2  # eigenvalues below this × the mean span the null space
    alpha: float = 10.0  # α: ‖ΔW‖² weight in the update's objective

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.null_threshold > 0:
            raise InterpEditError("null_threshold must be positive")
        if self.alpha < 0:
            raise InterpEditError("alpha must be >= 0")


@register_editor("alphaedit", AlphaEditHparams)
def apply_alphaedit(model: Model, requests: Sequence[EditRequest],
                    hp: AlphaEditHparams) -> AppliedEdit:
    protected = protected_keys(model)
    null_dims: dict[int, int] = {}
    n_protected: dict[int, int] = {}

    def update(layer: int, resid: Tensor, keys: Tensor, mom2: Tensor) -> Tensor:
        basis = null_basis(mom2, hp.null_threshold)
        earlier = protected.get(parameter_name(model, model.mlp_out_proj(layer)))
        null_dims[layer] = basis.shape[1]
        n_protected[layer] = 0 if earlier is None else earlier.shape[1]
        return alphaedit_update(resid, keys, basis, earlier, alpha=hp.alpha)

    applied = mass_edit(model, requests, hp, "alphaedit", update)
    applied.info["null_dims"] = null_dims
    applied.info["protected_keys"] = n_protected
    return applied


def protected_keys(model: Model) -> dict[str, Tensor]:
    """Parameter name -> the keys ``[d_in, m]`` that the edits applied to ``model`` wrote."""
    out: dict[str, list[Tensor]] = {}
    for e in applied_edits(model):
        for name, keys in e.keys.items():
            out.setdefault(name, []).append(keys)
    return {name: torch.cat(ks).T for name, ks in out.items()}
