"""Building nested config dataclasses from plain dicts, with strict keys and dotted overrides.

Every config in the project is a dataclass validated in ``__post_init__``. This module turns
YAML/JSON dicts and ``a.b.c=value`` command-line overrides into those dataclasses, rejecting
unknown keys with a did-you-mean suggestion, and turns them back into plain dicts for the
run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field has an invalid value or an unknown name."""


def check(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise ConfigError naming the field, its value and what is allowed unless condition holds."""
    if not condition:
        raise ConfigError(f"invalid {field}={value!r}: {allowed}")


def check_choice(field: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"invalid {field}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _unknown_key_message(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {where + close[0]!r}?" if close else ""
    return f"unknown config key {where + key!r}{hint} (known keys in this section: {', '.join(sorted(known))})"


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields take nested dicts."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {prefix.rstrip('.') or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _resolve_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(key, list(fields), prefix))
        tp = _strip_optional(hints[key])
        optional = tp is not hints[key]
        if _is_dataclass_type(tp) and not (value is None and optional):
            if not isinstance(value, dict):
                example = next(f.name for f in dataclasses.fields(tp) if f.init)
                raise ConfigError(f"invalid {prefix}{key}={value!r}: expected a mapping of fields such as "
                                  f"{example} (in a file `{key}:` with indented fields; on the command line "
                                  f"{prefix}{key}.{example}=...)")
            kwargs[key] = from_dict(tp, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}", optional)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a default
        raise ConfigError(f"invalid {prefix or cls.__name__}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(_qualify(str(exc), prefix)) from None


def _qualify(message: str, prefix: str) -> str:
    """Prefix a nested section's error with its parents ("invalid ffn.top_k" -> "invalid model.ffn.top_k").

    A section's own checks name fields relative to the section (``ffn.top_k``); the full path is
    what a user types in a config file or override.
    """
    parents = prefix.rstrip(".").split(".")[:-1]
    if not parents or not message.startswith("invalid "):
        return message
    parent = ".".join(parents) + "."
    if message.startswith(f"invalid {parent}"):
        return message
    return f"invalid {parent}{message[len('invalid '):]}"


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(value: Any, tp: Any, field: str, optional: bool = False) -> Any:
    """Check a scalar against its annotated type, converting command-line strings and whole floats.

    Bools are not integers here (``model.d_model=true`` is an error, not 1), integers are not
    bools (``tie_embeddings=5`` is an error), and numbers must be finite. A str field takes only
    strings; ``apply_overrides`` keeps an override's text as a string for such fields, so
    ``train.run_name=123`` is the name "123", while a YAML ``run_name: 123`` must be quoted.
    Other annotations (tuples, lists) are left to the dataclass's own checks.
    """
    if value is None:
        if optional or tp not in _TYPE_WORDS:
            return None
        raise ConfigError(f"invalid {field}=None: expected {_TYPE_WORDS[tp]}, null is not allowed here")
    if tp not in _TYPE_WORDS:
        return value

    def wrong() -> ConfigError:
        return ConfigError(f"invalid {field}={value!r}: expected a value of type {tp.__name__} ({_TYPE_WORDS[tp]})")

    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if tp is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on"):
                return True
            if lowered in ("false", "no", "off"):
                return False
            raise wrong()
        try:
            number = float(text)
        except ValueError:
            raise wrong() from None
        value = number
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong()
    if not math.isfinite(value):
        raise ConfigError(f"invalid {field}={value!r}: expected a finite number")
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise wrong()
        return int(value)
    return float(value)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_value(text: str) -> Any:
    """Parse an override's right-hand side: JSON when it parses (numbers, lists, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict, checking each path against ``cls``."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r}: expected the form section.field=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        node_cls = cls
        hint = None
        for depth, key in enumerate(keys):
            if node_cls is not None:
                known = [f.name for f in dataclasses.fields(node_cls)]
                if key not in known:
                    where = ".".join(keys[:depth])
                    raise ConfigError(_unknown_key_message(key, known, f"{where}." if where else ""))
                hint = _strip_optional(_resolve_hints(node_cls)[key])
                node_cls = hint if _is_dataclass_type(hint) else None
            if depth == len(keys) - 1:
                value = parse_value(raw)
                if hint is str and value is not None and not isinstance(value, str):
                    value = raw.strip()  # train.run_name=123 names the run "123"
                node[key] = value
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"invalid override {item!r}: {'.'.join(keys[:depth + 1])} is not a section")
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file (.json, .yaml or .yml) into a dict; every problem is a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"invalid config file {path}: it is not a regular file")
    if not path.name.endswith(_CONFIG_SUFFIXES):
        raise ConfigError(f"invalid config file {path}: expected a .json, .yaml or .yml file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not text.strip():
        raise ConfigError(f"config file {path} is empty; write the config sections (or `preset: NAME`) into it")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid config file {path}: {_yaml_error(exc)}") from None
        if data is None:
            raise ConfigError(f"config file {path} is empty (only comments); write the config sections into it")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid config file {path}: not valid JSON ({exc.msg} at line {exc.lineno} "
                              f"column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config file {path}: the top level must be a mapping")
    return data


_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def _yaml_error(exc: Exception) -> str:
    """One line from a PyYAML error: what went wrong and where (1-based line and column)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error: {problem}{where}"
