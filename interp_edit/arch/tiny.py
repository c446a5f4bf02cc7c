"""A tiny randomly initialised model of every family the adapter knows, built from its Hugging
Face config class (no hub access), for the per-family tests and the support table.

Each config turns on what makes its family different, at a size where it matters: sliding
windows shorter than a prompt (Mistral, Gemma 2/3), alternating local/global layers with
their own rotary tables (Gemma 3), attention and final-logit softcapping (Gemma 2), partial
rotary (Phi-3, GPT-J, GPT-NeoX), query/key norms (Qwen3, Gemma 3, OLMo-2), post-norms
(Gemma 2/3, OLMo-2), GPT-2's Conv1D weights, parallel attention and MLP (GPT-J, GPT-NeoX).

    from interp_edit.arch.tiny import TINY_FAMILIES, tiny_model
    models = {family: tiny_model(family) for family in TINY_FAMILIES}
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_GQA = dict(num_attention_heads=4, num_key_value_heads=2)


def _llama_like(d: int, n: int) -> dict[str, Any]:
    return dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n, **_GQA)


def _alternating(n: int) -> list[str]:
    return ["sliding_attention" if j % 2 == 0 else "full_attention" for j in range(n)]


# family -> (config class, model class, config fields from (d_model, n_layers))
_CONFIGS: dict[str, tuple[str, str, Callable[[int, int], dict[str, Any]]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _llama_like),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                lambda d, n: {**_llama_like(d, n), "sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _llama_like),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", lambda d, n: {**_llama_like(d, n),
                                                               "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", lambda d, n: {**_llama_like(d, n),
                                                               "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", lambda d, n: {
        **_llama_like(d, n), "head_dim": 16, "sliding_window": 3,
        "layer_types": _alternating(n), "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", lambda d, n: {
        **_llama_like(d, n), "head_dim": 16, "sliding_window": 3,
        "layer_types": _alternating(n)}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _llama_like),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", lambda d, n: {**_llama_like(d, n),
                                                            "partial_rotary_factor": 0.5}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", lambda d, n: dict(n_embd=d, n_layer=n, n_head=4)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", lambda d, n: dict(n_embd=d, n_layer=n, n_head=4,
                                                                rotary_dim=8)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", lambda d, n: dict(
        hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n, num_attention_heads=4,
        rotary_pct=0.25)),
    "opt": ("OPTConfig", "OPTForCausalLM", lambda d, n: dict(
        hidden_size=d, ffn_dim=2 * d, num_hidden_layers=n, num_attention_heads=4,
        word_embed_proj_dim=d)),
}
TINY_FAMILIES: tuple[str, ...] = tuple(_CONFIGS)


def tiny_hf(family: str, vocab_size: int, n_layers: int = 3, d_model: int = 64,
            seed: int = 0, pad: int | None = None, eos: int | None = None,
            tie: bool = True, n_ctx: int = 256) -> torch.nn.Module:
    """The Hugging Face model of ``family`` (random weights, seeded; eval mode)."""
    import transformers

    from interp_edit.errors import InterpEditError

    if family not in _CONFIGS:
        raise InterpEditError(f"no tiny config for {family!r}: one of {', '.join(_CONFIGS)}")
    cfg_cls, model_cls, fields = _CONFIGS[family]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=vocab_size, max_position_embeddings=n_ctx, tie_word_embeddings=tie,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=None, **fields(d_model, n_layers))
    if hasattr(cfg, "n_positions"):  # GPT-2, GPT-J name their context so
        cfg.n_positions = n_ctx
    cfg.architectures = [model_cls]  # how the bridge tells the architecture
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(cfg).eval()


def tiny_model(family: str, n_layers: int = 3, d_model: int = 64, seed: int = 0):
    """A :class:`~interp_edit.models.Model` of ``family`` with the word-level tokenizer of
    :mod:`interp_edit.testing` (its synthetic subjects, cities and jobs are single words)."""
    from interp_edit.testing import wrap_tiny

    return wrap_tiny(family, n_layers, d_model, seed)
