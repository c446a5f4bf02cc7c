"""The Hugging Face modules and settings of each decoder layer, as the layer stepper reads
them (:mod:`interp_edit.arch.stepper`), for the families whose :class:`Family` has
``stepper=True``: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), OLMo-2, Phi-3.

These share one block shape (attention with rotary embeddings and grouped keys/values, then a
gated MLP, each on the residual stream) and differ in switches this module reads off the
modules themselves:

- norms: before attention and before the MLP (Llama: ``input_layernorm``,
  ``post_attention_layernorm``), after each sublayer too (Gemma 2/3: ``post_attention_
  layernorm`` and ``post_feedforward_layernorm`` around ``pre_feedforward_layernorm``), or
  after only (OLMo-2);
- query/key norms per head (Qwen3, Gemma 3) or over the whole projection (OLMo-2);
- fused projections (Phi-3: ``qkv_proj``, ``gate_up_proj``, read as row slices);
- per-layer sliding windows (Gemma 2/3, Mistral, Qwen) and per-layer rotary tables (Gemma 3's
  local/global layers); attention-logit softcapping (Gemma 2).
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from interp_edit.arch.families import Adapter, unwrap


class Rows(torch.nn.Module):
    """Rows ``lo:hi`` of a fused linear layer, as a linear layer (views, no copies; weights
    are read at call time, so an in-place edit is seen)."""

    def __init__(self, lin: torch.nn.Module, lo: int, hi: int):
        super().__init__()
        self._lin, self.lo, self.hi = (lin,), lo, hi  # a tuple: not a registered submodule

    @property
    def weight(self) -> Tensor:
        return self._lin[0].weight[self.lo : self.hi]

    @property
    def bias(self) -> Tensor | None:
        b = self._lin[0].bias
        return None if b is None else b[self.lo : self.hi]


class Layer(NamedTuple):
    """One decoder layer's modules (None where the family has no such part)."""

    attn_in_norm: torch.nn.Module | None
    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    o: torch.nn.Module
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    qk_norm_whole: bool  # the q/k norms act on the whole projection (OLMo-2), not per head
    scaling: float
    softcap: float | None  # attention-logit softcapping
    window: int | None  # sliding window: query i sees keys j with i - window < j <= i
    rotary: str | None  # which rotary table (Gemma 3: the layer type; else None)
    attn_out_norm: torch.nn.Module | None
    mlp_in_norm: torch.nn.Module | None
    gate: torch.nn.Module
    up: torch.nn.Module
    down: torch.nn.Module
    act: Callable[[Tensor], Tensor]
    mlp_out_norm: torch.nn.Module | None


class Parts(NamedTuple):
    layers: list[Layer]
    embed: torch.nn.Module
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    rotary_types: tuple[str | None, ...]  # the rotary tables to build
    n_heads: int
    n_kv: int
    head_dim: int


def _opt(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    sub = getattr(module, name, None)
    return None if sub is None else unwrap(sub)


def _layer(block: torch.nn.Module, j: int, cfg, n_heads: int, n_kv: int, d_head: int,
           per_layer_rotary: bool) -> Layer:
    attn, mlp = unwrap(block.self_attn), unwrap(block.mlp)
    if hasattr(attn, "qkv_proj"):  # Phi-3
        qkv, nq, nk = unwrap(attn.qkv_proj), n_heads * d_head, n_kv * d_head
        q, k, v = Rows(qkv, 0, nq), Rows(qkv, nq, nq + nk), Rows(qkv, nq + nk, nq + 2 * nk)
    else:
        q, k, v = unwrap(attn.q_proj), unwrap(attn.k_proj), unwrap(attn.v_proj)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3
        fused = unwrap(mlp.gate_up_proj)
        half = fused.weight.shape[0] // 2
        gate, up = Rows(fused, 0, half), Rows(fused, half, 2 * half)
    else:
        gate, up = unwrap(mlp.gate_proj), unwrap(mlp.up_proj)
    q_norm = _opt(attn, "q_norm")
    whole = q_norm is not None and q_norm.weight.shape[-1] != d_head
    has_pre_ff = hasattr(block, "pre_feedforward_layernorm")
    post_ff = _opt(block, "post_feedforward_layernorm")
    if post_ff is not None and not has_pre_ff and not hasattr(block, "input_layernorm"):
        attn_in, attn_out, mlp_in = None, _opt(block, "post_attention_layernorm"), None  # OLMo-2
    elif has_pre_ff:  # Gemma 2/3
        attn_in, attn_out = _opt(block, "input_layernorm"), _opt(block, "post_attention_layernorm")
        mlp_in = _opt(block, "pre_feedforward_layernorm")
    else:  # Llama and the like: post_attention_layernorm is the MLP's input norm
        attn_in, attn_out, mlp_in = (_opt(block, "input_layernorm"), None,
                                     _opt(block, "post_attention_layernorm"))
    window = (getattr(attn, "sliding_window") if hasattr(attn, "sliding_window")
              else getattr(cfg, "sliding_window", None))
    types = getattr(cfg, "layer_types", None)
    return Layer(
        attn_in, q, k, v, unwrap(attn.o_proj), q_norm, _opt(attn, "k_norm"), whole,
        float(attn.scaling), getattr(cfg, "attn_logit_softcapping", None), window,
        types[j] if per_layer_rotary and types else None, attn_out, mlp_in, gate, up,
        unwrap(mlp.down_proj), getattr(mlp, "act_fn", None) or mlp.activation_fn, post_ff,
    )  # fmt: skip


def parts(ad: Adapter) -> Parts:
    """The stepper's view of a model of a stepper family (see the module docstring)."""
    hf, cfg = ad.hf, ad.hf.config
    inner = unwrap(hf.model)
    rotary = unwrap(inner.rotary_emb)
    per_layer = "layer_type" in inspect.signature(rotary.forward).parameters
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = [_layer(b, j, cfg, n_heads, n_kv, d_head, per_layer)
              for j, b in enumerate(ad.blocks)]
    types = tuple(dict.fromkeys(lay.rotary for lay in layers))
    return Parts(layers, ad.embed, ad.final_norm, ad.lm_head, rotary, types, n_heads, n_kv,
                 d_head)
