"""Building a backend's frozen settings dataclass from a config dict, with errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from_dict(settings: dict[str, Any], cls: type[T]) -> T:
    """``cls(**settings)`` after checking every key exists and every value has the default's type.

    An unknown key suggests the closest known one; ints are accepted for float settings.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [key for key in settings if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            match = difflib.get_close_matches(key, list(known), 1)
            hints.append(f"{key!r}" + (f" (did you mean {match[0]!r}?)" if match else ""))
        raise ValueError(
            f"unknown nerf setting {', '.join(hints)} for {cls.__name__}; known keys: {', '.join(known)}"
        )
    values = {}
    for key, value in settings.items():
        kind = type(known[key].default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"nerf setting {key!r} must be {kind.__name__}, got {value!r}")
        values[key] = value
    return cls(**values)
