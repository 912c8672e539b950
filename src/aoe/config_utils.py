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
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {where}{key!r}{hint} (known keys: {', '.join(sorted(known))})"


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
        if _is_dataclass_type(tp) and isinstance(value, dict):
            kwargs[key] = from_dict(tp, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
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


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Convert strings from the command line (and ints in float fields) to the annotated type."""
    if value is None:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and tp in (int, float, bool):
        text = value.strip()
        try:
            if tp is bool:
                lowered = text.lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(text)
            if tp is int:
                number = float(text)
                if not number.is_integer():
                    raise ValueError(text)
                return int(number)
            return float(text)
        except ValueError:
            raise ConfigError(f"invalid {field}={value!r}: expected a value of type {tp.__name__}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


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
        for depth, key in enumerate(keys):
            if node_cls is not None:
                known = [f.name for f in dataclasses.fields(node_cls)]
                if key not in known:
                    where = ".".join(keys[:depth])
                    raise ConfigError(_unknown_key_message(key, known, f"{where}." if where else ""))
                hint = _strip_optional(_resolve_hints(node_cls)[key])
                node_cls = hint if _is_dataclass_type(hint) else None
            if depth == len(keys) - 1:
                node[key] = parse_value(raw)
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"invalid override {item!r}: {'.'.join(keys[:depth + 1])} is not a section")
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file (.json, .yaml or .yml) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"invalid config file {path}: expected a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config file {path}: the top level must be a mapping")
    return data
