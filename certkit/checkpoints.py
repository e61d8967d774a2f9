"""Training checkpoints written and read without running code from the file.

A checkpoint (``last.pt``, ``best.pt``) is a ``torch.save`` of plain data only: tensors,
dicts, lists, tuples, strings, numbers, booleans and None (the configuration as a plain
dict, optimiser/scheduler/RNG states as their state dicts). It is read with
``torch.load(weights_only=True)``, whose unpickler builds those types and refuses every
other global, so a file whose pickle calls ``os.system`` fails before the call happens.

A file that needs Python's full unpickler (a checkpoint pickled with custom classes, or
any other pickle) is refused with :class:`UntrustedCheckpoint`; ``--trust-checkpoint``
loads it with ``weights_only=False``, which runs whatever code the file holds.
"""

from __future__ import annotations

import collections
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from certkit.errors import InvalidInput
from certkit.files import write_atomically

TRUST_FLAG = "--trust-checkpoint"

# The containers and scalars a checkpoint may hold (all of them load with weights_only=True;
# Counter is the milestones of MultiStepLR's state dict).
_PLAIN_CONTAINERS = (dict, collections.OrderedDict, collections.Counter, list, tuple)
_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


class UntrustedCheckpoint(InvalidInput):
    """A checkpoint that only Python's full unpickler can read, which would run code from it."""


def _check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value that ``weights_only=True`` could not read back.

    Saving such a value would write a checkpoint that certkit itself refuses to load, so
    this is a programming error caught at save time, not at the next resume.
    """
    if isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, _PLAIN_CONTAINERS):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint {where} is a {type(obj).__qualname__}: only plain types are saved")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (plain data only) atomically: readers never see a half-written file."""
    _check_plain(state)
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def _is_pickle(path: Path) -> bool:
    """Whether the file, or the ``data.pkl`` inside a torch zip checkpoint, is a well-formed pickle
    stream (parsed opcode by opcode, nothing built or called)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                with z.open(name) as fh:
                    for _ in pickletools.genops(fh):
                        pass
        else:
            with open(path, "rb") as fh:
                for _ in pickletools.genops(fh):
                    pass
    except Exception:
        return False
    return True


def _needs_full_unpickler(error: Exception, path: Path) -> bool:
    """Whether torch refused the file because it is a pickle that only the full unpickler reads
    (rather than because it is no pickle at all: garbage gets the plain 'not a checkpoint')."""
    return _is_weights_only_refusal(error) and _is_pickle(path)


def _is_weights_only_refusal(error: Exception) -> bool:
    """Whether torch.load's restricted unpickler refused the stream (its message says so)."""
    return isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower()


def load_checkpoint_state(path: str | Path, map_location: str | torch.device = "cpu",
                          trust: bool = False) -> dict[str, Any]:
    """The raw state dict of a checkpoint, read with ``weights_only=True`` unless ``trust``.

    Raises :class:`UntrustedCheckpoint` (naming ``--trust-checkpoint``) for a file that needs the
    unsafe unpickler, and InvalidInput for a missing, truncated or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols of foreign files
            state = torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as e:
        if not trust and _needs_full_unpickler(e, path):
            raise UntrustedCheckpoint(
                f"{path}: refused: reading it would run code stored in the file (it needs Python's full "
                f"unpickler, e.g. a checkpoint from an older certkit or not from certkit); pass {TRUST_FLAG} "
                "only if you trust where it came from") from None
        why = "neither a PyTorch file nor a pickle" if _is_weights_only_refusal(e) else \
            f"{type(e).__name__}: {_first_line(e)}"
        raise InvalidInput(f"{path}: not a certkit checkpoint ({why})") from None
    if not isinstance(state, dict):
        raise InvalidInput(f"{path}: not a certkit checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def _first_line(error: Exception) -> str:
    """The first non-empty line of an exception's message (torch's run to a page)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")
