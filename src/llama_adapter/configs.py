"""Building typed dataclass configs from loose mappings (YAML recipes, command-line overrides).

YAML 1.1 reads `3e-3` (no dot) as a string, and a recipe value of the wrong type would
otherwise fail deep inside training with an unrelated TypeError. Here numbers written as
strings become numbers where the field is numeric, a whole float given for an integer field
becomes that integer, and anything else unknown or unusable is refused with the key's name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def _numeric_kind(annotation: Any) -> type | None:
    """float or int when the field holds that number (optionally `| None`), else None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    for kind in (float, int):
        if kind in options:
            return kind
    return None


def build_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """cls(**values), refusing unknown keys and converting numeric strings, with `where` in messages."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for key, value in values.items():
        kind = _numeric_kind(hints[key])
        if kind is None or not isinstance(value, (str, float)):
            continue
        try:
            number = float(value)  # reads "1e3", and YAML's 700.0, for an integer field
        except ValueError:
            number = None
        if number is None or (kind is int and not number.is_integer()):
            wanted = "an integer" if kind is int else "a number"
            raise ValueError(f"{where}: {key} must be {wanted}, got {value!r}")
        values[key] = kind(number)
    return cls(**values)
