"""Tiny models for tests and examples, built without any hub access.

- :func:`random_model`: a randomly initialised Llama-architecture model (the same architecture
  as the default model, so every code path is exercised) with a word-level tokenizer.
- :func:`fact_model`: the same kind of model trained for a few seconds on synthetic
  ``subject -> attribute`` facts. It predicts its facts with high probability, so causal tracing
  and editing tests can assert on real behaviour.

Example::

    from interp_edit.testing import fact_model
    fm = fact_model()
    fact = fm.facts[0]
    fm.model.next_token_probs(fact.prompt, fact.attribute)   # close to 1
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from interp_edit import _files
from interp_edit._cache import cache_dir, file_digest, stable_hash
from interp_edit._loading import boot_bridge
from interp_edit.models import Model

_SYLLABLES = ["zor", "quix", "bal", "mera", "tund", "vel", "osk", "pry", "lum", "dax", "fen", "gor"]
CITIES = ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Cairo", "Lima", "Oslo"]
JOBS = ["doctor", "pilot", "chef", "farmer", "painter", "lawyer"]
# relation -> (templates, attributes). The first template is the "prompt", the others paraphrases.
RELATIONS = {
    "city": (["{} lives in the city of", "{} resides in the city of",
              "the home of {} is the city of"], CITIES),
    "job": (["{} works as a", "{} is employed as a", "the job of {} is a"], JOBS),
}
_EXTRA_WORDS = ["the", "of", "a", "is", "in", "new", "fact", ":", "and", "."]


@dataclass(frozen=True)
class SyntheticFact:
    subject: str
    relation: str
    attribute: str
    template: str  # with "{}" for the subject
    paraphrases: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)


@dataclass(frozen=True)
class FactModel:
    model: Model
    facts: tuple[SyntheticFact, ...]


def _subjects(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        first = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
        last = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
        names.add(f"{first} {last}")
    return sorted(names)


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>"] + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def _vocabulary(subjects: list[str]) -> list[str]:
    words = set(_EXTRA_WORDS) | set(CITIES) | set(JOBS)
    for templates, _ in RELATIONS.values():
        for t in templates:
            words |= set(t.replace("{}", " ").split())
    for s in subjects:
        words |= set(s.split())
    return sorted(words)


def random_model(
    n_layers: int = 4, d_model: int = 64, n_subjects: int = 16, seed: int = 0
) -> Model:
    """A random tiny Llama-architecture model with a word-level tokenizer (no hub access)."""
    return wrap_tiny("llama", n_layers, d_model, seed, n_subjects, n_ctx=64,
                     name=f"interp-edit-tiny-{n_layers}x{d_model}-s{seed}")


def wrap_tiny(family: str, n_layers: int, d_model: int, seed: int, n_subjects: int = 16,
              n_ctx: int = 256, name: str | None = None) -> Model:
    """A random tiny model of ``family`` (:func:`interp_edit.arch.tiny.tiny_hf`) with a fresh
    word-level tokenizer (the bridge takes its tokenizer over, so each model gets its own)."""
    hf, tok = _tiny_hf(family, n_layers, d_model, seed, n_subjects, n_ctx)
    return _wrap(hf, tok, seed, name or f"interp-edit-tiny-{family}-{n_layers}x{d_model}-s{seed}")


def _tiny_hf(family: str, n_layers: int, d_model: int, seed: int, n_subjects: int,
             n_ctx: int):
    """A random Hugging Face model of ``family`` and a fresh word-level tokenizer for it."""
    from interp_edit.arch.tiny import tiny_hf

    tok = _tokenizer(_vocabulary(_subjects(n_subjects, seed)))
    return tiny_hf(family, len(tok), n_layers, d_model, seed, tok.pad_token_id,
                   tok.eos_token_id, n_ctx=n_ctx), tok


def _wrap(hf: torch.nn.Module, tok, seed: int, name: str) -> Model:
    return Model(boot_bridge(f"interp-edit-tiny-{seed}", hf, tok, "cpu", torch.float32), tok,
                 name)


def save_random_model(path: str | os.PathLike, **sizes: int) -> Path:
    """:func:`random_model`'s weights and tokenizer as a Hugging Face directory, which
    ``load_model(path)`` loads (for tests of loading, caches and installs)."""
    hf, tok = random_hf(**sizes)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def random_hf(n_layers: int = 4, d_model: int = 64, n_subjects: int = 16, seed: int = 0):
    """The Hugging Face model and tokenizer of :func:`random_model`, before the bridge."""
    return _tiny_hf("llama", n_layers, d_model, seed, n_subjects, n_ctx=64)


@functools.lru_cache(maxsize=4)
def fact_model(
    n_layers: int = 4, d_model: int = 64, n_subjects: int = 16, steps: int = 300, seed: int = 0,
    family: str = "llama",
) -> FactModel:
    """A tiny model of ``family`` (:data:`interp_edit.arch.tiny.TINY_FAMILIES`) trained (a few
    seconds) to complete synthetic facts.

    Each subject gets one city and one job; the model is trained on every template of both
    relations. The trained weights are cached (safetensors, keyed by the arguments, this
    file's code and the torch version) in the user cache and in memory, so tests share them.
    """
    rng = random.Random(seed)
    facts = []
    for subject in _subjects(n_subjects, seed):
        for rel, (templates, attrs) in RELATIONS.items():
            facts.append(SyntheticFact(subject, rel, rng.choice(attrs), templates[0],
                                       tuple(templates[1:])))
    key = stable_hash([n_layers, d_model, n_subjects, steps, seed, family, torch.__version__,
                       file_digest(Path(__file__))])
    path = cache_dir("testing") / f"fact_model-{family}-{key}.safetensors"
    name = (f"interp-edit-tiny-{n_layers}x{d_model}-s{seed}" if family == "llama" else
            f"interp-edit-tiny-{family}-{n_layers}x{d_model}-s{seed}")
    hf, tok = _tiny_hf(family, n_layers, d_model, seed, n_subjects, n_ctx=64)
    if family == "llama":
        # trained through the bridge, as this model always was: the unit tests' thresholds
        # were set on exactly these weights, and Llama's bridge shares every weight with
        # the Hugging Face modules
        model = _wrap(hf, tok, seed, name)
        module, speller = model.hf_model, model
    else:
        # trained as a plain Hugging Face model, then wrapped: the bridge splits some fused
        # weights into copies (GPT-NeoX's query_key_value), and training through it would
        # update the copies only, leaving the weights the layer stepper reads untrained; a
        # second, untouched copy of the random model tokenizes the training text
        module = hf
        speller = _wrap(*_tiny_hf(family, n_layers, d_model, seed, n_subjects, n_ctx=64),
                        seed, "speller")
    params = dict(module.named_parameters())  # tied weights appear once
    trained = _files.load_cached(path, functools.partial(_read_weights, like=params))
    if trained is not None:
        with torch.no_grad():
            for param, value in trained.items():
                params[param].copy_(value)
    else:
        _train(module, speller, facts, steps, seed)
        _files.save_safetensors(params, path)
    # weights changed: a new Model computes the fingerprint, so artifacts are keyed to it
    if family == "llama":
        return FactModel(Model(model.bridge, tok, name + f"-facts{steps}"), tuple(facts))
    return FactModel(_wrap(hf, tok, seed, name + f"-facts{steps}"), tuple(facts))


def _read_weights(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached trained weights, checked: the names and shapes of ``like``, finite."""
    weights = _files.read_safetensors(path)[0]
    _files.require(weights.keys() == like.keys() and all(
        weights[k].shape == like[k].shape and bool(weights[k].isfinite().all()) for k in like),
        "not the tiny model's weights")
    return weights


def _train(hf: torch.nn.Module, model: Model, facts: list[SyntheticFact], steps: int,
           seed: int) -> None:
    """Train ``hf`` (a Hugging Face model, plain or wrapped) on ``facts``, tokenized by
    ``model``."""
    seqs = []
    for f in facts:
        for t in (f.template, *f.paraphrases):
            prompt = model.tokenize(t.format(f.subject)).tolist()
            seqs.append(prompt + model.target_ids(f.attribute))
    ids, last = model.batch_ids(seqs)
    params = [p for p in hf.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    torch.manual_seed(seed)
    rows = torch.arange(len(seqs))
    mask = torch.arange(ids.shape[1] - 1)[None, :] < last[:, None]  # position j predicts j+1
    hf.train()
    for _ in range(steps):
        logits = hf(ids).logits
        # next-token loss on every real position, plus extra weight on the attribute
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask])
        final = torch.nn.functional.cross_entropy(logits[rows, last - 1], ids[rows, last])
        opt.zero_grad()
        (loss + 3 * final).backward()
        opt.step()
    hf.eval()
    for p in params:
        p.requires_grad_(False)
