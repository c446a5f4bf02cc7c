"""The attribution screen's arithmetic: how activations and gradients become cell scores.

Everything here takes tensors (activations, gradients, log-probabilities) and knows nothing
of the model that produced them, so that the gradient pass (:mod:`.attribution`) can run on
any architecture's layer stepper or through the hook layer.

Units: a per-sample *effect* ``d_s`` estimates how much restoring a cell moves a metric of
noise sample ``s``'s p(target): log p (:func:`linear`, the ``"logodds"`` and ``"prob"``
estimates) or the log-odds ``log(p / (1 - p))`` (:func:`path`, the ``"ig"`` estimate). The
score maps then turn effects into probabilities, averaged over the samples as the exact
trace averages its samples' p(target).
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from interp_edit.tracing.inputs import window_layers


def linear(
    clean: Float[Tensor, "1 pos d"], corrupted: Float[Tensor, "samples pos d"],
    grad: Float[Tensor, "samples pos d"],
) -> Float[Tensor, "samples pos"]:
    """First order at the corrupted point: ``(clean - corrupted) . grad`` per position
    (attribution patching, Nanda 2023)."""
    return ((clean - corrupted) * grad).sum(-1)


def path(
    clean: Float[Tensor, "1 pos d"], points: Float[Tensor, "steps samples pos d"],
    clean_grad: Float[Tensor, "1 pos d"], grads: Float[Tensor, "steps samples pos d"],
) -> Float[Tensor, "samples pos"]:
    """The integral of ``grad . d(activation)`` along the path the activation takes from its
    corrupted value (``points[0]``) through ``points[1:]`` to its clean value, by the
    trapezoid rule: ``sum_i (x_{i+1} - x_i) . (g_i + g_{i+1}) / 2`` with ``x_k`` the clean
    activation. Where the activation is all that carries the corruption to the output (a
    cut, such as the last position's state when only the last token is corrupted), this
    converges to the exact change of the metric as the steps grow, with an error falling as
    1/k^2; elsewhere it is the site's share of the change along the path (its conductance,
    Dhamdhere et al. 2018), of which EAP-IG's ``(clean - corrupted) . mean_i g_i`` (Hanna et
    al. 2024) is the straight-line version."""
    xs = torch.cat((points, clean[None].expand(1, *points.shape[1:])))
    gs = torch.cat((grads, clean_grad[None].expand(1, *grads.shape[1:])))
    return ((xs[1:] - xs[:-1]) * (gs[1:] + gs[:-1])).sum((0, -1)) / 2


def windows(
    effects: Float[Tensor, "samples n_layers n_tokens"], kind: str, window: int
) -> Float[Tensor, "samples n_tokens n_layers"]:
    """Per sample, the sum of the site effects over each cell's restorations: one site for
    ``"resid"``; a window of layers for ``"mlp"``/``"attn"`` (differences of a prefix sum)."""
    S, L, T = effects.shape
    if kind == "resid":
        return rearrange(effects, "s l t -> s t l")
    csum = torch.cat((effects.new_zeros(S, 1, T), effects.cumsum(1)), 1)
    spans = [window_layers(layer, window, L) for layer in range(L)]
    return torch.stack([csum[:, w.stop] - csum[:, w.start] for w in spans], 2)


def logodds_scores(
    logp: Float[Tensor, "samples"], d: Float[Tensor, "samples n_tokens n_layers"]
) -> Float[Tensor, "n_tokens n_layers"]:
    """``mean_s sigmoid(o_s + d_s)``: each sample's log-odds ``o_s`` of the target moved by its
    log-odds effect ``d_s``; in float64, so that a corrupted p of 1 gives 1, not NaN."""
    logp, d = logp.double()[:, None, None], d.double()
    return torch.sigmoid(logp - _log1m(logp) + d).mean(0).float()


def logodds_step(
    logp: Float[Tensor, "samples"], d: Float[Tensor, "samples n_tokens n_layers"]
) -> Float[Tensor, "n_tokens n_layers"]:
    """:func:`logodds_scores` of a log-p effect ``d``: times d(log-odds)/d(log p) = 1 / (1 - p)."""
    return logodds_scores(logp, d.double() * (-_log1m(logp.double())).exp()[:, None, None])


def prob_scores(
    logp: Float[Tensor, "samples"], d: Float[Tensor, "samples n_tokens n_layers"]
) -> Float[Tensor, "n_tokens n_layers"]:
    """First order in p of a log-p effect: ``mean_s p_s (1 + d_s)`` (d p = p d log p)."""
    p = logp.exp()[:, None, None]
    return (p * (1 + d)).mean(0).float()


def logodds_weights(logp: Float[Tensor, "rows"]) -> Float[Tensor, "rows"]:
    """d(log-odds)/d(log p) = 1 / (1 - p) per row: turns gradients of log p into gradients of
    the log-odds (finite in float32 where p rounds to 1: the gradient is near 0 there)."""
    return (-_log1m(logp.double()).clamp_max(80.0)).exp().float()


def _log1m(logp: Tensor) -> Tensor:
    """log(1 - p) from log p, finite (clamped at -700) where p rounds to 1."""
    return torch.log(-torch.expm1(logp)).clamp_min(-700.0)


def attention_reads(
    q: Float[Tensor, "samples heads pos d_head"], k: Float[Tensor, "samples heads pos d_head"],
    v: Float[Tensor, "samples heads pos d_head"], grad_z: Float[Tensor, "samples heads pos d_head"],
    k_new: Float[Tensor, "samples cells pos heads d_head"],
    v_new: Float[Tensor, "samples cells pos heads d_head"], scale: float,
    softcap: float | None = None, window: int | None = None,
) -> Float[Tensor, "samples cells pos"]:
    """First order in one attention layer's outputs, with the softmax recomputed exactly:
    for each cell and key position ``t``, replace position ``t``'s key and value by
    ``k_new``/``v_new`` (the rest of the layer as it ran: queries ``q``, keys ``k``, values
    ``v``, all after the rotary embedding, key/value heads repeated to the query heads) and
    return ``sum_{query > t} grad_z . (z' - z)``, where ``z`` is each query position's
    attention output per head and ``z'`` the same after the replacement, exact in closed
    form: with ``a = A[query, t]`` and ``s`` the change of the query-key score,
    ``z' = (z - a v_t + a e^s v'_t) / (1 - a + a e^s)``. Linearizing the softmax instead
    misses a key that the corrupted query barely attends to but the restored one would
    (the attention saturation of Kramar et al. 2024, AtP*). Queries at ``t`` itself are
    left out (their position holds the restoration: the caller's). ``softcap``: the scores
    pass through ``c tanh(s / c)`` (Gemma 2), so ``s`` is the change of the capped score;
    ``window``: a sliding window (query ``i`` sees keys ``i - window < j <= i``), a key out
    of a query's window changes nothing there."""
    T = q.shape[2]

    def capped(x: Tensor) -> Tensor:
        return x if softcap is None else torch.tanh(x / softcap) * softcap

    raw = torch.einsum("shqd,shkd->shqk", q, k) * scale
    scores = capped(raw)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if window is not None:
        causal &= ~torch.ones_like(causal).tril(-window)
    logA = scores.masked_fill(~causal, float("-inf")).log_softmax(-1).double()  # [s h q t]
    gz = (grad_z * (logA.exp().float() @ v)).sum(-1).double()  # grad . z per query
    gv = torch.einsum("shqd,shtd->shqt", grad_z, v).double()  # grad(query) . v_t
    gv_new = torch.einsum("shqd,scthd->schqt", grad_z, v_new).double()
    ds = (capped(torch.einsum("shqd,scthd->schqt", q, k_new) * scale)
          - scores[:, None]).double()
    log_w = (logA[:, None] + ds).clamp_max(700.0)  # log(a e^s)
    a, w = logA.exp()[:, None], log_w.exp()
    change = (gz[:, None, ..., None] - a * gv[:, None] + w * gv_new) / (1 - a + w) \
        - gz[:, None, ..., None]
    later = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)  # query > t
    change = change.where(later, 0.0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return change.sum((2, 3)).float()  # [s c t]
