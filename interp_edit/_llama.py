"""A layer stepper for Hugging Face Llama-family decoders: runs one decoder layer at a time on
a slice of positions ``start .. start+P-1``, reading the keys/values of earlier positions from
a cache, and lets the caller replace the attention output, MLP output or block output at the
slice's first position. The fast tracing engine is built on it, MEND computes its
gradient factors with it (:mod:`interp_edit.editing.mend`, :mod:`interp_edit.resume`), and
sampling and greedy generation decode on it with a key/value cache (:meth:`LlamaStepper.decode`;
:func:`interp_edit.editing.keys.sample_token_ids`, :meth:`interp_edit.models.Model.generate`).

It calls the model's own RMSNorm and rotary modules and its own weights (through
``torch.nn.functional``), so the numbers match a plain forward pass up to float rounding.
Hooks on the TransformerBridge are *not* run here; the engine falls back to the hook-based
path when a bridge hook is installed.

``LlamaStepper(model, n, precision=torch.bfloat16)`` multiplies with bf16 copies of the
weights (made once per module and remade when a weight changes, :mod:`interp_edit._precision`)
while the residual stream, the norms and attention stay in the model's dtype: an
approximation for callers that can take it (MEND's blocks below the edit,
``MENDHparams.below``; the attribution screen with ``trace(..., precision="bfloat16")``, whose
backward pass multiplies by packed copies of the transposed weights), never by the exact
tracing methods. :func:`resolve_precision` turns a ``"auto" | "bfloat16" | "model"`` setting
into that dtype for both.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp_edit._precision import PRECISIONS, low_precision_linear, low_precision_supported
from interp_edit.errors import InterpEditError
from interp_edit.models import Model

SITES = ("attn", "mlp", "resid")


def _orig(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module inside (possibly nested) TransformerBridge wrappers."""
    while hasattr(module, "original_component"):
        module = module.original_component
    return module


class Patch(NamedTuple):
    """Replace an activation at the slice's first position on the rows where ``mask`` holds."""

    mask: Bool[Tensor, "batch"]
    value: Float[Tensor, "batch d_model"]


class LayerOut(NamedTuple):
    out: Float[Tensor, "batch pos d_model"]  # block output (the next layer's input)
    attn: Float[Tensor, "batch pos d_model"]
    mlp: Float[Tensor, "batch pos d_model"]
    k: Float[Tensor, "batch kv_head pos d_head"]  # after rotary
    v: Float[Tensor, "batch kv_head pos d_head"]
    key: Float[Tensor, "batch pos d_mlp"] | None  # the MLP key (None where a patch skipped rows)


@dataclass(frozen=True)
class RunCache:
    """Every layer's input, sublayer outputs and keys/values of one full run."""

    x: list[Tensor]  # x[j]: input of layer j, [batch, pos, d_model]; x[L]: last block output
    attn: list[Tensor]
    mlp: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]

    @property
    def final(self) -> Float[Tensor, "batch d_model"]:
        """The last block's output at the last position: what the logits are read from."""
        return self.x[-1][:, -1]


class _Layer(NamedTuple):
    """One decoder layer's Hugging Face modules (weights are read at call time, so an edit
    applied in place is seen)."""

    input_norm: torch.nn.Module
    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    o: torch.nn.Module
    scaling: float
    post_norm: torch.nn.Module
    gate: torch.nn.Module
    up: torch.nn.Module
    down: torch.nn.Module
    act: Callable[[Tensor], Tensor]


class _Parts(NamedTuple):
    layers: list[_Layer]
    embed: torch.nn.Module
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    n_heads: int
    n_kv: int


_PARTS: "weakref.WeakKeyDictionary[Model, _Parts]" = weakref.WeakKeyDictionary()


def _parts(model: Model) -> _Parts:
    """The model's modules, unwrapped from the bridge once per model (walking the wrappers
    on every call cost milliseconds per edit)."""
    if model not in _PARTS:
        hf = _orig(model.hf_model)
        inner = _orig(hf.model)
        layers = []
        for block in map(_orig, inner.layers):
            attn, mlp = _orig(block.self_attn), _orig(block.mlp)
            layers.append(_Layer(
                _orig(block.input_layernorm), _orig(attn.q_proj), _orig(attn.k_proj),
                _orig(attn.v_proj), _orig(attn.o_proj), attn.scaling,
                _orig(block.post_attention_layernorm), _orig(mlp.gate_proj), _orig(mlp.up_proj),
                _orig(mlp.down_proj), mlp.act_fn,
            ))  # fmt: skip
        _PARTS[model] = _Parts(
            layers, _orig(inner.embed_tokens), _orig(inner.norm), _orig(hf.lm_head),
            _orig(inner.rotary_emb), hf.config.num_attention_heads,
            hf.config.num_key_value_heads,
        )  # fmt: skip
    return _PARTS[model]


def resolve_precision(model: Model, setting: str) -> torch.dtype | None:
    """The dtype of the layer stepper's matrix multiplies for a precision ``setting``:
    ``"bfloat16"``; ``"model"`` (None: the model's own weights); ``"auto"``: bfloat16 where the
    hardware multiplies it natively (:func:`low_precision_supported`), else the model's. None
    also wherever the stepper does not run (other architectures, a bridge hook installed)."""
    if setting not in PRECISIONS:
        raise InterpEditError(f"precision {setting!r}: use one of {', '.join(PRECISIONS)}")
    if setting == "model" or not LlamaStepper.usable(model):
        return None
    if setting == "auto" and not low_precision_supported(model.device):
        return None
    return torch.bfloat16


def _rotate(x: Float[Tensor, "b p h d"], cos: Float[Tensor, "p 1 d"],
            sin: Float[Tensor, "p 1 d"]) -> Float[Tensor, "b p h d"]:
    """Rotary embedding, ``x * cos + rotate_half(x) * sin`` as Hugging Face computes it (the
    same roundings), without the concatenated copy."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


class _Rotary(torch.autograd.Function):
    """:func:`_rotate` with its input gradient in closed form: the rotation's transpose,
    ``g * cos + rotate_half^T(g * sin)`` (autograd through the in-place halves recorded
    copies of whole slices, ~10% of the attribution screen's time)."""

    @staticmethod
    def forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return _rotate(x, cos, sin)

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


def _apply(act: Tensor, patch: Patch | None) -> Tensor:
    if patch is not None:
        act[:, 0] = torch.where(patch.mask[:, None], patch.value, act[:, 0])
    return act


class LlamaStepper:
    """Step through a Llama-family model layer by layer (see the module docstring)."""

    @staticmethod
    def supports(model: Model) -> bool:
        hf = model.hf_model
        cfg = hf.config
        return (
            type(hf).__name__ == "LlamaForCausalLM"
            and getattr(cfg, "sliding_window", None) is None
            and getattr(cfg, "pretraining_tp", 1) == 1
            and hasattr(_orig(hf.model), "rotary_emb")
        )

    @staticmethod
    def usable(model: Model) -> bool:
        """Supported, and no hook is installed on the bridge (the stepper would not run it)."""
        return LlamaStepper.supports(model) and not model.has_hooks()

    def __init__(self, model: Model, n_tokens: int, precision: torch.dtype | None = None):
        parts = _parts(model)
        # matrix multiplies in ``precision`` (weights copied once, see low_precision_weights;
        # inputs cast, outputs cast back: the residual stream, norms and attention keep the
        # model's dtype); None: the model's own weights
        self.dtype = parts.embed.weight.dtype
        self.precision = None if precision in (None, self.dtype) else precision
        self.layers, self.embed, self.norm = parts.layers, parts.embed, parts.norm
        self.lm_head, self.n_heads, self.n_kv = parts.lm_head, parts.n_heads, parts.n_kv
        positions = torch.arange(n_tokens, device=model.device)[None]
        probe = self.embed.weight[:1][None]  # dtype/device carrier for the rotary module
        cos, sin = parts.rotary(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [pos, d_head]
        self._masks: dict[tuple[int, int, int], Tensor] = {}

    # ---- pieces --------------------------------------------------------------------------
    def _linear(self, lin: torch.nn.Module, x: Tensor) -> Tensor:
        return self._multiply(lin, self._narrow(x)).to(self.dtype)

    def _multiply(self, lin: torch.nn.Module, x: Tensor) -> Tensor:
        """``lin(x)`` for ``x`` already in the multiplies' dtype, the result left in it."""
        if self.precision is None:
            return F.linear(x, lin.weight, lin.bias)
        return low_precision_linear(lin, x, self.precision)

    def _narrow(self, x: Tensor) -> Tensor:
        """``x`` in the multiplies' dtype (cast once where several multiplies read it)."""
        return x if self.precision is None else x.to(self.precision)

    def _causal_mask(self, n_queries: int, n_keys: int, start: int) -> Bool[Tensor, "q k"]:
        """Query i (position start+i) sees keys 0 .. start+i; built once per shape (a sweep
        asks for the same few hundreds of times)."""
        key = (n_queries, n_keys, start)
        if key not in self._masks:
            ones = torch.ones(n_queries, n_keys, dtype=torch.bool, device=self.cos.device)
            self._masks[key] = ones.tril(diagonal=start)
        return self._masks[key]

    def _rope(self, x: Float[Tensor, "b p h d"], start: int) -> Float[Tensor, "b p h d"]:
        """Rotary embedding of positions ``start ..`` (see :func:`_rotate`)."""
        p = x.shape[1]
        cos, sin = self.cos[start : start + p, None], self.sin[start : start + p, None]
        if torch.is_grad_enabled() and x.requires_grad:
            return _Rotary.apply(x, cos, sin)
        return _rotate(x, cos, sin)

    def _heads(self, proj: torch.nn.Module, x: Tensor, n: int) -> Float[Tensor, "b p h d"]:
        return rearrange(self._linear(proj, x), "b p (h d) -> b p h d", h=n)

    def _key(self, j: int, x: Float[Tensor, "b p d"]) -> Float[Tensor, "b p d_mlp"]:
        """The input of MLP ``j``'s output projection (``x``: the normalized MLP input), in
        the multiplies' dtype (with a ``precision``, the activation and product are taken in
        it too: the output projection reads them in it anyway)."""
        lay, x = self.layers[j], self._narrow(x)
        hidden = lay.act(self._multiply(lay.gate, x))
        hidden *= self._multiply(lay.up, x)
        return hidden

    def unembed(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logits from final-layer hidden states (final norm, unembedding)."""
        return self._linear(self.lm_head, self.norm(h))

    def token_logits(
        self, h: Float[Tensor, "n d_model"], ids: Int[Tensor, "n k"]
    ) -> Float[Tensor, "n k"]:
        """The logits of ``ids`` only, from final-layer hidden states: ``k`` rows of the
        unembedding instead of all of it."""
        w = self.lm_head.weight[ids]  # [n, k, d_model]
        out = einsum(self.norm(h), w, "n d, n k d -> n k")
        return out if self.lm_head.bias is None else out + self.lm_head.bias[ids]

    def layer(
        self,
        j: int,
        x: Float[Tensor, "batch pos d_model"],
        start: int,
        past: tuple[Tensor, Tensor] | None = None,
        patches: dict[str, Patch] | None = None,
        last_only: bool = False,
        cache: tuple[Tensor, Tensor] | None = None,
    ) -> LayerOut:
        """Layer ``j`` on positions ``start .. start+P-1`` of ``x``; ``past`` holds the keys and
        values ``[batch, kv_head, start, d_head]`` of the earlier positions. ``last_only``
        computes the output of the last position only (all that the last layer needs).
        ``cache`` (instead of ``past``): buffers ``[batch, kv_head, capacity, d_head]`` holding
        the earlier positions; this slice's keys and values are written into them and read
        from there (decoding without a concatenation per step, :meth:`decode`)."""
        lay, patches = self.layers[j], patches or {}
        h = self._narrow(lay.input_norm(x))
        q_in, q_start = (h[:, -1:], start + x.shape[1] - 1) if last_only else (h, start)
        q = self._rope(self._heads(lay.q, q_in, self.n_heads), q_start).transpose(1, 2)
        k = self._rope(self._heads(lay.k, h, self.n_kv), start).transpose(1, 2)
        v = self._heads(lay.v, h, self.n_kv).transpose(1, 2)
        keys, values = k, v
        if cache is not None:
            end = start + x.shape[1]
            cache[0][:, :, start:end], cache[1][:, :, start:end] = k, v
            keys, values = cache[0][:, :, :end], cache[1][:, :, :end]
        elif past is not None:
            keys, values = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        mask = self._causal_mask(q.shape[2], keys.shape[2], start) if q.shape[2] > 1 else None
        z = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=lay.scaling,
            enable_gqa=self.n_kv != self.n_heads,
        )
        a = _apply(self._linear(lay.o, rearrange(z, "b h p d -> b p (h d)")), patches.get("attn"))
        mid = (x[:, -1:] if last_only else x) + a
        m, key = self._patched_mlp(j, lay.post_norm(mid), patches.get("mlp"))
        return LayerOut(_apply(mid + m, patches.get("resid")), a, m, k, v, key)

    def _patched_mlp(
        self, j: int, x: Float[Tensor, "batch pos d_model"], patch: Patch | None
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_mlp"] | None]:
        """The MLP output, with ``patch`` applied, and its key (``None`` when the patch
        replaced some rows: those are not computed, as an MLP-window trace replaces many)."""
        down = self.layers[j].down
        if patch is None or not bool(patch.mask.any()):
            key = self._key(j, x)
            return _apply(self._linear(down, key), patch), key
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        keep[:, 0] = ~patch.mask
        out = torch.empty_like(x)
        out[keep] = self._linear(down, self._key(j, x[keep][None]))[0]
        out[:, 0][patch.mask] = patch.value[patch.mask]
        return out, None

    def run(
        self,
        x: Float[Tensor, "batch pos d_model"],
        first: int,
        stop: int,
        visit: Callable[[int, Tensor, LayerOut], None] | None = None,
        last_only: bool = False,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Layers ``first .. stop-1`` on every position of ``x`` (the input of layer
        ``first``); returns the last one's output. ``visit(j, x_j, out_j)`` sees each layer's
        input and outputs on the way. ``last_only``: layer ``stop-1`` computes the last
        position's output only (``[batch, 1, d_model]``; the others' keys and values are all
        it needs of them), for callers that read nothing else."""
        for j in range(first, stop):
            out = self.layer(j, x, 0, last_only=last_only and j == stop - 1)
            if visit is not None:
                visit(j, x, out)
            x = out.out
        return x

    def decode(
        self,
        ids: Int[Tensor, "batch prompt"],
        length: int,
        choose: Callable[[Float[Tensor, "batch d_vocab"]], Int[Tensor, "batch 1"]],
        stop: int | None = None,
    ) -> Int[Tensor, "batch total"]:
        """``ids`` followed by ``length`` tokens, each ``choose(scores)`` of the fp32 logits at
        the last position; fewer when every row has chosen ``stop``. Each step's keys and
        values go into buffers sized for every position this stepper was built for, which
        must be at least ``prompt + length``."""
        shape = (ids.shape[0], self.n_kv, *self.cos.shape)  # [batch, kv_head, n_tokens, d_head]
        cache = [(self.cos.new_empty(shape), self.cos.new_empty(shape)) for _ in self.layers]
        out, new, start = [ids], ids, 0
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(length):
            x = self.embed(new)
            for j, buffers in enumerate(cache):
                x = self.layer(j, x, start, last_only=j == len(cache) - 1, cache=buffers).out
            start, new = start + new.shape[1], choose(self.unembed(x[:, -1]).float())
            out.append(new)
            if stop is not None:
                done |= new[:, 0] == stop
                if bool(done.all()):
                    break
        return torch.cat(out, 1)

    def target_probs(
        self, h: Float[Tensor, "batch d_model"], target_id: int
    ) -> Float[Tensor, "batch"]:
        """p(target) from final-layer hidden states (final norm, unembedding, softmax)."""
        return self.unembed(h).softmax(-1)[:, target_id].clone()  # a copy: no view pins the softmax

    def full_run(
        self,
        ids: Int[Tensor, "batch pos"],
        noise: Float[Tensor, "batch n_subject d_model"] | None = None,
        subject: tuple[int, int] = (0, 0),
        last_only: bool = False,
    ) -> RunCache:
        """A whole forward pass (noise added to the subject embeddings), caching everything.
        Differentiable: call it under ``torch.no_grad()`` unless gradients are wanted.
        ``last_only``: the last layer computes the last position alone (its outputs, and the
        last ``x``, are ``[batch, 1, d_model]``)."""
        x = self.embed(ids)
        if noise is not None:
            x = x.clone()
            x[:, subject[0] : subject[1]] += noise.to(x)
        xs, attn, mlp, ks, vs = [x], [], [], [], []

        def keep(j: int, x_j: Tensor, out: LayerOut) -> None:
            xs.append(out.out)
            attn.append(out.attn)
            mlp.append(out.mlp)
            ks.append(out.k)
            vs.append(out.v)

        self.run(x, 0, len(self.layers), keep, last_only)
        return RunCache(xs, attn, mlp, ks, vs)
