"""MEND's gradient-transform network (Mitchell et al. 2022).

It maps each token's gradient factors ``(u_t, δ_t)`` of an edited ``[d_out, d_in]`` matrix to
``(û_t, δ̂_t)``: ``z = [norm(u); norm(δ)]`` (running mean and std, collected while training),
then residual blocks ``z + B relu(s_l ⊙ (A z + b) + o_l) + c`` with a low-rank hidden layer,
mapped back to the inputs' scale. ``B = 0`` and ``c = 0`` at init, so an untrained network is
the identity. One network serves every edited matrix of one shape; the per-layer scale and
shift ``s_l, o_l`` (the network's *mode*) tell the layers apart. The editor that owns these
networks and turns their output into weight updates is :class:`interp_edit.editing.mend.MENDEditor`.
"""

from __future__ import annotations

import math

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor, nn


class RunningNorm(nn.Module):
    """Per-feature running mean and std over every vector seen in training mode (Chan et al.'s
    parallel update, float64). With fewer than two vectors seen it is the identity."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Float[Tensor, "n dim"]) -> None:
        n = x.shape[0]
        if n == 0:
            return
        x = x.double()
        batch_mean = x.mean(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.m2 += ((x - batch_mean) ** 2).sum(0) + diff**2 * self.count * n / total
        self.mean += diff * n / total
        self.count.copy_(total)

    @property
    def std(self) -> Float[Tensor, "dim"]:
        return (self.m2 / (self.count - 1).clamp(min=1)).sqrt()

    def forward(self, x: Float[Tensor, "n dim"]) -> Float[Tensor, "n dim"]:
        if self.training:
            self.update(x)
        if self.count < 2:
            return x
        return (x - self.mean.to(x)) / (self.std.to(x) + self.eps)

    def inverse(self, z: Float[Tensor, "n dim"]) -> Float[Tensor, "n dim"]:
        """Back to the input's scale: ``inverse(forward(x)) == x`` (up to rounding)."""
        if self.count < 2:
            return z
        return z * (self.std.to(z) + self.eps) + self.mean.to(z)


class _ResidualBlock(nn.Module):
    """z + B relu(s_l ⊙ (A z + b) + o_l) + c, with a rank-``rank`` hidden layer and per-layer
    (``mode``) scale s and shift o. B = 0 and c = 0 at init: the block starts as the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))  # A
        self.down_bias = nn.Parameter(torch.zeros(rank))  # b
        self.up = nn.Parameter(torch.zeros(dim, rank))  # B
        self.up_bias = nn.Parameter(torch.zeros(dim))  # c
        self.scale = nn.Parameter(torch.ones(n_modes, rank))  # s_l
        self.shift = nn.Parameter(torch.zeros(n_modes, rank))  # o_l

    def forward(self, z: Float[Tensor, "n dim"], mode: int) -> Float[Tensor, "n dim"]:
        hidden = einsum(z, self.down, "n dim, rank dim -> n rank") + self.down_bias
        hidden = torch.relu(hidden * self.scale[mode] + self.shift[mode])
        return z + einsum(hidden, self.up, "n rank, dim rank -> n dim") + self.up_bias


class GradientTransform(nn.Module):
    """(u_t, δ_t) -> (û_t, δ̂_t) for every edited matrix of one shape ``[d_out, d_in]``.

    The blocks work on the normalized vectors; their output is mapped back to the inputs'
    scale, so an untrained network returns (u_t, δ_t) and an untrained editor takes a plain
    (preconditioned) gradient step of size α_l."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modes: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm_u, self.norm_delta = RunningNorm(d_in), RunningNorm(d_out)
        dim = d_in + d_out
        self.blocks = nn.ModuleList(_ResidualBlock(dim, rank, n_modes) for _ in range(n_blocks))

    def forward(
        self, u: Float[Tensor, "n d_in"], delta: Float[Tensor, "n d_out"], mode: int
    ) -> tuple[Float[Tensor, "n d_in"], Float[Tensor, "n d_out"]]:
        z = torch.cat([self.norm_u(u), self.norm_delta(delta)], dim=-1)  # [n, d_in + d_out]
        for block in self.blocks:
            z = block(z, mode)
        return self.norm_u.inverse(z[:, : self.d_in]), self.norm_delta.inverse(z[:, self.d_in :])
