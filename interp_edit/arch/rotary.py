"""Rotary position embeddings as Hugging Face computes them (``x * cos + rotate_half(x) *
sin``, the same roundings), without the concatenated copy, with the input gradient in closed
form, and for partial rotary (Phi-3's ``partial_rotary_factor``: only the first dimensions of
each head rotate)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def rotate(x: Float[Tensor, "b p h d"], cos: Float[Tensor, "p 1 d"],
           sin: Float[Tensor, "p 1 d"]) -> Float[Tensor, "b p h d"]:
    """Rotary embedding of every dimension of ``x``."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


class Rotary(torch.autograd.Function):
    """:func:`rotate` with its input gradient in closed form: the rotation's transpose,
    ``g * cos + rotate_half^T(g * sin)`` (autograd through the in-place halves recorded
    copies of whole slices, ~10% of the attribution screen's time)."""

    @staticmethod
    def forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return rotate(x, cos, sin)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        out, g_sin = grad * cos, grad * sin
        out[..., :half] += g_sin[..., half:]
        out[..., half:] -= g_sin[..., :half]
        return out, None, None


def rope(x: Float[Tensor, "b p h d"], cos: Float[Tensor, "pos r"], sin: Float[Tensor, "pos r"],
         start: int) -> Float[Tensor, "b p h d"]:
    """Rotary embedding of positions ``start ..`` from tables ``[pos, r]`` (``r <= d``: the
    first ``r`` dimensions of each head rotate, the rest pass through)."""
    p, r = x.shape[1], cos.shape[-1]
    cos, sin = cos[start : start + p, None], sin[start : start + p, None]
    if r < x.shape[-1]:
        return torch.cat((rope(x[..., :r], cos[:, 0], sin[:, 0], 0), x[..., r:]), -1)
    if torch.is_grad_enabled() and x.requires_grad:
        return Rotary.apply(x, cos, sin)
    return rotate(x, cos, sin)
