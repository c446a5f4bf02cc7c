"""``estimate="atpstar"``: the screen with attention read exactly, and the last token exact.

Restoring a cell at token ``t`` before the last token changes the answer only through what
later positions read from position ``t``: the keys and values that each later layer's
attention computes there. The linear screen misses the largest effects of the grid (the
last subject token's early and middle layers), because the corrupted queries barely attend
to a corrupted subject: the gradient through an attention weight near 0 is near 0, while the
restored key would draw the attention back (AtP*, Kramar et al. 2024). So for each cell:

1. The restoration rides the residual stream: at every later layer ``l``, position ``t``'s
   input is taken as its corrupted value plus the restored outputs below ``l`` (the cell's
   change to a block output for ``"resid"``; the sum of the window's restored MLP or attention
   outputs below ``l`` for ``"mlp"``/``"attn"``: the window restored jointly, not as a sum of
   single-layer estimates). Their keys and values are recomputed from that input.
2. Each later layer's attention output at every query after ``t`` is recomputed exactly for
   the new key and value (the softmax included, :func:`~.estimates.attention_reads`), and
   its change is taken to first order onward (the gradient of log p(target) at the
   attention output, from the screen's one backward pass).
3. The sum over layers is the cell's log-p effect, scored in log-odds as ``"logodds"`` is.

The last token's cells are computed exactly instead, by the fast engine: recomputing one
position is cheap, and there a restoration acts through the position's own later layers,
not through attention reads. They are marked exact in the result (``TraceResult.exact``).

The cost over the plain screen: the keys and values of every cell's input at every later
layer (``n_layers^2 / 2`` rows per token and sample, of the two small projections) and the
exact trace of the last token. Like every screen it is an estimate: the column at ``t`` is
not re-run (its own MLPs' response to the restored state is missed), and what the attention
outputs do downstream is linear. Softcapped scores and sliding windows (Gemma 2/3) are read
exactly as the layer computes them; where a norm follows the attention's output projection
(Gemma 2/3, OLMo-2) the change of the projection's output is taken through that norm to
first order (:func:`_through_norm`). It needs the layer stepper (:func:`supported`).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor

from interp_edit.arch.stepper import RunCache, Stepper
from interp_edit.tracing import engine, estimates
from interp_edit.tracing.inputs import Traced, TraceInputs, window_layers, with_clean_pass


def read_effects(
    stepper: Stepper, run: RunCache, grad_attn: list[Tensor], kinds, window: int,
    samples: int,
) -> dict[str, Float[Tensor, "samples n_tokens n_layers"]]:
    """Step 1-2 of the module docstring for every cell of every kind: the log-p effect per
    noise sample (rows ``1 .. samples`` of ``run``; row 0 is the clean prompt)."""
    rows = slice(1, 1 + samples)
    L, T = len(run.attn), run.x[0].shape[1]
    out = {k: torch.zeros(samples, T, L) for k in kinds}
    spans = {k: [range(c, c + 1) if k == "resid" else window_layers(c, window, L)
                 for c in range(L)] for k in kinds}
    # prefix sums over layers of each site's clean - corrupted change: [L, S, T, d]
    sites = {"resid": run.x[1:], "mlp": run.mlp, "attn": run.attn}
    prefix = {}
    for k in kinds:
        deltas = [a[:1] - a[rows] for a in sites[k][: L - 1]]  # the last layer: never read
        prefix[k] = torch.cumsum(torch.stack([torch.zeros_like(deltas[0])] + deltas), 0)
    for layer in range(1, L):
        x = run.x[layer][rows]
        q, k, v, grad_z = _attention(stepper, layer, x, run, grad_attn[layer][rows])
        lay = stepper.layers[layer]
        for kind in kinds:
            cells = [c for c, span in enumerate(spans[kind]) if span.start < layer]
            ends = torch.tensor([min(spans[kind][c].stop, layer) for c in cells])
            starts = torch.tensor([spans[kind][c].start for c in cells])
            change = prefix[kind][ends] - prefix[kind][starts]  # [cells, S, T, d]
            k_new, v_new = _keys_values(stepper, layer, x[None] + change)
            effect = estimates.attention_reads(q, k, v, grad_z, k_new, v_new, lay.scaling,
                                               softcap=lay.softcap, window=lay.window)
            out[kind][:, :, cells] += rearrange(effect, "s c t -> s t c").float().cpu()
    return out


def _attention(stepper: Stepper, layer: int, x: Tensor, run: RunCache, grad_a: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Layer ``layer``'s queries, keys, values (query heads, after the rotary embedding)
    ``[S, heads, pos, d_head]`` on the corrupted rows, and the gradient at each head's
    attention output (before the output projection), from the one at the layer's attention
    output. Where a norm follows the output projection (Gemma 2/3, OLMo-2) the gradient is
    taken back through it at the corrupted run's projection output (first order in it)."""
    lay, H = stepper.layers[layer], stepper.n_heads
    rows = slice(1, 1 + x.shape[0])
    q = stepper.attention_inputs(layer, x)[0]
    k, v = (repeat(a[rows], "s g p d -> s (g r) p d", r=H // stepper.n_kv)
            for a in (run.k[layer], run.v[layer]))
    full = grad_a.new_zeros(x.shape[0], x.shape[1], grad_a.shape[-1])
    full[:, x.shape[1] - grad_a.shape[1]:] = grad_a  # the last layer: its last position only
    if lay.attn_out_norm is not None:
        full = _through_norm(stepper, layer, q, run.k[layer][rows], run.v[layer][rows], full)
    grad_z = rearrange(full.float() @ lay.o.weight.float(), "s p (h d) -> s h p d", h=H)
    return q.float(), k.float(), v.float(), grad_z


def _through_norm(stepper: Stepper, layer: int, q: Tensor, keys: Tensor, values: Tensor,
                  grad: Float[Tensor, "S pos d_model"]) -> Float[Tensor, "S pos d_model"]:
    """``grad`` (at the output of layer ``layer``'s post-attention norm) taken back to the
    norm's input, the output projection's output of the run that ``q``, ``keys``,
    ``values`` describe: the vector-Jacobian product of the norm there."""
    a = stepper.attention_output(layer, q, keys, values).detach()
    with torch.enable_grad():
        a.requires_grad_(True)
        out = stepper.layers[layer].attn_out_norm(a)
        (back,) = torch.autograd.grad(out, a, grad.to(out.dtype))
    return back.float()


def _keys_values(stepper: Stepper, layer: int, x: Float[Tensor, "cells S pos d"]
                 ) -> tuple[Tensor, Tensor]:
    """Keys (after the rotary embedding) and values of inputs ``x``, query heads,
    ``[S, cells, pos, heads, d_head]``."""
    C, S = x.shape[0], x.shape[1]
    _, k, v = stepper.attention_inputs(layer, rearrange(x, "c s p d -> (c s) p d"),
                                       queries=False)
    r = stepper.n_heads // stepper.n_kv
    return tuple(repeat(a.float(), "(c s) g p d -> s c p (g r) d", c=C, s=S, r=r)
                 for a in (k, v))


def supported(model) -> bool:
    """Whether ``"atpstar"`` runs on ``model``: on the layer stepper (every family its
    adapter knows; softcapped scores, sliding windows and post-attention norms included)."""
    return Stepper.usable(model)


def last_token_exact(inputs: TraceInputs, kinds, window: int, progress
                     ) -> dict[str, Float[Tensor, "n_layers"]]:
    """The last token's cells of each kind, by the fast engine (``inputs`` completed by the
    screen's clean row: its target; the exact clean pass is run here)."""
    last = [(inputs.n_tokens - 1, layer) for layer in range(inputs.n_layers)]
    grids = engine.run(with_clean_pass(inputs), kinds, window=window, sever=None,
                       cells=last, progress=progress).grids
    return {k: grids[k][-1] for k in kinds}


def run(inputs: TraceInputs, g, kinds, *, window, progress, precision) -> Traced:
    """``estimate="atpstar"`` from the screen's gradient pass ``g``
    (:class:`~.attribution.GradientPass`, one noise scale, run with ``precision``)."""
    S, T = inputs.samples, inputs.n_tokens
    stepper = Stepper(inputs.model, T, precision)
    with torch.no_grad():
        effects = read_effects(stepper, g.run, g.grads["attn"], kinds, window, S)
    logp = g.logp[1 : 1 + S]
    exact_row = last_token_exact(g.inputs, kinds, window, progress)
    grids, exact = {}, {}
    for kind in kinds:
        grid = estimates.logodds_step(logp, effects[kind])
        grid[-1] = exact_row[kind]
        grids[kind] = grid
        exact[kind] = torch.zeros(T, inputs.n_layers, dtype=torch.bool)
        exact[kind][-1] = True
    return Traced(grids, float(logp.exp().mean()), g.inputs, exact)
