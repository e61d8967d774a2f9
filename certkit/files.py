"""File helpers shared by every command that writes results."""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``: readers never see a half-written file.

    The temporary file is flushed to disk (fsync) before the rename, so that after a crash of
    the machine ``path`` holds the old or the new content, never a renamed empty file. A
    process killed before the rename leaves ``path`` as it was and a hidden temporary beside
    it, which :func:`remove_stale_temporaries` clears on the next run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete the temporaries that :func:`write_atomically` left beside ``path`` when its
    process was killed (``.NAME.*.tmp``). Call it only where no other process writes ``path``."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)


# Decompressed size above which a .gz input is refused (a decompression bomb expands ~1000x).
GZ_LIMIT = 256 * 2**20


def read_gz_capped(path: str | Path, limit: int = GZ_LIMIT) -> bytes:
    """The decompressed bytes of a gzip file, refused once they pass ``limit`` bytes.

    The stream is read at most ``limit + 1`` bytes far, so a small file that expands to
    gigabytes (a decompression bomb) costs ``limit`` bytes of memory and a clear error,
    never the machine's memory.
    """
    import gzip
    import zlib

    from certkit.errors import InvalidInput

    try:
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InvalidInput(f"{path}: not a readable gzip file ({e})") from None
    if len(data) > limit:
        size = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit} bytes"
        raise InvalidInput(f"{path}: decompresses to more than {size}, the limit for a .gz input; "
                           "refused (a corrupt file or a decompression bomb)")
    return data


def check_array_file_size(path: str | Path, limit: int | None = None) -> None:
    """Refuse a ``.npy`` / ``.npz`` file whose arrays would take more than ``limit`` bytes
    (default: half the memory available now) once read: an archive's members are counted at
    their declared uncompressed sizes, which reading never exceeds, so a small archive that
    expands past the machine's memory gets a one-line error instead of exhausting it."""
    import zipfile

    from certkit.errors import InvalidInput
    from certkit.memory import default_budget, format_size

    limit = default_budget("cpu") if limit is None else limit
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            size = sum(info.file_size for info in z.infolist())
    else:
        size = path.stat().st_size
    if size > limit:
        raise InvalidInput(f"{path}: its arrays take {format_size(size)} once read, more than the "
                           f"{format_size(limit)} certkit allows (half the memory available)")
