"""Shared helper of the learning configs (JSON round trips of frozen dataclasses)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from ..errors import InputError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: object) -> T:
    """``cls(**data)`` for a dataclass ``cls``; a non-mapping or unknown keys raise :class:`InputError` naming
    them (missing keys take the defaults)."""
    name = f"{cls.__name__}.from_dict"
    if not isinstance(data, Mapping):
        raise InputError(f"{name}: expected a mapping; got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{name}: unknown keys {unknown}; expected a subset of {sorted(known)}")
    kwargs: dict[str, Any] = dict(data)
    return cls(**kwargs)
