"""pynetdicom's UID parsing, remembered while a listener runs.

Every association request names its presentation contexts by UID: DCMTK's ``storescu`` proposes
about 120 abstract syntaxes with their transfer syntaxes, and pynetdicom (3.0) turns each one
into a pydicom ``UID`` through ``pynetdicom.utils.set_uid``, which validates it with regular
expressions twice (pydicom's and its own). That was a fifth of the listener's time per
association. The same few hundred UIDs come back on every association, and ``UID`` objects are
immutable strings, so :func:`cached_uids` puts a memoised ``set_uid`` in the pynetdicom modules
that parse PDUs, primitives and presentation contexts: a UID seen before is returned without
validating it again. A value that fails validation raises as before (exceptions are not
remembered); at most :data:`CACHE_SIZE` distinct values are kept.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType

from pynetdicom import dimse_primitives, pdu_items, pdu_primitives, presentation, utils

CACHE_SIZE = 4096
"""Distinct (value, parameter) pairs remembered; a hostile peer inventing UIDs only evicts."""

_MODULES: tuple[ModuleType, ...] = (pdu_items, pdu_primitives, presentation, dimse_primitives)

cached_set_uid = functools.lru_cache(maxsize=CACHE_SIZE)(utils.set_uid)
"""``pynetdicom.utils.set_uid``, memoised (its arguments are strings, bytes, None and flags)."""


@contextlib.contextmanager
def cached_uids() -> Iterator[None]:
    """While inside, pynetdicom parses UIDs through :data:`cached_set_uid`."""
    before = [module.set_uid for module in _MODULES]
    for module in _MODULES:
        module.set_uid = cached_set_uid  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in zip(_MODULES, before, strict=True):
            module.set_uid = original  # type: ignore[attr-defined]
