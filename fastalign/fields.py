"""Typed, range-checked fields for the configuration dataclasses (the training config, the
model config and every method's options section): one checker, so that a bad value fails
when the config is loaded, naming its key, what was expected and what came, instead of
deep inside training.

A field declares its range with :func:`setting`; its type is its annotation (``int``,
``float``, ``str``, ``bool``, ``list[int]``, ``X | None``). An ``int`` given for a ``float``
field becomes a float; nothing else is converted (``epochs: 1.5`` is an error, not 1 or 2).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field with its allowed values: ``minimum <= value``, ``value > above``,
    ``value <= maximum``, ``value in choices`` (for a list field: every element)."""
    rules = {"minimum": minimum, "above": above, "maximum": maximum, "choices": choices}
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={k: v for k, v in rules.items() if v is not None},
    )


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(
            "null" if a is type(None) else _describe(a) for a in args if a is not type(None)
        ) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` (int -> float only), or TypeError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _typed(key, value, option)
            except TypeError:
                pass
    elif origin is list:
        if isinstance(value, list):
            return [_typed(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    else:
        return value  # a nested section or another type: checked by its own owner
    raise TypeError(f"{key} must be {_describe(hint)}, got {value!r}")


def _check_range(key: str, value: Any, rules: typing.Mapping[str, Any]) -> None:
    if value is None or not rules:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(f"{key}[{i}]", item, rules)
        return
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    bounds = (
        ("minimum", lambda v, b: v >= b, ">="),
        ("above", lambda v, b: v > b, ">"),
        ("maximum", lambda v, b: v <= b, "<="),
    )
    for name, holds, sign in bounds:
        if name in rules and not holds(value, rules[name]):
            raise ValueError(f"{key} must be {sign} {rules[name]}, got {value!r}")


def check_fields(section: Any, prefix: str = "") -> None:
    """Check (and, int -> float, normalise) every field of the dataclass instance
    ``section`` against its annotation and :func:`setting` range; errors name the key as
    ``prefix + field`` (``model.embed_dim``).

    Raises:
        TypeError: a value of another type (``epochs=abc``, ``epochs=1.5``).
        ValueError: a value out of its range or choices (``lr=0``, ``loss=hinj``).
    """
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        key = prefix + f.name
        value = _typed(key, getattr(section, f.name), hints[f.name])
        _check_range(key, value, f.metadata)
        object.__setattr__(section, f.name, value)
