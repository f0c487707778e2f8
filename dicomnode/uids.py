"""Deterministic UIDs for result objects, so that a re-run never duplicates anything at the PACS.

Every UID is ``pydicom.uid.generate_uid(prefix, entropy_srcs=[...])``: a SHA-512 hash of the
(JSON-encoded) inputs below, rendered under ``prefix``. The same inputs and model version always
give the same UID (a re-send after a crash overwrites, it does not add), and any change gives a
new one:

- result series (one per kind and study): study UID, kind, algorithm version;
- Secondary Capture / presentation state (one per source image): source SOP Instance UID, kind,
  algorithm version;
- the study's SR: study UID, the sorted SOP Instance UIDs of all analysed images, algorithm
  version. A new generation of the study (an image added or replaced) gives a new SR UID; the
  previous SR is then referenced as a predecessor document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import StrEnum

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

#: Default root for generated UIDs; deployments should configure their organisation's root.
DEFAULT_UID_PREFIX = PYDICOM_ROOT_UID


class ResultKind(StrEnum):
    """The kinds of DICOM object the node writes."""

    SR = "sr"
    SECONDARY_CAPTURE = "sc"
    PRESENTATION_STATE = "gsps"


def derive_uid(*parts: str, prefix: str = DEFAULT_UID_PREFIX) -> UID:
    """A UID that is a pure function of ``parts`` (hashed) under ``prefix``."""
    if not parts or any(not part for part in parts):
        raise ValueError(f"every part of a derived UID must be a non-empty string, got {parts!r}")
    # pydicom concatenates entropy sources without a separator; JSON keeps ("ab", "c") and
    # ("a", "bc") apart. pydicom validates the prefix (ValueError if invalid).
    return generate_uid(prefix=prefix, entropy_srcs=[json.dumps(["fracture-dicomnode", *parts])])


def series_uid(
    kind: ResultKind, study_uid: str, version: str, prefix: str = DEFAULT_UID_PREFIX
) -> UID:
    """Series Instance UID for all results of one ``kind`` in a study from one model version."""
    return derive_uid("series", kind.value, study_uid, version, prefix=prefix)


def image_result_uid(
    kind: ResultKind, source_sop_uid: str, version: str, prefix: str = DEFAULT_UID_PREFIX
) -> UID:
    """SOP Instance UID of a per-image result (Secondary Capture or presentation state)."""
    if kind is ResultKind.SR:
        raise ValueError("the SR covers a whole study: use report_uid")
    return derive_uid("instance", kind.value, source_sop_uid, version, prefix=prefix)


def report_uid(
    study_uid: str, source_sop_uids: Iterable[str], version: str, prefix: str = DEFAULT_UID_PREFIX
) -> UID:
    """SOP Instance UID of the study's SR: changes when the set of analysed images changes."""
    sources = sorted(set(source_sop_uids))
    if not sources:
        raise ValueError("an SR needs at least one analysed source image")
    return derive_uid("report", study_uid, version, *sources, prefix=prefix)


def tracking_uid(
    source_sop_uid: str, version: str, index: int, prefix: str = DEFAULT_UID_PREFIX
) -> UID:
    """Tracking Unique Identifier of finding ``index`` (0: the image, 1..n: its boxes)."""
    return derive_uid("tracking", source_sop_uid, version, str(index), prefix=prefix)
