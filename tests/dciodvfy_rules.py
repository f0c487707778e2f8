"""dciodvfy findings that are limits of dciodvfy, not defects of the object it checks.

Each rule names the standard's text that makes the object right, and the check that shows
dciodvfy's view (a clean file built for it). The tests and the fuzz harness count these
findings apart instead of hiding them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: dciodvfy's summary line after any "Value invalid" error.
INVALID_VALUES_SUMMARY = (
    "Error - Dicom dataset contains invalid data values for Value Representations"
)

#: dciodvfy's complaint about one byte of a text value outside the declared repertoire.
_REPERTOIRE = re.compile(
    r"Character invalid for character repertoire .*\(0x([0-9a-f]{2})\)$", re.IGNORECASE
)


def katakana_in_iso_ir_13(error: str, character_set: Sequence[str]) -> bool:
    """Whether ``error`` is dciodvfy refusing a half-width katakana byte (0xA1-0xDF) in an
    object whose Specific Character Set is the single term ``ISO_IR 13``.

    PS3.3 C.12.1.1.2, Table C.12-2: ``ISO_IR 13`` (Japanese, without code extensions) has JIS X
    0201 romaji as G0 (ISO-IR 14) and JIS X 0201 katakana as G1 (ISO-IR 13), so the bytes
    0xA1-0xDF are katakana in it. dicom3tools' dciodvfy (Debian 1.00~20230616) takes only G0:
    it refuses a clean file whose Patient ID is "ﾈｯﾀﾚ" in ``ISO_IR 13`` and accepts the same
    characters declared ``\\ISO 2022 IR 13`` (test_writers checks both). A result must keep
    the source's Patient ID bytes and character set (the PACS matches the patient on them), so
    the object is right and the finding is dciodvfy's."""
    match = _REPERTOIRE.search(error)
    return (
        match is not None
        and [term.strip() for term in character_set] == ["ISO_IR 13"]
        and 0xA1 <= int(match.group(1), 16) <= 0xDF
    )
