"""Reading a config: a YAML file, then `section.key=value` overrides, checked against the typed sections.

Unknown keys (with a "did you mean"), wrong types and bad choices raise `ConfigError` naming the field;
values are converted where YAML is loose (`3e-4` read as a string, `1e9` as a float for an integer field).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal, Optional

import yaml

from pretrain.config import Config, ConfigError


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML file (or nothing: all defaults), apply `section.key=value` overrides, check names and types."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"config file {path!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, "")


def config_from_dict(raw: dict) -> Config:
    """A config from its dict form (`Config.to_dict()`, as a checkpoint's meta.json holds it), checked like a file."""
    return _build(Config, raw, "")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} must look like section.key=value (for example train.iters=50)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            suggestion = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{suggestion[0]}?" if suggestion else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        values[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**values)


def _coerce(kind: Any, value: Any, name: str) -> Any:
    """Check `value` against the annotation `kind`; return it converted (ints to floats, '3e-4' to 3e-4)."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, {} if value is None else value, name + ".")
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except ConfigError:
                pass
        allowed = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise ConfigError(f"{name}={value!r}: expected {allowed}")
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            suggestion = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {suggestion[0]!r}?" if suggestion else ""
            raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(repr, choices))}{hint}")
        return value
    if origin is dict:
        key_kind, item = typing.get_args(kind)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping of names to {_type_name(item)}")
        return {str(k): _coerce(item, v, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value on the command line
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r}: expected a list of {_type_name(item)}")
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (float, str)) and not isinstance(value, bool):  # 1e9 or "1e9" (YAML 1.1)
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r}: expected a number")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # run.name=123 on the command line
        raise ConfigError(f"{name}={value!r}: expected a string")
    raise TypeError(f"config field {name} has an unsupported annotation {kind!r}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(kind)))
    if typing.get_origin(kind) is list:
        return "a list"
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))
