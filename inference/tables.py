"""Settings records read from TOML tables: the one check every ``from_mapping`` shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def checked_keys(cls: type, mapping: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``mapping`` as a dict, after refusing keys that are not fields of the dataclass ``cls``
    (a ValueError naming them and the known ones). Missing keys take the dataclass defaults."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return dict(mapping)
