"""Settings from a YAML file and ``--set KEY=VALUE`` overrides, for every command that has them.

A configuration file is a YAML mapping of *sections*: ``solver:`` (:class:`certkit.complete.config.SolverConfig`,
for ``run-instance`` and ``vnncomp``) and ``verify:`` (:class:`certkit.verify.VerifyConfig`, for
``verify``), so that one file serves every command. Settings must sit inside a section (a key
such as ``seed`` exists in both). Every section a file holds is checked, whichever command
reads it. The loader is general: any dataclass whose fields carry ``metadata["help"]`` (and
optionally ``min``, ``choices`` or a ``parse`` function, see :func:`setting`) can be a section.
Files are read with ``yaml.safe_load`` (no tags that build objects) and capped at 1 MiB.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import reprlib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from certkit.errors import InvalidInput

MAX_CONFIG_BYTES = 1 << 20  # a configuration file is a few hundred bytes; anything over 1 MiB is refused

# section name → (module, class, what it configures); classes are imported only when used
SECTIONS: dict[str, tuple[str, str, str]] = {
    "solver": ("certkit.complete.config", "SolverConfig", "the complete solver: certkit run-instance and vnncomp"),
    "verify": ("certkit.verify", "VerifyConfig", "certkit verify (its flags, when given, win over these)"),
}


def setting(default: Any = MISSING, help: str = "", **meta: Any):
    """A dataclass field with its ``help`` and optional checks: ``min`` (a lower bound),
    ``choices`` (allowed strings), ``parse`` (a function from the text or YAML value to the
    value, raising InvalidInput)."""
    return field(default=default, metadata={"help": help, **meta})


def section_class(name: str) -> type:
    module, cls, _ = SECTIONS[name]
    return getattr(importlib.import_module(module), cls)


def _shown(value: Any, limit: int = 60) -> str:
    """``value`` for an error message: short, also when a YAML alias nests it exponentially deep."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _nearest(key: str, names: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(names), n=3, cutoff=0.0)
    return ", ".join(near)


@dataclass
class Resolved:
    """The effective settings of one section: ``values`` by field name, and where each came
    from (``origin``: 'default', the file's path, '--set' or a command-line flag). A field
    without a default (verify's ``eps``) is absent until something gives it."""

    section: str
    cls: type
    values: dict[str, Any]
    origin: dict[str, str]

    @classmethod
    def defaults(cls, section: str, config_cls: type | None = None) -> Resolved:
        config_cls = config_cls or section_class(section)
        values = {}
        for f in dataclasses.fields(config_cls):
            if f.default is not MISSING:
                values[f.name] = f.default
            elif f.default_factory is not MISSING:
                values[f.name] = f.default_factory()
        return cls(section, config_cls, values, dict.fromkeys(values, "default"))

    def fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.cls)}

    def unknown(self, key: Any, where: str) -> InvalidInput:
        return InvalidInput(f"{where}: unknown {self.section} setting {_shown(key)}; nearest: "
                            f"{_nearest(str(key), self.fields())} (certkit config show lists them all)")

    def set(self, key: Any, value: Any, origin: str) -> None:
        """Check ``value`` (a YAML value, or the text of --set or of a flag) against the field's
        type and checks, and keep it."""
        f = self.fields().get(key) if isinstance(key, str) else None
        if f is None:
            raise self.unknown(key, origin)
        if value is None and f.default is MISSING:  # 'eps: null' (config show's placeholder): not given
            self.values.pop(key, None)
            self.origin.pop(key, None)
            return
        self.values[key] = coerce(self.section, f, typing.get_type_hints(self.cls)[key], value, origin)
        self.origin[key] = origin

    def update(self, mapping: Mapping[str, Any], origin: str) -> None:
        for key, value in mapping.items():
            self.set(key, value, origin)

    def build(self, **extra: Any):
        """The dataclass of these values (InvalidInput naming a required setting nobody gave)."""
        missing = [f.name for f in dataclasses.fields(self.cls)
                   if f.name not in self.values and f.name not in extra
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise InvalidInput(f"the {self.section} setting {', '.join(missing)} is required")
        return self.cls(**{**self.values, **extra})


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _type_name(hint: Any) -> str:
    if _optional(hint) is not None:
        return f"{_type_name(_optional(hint))} or null"
    if typing.get_origin(hint) is tuple:
        return "two numbers such as 0,1"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _optional(hint: Any) -> Any | None:
    """T for ``T | None``; None for anything else."""
    if typing.get_origin(hint) in (UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not NoneType]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _scalar(hint: Any, value: Any) -> Any:
    """``value`` (YAML's or text) as ``hint``; raises ValueError when it is not one."""
    text = value.strip() if isinstance(value, str) else None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError
    if isinstance(value, bool):
        raise ValueError  # YAML's true is no number
    if hint is int:
        if isinstance(value, int):
            return value
        if text is not None:
            return int(text)
        raise ValueError
    if hint is float:
        number = float(text) if text is not None else float(value) if isinstance(value, (int, float)) else None
        if number is None or not math.isfinite(number):
            raise ValueError
        return number
    if hint is str and isinstance(value, str):
        return value
    raise ValueError


def _pair(value: Any) -> tuple[float, float]:
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        raise ValueError
    return tuple(_scalar(float, p) for p in parts)


def coerce(section: str, f: dataclasses.Field, hint: Any, value: Any, origin: str) -> Any:
    """``value`` checked and converted to field ``f``'s type (``hint``), or InvalidInput naming
    the setting, the value, where it came from and what was expected."""
    where = f"{section}.{f.name} = {_shown(value)} (from {origin})"
    inner = _optional(hint)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~", "")):
            return None
        hint = inner
    parse: Callable[[Any], Any] | None = f.metadata.get("parse")
    if parse is not None:
        try:
            return parse(value)
        except InvalidInput as e:
            raise InvalidInput(f"{where}: {e}") from None
        except (ValueError, TypeError):
            raise InvalidInput(f"{where}: expected {_type_name(hint)}") from None
    try:
        result = _pair(value) if typing.get_origin(hint) is tuple else _scalar(hint, value)
    except (ValueError, TypeError):
        raise InvalidInput(f"{where}: expected {_type_name(hint)}") from None
    choices = f.metadata.get("choices")
    if choices is not None and result not in choices:
        raise InvalidInput(f"{where}: expected one of {', '.join(choices)}")
    low = f.metadata.get("min")
    if low is not None and isinstance(result, (int, float)) and not isinstance(result, bool) and result < low:
        raise InvalidInput(f"{where}: must be at least {low}")
    return result


def read_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """The sections of a YAML configuration file (``yaml.safe_load``: no tags that build
    objects), each a mapping; an empty file or section is empty. Anything else is InvalidInput:
    a file over 1 MiB, not YAML, not a mapping, a top-level key that is no section."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    if size > MAX_CONFIG_BYTES:
        raise InvalidInput(f"{path}: {size:,} bytes; a configuration file may hold at most {MAX_CONFIG_BYTES:,}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not a text file (UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise InvalidInput(f"{path}: not valid YAML ({problem}{at})") from None
    except RecursionError:
        raise InvalidInput(f"{path}: nested too deeply to be a configuration file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                           f"got {type(data).__name__}")
    out = {}
    for key, body in data.items():
        if key not in SECTIONS:
            raise InvalidInput(f"{path}: top-level key {_shown(key)} is not a section; settings go under "
                               f"{' or '.join(s + ':' for s in SECTIONS)}{_belongs(key)}")
        if body is not None and not isinstance(body, dict):
            raise InvalidInput(f"{path}: section {key}: expected a mapping of settings, got {type(body).__name__}")
        out[key] = body or {}
    return out


def _belongs(key: Any) -> str:
    """' (KEY is a solver setting)' where it is one of some section's names, else the nearest sections."""
    owners = [name for name in SECTIONS if key in {f.name for f in dataclasses.fields(section_class(name))}]
    if owners:
        return f" ({key} is a {' and a '.join(owners)} setting)"
    return f" (nearest: {_nearest(str(key), SECTIONS)})" if isinstance(key, str) else ""


def _split_set(text: str, resolved: dict[str, Resolved], uses: tuple[str, ...]) -> tuple[Resolved, str, str]:
    """``KEY=VALUE`` or ``SECTION.KEY=VALUE`` → (the section's settings, key, value text)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InvalidInput(f"--set {_shown(text)}: expected KEY=VALUE")
    section, dot, key = name.partition(".")
    if dot:
        if section not in uses:
            allowed = " or ".join(f"{s}." for s in uses)
            raise InvalidInput(f"--set {_shown(text)}: this command takes {allowed} settings, not {section}.")
        return resolved[section], key, value
    owners = [s for s in uses if name in resolved[s].fields()]
    if len(owners) > 1:
        raise InvalidInput(f"--set {_shown(text)}: {name} is a setting of {' and '.join(owners)}; write "
                           f"{' or '.join(f'{s}.{name}' for s in owners)}")
    if not owners:
        near = _nearest(name, [k for s in uses for k in resolved[s].fields()])
        raise InvalidInput(f"--set {_shown(text)}: unknown {' or '.join(uses)} setting {name!r}; nearest: {near} "
                           "(certkit config show lists them all)")
    return resolved[owners[0]], name, value


def load_config(path: str | Path | None, sets: Iterable[str] = (), uses: Iterable[str] = ("solver",)
                ) -> dict[str, Resolved]:
    """The effective settings of the sections ``uses``: defaults, then the file's section, then
    each ``--set`` in order (later wins). Every section the file holds is checked, also one the
    command does not use; ``--set`` takes ``KEY=VALUE`` (the one section of ``uses`` that has
    KEY) or ``SECTION.KEY=VALUE``."""
    uses = tuple(uses)
    data = read_config_file(path) if path is not None else {}
    resolved = {name: Resolved.defaults(name) for name in dict.fromkeys([*uses, *data])}
    for name, mapping in data.items():
        resolved[name].update(mapping, str(path))
    for text in sets:
        target, key, value = _split_set(text, resolved, uses)
        target.set(key, value, "--set")
    return {name: resolved[name] for name in uses}


def solver_config(path: str | Path | None = None, sets: Iterable[str] = ()):
    """The effective :class:`SolverConfig` of a configuration file and ``--set`` overrides."""
    return load_config(path, sets, ("solver",))["solver"].build()


def config_from_mapping(cls: type, mapping: Mapping[str, Any], origin: str, section: str = "solver"):
    """``cls`` from a mapping of its settings (a JSON object, a file's section), checked as a
    file's would be; missing settings take their defaults."""
    if not isinstance(mapping, Mapping):
        raise InvalidInput(f"{origin}: expected a mapping of {section} settings")
    resolved = Resolved.defaults(section, cls)
    resolved.update(mapping, origin)
    return resolved.build()


def plain(config: Any) -> dict[str, Any]:
    """A config dataclass as plain values (tuples as lists): for JSON, YAML and comparison."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: OLD → NEW' for every setting whose value differs (a key missing on one side too)."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a != b:
            out.append(f"{key}: {_shown(a, 30)} → {_shown(b, 30)}")
    return out


def to_yaml(sections: Mapping[str, Resolved], header: str = "") -> str:
    """The sections as a YAML configuration file, every setting under its help as a comment;
    reading it back (:func:`load_config`) gives the same values."""
    import yaml

    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, resolved in sections.items():
        lines.append(f"{name}:  # {SECTIONS[name][2]}")
        for key, f in resolved.fields().items():
            help_ = f.metadata.get("help", "")
            if f.default is MISSING and f.default_factory is MISSING:
                help_ += " (required; null: not set here)"
            lines.append(f"  # {help_}")
            value = resolved.values.get(key)
            value = list(value) if isinstance(value, tuple) else value
            text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 16)
            lines.append(f"  {key}: {text.removesuffix(chr(10)).removesuffix('...').strip()}")
    return "\n".join(lines) + "\n"


def setting_text(value: Any) -> str:
    """A setting's value as ``--set`` takes it: true/false, null, MIN,MAX for pairs."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def one_line(config: Any) -> str:
    """``key=value key=value ...``: a config in one log line, each value as ``--set`` takes it."""
    return " ".join(f"{k}={setting_text(v)}" for k, v in plain(config).items())
