"""Run the top of a model again from a block's recorded input.

An editor that changes only layers ``first..`` (MEND's last MLPs; its training loop, which
scores the edited model on the same tokens) leaves everything below ``first`` as it was, so a
second pass needs only the blocks from ``first`` up.

- :func:`block_input` computes the input of block ``first`` for some token ids: on
  Llama-family models with no bridge hook installed, with the layer stepper
  (:mod:`interp_edit.arch.stepper`: the Hugging Face weights through ``torch.nn.functional``,
  without the bridge's per-hook overhead); otherwise with an ordinary bridge pass, recorded
  by :func:`record_block_input`.
- :func:`record_block_input` records what the decoder fed block ``first`` during a bridge
  pass: the hidden states, and the keyword arguments (attention mask, rotary embeddings,
  positions) of *every* block from ``first`` up: they differ by layer where a family
  alternates local and global attention (Gemma 3: its own rotary table and mask per layer
  type).
- :func:`logits_from` runs blocks ``first..``, the final norm, the unembedding (at chosen
  positions) and the family's final-logit softcapping (Gemma 2) from such an input. A recorded input replays the bridge's own block wrappers, so
  every hook installed on the bridge (``interp_edit.hooks``) runs as in a full pass; a stepper
  input runs the stepper (and refuses when a hook is installed, which it would not run).
  Either way weights swapped in on the Hugging Face modules are used, and the numbers equal a
  full pass up to float rounding (bit for bit for a recorded input: same modules, same inputs).

Models whose family the adapter does not know are not supported (:func:`supports_resume`,
:attr:`interp_edit.arch.Adapter.resumable`); callers then run the full pass.

    with record_block_input(model, 27) as rec:
        first = model.logits(ids)
    again = logits_from(model, rec.value)          # == first, from 3 of 30 blocks
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp_edit.arch import adapter
from interp_edit.arch.stepper import Stepper
from interp_edit.errors import InterpEditError
from interp_edit.models import Model

# decoder keyword arguments that must not be replayed: a second pass would append to the cache
_DROP = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache",
         "cache_position")


@dataclass(frozen=True)
class BlockInput:
    """The input of block ``layer`` in one forward pass, detached."""

    layer: int
    hidden: Float[Tensor, "batch pos d_model"]
    # each block's keyword arguments from ``layer`` up; None: computed by the layer stepper
    kwargs: tuple[dict[str, Any], ...] | None = field(repr=False)


@dataclass
class _Recording:
    value: BlockInput | None = None


def supports_resume(model: Model) -> bool:
    """Whether the adapter knows the model's blocks and final norm."""
    return adapter(model).resumable


@contextmanager
def record_block_input(model: Model, layer: int) -> Iterator[_Recording]:
    """Record the input of block ``layer`` in the forward passes run inside the block (the
    last one wins), with the keyword arguments of every block from there up:
    ``rec.value`` is a :class:`BlockInput`."""
    ad = adapter(model)
    if not ad.resumable:
        raise InterpEditError(f"{model.name}: resuming from a block needs a model family the "
                              f"adapter knows (this is {ad.name}; see interp_edit.arch)")
    model._check_layer(layer)
    rec = _Recording()
    hidden: list[Tensor] = []
    kwargs: dict[int, dict[str, Any]] = {}

    def pre_hook(j: int):
        def record(module, args, kw):
            if j == layer:
                hidden[:] = [(args[0] if args else kw["hidden_states"]).detach()]
            kwargs[j] = {k: v for k, v in kw.items() if k not in _DROP and k != "hidden_states"}
            if j == model.n_layers - 1:
                rec.value = BlockInput(layer, hidden[0],
                                       tuple(kwargs[i] for i in range(layer, model.n_layers)))
        return record

    handles = [block.register_forward_pre_hook(pre_hook(j), with_kwargs=True)
               for j, block in enumerate(ad.wrapped_blocks) if j >= layer]
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()


def block_input(
    model: Model, ids: Int[Tensor, "batch pos"], layer: int, precision: torch.dtype | None = None
) -> BlockInput:
    """The input of block ``layer`` for ``ids`` (no gradient; see the module docstring).
    ``precision``: the blocks' matrix multiplies in that dtype (layer stepper only; see
    :class:`interp_edit.arch.stepper.Stepper`), an approximation for callers that can take it."""
    model._check_layer(layer)
    with torch.no_grad():
        if Stepper.usable(model):
            stepper = Stepper(model, ids.shape[1], precision)
            # rows that repeat (an edit's prompt, once with each answer, cut before the
            # answer) run once
            unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
            if len(unique) == len(ids):
                return BlockInput(layer, stepper.run(stepper.embed(ids), 0, layer), None)
            return BlockInput(layer, stepper.run(stepper.embed(unique), 0, layer)[inverse], None)
        with record_block_input(model, layer) as rec:
            model.logits(ids, [-1])
    return rec.value


def stepper_for(model: Model, start: BlockInput) -> Stepper:
    """The layer stepper to go on from a stepper-computed ``start``; refuses when a bridge hook
    has been installed since (the stepper would not run it)."""
    if not Stepper.usable(model):
        raise InterpEditError("this block input was computed by the layer stepper, which does "
                              "not run bridge hooks; remove them or record the input with "
                              "record_block_input")
    return Stepper(model, start.hidden.shape[1])


def logits_from(
    model: Model, start: BlockInput, positions: Int[Tensor, "k"] | None = None
) -> Float[Tensor, "batch k d_vocab"]:
    """Logits from blocks ``start.layer..`` on ``start.hidden`` (at ``positions`` only, when
    given: the unembedding is most of a short pass's last-layer cost). Differentiable."""
    x = start.hidden
    if start.kwargs is None:  # a stepper input: step on
        stepper = stepper_for(model, start)
        x = stepper.run(x, start.layer, model.n_layers)
        return stepper.unembed(x if positions is None else x[:, positions])
    ad = adapter(model)
    for block, kwargs in zip(ad.wrapped_blocks[start.layer :], start.kwargs, strict=True):
        out = block(x, **kwargs)
        x = out[0] if isinstance(out, tuple) else out
    if positions is not None:
        x = x[:, positions]
    return ad.final_logits(x)
