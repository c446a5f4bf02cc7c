"""Writing and reading artifacts and cache entries so that a crash, a concurrent writer or a
damaged file never leaves or serves a wrong result.

- Every write goes through :func:`atomic_path` (or the helpers built on it): the content is
  written under a fresh temporary name in the target's directory (``tempfile.mkstemp``, so two
  processes never share one) and renamed over the target with ``os.replace``, which readers see
  as all or nothing; the temporary file is removed when the writer fails. :func:`atomic_dir`
  does the same for a directory (a cached model), where the first complete copy wins.
- Reading an artifact (a file the user passes: an edit, a trace, a report, a MEND editor)
  happens inside :func:`reading`, which turns whatever a damaged, truncated or foreign file
  raises (``SafetensorError``, ``BadZipFile``, ``JSONDecodeError``, ``KeyError`` ...) into a
  :class:`~interp_edit.errors.CorruptFileError` naming the file and saying what to do.
- A cache entry is read with :func:`load_cached`: when it does not load or fails its
  validation it is removed with a warning and the caller rebuilds it; it is never used.

NPZ files are always read with ``allow_pickle=False`` (:func:`read_npz`).

Data files (the IKE demonstration pool) come from an explicit argument or, by name, from the
folder in ``INTERP_EDIT_DATA`` (:func:`data_file`); the package never looks in its source
checkout, so an installed wheel behaves as the checkout does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np
from torch import Tensor

from interp_edit._cache import tensors_digest
from interp_edit.errors import CorruptFileError, InterpEditError

T = TypeVar("T")
_DIGEST = "interp_edit.tensors_sha256"  # safetensors header key: digest of the tensors

_UMASK = os.umask(0)
os.umask(_UMASK)


DATA_ENV = "INTERP_EDIT_DATA"


def data_file(name: str, what: str, argument: str) -> Path:
    """``$INTERP_EDIT_DATA/name``, for a ``what`` whose ``argument`` was not given; an
    :class:`InterpEditError` saying how to provide it when the variable is unset or the folder
    lacks the file."""
    folder = os.environ.get(DATA_ENV)
    path = Path(folder).expanduser() / name if folder else None
    if path is not None and path.is_file():
        return path
    where = (f"{DATA_ENV}={folder!r} has no {name}" if folder
             else f"{DATA_ENV} is not set")
    raise InterpEditError(
        f"{what}: no {argument} given and {where}. Pass {argument}'path/to/{name}', or set "
        f"{DATA_ENV} to a folder holding {name}"
    )


# ---- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A fresh temporary path next to ``path`` (ending in ``suffix``, for writers that pick a
    format by extension); renamed to ``path`` when the block succeeds, removed when it fails.
    The published file gets the permissions a plain ``open(path, "w")`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """``open`` for writing, published atomically when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    return write_text(path, json.dumps(obj, **kwargs))


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Tensors to a safetensors file, with ``metadata`` and a digest of the tensors in its
    header (:func:`read_safetensors` checks it, so a changed byte is caught)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}),
                                               _DIGEST: tensors_digest(tensors)})
    return Path(path)


def save_npz(path: str | os.PathLike, compress: bool = False, **arrays: np.ndarray) -> Path:
    """Arrays to one ``.npz`` at exactly ``path`` (a file object: numpy appends no suffix)."""
    with atomic_open(path, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary directory next to ``path``, renamed to ``path`` when the block
    succeeds. If another process published ``path`` meanwhile, its copy is kept and this one
    removed (both are complete; the first wins). Removed when the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard(path: str | os.PathLike) -> None:
    """Remove a file or directory; a directory is first renamed to a unique name, so a
    concurrent writer can publish a fresh copy at ``path`` at once."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        try:
            os.replace(path, aside / path.name)
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- reading -------------------------------------------------------------------------------
@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Any error raised in the block while reading ``path`` (a ``what``) becomes a
    :class:`CorruptFileError` that names the file and says ``fix``; a missing file an
    :class:`InterpEditError`."""
    try:
        yield
    except FileNotFoundError:
        raise InterpEditError(f"{what} {str(path)!r} does not exist") from None
    except PermissionError:
        raise InterpEditError(f"{what} {str(path)!r} cannot be read (permission denied)") from None
    except Exception as exc:  # whatever the parser of a damaged or foreign file raises
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CorruptFileError(
            f"{path} is not a valid {what} ({type(exc).__name__}: {why}); {fix}"
        ) from exc


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its header metadata, checked against the digest
    :func:`save_safetensors` wrote (call inside :func:`reading`: a damaged file raises)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    digest = meta.pop(_DIGEST, None)
    require(digest is None or digest == tensors_digest(tensors),
            "its tensors do not match the digest in its header (changed after it was written)")
    return tensors, meta


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read eagerly with ``allow_pickle=False`` (call inside
    :func:`reading`)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: np.array(data[k]) for k in data.files}


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def require(condition: bool, message: str) -> None:
    """Raise (inside :func:`reading` or :func:`load_cached`) when a read file fails a check."""
    if not condition:
        raise ValueError(message)


def load_cached(path: str | os.PathLike, load: Callable[[Path], T]) -> T | None:
    """``load(path)``, or None when the entry is missing. An entry that ``load`` cannot read
    or rejects (it raises) is removed with a warning and None returned, so the caller
    rebuilds it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as exc:  # a damaged entry: never used
        warnings.warn(f"the cache entry {path} is damaged ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); rebuilding it", stacklevel=2)
        discard(path)
        return None
