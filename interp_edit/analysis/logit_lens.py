"""The logit lens (nostalgebraist 2020): read an intermediate residual stream as if it were the
last one, through the model's own final norm and unembedding.

    probs = lens_probs(model, resid)              # [..., d_vocab], softmax of the lens logits
    p = target_lens(model, resid, [true_id, new_id])   # [..., 2]

The final norm and unembedding are the bridge's ``ln_final`` and ``unembed`` components, so
any architecture TransformerLens bridges works (RMSNorm or LayerNorm, tied or untied
embeddings). Applied to the output of the last block (``blocks.{L-1}.hook_resid_post``) the
lens gives exactly the model's output distribution (tested).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.errors import InterpEditError
from interp_edit.models import Model


def _readout(model: Model) -> tuple[torch.nn.Module, torch.nn.Module]:
    bridge = model.bridge
    norm, unembed = getattr(bridge, "ln_final", None), getattr(bridge, "unembed", None)
    if norm is None or unembed is None:
        raise InterpEditError(
            f"model {model.name!r} has no bridge ln_final/unembed component: the logit lens "
            "needs the final norm and the unembedding"
        )
    return norm, unembed


@torch.no_grad()
def lens_logits(
    model: Model, resid: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_vocab"]:
    """``unembed(ln_final(resid))``: the logits the model would emit if ``resid`` were final."""
    norm, unembed = _readout(model)
    return unembed(norm(resid.to(model.device)))


def lens_probs(model: Model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Softmax of :func:`lens_logits` (computed in float32)."""
    return lens_logits(model, resid).float().softmax(-1)


def target_lens(
    model: Model, resid: Float[Tensor, "... d_model"], target_ids: Sequence[int]
) -> Float[Tensor, "... n_targets"]:
    """Logit-lens probability of each target token id at every leading index of ``resid``."""
    ids = torch.as_tensor(list(target_ids), device=model.device, dtype=torch.long)
    return lens_probs(model, resid)[..., ids].cpu()
