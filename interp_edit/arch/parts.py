"""The Hugging Face modules and settings of each decoder layer, as the layer stepper reads
them (:mod:`interp_edit.arch.stepper`), for the families whose :class:`Family` has
``stepper=True``: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), OLMo-2, Phi-3,
and GPT-2, GPT-J, GPT-NeoX and OPT (:func:`_gpt2_layer` and the like: learned positions or
partial rotary, LayerNorms, a plain MLP, GPT-J's and GPT-NeoX's parallel attention and MLP;
GPT-2's Conv1D weights and fused projections read as transposed views and slices).

The Llama-like ones share one block shape (attention with rotary embeddings and grouped
keys/values, then a gated MLP, each on the residual stream) and differ in switches this
module reads off the modules themselves:

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


class Columns(torch.nn.Module):
    """Columns ``lo:hi`` of a Conv1D's ``[d_in, d_out]`` weight, as a linear layer's
    ``[d_out, d_in]`` weight (a transposed view; the whole of it by default)."""

    def __init__(self, conv: torch.nn.Module, lo: int = 0, hi: int | None = None):
        super().__init__()
        self._conv, self.lo, self.hi = (conv,), lo, hi

    @property
    def weight(self) -> Tensor:
        return self._conv[0].weight[:, self.lo : self.hi].t()

    @property
    def bias(self) -> Tensor | None:
        b = self._conv[0].bias
        return None if b is None else b[self.lo : self.hi]


class HeadRows(torch.nn.Module):
    """Part ``part`` (0: queries, 1: keys, 2: values) of GPT-NeoX's fused projection, whose
    rows run head by head, ``[q_h, k_h, v_h]`` per head (a copy per call: the rows are not
    contiguous)."""

    def __init__(self, lin: torch.nn.Module, n_heads: int, part: int):
        super().__init__()
        self._lin, self.n, self.part = (lin,), n_heads, part

    def _pick(self, t: Tensor) -> Tensor:
        return t.unflatten(0, (self.n, 3, -1))[:, self.part].flatten(0, 1)

    @property
    def weight(self) -> Tensor:
        return self._pick(self._lin[0].weight)

    @property
    def bias(self) -> Tensor | None:
        b = self._lin[0].bias
        return None if b is None else self._pick(b)


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
    gate: torch.nn.Module | None  # None: a plain MLP, key = act(up(x))
    up: torch.nn.Module
    down: torch.nn.Module
    act: Callable[[Tensor], Tensor]
    mlp_out_norm: torch.nn.Module | None
    parallel: bool = False  # the MLP reads the block input, not the attention's output (NeoX)


class Parts(NamedTuple):
    layers: list[Layer]
    embed: torch.nn.Module
    positions: torch.nn.Module | None  # learned position embeddings (GPT-2), added to embed
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module | None  # None: no rotary embeddings (GPT-2)
    rotary_types: tuple[str | None, ...]  # the rotary tables to build
    n_heads: int
    n_kv: int
    head_dim: int
    pairs: bool = False  # GPT-J: rotary on dimension pairs, its module returns (sin, cos)


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


def _gpt2_layer(block: torch.nn.Module, cfg) -> Layer:
    attn, mlp, d = unwrap(block.attn), unwrap(block.mlp), cfg.n_embd
    qkv = unwrap(attn.c_attn)
    q, k, v = Columns(qkv, 0, d), Columns(qkv, d, 2 * d), Columns(qkv, 2 * d, 3 * d)
    return Layer(
        unwrap(block.ln_1), q, k, v, Columns(unwrap(attn.c_proj)), None, None, False,
        float(attn.scaling), None, None, None, None, unwrap(block.ln_2), None,
        Columns(unwrap(mlp.c_fc)), Columns(unwrap(mlp.c_proj)), mlp.act, None,
    )  # fmt: skip


def _neox_layer(block: torch.nn.Module, cfg) -> Layer:
    attn, mlp = unwrap(block.attention), unwrap(block.mlp)
    qkv, n = unwrap(attn.query_key_value), cfg.num_attention_heads
    return Layer(
        unwrap(block.input_layernorm), HeadRows(qkv, n, 0), HeadRows(qkv, n, 1),
        HeadRows(qkv, n, 2), unwrap(attn.dense), None, None, False, float(attn.scaling), None,
        None, None, None, unwrap(block.post_attention_layernorm), None,
        unwrap(mlp.dense_h_to_4h), unwrap(mlp.dense_4h_to_h), mlp.act, None,
        bool(cfg.use_parallel_residual),
    )  # fmt: skip


class Offset(torch.nn.Module):
    """OPT's learned positions: row ``position + offset`` of its table."""

    def __init__(self, table: torch.nn.Module, offset: int):
        super().__init__()
        self._table, self.offset = (table,), offset

    def forward(self, positions: Tensor) -> Tensor:
        return torch.nn.functional.embedding(positions + self.offset, self._table[0].weight)


def _gptj_layer(block: torch.nn.Module, cfg) -> Layer:
    attn, mlp, ln = unwrap(block.attn), unwrap(block.mlp), unwrap(block.ln_1)
    return Layer(
        ln, unwrap(attn.q_proj), unwrap(attn.k_proj), unwrap(attn.v_proj),
        unwrap(attn.out_proj), None, None, False, float(attn.scaling), None, None, None, None,
        ln, None, unwrap(mlp.fc_in), unwrap(mlp.fc_out), mlp.act, None, True,
    )  # fmt: skip


def _opt_layer(block: torch.nn.Module, cfg) -> Layer:
    attn = unwrap(block.self_attn)
    return Layer(
        unwrap(block.self_attn_layer_norm), unwrap(attn.q_proj), unwrap(attn.k_proj),
        unwrap(attn.v_proj), unwrap(attn.out_proj), None, None, False, float(attn.scaling),
        None, None, None, None, unwrap(block.final_layer_norm), None, unwrap(block.fc1),
        unwrap(block.fc2), block.activation_fn, None,
    )  # fmt: skip


def stepper_fits(ad: Adapter) -> bool:
    """Whether this model's configuration is one the stepper implements (OPT: pre-norm
    blocks without input/output projections; elsewhere every configuration)."""
    cfg = ad.hf.config
    if ad.family.name == "opt":
        return bool(cfg.do_layer_norm_before) and cfg.word_embed_proj_dim == cfg.hidden_size
    return getattr(cfg, "pretraining_tp", 1) == 1


def parts(ad: Adapter) -> Parts:
    """The stepper's view of a model of a stepper family (see the module docstring)."""
    hf, cfg, name = ad.hf, ad.hf.config, ad.family.name
    if name == "gpt2":
        inner = unwrap(hf.transformer)
        layers = [_gpt2_layer(b, cfg) for b in ad.blocks]
        return Parts(layers, ad.embed, unwrap(inner.wpe), ad.final_norm, ad.lm_head, None,
                     (None,), cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head)
    if name == "gptj":
        n = cfg.n_head
        layers = [_gptj_layer(b, cfg) for b in ad.blocks]
        return Parts(layers, ad.embed, None, ad.final_norm, ad.lm_head,
                     unwrap(unwrap(hf.transformer).rotary_emb), (None,), n, n, cfg.n_embd // n,
                     pairs=True)
    if name == "opt":
        n, decoder = cfg.num_attention_heads, unwrap(unwrap(hf.model).decoder)
        layers = [_opt_layer(b, cfg) for b in ad.blocks]
        return Parts(layers, ad.embed, Offset(unwrap(decoder.embed_positions), 2),
                     ad.final_norm, ad.lm_head, None, (None,), n, n, cfg.hidden_size // n)
    if name == "gpt_neox":
        n = cfg.num_attention_heads
        layers = [_neox_layer(b, cfg) for b in ad.blocks]
        return Parts(layers, ad.embed, None, ad.final_norm, ad.lm_head,
                     unwrap(unwrap(hf.gpt_neox).rotary_emb), (None,), n, n, cfg.hidden_size // n)
    inner = unwrap(hf.model)
    rotary = unwrap(inner.rotary_emb)
    per_layer = "layer_type" in inspect.signature(rotary.forward).parameters
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = [_layer(b, j, cfg, n_heads, n_kv, d_head, per_layer)
              for j, b in enumerate(ad.blocks)]
    types = tuple(dict.fromkeys(lay.rotary for lay in layers))
    return Parts(layers, ad.embed, None, ad.final_norm, ad.lm_head, rotary, types, n_heads,
                 n_kv, d_head)
