"""What the toolkit knows about each decoder family, and the per-model adapter built from it.

This is the only module that spells Hugging Face module paths. A :class:`Family` says where a
family's blocks, final norm and MLP output projection live, whether that projection is a
GPT-2 ``Conv1D`` (weight stored ``[d_in, d_out]``) or an ``nn.Linear`` (``[d_out, d_in]``),
whether the MLP output is normalised again before the residual add (Gemma 2/3, OLMo-2:
"post-norm"), and whether the layer stepper (:mod:`interp_edit.arch.stepper`) runs it.

:func:`adapter` turns a loaded model into an :class:`Adapter`:

- ``mlp_out_matrix(layer)``: the MLP output matrix as ``[d_model, d_mlp]`` whatever the
  storage, and ``to_parameter(delta)``: a ``[d_model, d_mlp]`` change in the parameter's own
  orientation (what an :class:`~interp_edit.editing.base.AppliedEdit` adds);
- (the bridge hook holding what the MLP output matrix writes, before any post-norm, is
  :func:`interp_edit.models.mlp_write_hook`: ROME's δ and MEND's output gradient are taken
  there, so ``W'k* = v*`` holds in the space the edited matrix writes to);
- ``mlp_post_norm(layer)``: the norm a post-norm family applies to the MLP output before the
  residual add, or None (MEMIT and AlphaEdit take their residual targets back through it);
- ``final_logits(h)``: final norm, unembedding and final-logit softcapping (Gemma 2);
- ``document_start()``: the token that opens a plain document (the tokenizer's
  end-of-text token where it has one, else a non-chat BOS, else none);
- ``hf_name(name)``: a parameter's Hugging Face state-dict name (the bridge's wrapper paths
  removed), so saved edits and editors survive TransformerLens releases.

A model of a class not in :data:`FAMILIES` gets a generic adapter: the MLP output
projection is read from the bridge (``blocks[L].mlp.out``) and its orientation from its
module type (``nn.Linear`` or ``Conv1D``; anything else raises an :class:`InterpEditError`
naming the class); tracing runs through the hooks and nothing resumes from a block. Every
result stays correct; only the fast paths are missing.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from functools import cached_property

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit.errors import InterpEditError

WRAPPER = "._original_component"  # what the bridge inserts into parameter paths
_END_OF_TEXT = re.compile(r"<\|?end_?of_?text\|?>", re.IGNORECASE)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module inside (possibly nested) TransformerBridge wrappers."""
    while hasattr(module, "original_component"):
        module = module.original_component
    return module


def hf_name(name: str) -> str:
    """A parameter's Hugging Face state-dict name (the bridge's wrapper paths removed)."""
    return name.replace(WRAPPER, "")


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts (attribute paths from the ``*ForCausalLM`` module)."""

    name: str
    classes: tuple[str, ...]  # Hugging Face model class names
    blocks: str  # the ModuleList of decoder blocks
    final_norm: str
    mlp_out: str  # the MLP output projection, relative to a block
    conv1d: bool = False  # weight stored [d_in, d_out] (GPT-2 Conv1D)
    post_norm: str | None = None  # the norm applied to the MLP output before the residual add
    stepper: bool = False  # the layer stepper runs this family (fast paths)


_LLAMA = dict(blocks="model.layers", final_norm="model.norm", mlp_out="mlp.down_proj")
_POST = "post_feedforward_layernorm"
FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), **_LLAMA, stepper=True),
    Family("mistral", ("MistralForCausalLM",), **_LLAMA, stepper=True),
    Family("qwen2", ("Qwen2ForCausalLM",), **_LLAMA, stepper=True),
    Family("qwen3", ("Qwen3ForCausalLM",), **_LLAMA, stepper=True),
    Family("gemma", ("GemmaForCausalLM",), **_LLAMA, stepper=True),
    Family("gemma2", ("Gemma2ForCausalLM",), **_LLAMA, post_norm=_POST, stepper=True),
    Family("gemma3", ("Gemma3ForCausalLM",), **_LLAMA, post_norm=_POST, stepper=True),
    Family("olmo2", ("Olmo2ForCausalLM",), **_LLAMA, post_norm=_POST, stepper=True),
    Family("phi3", ("Phi3ForCausalLM",), **_LLAMA, stepper=True),
    Family("gpt2", ("GPT2LMHeadModel",), "transformer.h", "transformer.ln_f", "mlp.c_proj",
           conv1d=True, stepper=True),
    Family("gptj", ("GPTJForCausalLM",), "transformer.h", "transformer.ln_f", "mlp.fc_out",
           stepper=True),
    Family("gpt_neox", ("GPTNeoXForCausalLM",), "gpt_neox.layers",
           "gpt_neox.final_layer_norm", "mlp.dense_4h_to_h", stepper=True),
    Family("opt", ("OPTForCausalLM",), "model.decoder.layers", "model.decoder.final_layer_norm",
           "fc2", stepper=True),
)
_BY_CLASS = {c: f for f in FAMILIES for c in f.classes}


def supported() -> str:
    """The known families, for messages."""
    return ", ".join(f.name for f in FAMILIES)


class Adapter:
    """One loaded model seen through its family (see the module docstring)."""

    def __init__(self, model) -> None:
        self.model = model
        self.hf = unwrap(model.hf_model)
        self.cls = type(self.hf).__name__
        self.family: Family | None = _BY_CLASS.get(self.cls)
        cfg = self.hf.config
        self.softcap: float | None = getattr(cfg, "final_logit_softcapping", None)
        # the sqrt(d_model) of Gemma's embeddings is applied inside the embedding module
        # (transformers 5): token embeddings, hook_embed and the noise std all include it
        self.embed_scale = float(getattr(self.embed, "scalar_embed_scale", 1.0))

    @property
    def name(self) -> str:
        return self.family.name if self.family else f"generic ({self.cls})"

    @property
    def has_stepper(self) -> bool:
        return self.family is not None and self.family.stepper

    # ---- modules --------------------------------------------------------------------------
    @cached_property
    def wrapped_blocks(self) -> list[torch.nn.Module] | None:
        """The decoder blocks as the bridge calls them (its wrappers run its hooks), or None
        for a generic model."""
        if self.family is None:
            return None
        return list(self.hf.get_submodule(self.family.blocks))

    @cached_property
    def blocks(self) -> list[torch.nn.Module] | None:
        """The decoder blocks (Hugging Face modules), or None for a generic model."""
        return None if self.family is None else [unwrap(b) for b in self.wrapped_blocks]

    @cached_property
    def resumable(self) -> bool:
        """Whether the top blocks can be run again from a block's input: a known family whose
        last block feeds the final norm directly (not OPT with a final projection)."""
        if self.family is None:
            return False
        try:
            self.hf.get_submodule(self.family.final_norm)
        except AttributeError:
            return False
        cfg = self.hf.config
        return getattr(cfg, "word_embed_proj_dim", cfg.hidden_size) == cfg.hidden_size

    @cached_property
    def wrapped_final_norm(self) -> torch.nn.Module | None:
        return None if self.family is None else self.hf.get_submodule(self.family.final_norm)

    @cached_property
    def final_norm(self) -> torch.nn.Module | None:
        return None if self.family is None else unwrap(self.wrapped_final_norm)

    @property
    def embed(self) -> torch.nn.Module:
        return unwrap(self.hf.get_input_embeddings())

    @property
    def lm_head(self) -> torch.nn.Module:
        return unwrap(self.hf.get_output_embeddings())

    def mlp_out(self, layer: int) -> torch.nn.Module:
        """The MLP output projection of ``layer`` (ROME and MEND edit its weight)."""
        self.model._check_layer(layer)
        if self.family is not None:
            return unwrap(self.blocks[layer].get_submodule(self.family.mlp_out))
        return unwrap(self.model.bridge.blocks[layer].mlp.out)

    def mlp_post_norm(self, layer: int) -> torch.nn.Module | None:
        """The RMS norm that ``layer``'s MLP output passes before the residual add (Gemma 2/3,
        OLMo-2), or None where the MLP output is added as it is."""
        self.model._check_layer(layer)
        if self.family is None or self.family.post_norm is None:
            return None
        return unwrap(self.blocks[layer].get_submodule(self.family.post_norm))

    def conv1d(self, layer: int) -> bool:
        """Whether ``layer``'s MLP output weight is stored ``[d_in, d_out]``."""
        if self.family is not None:
            return self.family.conv1d
        mod = self.mlp_out(layer)
        if isinstance(mod, torch.nn.Linear):
            return False
        if type(mod).__name__ == "Conv1D":
            return True
        raise InterpEditError(
            f"{self.cls}: the MLP output projection of layer {layer} is a "
            f"{type(mod).__name__}, neither nn.Linear nor Conv1D, so its orientation is "
            f"unknown; supported families: {supported()}")

    @cached_property
    def _block_of(self) -> dict[int, int]:
        """id(parameter) -> the index of the block that holds it."""
        return {id(p): j for j, block in enumerate(self.model.bridge.blocks)
                for p in block.parameters()}

    def layer_of(self, name: str) -> int | None:
        """The block holding parameter ``name`` (either naming), or None (embeddings, final
        norm, unembedding, or no such parameter)."""
        param = self.model.parameters_by_name.get(name)
        return None if param is None else self._block_of.get(id(param))

    # ---- the MLP output matrix, one orientation --------------------------------------------
    def mlp_out_matrix(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        """``layer``'s MLP output weight as ``[d_model, d_mlp]`` (a view, no copy)."""
        w = self.mlp_out(layer).weight
        return w.t() if self.conv1d(layer) else w

    def to_parameter(self, layer: int, delta: Float[Tensor, "d_model d_mlp"]) -> Tensor:
        """A ``[d_model, d_mlp]`` change of ``layer``'s MLP output matrix in its parameter's
        own orientation (contiguous)."""
        return (delta.t() if self.conv1d(layer) else delta).contiguous()

    def from_parameter(self, layer: int, delta: Tensor) -> Float[Tensor, "d_model d_mlp"]:
        """The inverse of :meth:`to_parameter`."""
        return delta.t() if self.conv1d(layer) else delta

    # ---- the output side ------------------------------------------------------------------
    def softcapped(self, logits: Tensor) -> Tensor:
        """``cap · tanh(logits / cap)`` where the family caps its final logits (Gemma 2)."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def final_logits(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logits from last-block hidden states (final norm, unembedding, softcapping), through
        the bridge's wrappers (their hooks run)."""
        if not self.resumable:
            raise InterpEditError(f"{self.cls}: no known final norm; supported: {supported()}")
        return self.softcapped(self.hf.get_output_embeddings()(self.wrapped_final_norm(h)))

    def document_start(self) -> list[int]:
        """The token that opens a plain document, to sample ordinary text after: the
        tokenizer's end-of-text token where its vocabulary has one (GPT-2, SmolLM: a special
        token named "endoftext", whatever its brackets), else the BOS token when the model
        prepends one (Gemma), else none."""
        tok = self.model.tokenizer
        for i, added in sorted(getattr(tok, "added_tokens_decoder", {}).items()):
            if _END_OF_TEXT.fullmatch(str(added)):
                return [i]
        return [tok.bos_token_id] if self.model.prepend_bos else []


_ADAPTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adapter(model) -> Adapter:
    """The model's :class:`Adapter`, built once per model."""
    if model not in _ADAPTERS:
        _ADAPTERS[model] = Adapter(model)
    return _ADAPTERS[model]
