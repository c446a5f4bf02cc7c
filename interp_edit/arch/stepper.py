"""The layer stepper of the fast paths: runs one decoder layer at a time on
a slice of positions ``start .. start+P-1``, reading the keys/values of earlier positions from
a cache, and lets the caller replace the attention output, MLP output or block output at the
slice's first position. The fast tracing engine is built on it, MEND computes its
gradient factors with it (:mod:`interp_edit.editing.mend`, :mod:`interp_edit.resume`), and
sampling and greedy generation decode on it with a key/value cache (:meth:`Stepper.decode`;
:func:`interp_edit.editing.keys.sample_token_ids`, :meth:`interp_edit.models.Model.generate`).

It runs every family whose :class:`~interp_edit.arch.families.Family` has ``stepper=True``
(the layer layouts are read by :mod:`interp_edit.arch.parts`). It calls the model's own norm
and rotary modules and its own weights (through ``torch.nn.functional``), so the numbers
match a plain forward pass up to float rounding. Its ``mlp`` output is what the block adds to
the residual stream (after the post-norm, where the family has one: the bridge's
``hook_mlp_out``), its ``write`` the MLP output matrix's own output (before it).
Hooks on the TransformerBridge are *not* run here; the engine falls back to the hook-based
path when a bridge hook is installed.

``Stepper(model, n, precision=torch.bfloat16)`` multiplies with bf16 copies of the
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
from einops import einsum, rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp_edit._precision import PRECISIONS, low_precision_linear, low_precision_supported
from interp_edit.arch.families import adapter
from interp_edit.arch.parts import Parts, parts, stepper_fits
from interp_edit.arch.rotary import rope, rope_pairs
from interp_edit.errors import InterpEditError

SITES = ("attn", "mlp", "resid")


class Patch(NamedTuple):
    """Replace an activation at the slice's first position on the rows where ``mask`` holds."""

    mask: Bool[Tensor, "batch"]
    value: Float[Tensor, "batch d_model"]


class LayerOut(NamedTuple):
    out: Float[Tensor, "batch pos d_model"]  # block output (the next layer's input)
    attn: Float[Tensor, "batch pos d_model"]  # what attention adds to the residual stream
    mlp: Float[Tensor, "batch pos d_model"]  # what the MLP adds to the residual stream
    k: Float[Tensor, "batch kv_head pos d_head"]  # after rotary
    v: Float[Tensor, "batch kv_head pos d_head"]
    key: Float[Tensor, "batch pos d_mlp"] | None  # the MLP key (None where a patch skipped rows)
    write: Float[Tensor, "batch pos d_model"] | None  # the MLP output matrix's output (None:
    # as ``key``); the same tensor as ``mlp`` where the family has no post-norm


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


_PARTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _parts(model) -> Parts:
    """The model's modules, unwrapped from the bridge once per model (walking the wrappers
    on every call cost milliseconds per edit)."""
    if model not in _PARTS:
        _PARTS[model] = parts(adapter(model))
    return _PARTS[model]


def resolve_precision(model, setting: str) -> torch.dtype | None:
    """The dtype of the layer stepper's matrix multiplies for a precision ``setting``:
    ``"bfloat16"``; ``"model"`` (None: the model's own weights); ``"auto"``: bfloat16 where the
    hardware multiplies it natively (:func:`low_precision_supported`), else the model's. None
    also wherever the stepper does not run (other architectures, a bridge hook installed)."""
    if setting not in PRECISIONS:
        raise InterpEditError(f"precision {setting!r}: use one of {', '.join(PRECISIONS)}")
    if setting == "model" or not Stepper.usable(model):
        return None
    if setting == "auto" and not low_precision_supported(model.device):
        return None
    return torch.bfloat16


def _apply(act: Tensor, patch: Patch | None) -> Tensor:
    if patch is not None:
        act[:, 0] = torch.where(patch.mask[:, None], patch.value, act[:, 0])
    return act


def _norm(module: torch.nn.Module | None, x: Tensor) -> Tensor:
    return x if module is None else module(x)


class Stepper:
    """Step through a model layer by layer (see the module docstring)."""

    @staticmethod
    def supports(model) -> bool:
        """Whether the model's family runs on the stepper (the weights alone, no hooks)."""
        ad = adapter(model)
        return ad.has_stepper and stepper_fits(ad)

    @staticmethod
    def usable(model) -> bool:
        """Supported, and no hook is installed on the bridge (the stepper would not run it)."""
        return Stepper.supports(model) and not model.has_hooks()

    def __init__(self, model, n_tokens: int, precision: torch.dtype | None = None):
        p = _parts(model)
        # matrix multiplies in ``precision`` (weights copied once, see low_precision_weights;
        # inputs cast, outputs cast back: the residual stream, norms and attention keep the
        # model's dtype); None: the model's own weights
        self.dtype = p.embed.weight.dtype
        self.precision = None if precision in (None, self.dtype) else precision
        self.layers, self.tokens, self.positions, self.norm = (p.layers, p.embed, p.positions,
                                                                p.norm)
        self.lm_head, self.n_heads, self.n_kv = p.lm_head, p.n_heads, p.n_kv
        self.softcapped = adapter(model).softcapped
        self.n_tokens = n_tokens
        positions = torch.arange(n_tokens, device=model.device)[None]
        probe = self.tokens.weight[:1][None]  # dtype/device carrier for the rotary module
        self.tables: dict[str | None, tuple[Tensor, Tensor] | None] = {None: None}
        for kind in p.rotary_types if p.rotary is not None else ():
            # Gemma 3: one table per layer type; else one
            cos, sin = (p.rotary(probe, positions) if kind is None
                        else p.rotary(probe, positions, kind))
            if p.pairs:  # GPT-J: (sin, cos), one entry per pair of dimensions
                sin, cos = (t.repeat_interleave(2, -1) for t in (cos, sin))
            self.tables[kind] = (cos[0], sin[0])  # [pos, rotary_dim]
        self.rotate = rope_pairs if p.pairs else rope
        self.kv_shape = (self.n_kv, n_tokens, p.head_dim)
        self._masks: dict[tuple[int, int, int | None], Tensor | None] = {}

    # ---- pieces --------------------------------------------------------------------------
    def embed(self, ids: Int[Tensor, "batch pos"], start: int = 0) -> Float[Tensor, "batch pos d"]:
        """The input of layer 0 for tokens at positions ``start ..``: token embeddings (with
        the family's scale, inside the module), plus learned position embeddings (GPT-2)."""
        x = self.tokens(ids)
        if self.positions is None:
            return x
        where = torch.arange(start, start + ids.shape[1], device=ids.device)
        return x + self.positions(where)

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

    def _mask(self, n_queries: int, n_keys: int, window: int | None) -> Bool[Tensor, "q k"] | None:
        """The queries are the last ``n_queries`` of ``n_keys`` positions; query i sees keys
        j <= i (and i - window < j under a sliding window). None where every query sees
        every key. Built once per shape (a sweep asks for the same few hundreds of times)."""
        key = (n_queries, n_keys, window)
        if key not in self._masks:
            if n_queries == 1 and (window is None or n_keys <= window):
                self._masks[key] = None
            else:
                ones = torch.ones(n_queries, n_keys, dtype=torch.bool, device=self.tokens.weight.device)
                mask = ones.tril(diagonal=n_keys - n_queries)
                if window is not None:
                    mask &= ~ones.tril(diagonal=n_keys - n_queries - window)
                self._masks[key] = mask
        return self._masks[key]

    def _heads(self, proj: torch.nn.Module, x: Tensor, n: int,
               whole_norm: torch.nn.Module | None = None) -> Float[Tensor, "b p h d"]:
        y = self._linear(proj, x)
        return rearrange(_norm(whole_norm, y), "b p (h d) -> b p h d", h=n)

    def _key(self, j: int, x: Float[Tensor, "b p d"]) -> Float[Tensor, "b p d_mlp"]:
        """The input of MLP ``j``'s output projection (``x``: the normalized MLP input), in
        the multiplies' dtype (with a ``precision``, the activation and product are taken in
        it too: the output projection reads them in it anyway)."""
        lay, x = self.layers[j], self._narrow(x)
        if lay.gate is None:
            return lay.act(self._multiply(lay.up, x))
        hidden = lay.act(self._multiply(lay.gate, x))
        hidden *= self._multiply(lay.up, x)
        return hidden

    def unembed(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logits from final-layer hidden states (final norm, unembedding, softcapping)."""
        return self.softcapped(self._linear(self.lm_head, self.norm(h)))

    def token_logits(
        self, h: Float[Tensor, "n d_model"], ids: Int[Tensor, "n k"]
    ) -> Float[Tensor, "n k"]:
        """The logits of ``ids`` only, from final-layer hidden states: ``k`` rows of the
        unembedding instead of all of it."""
        w = self.lm_head.weight[ids]  # [n, k, d_model]
        out = einsum(self.norm(h), w, "n d, n k d -> n k")
        return self.softcapped(out if self.lm_head.bias is None else out + self.lm_head.bias[ids])

    def _attend(self, j: int, q: Tensor, keys: Tensor, values: Tensor) -> Float[Tensor, "b h q d"]:
        """Scaled dot-product attention of layer ``j`` (causal, its window, its softcap)."""
        lay = self.layers[j]
        mask = self._mask(q.shape[2], keys.shape[2], lay.window)
        if lay.softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                  scale=lay.scaling,
                                                  enable_gqa=self.n_kv != self.n_heads)
        # Gemma 2: cap · tanh(scores / cap) before the mask, softmax in fp32 (as its eager path)
        group = self.n_heads // self.n_kv
        keys, values = (repeat(a, "b h p d -> b (h g) p d", g=group) for a in (keys, values))
        scores = einsum(q, keys, "b h q d, b h k d -> b h q k") * lay.scaling
        scores = torch.tanh(scores / lay.softcap) * lay.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        return einsum(probs, values, "b h q k, b h k d -> b h q d")

    def attention_inputs(
        self, j: int, x: Float[Tensor, "batch pos d_model"], start: int = 0,
        last_only: bool = False, queries: bool = True,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Layer ``j``'s queries ``[batch, head, pos, d_head]`` (of the last position only
        with ``last_only``; None without ``queries``), keys and values ``[batch, kv_head, pos,
        d_head]`` of inputs ``x`` at positions ``start ..``, after their norms and the rotary
        embedding (what :meth:`layer` attends with; the attribution screen's ``"atpstar"``
        recomputes keys and values of other inputs with it)."""
        lay = self.layers[j]
        table = self.tables[lay.rotary]  # None: no rotary embedding (GPT-2, OPT)
        h = self._narrow(_norm(lay.attn_in_norm, x))
        q_in, q_start = (h[:, -1:], start + x.shape[1] - 1) if last_only else (h, start)
        whole = lay.qk_norm_whole
        k = self._heads(lay.k, h, self.n_kv, lay.k_norm if whole else None)
        k = k if whole else _norm(lay.k_norm, k)
        if table is not None:
            k = self.rotate(k, *table, start)
        k = k.transpose(1, 2)
        v = self._heads(lay.v, h, self.n_kv).transpose(1, 2)
        if not queries:
            return None, k, v
        q = self._heads(lay.q, q_in, self.n_heads, lay.q_norm if whole else None)
        q = q if whole else _norm(lay.q_norm, q)
        if table is not None:
            q = self.rotate(q, *table, q_start)
        q = q.transpose(1, 2)
        return q, k, v

    def attention_output(self, j: int, q: Tensor, keys: Tensor, values: Tensor
                         ) -> Float[Tensor, "batch pos d_model"]:
        """Layer ``j``'s attention for queries ``q`` over ``keys``/``values`` (as
        :meth:`attention_inputs` returns them), through the output projection: the attention
        output before any post-attention norm."""
        z = self._attend(j, q, keys, values)
        return self._linear(self.layers[j].o, rearrange(z, "b h p d -> b p (h d)"))

    def layer(
        self,
        j: int,
        x: Float[Tensor, "batch pos d_model"],
        start: int,
        past: tuple[Tensor, Tensor] | None = None,
        patches: dict[str, Patch] | None = None,
        last_only: bool = False,
        cache: tuple[Tensor, Tensor] | None = None,
        add: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> LayerOut:
        """Layer ``j`` on positions ``start .. start+P-1`` of ``x``; ``past`` holds the keys and
        values ``[batch, kv_head, start, d_head]`` of the earlier positions. ``last_only``
        computes the output of the last position only (all that the last layer needs).
        ``cache`` (instead of ``past``): buffers ``[batch, kv_head, capacity, d_head]`` holding
        the earlier positions; this slice's keys and values are written into them and read
        from there (decoding without a concatenation per step, :meth:`decode`). ``add`` is
        added to what the MLP output matrix writes, before any post-norm (the space of
        ROME's and MEMIT's δ, :func:`interp_edit.models.mlp_write_hook`); not with patches."""
        lay, patches = self.layers[j], patches or {}
        if add is not None and patches:
            raise InterpEditError("Stepper.layer: add= and patches= are not combined")
        q, k, v = self.attention_inputs(j, x, start, last_only)
        keys, values = k, v
        if cache is not None:
            end = start + x.shape[1]
            cache[0][:, :, start:end], cache[1][:, :, start:end] = k, v
            keys, values = cache[0][:, :, :end], cache[1][:, :, :end]
        elif past is not None:
            keys, values = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        a = self.attention_output(j, q, keys, values)
        a = _apply(_norm(lay.attn_out_norm, a), patches.get("attn"))
        own = x[:, -1:] if last_only else x
        mid = own + a
        mlp_in = _norm(lay.mlp_in_norm, own if lay.parallel else mid)
        if add is None:
            m, key, write = self._patched_mlp(j, mlp_in, patches.get("mlp"))
        else:
            m, key, write = self._mlp(j, mlp_in, add)
        return LayerOut(_apply(mid + m, patches.get("resid")), a, m, k, v, key, write)

    def _mlp(self, j: int, x: Tensor, add: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """MLP ``j`` on normalized inputs: its output, key and the output matrix's output
        (plus ``add``)."""
        lay = self.layers[j]
        key = self._key(j, x)
        write = self._linear(lay.down, key)
        if add is not None:
            write = write + add
        return _norm(lay.mlp_out_norm, write), key, write

    def _patched_mlp(
        self, j: int, x: Float[Tensor, "batch pos d_model"], patch: Patch | None
    ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor | None, Tensor | None]:
        """The MLP output, with ``patch`` applied, its key and its output matrix's output
        (``None`` when the patch replaced some rows: those are not computed, as an MLP-window
        trace replaces many)."""
        if patch is None or not bool(patch.mask.any()):
            out, key, write = self._mlp(j, x)
            return _apply(out, patch), key, write
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        keep[:, 0] = ~patch.mask
        out = torch.empty_like(x)
        out[keep] = self._mlp(j, x[keep][None])[0][0]
        out[:, 0][patch.mask] = patch.value[patch.mask]
        return out, None, None

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
        shape = (ids.shape[0], *self.kv_shape)  # [batch, kv_head, n_tokens, d_head]
        w = self.tokens.weight
        cache = [(w.new_empty(shape), w.new_empty(shape)) for _ in self.layers]
        out, new, start = [ids], ids, 0
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(length):
            x = self.embed(new, start)
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
        """A whole forward pass (noise added to the subject's token embeddings), caching
        everything. Differentiable: call it under ``torch.no_grad()`` unless gradients are
        wanted. ``last_only``: the last layer computes the last position alone (its outputs,
        and the last ``x``, are ``[batch, 1, d_model]``)."""
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
