"""Closed-form weight updates of the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

An MLP output matrix W ``[d_model, d_mlp]`` maps keys k to values W k. An edit asks W + ΔW to
map the batch's keys K ``[d_mlp, n]`` (one column per fact) to W K + R, where R
``[d_model, n]`` is the residual still to be written at this layer, while other keys move
little:

- :func:`memit_update` (Meng et al. 2023): min ‖ΔW K − R‖² + λ ‖ΔW K₀‖², with
  K₀K₀ᵀ ∝ C the key second moment of ordinary text (:mod:`~interp_edit.editing.stats`), whose
  solution ΔW = R Kᵀ (λC + KKᵀ)⁻¹ is computed as R (λI + KᵀC⁻¹K)⁻¹ (C⁻¹K)ᵀ (the same matrix,
  by (λC + KKᵀ) C⁻¹K = K (λI + KᵀC⁻¹K)): an n × n solve instead of d_mlp × d_mlp, and valid
  at λ = 0, where ΔW K = R exactly. One key and λ = 0 is ROME's rank-one update
  (v − Wk*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*) (Meng et al. 2022).
- :func:`alphaedit_update` (Fang et al. 2025): ΔW restricted to rows in the approximate null
  space of C (:func:`null_basis`: eigenvectors U with small eigenvalues), so that keys of
  ordinary text, P K₀ ≈ 0 with P = UUᵀ, map to what they mapped to before; the keys K_p of
  earlier edits still applied enter the objective, min ‖ΔW K − R‖² + ‖ΔW K_p‖² + α‖ΔW‖².
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.editing.stats import solve_mom2
from interp_edit.errors import InterpEditError

_BASES: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}  # (C, null-space basis of C)


def memit_update(
    resid: Float[Tensor, "d_model n"],
    keys: Float[Tensor, "d_mlp n"],
    mom2: Float[Tensor, "d_mlp d_mlp"],
    *,
    weight: float = 0.0,
    ridge: float = 0.0,
) -> Float[Tensor, "d_model d_mlp"]:
    """ΔW = R Kᵀ (λC + KKᵀ)⁻¹ with λ = ``weight``, in float64 (see the module docstring).
    ``ridge`` regularises C (:func:`~interp_edit.editing.stats.solve_mom2`)."""
    c_inv_k = solve_mom2(mom2, keys, ridge)  # [d_mlp, n]
    gram = keys.double().T @ c_inv_k  # [n, n] KᵀC⁻¹K
    gram = gram + weight * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram, resid.double().T)  # [n, d_model] (gram is symmetric)
    return (coef.T @ c_inv_k.T).to(resid.dtype)


def null_basis(mom2: Float[Tensor, "d_mlp d_mlp"], threshold: float) -> Float[Tensor, "d_mlp r"]:
    """Orthonormal eigenvectors of C whose eigenvalues are below ``threshold`` × the mean
    eigenvalue (a scale-free version of AlphaEdit's absolute cut-off), float64. Kept in memory
    per matrix."""
    key = (id(mom2), float(threshold))
    hit = _BASES.get(key)
    if hit is None or hit[0] is not mom2:
        evals, evecs = torch.linalg.eigh(mom2.double())
        basis = evecs[:, evals < threshold * evals.mean()]
        _BASES[key] = hit = (mom2, basis)
    if hit[1].shape[1] == 0:
        raise InterpEditError(
            f"the key second moment has no eigenvalue below {threshold} x its mean: no null "
            "space to edit in; raise null_threshold")
    return hit[1]


def alphaedit_update(
    resid: Float[Tensor, "d_model n"],
    keys: Float[Tensor, "d_mlp n"],
    basis: Float[Tensor, "d_mlp r"],
    protected: Float[Tensor, "d_mlp m"] | None = None,
    *,
    alpha: float = 1.0,
) -> Float[Tensor, "d_model d_mlp"]:
    """ΔW = R Kᵀ P (P (KKᵀ + K_pK_pᵀ) + αI)⁻¹ with P = UUᵀ, computed in the r-dimensional
    null space: ΔW = R Aᵀ (AAᵀ + A_pA_pᵀ + αI)⁻¹ Uᵀ with A = UᵀK, A_p = UᵀK_p (float64).
    ``alpha`` is in units of the keys' mean squared norm (the batch's), so one setting
    serves models whose keys differ in scale."""
    u = basis.double()
    a = u.T @ keys.double()  # [r, n]
    scale = keys.double().square().sum(0).mean()
    gram = a @ a.T + alpha * scale * torch.eye(len(a), dtype=a.dtype, device=a.device)
    if protected is not None and protected.shape[1]:
        ap = u.T @ protected.double()
        gram = gram + ap @ ap.T
    coef = torch.linalg.solve(gram, a @ resid.double().T)  # [r, d_model]
    return (coef.T @ u.T).to(resid.dtype)
