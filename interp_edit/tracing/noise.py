"""The one noise routine of causal tracing: how much Gaussian noise corrupts the subject.

``noise="sK"`` means K times the standard deviation of subject-token embeddings, as in Meng et
al. 2022 (kmeng01/rome ``collect_embedding_std``, where K = 3). ROME measures that std over the
subjects of the dataset being traced. Here it is measured over :data:`REFERENCE_SUBJECTS`, a
fixed built-in list of well-known entities of many types, so one prompt's trace does not depend
on which other facts were traced with it; the measured value is cached per model fingerprint.
``trace_dataset`` follows ROME instead and measures it over the dataset's subjects; both record
the list in ``noise_source``.
Pass a float for a fixed std, or a tensor ``[samples, subject_len, d_model]`` to use given noise
(that makes any two implementations exactly comparable).

Noise is drawn once per trace from a seeded generator and the same samples serve every cell.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp_edit import _files, _validate
from interp_edit._cache import cache_dir
from interp_edit.errors import InterpEditError
from interp_edit.models import Model

# Well-known entities of many types (places, people, organisations, works, things). Version
# the name if the list changes: cached stds are keyed by it.
REFERENCE_LIST_NAME = "builtin-subjects-v1"
REFERENCE_SUBJECTS: tuple[str, ...] = (
    "The Eiffel Tower", "The Great Wall of China", "Mount Everest", "The Colosseum",
    "The Statue of Liberty", "Big Ben", "The Taj Mahal", "Machu Picchu", "The Sahara",
    "The Amazon River", "Lake Baikal", "The Grand Canyon", "Stonehenge", "The Louvre",
    "Albert Einstein", "Marie Curie", "William Shakespeare", "Leonardo da Vinci",
    "Isaac Newton", "Wolfgang Amadeus Mozart", "Pablo Picasso", "Nelson Mandela",
    "Frida Kahlo", "Charles Darwin", "Ada Lovelace", "Mahatma Gandhi", "Cleopatra",
    "Napoleon Bonaparte", "Serena Williams", "Lionel Messi", "Toyota", "Microsoft",
    "Apple", "Nokia", "Volkswagen", "Samsung", "IKEA", "Nintendo", "Coca-Cola",
    "Airbus", "the BBC", "the United Nations", "Harvard University", "France", "Japan",
    "Brazil", "Canada", "Egypt", "Australia", "Norway", "Kenya", "Berlin", "Buenos Aires",
    "Istanbul", "Toronto", "Mumbai", "The Beatles", "Hamlet", "The Mona Lisa",
    "Windows 95", "the iPhone", "Python", "Bitcoin", "Jupiter", "the Moon",
)  # fmt: skip

_SPEC = re.compile(r"^s(\d+(?:\.\d*)?|\.\d+)$")


def spec_multiplier(spec: str) -> float | None:
    """K of a noise spec ``"sK"`` (``"s3"`` -> 3.0, ``"s2.5"`` -> 2.5), or ``None`` when
    ``spec`` is not of that form. :func:`resolve_noise` and ``trace_dataset`` both parse here."""
    match = _SPEC.fullmatch(spec.strip())
    return float(match.group(1)) if match else None


@torch.no_grad()
def embedding_std(model: Model, subjects: Sequence[str]) -> float:
    """Std over all elements of the token embeddings of ``subjects``' tokens (ROME's
    ``collect_embedding_std``): each subject is tokenized alone, without special tokens."""
    ids = [i for s in subjects for i in model.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InterpEditError("no subject tokens to measure the embedding std from")
    emb = model.hf_model.get_input_embeddings()
    return float(emb(torch.tensor(ids, device=model.device)).float().std())


def reference_std(model: Model) -> tuple[float, int]:
    """Embedding std over :data:`REFERENCE_SUBJECTS` for this model (cached) and the list size."""
    path = cache_dir("noise") / f"{model.weights_key}-{REFERENCE_LIST_NAME}.json"
    std = _files.load_cached(path, _read_std)
    if std is None:
        std = embedding_std(model, REFERENCE_SUBJECTS)
        _files.write_json(path, {"std": std, "list": REFERENCE_LIST_NAME, "model": model.name})
    return std, len(REFERENCE_SUBJECTS)


def _read_std(path: Path) -> float:
    """A cached reference std, checked: a finite positive number for this list."""
    entry = _files.read_json(path)
    std = entry["std"]
    _files.require(entry.get("list") == REFERENCE_LIST_NAME and isinstance(std, float)
                   and math.isfinite(std) and std > 0, "not a finite positive std of this list")
    return std


def resolve_noise(
    model: Model,
    noise: str | float | Tensor,
    samples: int,
    subject_len: int,
    seed: int,
) -> tuple[Float[Tensor, "samples subject_len d_model"], float, str]:
    """The noise added to the subject embeddings, its std, and a description of its source."""
    shape = (samples, subject_len, model.d_model)
    if isinstance(noise, Tensor):
        if tuple(noise.shape) != shape:
            raise InterpEditError(
                f"the noise tensor has shape {tuple(noise.shape)}; expected "
                f"[samples, subject_len, d_model] = {list(shape)} for this prompt and subject "
                "(pass samples= equal to the tensor's first dimension)"
            )
        _validate.finite("the noise tensor", noise.detach())
        return noise.detach().float().to(model.device), float(noise.float().std()), "given tensor"
    if isinstance(noise, str):
        k = spec_multiplier(noise)
        if k is None:
            raise InterpEditError(
                f"unknown noise {noise!r}: use 'sK' (K x the subject-embedding std, e.g. 's3'),"
                " a float std, or a tensor [samples, subject_len, d_model]"
            )
        base, n = reference_std(model)
        std = k * base
        source = (
            f"{k:g} x std of subject-token embeddings over the built-in reference "
            f"subjects ({REFERENCE_LIST_NAME}, n={n})"
        )
    elif isinstance(noise, (int, float)) and not isinstance(noise, bool):
        std, source = _validate.number("the noise std", noise, 0.0), "fixed std"
    else:
        kind = type(noise).__name__
        raise InterpEditError(f"noise must be 'sK', a float or a tensor, not {kind}")
    _validate.number("the noise std", std, 0.0)  # K x the std: finite when K is
    gen = torch.Generator().manual_seed(int(seed))
    sampled = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    return sampled.to(model.device), std, source
