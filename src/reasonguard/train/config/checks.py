"""A config dataclass's fields checked against their annotations, and converted where YAML
reads a value as another type (`5e-5` read as a string, `no` as False, `a,b` for a list).

Only the annotation kinds the configs use are known: `str`, `int`, `float`, `bool`, `None`,
`Literal[...]`, `list[...]` and unions of them. A value that fits none raises `UserError` naming
the key and what it expects (for a `Literal`, the allowed values).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from reasonguard.errors import UserError


def check_types(config: Any) -> None:
    """Check every field of a config dataclass against its annotation, converting it in place.

    Raises:
        UserError: `config key 'K': expected ..., got ...`, or the allowed values of a choice.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, converted = _coerce(value, hints[f.name])
        if not ok:
            raise UserError(_type_message(f.name, value, hints[f.name]))
        setattr(config, f.name, converted)


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(is valid, value converted to the annotated type) for the annotation kinds we use."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        members = typing.get_args(annotation)
        # Exact matches first, so `int | float` keeps an int an int.
        for member in members:
            if _is_exact(value, member):
                return True, value
        for member in members:
            ok, converted = _coerce(value, member)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value is False and "no" in allowed:
            return True, "no"  # YAML 1.1 reads a bare `no` (or `off`, `false`) as False
        return value in allowed and type(value) is type(allowed[0]), value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str) and item_type is str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, value
        items = [_coerce(item, item_type) for item in value]
        if not all(ok for ok, _ in items):
            return False, value
        return True, [item for _, item in items]
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int | float):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config annotation {annotation!r}")


def _is_exact(value: Any, annotation: Any) -> bool:
    if typing.get_origin(annotation) is not None:
        return False
    if annotation is type(None):
        return value is None
    return type(value) is annotation


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number"}.get(
        annotation, "a string"
    )


def _type_message(name: str, value: Any, annotation: Any) -> str:
    literals = _literal_values(annotation)
    if literals and isinstance(value, str):
        members = typing.get_args(annotation) if typing.get_origin(annotation) else ()
        booleans = ["true/false"] if bool in members else []
        return (
            f"config key {name!r}: {value!r} is not allowed; allowed values: "
            f"{', '.join(booleans + [str(v) for v in literals])}"
        )
    return f"config key {name!r}: expected {_type_name(annotation)}, got {value!r}"


def _literal_values(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return [v for a in typing.get_args(annotation) for v in _literal_values(a)]
    return []
