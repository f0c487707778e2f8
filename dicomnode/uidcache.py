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

``PresentationContext.add_transfer_syntax`` validates each proposed transfer syntax itself
(four more regular expressions per value, for some 300 values per request); a value it took
before without a word (a valid UID of a transfer syntax, or a private one) is appended as that
same ``UID`` while a listener runs; any other value still goes through pynetdicom's method, with
its errors and warnings.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from pydicom.uid import UID
from pynetdicom import dimse_primitives, pdu_items, pdu_primitives, presentation, utils
from pynetdicom.presentation import PresentationContext

CACHE_SIZE = 4096
"""Distinct (value, parameter) pairs remembered; a hostile peer inventing UIDs only evicts."""

_MODULES: tuple[ModuleType, ...] = (pdu_items, pdu_primitives, presentation, dimse_primitives)

cached_set_uid = functools.lru_cache(maxsize=CACHE_SIZE)(utils.set_uid)
"""``pynetdicom.utils.set_uid``, memoised (its arguments are strings, bytes, None and flags)."""


@functools.lru_cache(maxsize=CACHE_SIZE)
def plain_transfer_syntax(value: str | bytes) -> UID | None:
    """The ``UID`` pynetdicom's ``add_transfer_syntax`` makes of ``value`` when it takes it
    without an error or a warning; None for any other value."""
    try:
        uid = UID(value.decode("ascii") if isinstance(value, bytes) else value)
    except UnicodeDecodeError:
        return None
    plain = uid and utils.validate_uid(uid) and uid.is_valid
    return uid if plain and (uid.is_private or uid.is_transfer_syntax) else None


def _add_transfer_syntax(original: Any) -> Any:
    def add_transfer_syntax(self: PresentationContext, syntax: Any) -> None:
        uid = plain_transfer_syntax(syntax) if isinstance(syntax, str | bytes) else None
        if uid is None:
            original(self, syntax)
        elif uid not in self._transfer_syntax:
            self._transfer_syntax.append(uid)

    return add_transfer_syntax


@contextlib.contextmanager
def cached_uids() -> Iterator[None]:
    """While inside, pynetdicom parses UIDs through :data:`cached_set_uid` and adds transfer
    syntaxes it took before through :func:`plain_transfer_syntax`."""
    before = [module.set_uid for module in _MODULES]
    add_transfer_syntax = PresentationContext.add_transfer_syntax
    for module in _MODULES:
        module.set_uid = cached_set_uid  # type: ignore[attr-defined]
    PresentationContext.add_transfer_syntax = _add_transfer_syntax(add_transfer_syntax)  # type: ignore[method-assign]
    try:
        yield
    finally:
        PresentationContext.add_transfer_syntax = add_transfer_syntax  # type: ignore[method-assign]
        for module, original in zip(_MODULES, before, strict=True):
            module.set_uid = original  # type: ignore[attr-defined]
