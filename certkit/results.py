"""Verification results in HDF5, written incrementally (schema: docs/results-format.md).

Rows are appended after every batch, so an interrupted run keeps what it finished;
``complete`` is set only when the last sample is written. ``--resume`` reopens the file,
checks that it belongs to the same model, ε, method and data slice, and continues after
the last committed row.

Every change is atomic, so a process killed at any moment (``kill -9``) leaves either the
file before the change or the file after it: the new content is written to a copy beside
the file, flushed to disk and renamed over it. The attribute ``rows_committed``, written
last, counts the rows of every dataset; a file whose datasets disagree with it (a torn
append by an older certkit) is read and resumed only up to the committed rows, and never
counts as complete.

A sweep over several radii (``--eps 0.1,0.2,0.3``, :class:`SweepFile`) keeps one group per ε,
each with the datasets and attributes of a single-ε file plus ``reused_from``; the root holds
the run's provenance and the list of radii. :func:`read_sweep` reads either kind of file as a
list of (attributes, datasets), one per ε.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from certkit.errors import InvalidInput
from certkit.files import remove_stale_temporaries, write_atomically
from certkit.status import HDF5_CODES

STATUS = tuple(s.value for s in HDF5_CODES)  # the status dataset's codes, as named in the file
IDENTITY_ATTRS = ("model_sha256", "eps", "method", "dataset", "start", "n")
# how the last run that wrote the file ran (sharded runs only: certkit.scale_out); not identity: the
# rows do not depend on them, so a resumed run may change them and records its own
RUN_ATTRS = ("workers", "cluster_address")


class _Table:
    """The rows of one radius, appended atomically: the root of a single-ε file (``group`` None)
    or one group of a sweep. ``done``: the rows committed so far."""

    def __init__(self, path: Path, group: str | None, done: int):
        self.path = path
        self.group = group
        self.done = done

    def _node(self, f: h5py.File) -> h5py.Group:
        return f if self.group is None else f[self.group]

    def _rewrite(self, change: Callable[[h5py.File], None]) -> None:
        _rewrite(self.path, change)

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Append a batch of rows, one value per row for every dataset of the file, atomically."""
        n = len(rows["index"])

        def change(f: h5py.File) -> None:
            node = self._node(f)
            names = {k for k in node if isinstance(node[k], h5py.Dataset)}
            missing = sorted(names - set(rows))
            if missing or any(len(v) != n for v in rows.values()):
                raise ValueError(f"a batch of results needs {n} rows of every dataset; missing: {missing}, "
                                 f"lengths: { {k: len(v) for k, v in rows.items()} }")
            for name, values in rows.items():
                ds = node[name]
                ds.resize(self.done + n, axis=0)
                ds[self.done:] = values
            node.attrs["rows_committed"] = self.done + n  # last: the rows count only once this is written

        self._rewrite(change)
        self.done += n

    def mark_complete(self) -> None:
        """Set ``complete`` (atomically), after the last row."""
        def change(f: h5py.File) -> None:
            self._node(f).attrs["complete"] = True

        self._rewrite(change)


class ResultsFile(_Table):
    """An HDF5 results file of one radius for ``n`` samples with the given stages."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], stages: list[str], num_specs: int,
                 input_size: int, resume: bool = False):
        super().__init__(Path(path), None, 0)
        self.stages = stages
        if resume and self.path.exists():
            self.done = self._reopen(attrs)
            return
        if self.path.exists() and not resume:
            raise InvalidInput(f"{self.path} exists: pass --resume to continue it, or choose another --out")
        write_atomically(self.path, lambda tmp: self._create(tmp, attrs, stages, num_specs, input_size))

    def _reopen(self, attrs: dict[str, Any]) -> int:
        """Check that the file on disk belongs to this run; the number of committed rows.

        Rows past the committed count (a torn append of an older certkit) are cut off first."""
        remove_stale_temporaries(self.path)
        try:
            with h5py.File(self.path, "r") as f:
                _check_identity(self.path, f, attrs)
                done, lengths = committed_rows(f)
                stale = {k: attrs.get(k) for k in RUN_ATTRS if _plain(f.attrs.get(k)) != _plain(attrs.get(k))}
                names = f.attrs.get("status_names")
        except OSError as e:
            raise InvalidInput(f"{self.path}: cannot resume, not a readable results file ({e})") from None
        if names != json.dumps(STATUS):  # an older certkit's, without the codes added since
            stale["status_names"] = json.dumps(STATUS)
        torn = any(n != done for n in lengths.values())
        if torn or stale:
            self._rewrite(lambda f: _update(f, done if torn else None, stale))
        return done

    @staticmethod
    def _create(tmp: str, attrs: dict[str, Any], stages: list[str], num_specs: int, input_size: int) -> None:
        with h5py.File(tmp, "w") as f:
            _init_table(f, attrs, stages, num_specs, input_size)


class SweepFile:
    """An HDF5 results file of a sweep: one group per radius (:func:`group_name`), each laid out
    as a single-ε file plus the dataset ``reused_from``; the root holds ``attrs`` (the run's
    provenance, ``eps`` the list of radii) and ``groups`` (their names, ascending ε). All groups
    are created at once; ``groups[eps]`` appends to one, and ``complete`` at the root is set by
    :meth:`mark_complete` once every group is complete.

    ``radii`` maps each ε to its group's own attributes (``eps``, ``options``), which a reader
    sees over the root's."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], radii: dict[float, dict[str, Any]],
                 stages: list[str], num_specs: int, input_size: int, resume: bool = False):
        self.path = Path(path)
        names = {e: group_name(e) for e in sorted(radii)}
        if resume and self.path.exists():
            done = self._reopen(attrs, names)
        elif self.path.exists():
            raise InvalidInput(f"{self.path} exists: pass --resume to continue it, or choose another --out")
        else:
            write_atomically(self.path, lambda tmp: self._create(tmp, attrs, radii, names, stages, num_specs,
                                                                 input_size))
            done = dict.fromkeys(radii, (0, False))
        self.groups = {e: _Table(self.path, names[e], done[e][0]) for e in names}
        self.finished = {e for e in names if done[e][1]}  # complete already (resumed)

    @staticmethod
    def _create(tmp: str, attrs: dict[str, Any], radii: dict[float, dict[str, Any]], names: dict[float, str],
                stages: list[str], num_specs: int, input_size: int) -> None:
        with h5py.File(tmp, "w") as f:
            _set_attrs(f, {**attrs, "eps": np.array(sorted(radii), dtype=np.float64),
                           "groups": json.dumps(list(names.values())), "complete": False})
            for e, name in names.items():
                _init_table(f.create_group(name), radii[e], stages, num_specs, input_size, sweep=True)

    def _reopen(self, attrs: dict[str, Any], names: dict[float, str]) -> dict[float, tuple[int, bool]]:
        """Check that the file on disk is this sweep's; per ε, (rows committed, complete). Torn
        appends are cut off and the run's attributes (``workers``, ...) updated, atomically."""
        remove_stale_temporaries(self.path)
        attrs = {**attrs, "eps": list(names)}
        try:
            with h5py.File(self.path, "r") as f:
                _check_identity(self.path, f, attrs)
                if _plain(f.attrs.get("groups")) != json.dumps(list(names.values())):
                    raise InvalidInput(f"{self.path}: cannot resume, its groups are not those of this sweep")
                done = {e: committed_rows(f[name]) for e, name in names.items()}
                complete = {e: bool(f[name].attrs.get("complete")) for e, name in names.items()}
                stale = {k: attrs.get(k) for k in RUN_ATTRS if _plain(f.attrs.get(k)) != _plain(attrs.get(k))}
        except OSError as e:
            raise InvalidInput(f"{self.path}: cannot resume, not a readable results file ({e})") from None
        torn = {e: rows for e, (rows, lengths) in done.items() if any(n != rows for n in lengths.values())}
        if torn or stale:
            def change(f: h5py.File) -> None:
                _update(f, None, stale)
                for e, rows in torn.items():
                    _truncate(f[names[e]], rows)

            _rewrite(self.path, change)
        return {e: (rows, complete[e] and e not in torn) for e, (rows, _) in done.items()}

    def update_rows(self, changes: dict[float, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
        """Overwrite committed rows, in one atomic change: per ε and dataset, (the rows' positions,
        ascending; their new values)."""
        def change(f: h5py.File) -> None:
            for eps, datasets in changes.items():
                for name, (rows, values) in datasets.items():
                    if len(rows):
                        f[self.groups[eps].group][name][rows] = values

        _rewrite(self.path, change)

    def mark_complete(self) -> None:
        """Set ``complete`` at the root (atomically), once every group is."""
        def change(f: h5py.File) -> None:
            f.attrs["complete"] = True

        _rewrite(self.path, change)


def group_name(eps: float) -> str:
    """The group of radius ``eps`` in a sweep file: ``eps_`` and the shortest text that reads back
    as that float (``eps_0.1``, ``eps_0.00392156862745098``), so that no two radii share one."""
    return f"eps_{float(eps)!r}"


def _rewrite(path: Path, change: Callable[[h5py.File], None]) -> None:
    """Apply ``change`` to a copy of the file and rename it over the file (atomic)."""
    def write(tmp: str) -> None:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            change(f)

    write_atomically(path, write)


def _set_attrs(node: h5py.Group, attrs: dict[str, Any]) -> None:
    """Numbers, strings, flags and arrays as HDF5 attributes; anything else as JSON text."""
    for k, v in attrs.items():
        node.attrs[k] = v if isinstance(v, (int, float, str, bool, np.number, np.ndarray)) else json.dumps(v)


def _init_table(node: h5py.Group, attrs: dict[str, Any], stages: list[str], num_specs: int, input_size: int,
                sweep: bool = False) -> None:
    """The attributes and empty datasets of one radius's rows (a sweep's groups also ``reused_from``)."""
    _set_attrs(node, attrs)
    node.attrs["stages"] = json.dumps(stages)
    node.attrs["status_names"] = json.dumps(STATUS)
    node.attrs["complete"] = False
    S = len(stages)
    layout = [("index", "i8", ()), ("label", "i8", ()), ("prediction", "i8", ()), ("status", "i1", ()),
              ("stage", "i1", ()), ("margins", "f4", (S, num_specs)), ("times", "f4", (S,)),
              ("counterexample", "f4", (input_size,)), ("reason", h5py.string_dtype(), ())]
    for name, dtype, shape in layout + ([("reused_from", "f4", ())] if sweep else []):
        node.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                            chunks=(64, *shape), compression="gzip" if name == "counterexample" else None)
    node.attrs["rows_committed"] = 0


def _check_identity(path: Path, f: h5py.File, attrs: dict[str, Any]) -> None:
    """InvalidInput unless the file was written for the same model, ε (or list of ε), method and
    data slice as ``attrs``."""
    for k in IDENTITY_ATTRS:
        if _plain(f.attrs.get(k)) != _plain(attrs[k]):
            raise InvalidInput(f"{path}: cannot resume, it was written for {k}="
                               f"{_plain(f.attrs.get(k))!r}, not {_plain(attrs[k])!r}")


def committed_rows(f: h5py.Group) -> tuple[int, dict[str, int]]:
    """(rows committed, length of every dataset) of an open results file (or a sweep's group).
    Files written before ``rows_committed`` existed count the rows every dataset has."""
    lengths = {k: int(f[k].shape[0]) for k in f if isinstance(f[k], h5py.Dataset)}
    shortest = min(lengths.values(), default=0)
    committed = f.attrs.get("rows_committed")
    return (shortest if committed is None else min(int(committed), shortest)), lengths


def _truncate(node: h5py.Group, rows: int) -> None:
    for name in node:
        if isinstance(node[name], h5py.Dataset):
            node[name].resize(rows, axis=0)
    node.attrs["rows_committed"] = rows


def _update(f: h5py.File, rows: int | None, attrs: dict[str, Any]) -> None:
    """Cut the datasets to ``rows`` (None: leave them) and set ``attrs`` (None: delete)."""
    if rows is not None:
        _truncate(f, rows)
    for k, v in attrs.items():
        if v is None:
            f.attrs.pop(k, None)
        else:
            f.attrs[k] = v


def _plain(v: Any) -> Any:
    if isinstance(v, (np.ndarray, list, tuple)):  # a sweep's radii
        return [_plain(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return round(float(v), 12)
    if isinstance(v, np.integer):
        return int(v)
    return v


def read_results(path: str | Path, eps: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(attributes, datasets) of a results file: of a single-ε file, or of the group of radius
    ``eps`` of a sweep (:func:`read_sweep` reads all of them). ``reused_from`` is all NaN where the
    file has none (a single-ε file: every row was computed at its ε)."""
    groups = read_sweep(path)
    if len(groups) == 1 and eps is None:
        return groups[0]
    chosen = [g for g in groups if eps is not None and _plain(g[0]["eps"]) == _plain(eps)]
    if not chosen:
        radii = ", ".join(f"{g[0]['eps']:g}" for g in groups)
        wanted = "read it with read_sweep, or pass eps=" if eps is None else f"it has no ε={eps:g}"
        raise InvalidInput(f"{path}: the results of ε {radii}; {wanted}")
    return chosen[0]


def read_sweep(path: str | Path) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(attributes, datasets) per radius, ascending ε, each what :func:`read_results` gives for a
    single-ε file: one for a single-ε file, one per group for a sweep. A group's attributes are
    the root's (provenance) overlaid with its own (``eps``, ``options``, ``stages``, ``complete``,
    ...); ``sweep_eps`` lists every radius of the sweep."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such results file")
    try:
        with h5py.File(path, "r") as f:
            root = {k: _plain(v) for k, v in f.attrs.items()}
            if "groups" not in root:
                return [_read_table(path, f, root)]
            names = json.loads(root.pop("groups"))
            root["sweep_eps"] = root.pop("eps")
            return [_read_table(path, f[name], root) for name in names]
    except (OSError, KeyError, ValueError) as e:
        raise InvalidInput(f"{path}: not a certkit results file ({e})") from None


def _read_table(path: Path, node: h5py.Group, inherited: dict[str, Any]
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(attributes, datasets) of one radius's rows: the committed ones."""
    attrs = {**inherited, **{k: _plain(v) for k, v in node.attrs.items()}}
    rows, lengths = committed_rows(node)
    data = {k: node[k][:rows] for k in lengths}
    if "reason" in data:  # variable-length UTF-8: read back as str, not bytes
        data["reason"] = np.array([r.decode() if isinstance(r, bytes) else r for r in data["reason"]], dtype=object)
    if "index" not in data or "complete" not in attrs:
        raise InvalidInput(f"{path}: not a certkit results file (no index dataset or complete attribute)")
    data.setdefault("reused_from", np.full(rows, np.nan, np.float32))
    # a torn or short file never counts as complete, whatever its flag says
    attrs["complete"] = bool(attrs["complete"]) and all(n == rows for n in lengths.values()) \
        and rows == int(attrs.get("n", rows))
    for k in ("stages", "status_names", "options"):
        if isinstance(attrs.get(k), str):
            attrs[k] = json.loads(attrs[k])
    return attrs, data


def summarize(attrs: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracies (%) and times: clean, verified (cumulative along the cascade), PGD-robust."""
    n = len(data["status"])
    stages = attrs["stages"]
    status = data["status"]
    out: dict[str, Any] = {"samples": n, "requested": int(attrs.get("n", n)), "complete": bool(attrs["complete"]),
                           "eps": attrs["eps"], "method": attrs["method"],
                           "bounded_output": attrs.get("bounded_output", "outputs")}
    if n == 0:
        return out
    pct = lambda k: 100.0 * float(k) / n  # noqa: E731
    error = status == STATUS.index("error")  # a sharded run's samples whose worker kept dying: no prediction
    out["clean_accuracy"] = pct(((status != STATUS.index("misclassified")) & ~error).sum())
    verified = status == STATUS.index("verified")
    out["verified_accuracy"] = pct(verified.sum())
    out["verified_by_stage"] = {s: pct((verified & (data["stage"] <= i)).sum()) for i, s in enumerate(stages)
                                if s != "attack"}
    out["falsified"] = pct((status == STATUS.index("falsified")).sum())
    out["unknown"] = pct((status == STATUS.index("unknown")).sum())
    if error.any():
        out["error"] = pct(error.sum())
    out["pgd_robust_accuracy"] = out["clean_accuracy"] - out["falsified"]
    if "sweep_eps" in attrs:  # a sweep's group: the rows whose answer was carried over from another ε
        out["reused"] = pct(np.isfinite(data["reused_from"]).sum())
    out["time_total"] = float(np.nansum(data["times"]))
    out["time_by_stage"] = {s: float(np.nansum(data["times"][:, i])) for i, s in enumerate(stages)}
    return out
