"""Typed config dataclasses and ml_collections: checks that name the field, and both directions.

check / check_choice / unused / scalar     one value's checks, with the shared messages
choice(default, registry)                  a str field whose valid values are a registry's
from_mapping(cls, config_dict)             a ConfigDict (or dict, JSON) -> frozen dataclass
config_dict(cls, linked=...)               a dataclass's defaults -> the ConfigDict
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import ml_collections
import numpy as np


def check(ok: bool, field: str, value: Any, expected: str) -> None:
    """ValueError `config field {field}={value!r} is invalid: expected {expected}.` unless `ok`."""
    if not ok:
        raise ValueError(f"config field {field}={value!r} is invalid: expected {expected}.")


def check_choice(field: str, value: Any, choices: Collection) -> None:
    """ValueError naming `field` unless `value` is one of `choices` (e.g. a registry's keys)."""
    check(value in choices, field, value, f"one of {sorted(choices)}")


def unused(value: Any, default: Any, field: str, needed: str) -> None:
    """A setting that only matters with another one must stay at its default without it."""
    if value != default:
        raise ValueError(
            f"config field {field}={value!r} has no effect: it is only used with {needed}; "
            f"leave it at {default!r}."
        )


def scalar(field: str, value: Any, kind: type) -> Any:
    """`value` as a `kind` (bool, int, float or str), or a TypeError / ValueError naming `field`.

    NumPy scalars count as the Python value they hold; an int is a valid float (and becomes
    one); a bool is never a number; floats must be finite.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"config field {field}={value!r} must be a bool.")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"config field {field}={value!r} must be an int.")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"config field {field}={value!r} must be a number.")
        value = float(value)
        check(math.isfinite(value), field, value, "finite")
    elif not isinstance(value, kind):
        raise TypeError(f"config field {field}={value!r} must be a {kind.__name__}.")
    return value


Choices = Collection[str] | Callable[[], Collection[str]]


def choice(default: str, choices: Choices) -> Any:
    """A str dataclass field whose valid values are `choices`: a collection, or a function
    returning one (a registry's keys, read at each check so that entries added later count).

    `check_choices` (in the dataclass's `__post_init__`) and config coercion enforce it.
    """
    return dataclasses.field(default=default, metadata={"choices": choices})


def choices_of(field: dataclasses.Field) -> Collection[str] | None:
    """The valid values of a `choice` field (None for any other field)."""
    choices = field.metadata.get("choices")
    return choices() if callable(choices) else choices


def check_choices(instance: Any, prefix: str) -> None:
    """Every `choice` field of a dataclass instance holds one of its choices, naming the field."""
    for field in dataclasses.fields(instance):
        choices = choices_of(field)
        if choices is not None:
            check_choice(f"{prefix}.{field.name}", getattr(instance, field.name), choices)


def unknown_fields_error(prefix: str, unknown: Sequence[str], valid: Collection[str]) -> ValueError:
    """The error for fields `unknown` under `prefix` ("" at the top), listing the `valid` ones."""
    where = f"{prefix}." if prefix else ""
    return ValueError(
        f"unknown config field(s) {[where + k for k in unknown]}; valid: {sorted(valid)}."
    )


def coerce(value: Any, annotation: Any, field: str) -> Any:
    """Check/convert one value against a (resolved) type annotation, naming the field."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        check_choice(field, value, typing.get_args(annotation))
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, field)
            except (TypeError, ValueError):
                pass
        raise TypeError(f"config field {field}={value!r} matches none of {annotation}.")
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, Mapping):  # key/value settings, e.g. data.gym_kwargs
            value = tuple(sorted(value.items()))
        check(isinstance(value, list | tuple), field, value, "a tuple")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        else:
            check(len(args) == len(value), field, value, f"a tuple of {len(args)} items")
            items = list(args)
        return tuple(
            coerce(v, item, f"{field}[{i}]")
            for i, (v, item) in enumerate(zip(value, items, strict=True))
        )
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, prefix=field)
    if annotation in (bool, int, float, str):
        return scalar(field, value, annotation)
    return value


def from_mapping(cls: type, values: Mapping[str, Any] | Any, *, prefix: str = "") -> Any:
    """Build frozen dataclass `cls` from a dict / ConfigDict, validating every field.

    Unknown keys, wrong types and out-of-range values raise errors that name
    the full dotted field (e.g. `rl.margin_low`). Missing keys take defaults.
    """
    if dataclasses.is_dataclass(values) and isinstance(values, cls):
        return values
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    if not isinstance(values, Mapping):
        raise TypeError(f"config field {prefix or cls.__name__} must be a mapping, got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise unknown_fields_error(prefix, unknown, known)
    kwargs = {
        name: coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in values.items()
    }
    return cls(**kwargs)


def config_default(factory: Callable[[], Any], **field_kwargs) -> Any:
    """A dataclass field whose ml_collections form is not its default: `config_dict` holds
    `factory()` there (e.g. a dict for a field stored as key/value pairs)."""
    return dataclasses.field(**field_kwargs, metadata={"config_default": factory})


def config_dict(cls: type, *, linked: Mapping[str, str] | None = None) -> ml_collections.ConfigDict:
    """Every init field of dataclass `cls` with its default, nested dataclasses as sections.

    Optional fields whose default is None become typed `FieldReference`s (the command
    line can still set them); fields made with `config_default` hold their factory's
    value. `linked` maps a dotted field to another whose value it follows: both share
    one `FieldReference`, so setting either sets both.
    """
    config = _section(cls)
    for follower, leader in (linked or {}).items():
        reference = ml_collections.FieldReference(_get(config, leader))
        _set(config, leader, reference)
        _set(config, follower, reference)
    return config


def _section(cls: type) -> ml_collections.ConfigDict:
    hints = typing.get_type_hints(cls)
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        if field.init:
            section[field.name] = _config_value(field, hints[field.name])
    return section


def _config_value(field: dataclasses.Field, annotation: Any) -> Any:
    """One field's default as the ml_collections config holds it."""
    if "config_default" in field.metadata:
        return field.metadata["config_default"]()
    if dataclasses.is_dataclass(annotation):
        return _section(annotation)
    default = field.default
    if default is dataclasses.MISSING:
        default = field.default_factory()
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and default is None:
        (kind,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return ml_collections.FieldReference(None, field_type=kind)
    if annotation is float:
        return float(default)
    return default


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    *parents, key = path.split(".")
    for parent in parents:
        config = config[parent]
    return config[key]


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *parents, key = path.split(".")
    for parent in parents:
        config = config[parent]
    config[key] = value
