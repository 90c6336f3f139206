"""Frozen-dataclass configs: load from YAML, apply dotted command-line overrides, validate.

Every config in the package is a frozen dataclass whose fields are plain values or nested
config dataclasses. ``load_config(Cls, path, ["a.b=3", "c=foo"])`` builds one from a YAML file
(optional) and overrides; unknown keys, wrong types and failed validation raise ``ConfigError``
naming the offending dotted key. Each dataclass validates itself in ``__post_init__`` (use
``require``) and may check names against a registry with ``require_in_registry``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be loaded or is invalid; the message names the dotted key."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (use in ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)


def require_in_registry(name: str, registry: Mapping[str, Any], what: str) -> None:
    """Raise ConfigError if ``name`` is not a key of ``registry``, listing the valid names."""
    if name not in registry:
        raise ConfigError(f"unknown {what} {name!r}; registered: {sorted(registry)}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {args}: {errors}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {annotation.__name__}, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {args}")
        return value
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {prefix}{name} for {cls.__name__}{hint}")
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = _deep_merge(to_dict(default), value)  # keep the field's own defaults
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except (ConfigError, TypeError) as e:
        raise ConfigError(_locate(str(e), prefix, cls, fields)) from None


def _locate(message: str, prefix: str, cls: type, fields: Mapping[str, Any]) -> str:
    """A validation message with its full dotted key: a message that starts with a field name
    (the ``require`` convention) gets ``prefix`` joined to it; any other one is put after the
    config's own dotted key (or class name at top level)."""
    first = message.split(" ", 1)[0]
    if first in fields:
        return prefix + message
    return f"{prefix.rstrip('.') or cls.__name__}: {message}"


def to_dict(config: Any) -> dict[str, Any]:
    """A config as nested plain dicts/lists (YAML- and JSON-serialisable)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


def changed_keys(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two ``to_dict`` trees (a key present in one
    tree only counts as changed), sorted."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif key not in saved or key not in now or a != b:
            out.append(prefix + key)
    return out


def require_unchanged(saved: Mapping[str, Any], config: Any, may_change: Sequence[str], what: str) -> None:
    """Raise ``ConfigError`` (one line) naming the dotted keys of ``config`` that differ from
    ``saved`` (the ``to_dict`` tree it resumes), except keys equal to or under a ``may_change``
    entry (e.g. ``"logging"`` covers ``logging.progress``)."""
    now = json.loads(json.dumps(to_dict(config)))  # tuples as lists, as ``saved`` came from JSON
    changed = [k for k in changed_keys(saved, now)
               if not any(k == m or k.startswith(m + ".") for m in may_change)]
    if changed:
        raise ConfigError(f"cannot resume {what}: the configuration changed at {', '.join(changed)} "
                          f"(only {', '.join(may_change)} may change on resume; start a new output_dir "
                          f"or restore the old values)")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {e}") from None
        _set_dotted(data, key.strip(), value)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a validated ``cls`` from defaults, then a YAML file, then dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at top level")
        data = loaded or {}
    apply_overrides(data, overrides)
    return _build(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML (round-trips through load_config)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
