"""Turn plain YAML data into typed dataclasses, refusing anything unexpected.

Every error names the dotted key, the bad value and what would have been accepted, because
the person reading it is about to spend 256 GPUs on the answer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A config value is wrong. `key` is the dotted path, e.g. `training.tp`."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is dict:
        k, v = get_args(tp)
        return f"a mapping of {_describe(k)} to {_describe(v)}"
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1:  # Optional[X]: X's own error is the useful one
            return _convert(value, options[0], key)
        errors = []
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(key, f"got {value!r}; expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"got {value!r}; expected null")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        raise ConfigError(key, f"got {value!r}; allowed values: {', '.join(repr(a) for a in allowed)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}; expected {_describe(tp)}")
        kt, vt = get_args(tp)
        return {_convert(k, kt, f"{key}.{k}"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"got {value!r}; expected {_describe(tp)}")
        (it,) = get_args(tp)
        return [_convert(v, it, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}; expected {_describe(tp)}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    raise ConfigError(key, f"got {value!r} ({type(value).__name__}); expected {_describe(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = ".".join(p for p in (prefix, unknown[0]) if p)
        raise ConfigError(where, f"unknown key; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(prefix, str(e)) from None
    except ValueError as e:  # a section that checks itself (monitoring.config.MonitorConfig)
        if isinstance(e, ConfigError) or not hasattr(e, "field"):
            raise
        raise ConfigError(".".join(p for p in (prefix, e.field) if p),
                          f"got {e.value!r}; allowed: {e.allowed}") from None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Range check used by the dataclasses' `validate` methods."""
    if not condition:
        raise ConfigError(key, f"got {value!r}; allowed: {allowed}")
