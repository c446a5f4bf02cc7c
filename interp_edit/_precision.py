"""Low-precision copies of linear layers' weights, for the callers that can take rounding.

The layer stepper (:mod:`interp_edit.arch.stepper`) multiplies with them when it is given a
``precision``: MEND's blocks below the edit (``MENDHparams.below``) and the attribution screen
(``trace(..., method="attribution", precision=...)``, whose backward pass multiplies by copies
of the transposed weights). The exact tracing methods never do. A copy is made once per
module and dtype and remade when the weight changes (:func:`low_precision_weights`); on CPU it
is packed in oneDNN's blocked layout. ``"auto"`` picks bf16 where the hardware multiplies it
natively (:func:`low_precision_supported`); :func:`interp_edit.arch.stepper.resolve_precision`
turns a setting into the stepper's dtype.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

PRECISIONS = ("auto", "bfloat16", "model")


class LowPrecisionLinear(NamedTuple):
    """A linear layer's weights copied to another dtype (or their transpose, for a backward
    pass): on CPU packed in oneDNN's blocked layout once (``packed``), so that each multiply
    does not reorder the whole matrix again (docs/performance.md gives the measurement);
    elsewhere a plain copy."""

    stamp: tuple
    weight: Tensor
    bias: Tensor | None
    packed: bool

    def __call__(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


# module -> {(dtype, transposed): copy}
_LOW: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _stamp(t: Tensor | None) -> tuple[int, int] | None:
    return None if t is None else (t._version, t.data_ptr())


def _pack(w: Tensor) -> Tensor | None:
    """``w`` in oneDNN's blocked layout (the private op inductor freezes CPU weights with);
    None where that is not available."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, 16)
    except (AttributeError, RuntimeError):
        return None


def low_precision_weights(lin: torch.nn.Module, dtype: torch.dtype,
                          transposed: bool = False) -> LowPrecisionLinear:
    """``lin`` in ``dtype`` (``transposed``: its weight's transpose and no bias, which
    multiplies an output gradient back to the input), copied once and kept (one copy per
    module) until its weights change: an in-place change bumps a tensor's version counter and
    a replaced tensor has another address, and either makes a new copy. (A change made
    through ``.data`` bumps neither and is not seen.)"""
    w, b = lin.weight, None if transposed else lin.bias
    stamp = (_stamp(w), _stamp(b))
    copies = _LOW.setdefault(lin, {})
    entry = copies.get((dtype, transposed))
    if entry is None or entry.stamp != stamp:
        with torch.no_grad():
            low = (w.t().contiguous() if transposed else w).to(dtype)
            bias = None if b is None else b.to(dtype)
            packed = _pack(low)
            entry = LowPrecisionLinear(stamp, low if packed is None else packed, bias,
                                       packed is not None)
        copies[(dtype, transposed)] = entry
    return entry


def low_precision_linear(lin: torch.nn.Module, x: Float[Tensor, "... d_in"],
                         dtype: torch.dtype) -> Float[Tensor, "... d_out"]:
    """``lin(x)`` with ``lin``'s weights in ``dtype`` (``x`` already in it), differentiable in
    ``x`` (the weights get no gradient): packed copies multiply through
    :class:`_PackedMultiply`, plain ones through ``F.linear``."""
    entry = low_precision_weights(lin, dtype)
    if entry.packed and torch.is_grad_enabled() and x.requires_grad:
        return _PackedMultiply.apply(x, entry, lin)
    return entry(x)


class _PackedMultiply(torch.autograd.Function):
    """A packed multiply with its input gradient: ``grad @ W``, a packed multiply by the
    transposed copy (oneDNN's packed op has no derivative of its own)."""

    @staticmethod
    def forward(x: Tensor, entry: LowPrecisionLinear, lin: torch.nn.Module) -> Tensor:
        return entry(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.lin, ctx.dtype = inputs[2], inputs[0].dtype

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        back = low_precision_weights(ctx.lin, ctx.dtype, transposed=True)
        return back(grad.to(ctx.dtype).contiguous()), None, None


@functools.lru_cache(maxsize=None)  # the CPU probes cost a fraction of a millisecond each
def low_precision_supported(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (CUDA with bf16, or a CPU
    with AMX tiles or AVX-512 BF16), so that a bf16 copy of the weights is faster to use."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
