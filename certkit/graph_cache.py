"""Converted ONNX graphs, stored per file content, so the next run of a network skips conversion.

Converting an ONNX file into a bound graph (checks, folding, onnx2torch, tracing) imports
onnx and onnx2torch (about 2.6 s on two cores) and takes a while for large networks; a
VNN-COMP benchmark solves the same network for many properties, each in a fresh process.
:func:`load_bounded` converts a file once and stores the graph as plain data
(:mod:`certkit.bounds.frozen`) under the cache directory; later calls read it back with
``torch.load(weights_only=True)`` (no code runs from the file) without importing either.

An entry's name is a hash of the file's bytes, the dtype, and a fingerprint of everything
that decides the graph: the source of the bound rules and the ONNX loader, and the versions
of torch, onnx, onnx2torch and onnxsim. A changed file, or another certkit, finds no entry
and converts again; two files share an entry only when their bytes are identical. Entries
are written to a temporary file and renamed, so concurrent runs never read half an entry;
an unreadable entry is converted again and replaced. Files with external data are not
stored (their hash would not cover the data).

The directory is ``$CERTKIT_CACHE`` when set (``off`` disables the cache), else
``$XDG_CACHE_HOME/certkit/graphs`` or ``~/.cache/certkit/graphs``. Deleting it is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from certkit.bounds.engine import BoundedModel
from certkit.errors import InvalidModel
from certkit.files import file_sha256

CACHE_ENV = "CERTKIT_CACHE"
_OFF = {"", "off", "0", "false", "no", "none"}
_SOURCES = ("bounds", "onnx_io.py", "graph_cache.py")  # what decides a converted graph, under certkit/
_LIBRARIES = ("torch", "onnx", "onnx2torch", "onnxsim")


@dataclass
class LoadedNetwork:
    """A network ready for bounding, with what its loading learnt about the file."""

    model: BoundedModel
    nonfinite: str  # why some weight is NaN/Inf ('' when all are finite)
    cached: bool  # read from the cache (False: converted now)
    stored: bool  # the cache holds it now (read from it, or converted and written)


def cache_dir() -> Path | None:
    """Where converted graphs are kept (None: caching is off)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "certkit" / "graphs"


@functools.cache
def code_fingerprint() -> str:
    """A hash of the certkit sources and library versions a converted graph depends on."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for entry in _SOURCES:
        files = sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    for name in _LIBRARIES:
        try:
            h.update(f"{name}={metadata.version(name)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=absent\0".encode())
    return h.hexdigest()


def entry_path(path: str | Path, dtype: torch.dtype, directory: Path) -> Path:
    """The cache entry of the network in file ``path``, converted to ``dtype``."""
    key = hashlib.sha256(f"{file_sha256(path)}\0{dtype}\0{code_fingerprint()}".encode()).hexdigest()
    return directory / f"{key[:40]}.pt"


_DEFAULT = object()


def load_bounded(path: str | Path, dtype: torch.dtype = torch.float64, directory=_DEFAULT) -> LoadedNetwork:
    """The network in ONNX file ``path`` as a BoundedModel in ``dtype``: read from the cache
    when an entry for exactly these bytes exists, converted (and stored) otherwise.
    ``directory``: the cache directory (default :func:`cache_dir`; None: no cache)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path}: no such file")
    directory = cache_dir() if directory is _DEFAULT else directory
    entry = None if directory is None else entry_path(path, dtype, Path(directory))
    if entry is not None and entry.is_file():
        found = _read(entry, path)
        if found is not None:
            return found
    return _convert(path, dtype, entry)


def _read(entry: Path, path: Path) -> LoadedNetwork | None:
    """The network stored in ``entry``, or None when the entry cannot be read (it is then
    converted again and replaced)."""
    from certkit.bounds.frozen import decode

    try:
        data = torch.load(entry, map_location="cpu", weights_only=True)
        graph, dtype = decode(data["graph"])
        nonfinite = str(data["nonfinite"])
    except Exception:
        return None
    return LoadedNetwork(BoundedModel.from_graph(graph, dtype, path), nonfinite, True, True)


def _convert(path: Path, dtype: torch.dtype, entry: Path | None) -> LoadedNetwork:
    from certkit.onnx_io import nonfinite_weights_reason, uses_external_data

    model = BoundedModel(path).to(dtype)
    nonfinite = nonfinite_weights_reason(path)
    # stored only if the file still has the bytes its entry is named after (not rewritten meanwhile)
    stored = (entry is not None and not uses_external_data(path) and entry_path(path, dtype, entry.parent) == entry
              and _store(entry, model, nonfinite))
    return LoadedNetwork(model, nonfinite, False, stored)


def _store(entry: Path, model: BoundedModel, nonfinite: str) -> bool:
    """Write the entry (atomically); whether it was written (a graph the format cannot hold,
    or a directory that cannot be written, just stays uncached)."""
    from certkit.bounds.frozen import Unfreezable, encode
    from certkit.files import write_atomically

    try:
        data = {"graph": encode(model.graph, model.dtype), "nonfinite": nonfinite}
        write_atomically(entry, lambda tmp: torch.save(data, tmp))
    except (Unfreezable, OSError):
        return False
    return True


def clear(directory: Path | None = None) -> int:
    """Delete every entry of the cache directory; the number deleted."""
    directory = cache_dir() if directory is None else directory
    if directory is None or not directory.is_dir():
        return 0
    removed = 0
    for f in directory.glob("*.pt"):
        f.unlink(missing_ok=True)
        removed += 1
    return removed
