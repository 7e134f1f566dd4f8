"""Typed dataclasses from plain dicts (YAML, overrides, a saved config), every value converted or refused.

`build` turns a mapping into a dataclass of the schema, section by section, naming any unknown key and the
valid ones; `set_dotted` sets one `section.key` of such a mapping (an override), refusing unknown keys.
The values' ranges are checked afterwards, by ``validate.py``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

from .schema import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def build(cls: type[T], d: dict[str, Any], prefix: str) -> T:
    """`cls` from the mapping `d` (keys left out keep their defaults); `prefix` names the section in errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'} are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """`d[section][key] = value` for `key` = "section.key" (any depth); the key must already be in `d`."""
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])} (in override {key})")
        cur = nxt
    if parts[-1] not in cur:
        raise ConfigError(f"unknown config key {key}")
    cur[parts[-1]] = value


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """`value` as the type `tp` (a field's annotation), converted where YAML or the command line give it as
    text; `name` is the field's dotted name for the error."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a section (a class, not an instance)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of fields, got {value!r}")
        return build(tp, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(tp), value, name)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name}: expected a mapping of section.key: value, got {value!r}")
        return dict(value)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(arg, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {name}")


def _coerce_union(options: tuple[Any, ...], value: Any, name: str) -> Any:
    """`value` as the one of `options` of its shape: a list as the sequence type, anything else as the
    scalar (`int | tuple[int, int]`: a number, or a [min, max] list)."""
    is_seq = isinstance(value, (list, tuple))
    fits = [o for o in options if (typing.get_origin(o) in (tuple, list)) == is_seq]
    try:
        if not fits:
            raise ConfigError(name)
        return _coerce(fits[0], value, name)
    except ConfigError:
        raise ConfigError(f"{name}: expected {' or '.join(_describe(o) for o in options)}, got {value!r}") from None


def _describe(tp: Any) -> str:
    """A type of the schema in words, for errors: "an integer", "a list of 2 integers"."""
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args:
        return f"a list of {len(args)} {'integers' if all(a is int for a in args) else 'numbers'}"
    return words.get(tp, str(tp))


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False
