"""Memory budgets for bound computations (``--max-memory``).

CROWN's backward passes hold one linear-coefficient tensor A of shape (rows, *node shape)
per node they pass through; its largest instance (rows × the widest node × the element
size, times the state α-CROWN keeps beside it) dominates the peak. The engine estimates
that size before a pass starts and splits the rows (neurons, specifications, domains) into
chunks that fit the budget; chunks change nothing but memory. Where a single row does not
fit, :class:`MemoryBudgetExceeded` says so in one line, instead of the kernel's OOM killer
ending the process without a word.

The default budget is a safe share of the memory available now: ``MemAvailable`` from
``/proc/meminfo`` (psutil where that file is missing, if installed) on the CPU, the free
memory ``torch.cuda.mem_get_info`` reports on a CUDA device.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

from certkit.errors import CertkitError

if TYPE_CHECKING:
    import torch

DEFAULT_SHARE = 0.5  # of the available memory, for the largest coefficient tensor (temporaries take the rest)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CACHE_SECONDS = 1.0  # the default budget is re-read at most this often (it sits on branch and bound's hot path)
_cache: dict[str, tuple[float, int]] = {}


class MemoryBudgetExceeded(CertkitError):
    """A bound computation whose smallest chunk does not fit the memory budget."""


def parse_size(text: str | int) -> int:
    """Bytes from a size such as ``2G``, ``512M``, ``1.5GiB``, ``300KB`` or ``1000000`` (binary units).

    Raises :class:`~certkit.errors.InvalidInput` for anything else, or for a size below one byte."""
    from certkit.errors import InvalidInput

    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGTkmgt]?)(?:i?[Bb])?\s*", text)
        if m is None:
            raise InvalidInput(f"bad memory size {text!r}: expected a number with an optional unit, e.g. 2G or 512M")
        number = float(m.group(1))
        if number > 1 << 60:
            raise InvalidInput(f"bad memory size {text!r}: too large")
        value = int(number * _UNITS[m.group(2).upper()])
    if value < 1:
        raise InvalidInput(f"bad memory size {text!r}: must be at least one byte")
    return value


def format_size(n: float) -> str:
    """A byte count for people: ``512 B``, ``3.0 MiB``, ``1.25 GiB``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where the file or the field is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free now for tensors on ``device``: the GPU's free memory for CUDA, the machine's
    available memory otherwise (/proc/meminfo, then psutil, then the physical memory)."""
    import torch  # here, not at the top: parse_size serves processes that never load torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = _meminfo_available()
    if avail is None:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return avail


def default_budget(device: torch.device | str = "cpu") -> int:
    """The budget without ``--max-memory``: :data:`DEFAULT_SHARE` of :func:`available_memory`
    (re-read at most once a second per device)."""
    key = str(device)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and now - hit[0] < _CACHE_SECONDS:
        return hit[1]
    budget = max(1, int(DEFAULT_SHARE * available_memory(device)))
    _cache[key] = (now, budget)
    return budget


def rows_that_fit(row_bytes: int, budget: int, what: str) -> int:
    """How many rows of ``row_bytes`` each fit ``budget``; raises :class:`MemoryBudgetExceeded`
    (naming ``what``) when not even one does."""
    rows = budget // max(1, row_bytes)
    if rows < 1:
        raise MemoryBudgetExceeded(f"{what} needs {format_size(row_bytes)} of linear coefficients for a single row, "
                                   f"more than the memory budget of {format_size(budget)} (--max-memory)")
    return rows


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux: VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# glibc's mallopt parameters M_TRIM_THRESHOLD and M_MMAP_THRESHOLD, and what certkit's own processes
# set them to: blocks below 32 MiB from the heap, up to 64 MiB of free heap kept for the next ones
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREE, _HEAP_BELOW = 64 << 20, 32 << 20


def reuse_freed_memory() -> bool:
    """Have glibc's malloc serve blocks below 32 MiB from its heap and keep up to 64 MiB of it free
    for the next blocks (mallopt ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``), instead of mapping
    fresh pages for large blocks and handing freed heap back at once. A CROWN pass allocates and
    frees coefficient tensors of a few MiB at every step; mapped anew, each page-faults its way in
    again. Both or neither: setting one turns glibc's adaptive choice of both off, and the other's
    small default then maps or trims at every step (slower than not tuning at all). For the
    processes certkit owns (its command line and the ``run-instance`` worker), not on import: it is
    the process's allocator. False where it does not apply (no glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BELOW) == 1
    except (OSError, AttributeError):
        return False
