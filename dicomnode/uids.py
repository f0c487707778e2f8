"""Deterministic UIDs for result objects, so that a re-run never duplicates anything at the PACS
and one UID never names two different contents.

Every UID is ``pydicom.uid.generate_uid(prefix, entropy_srcs=[...])``: a SHA-512 hash of the
(JSON-encoded) inputs below, rendered under ``prefix``. The same inputs always give the same UID
(a re-send after a crash overwrites at the PACS, it does not add), and any change gives a new one.

A source image is identified by its content, not only by its name: a :class:`SourceIdentity` is
its SOP Instance UID plus the SHA-256 of the stored instance (the bytes as received, recorded by
the listener). A modality that re-sends a corrected image under the same SOP Instance UID
therefore gets new results for it, never different results under the old UIDs.

- result series (one per kind and study): study UID, kind, algorithm version;
- Secondary Capture / presentation state (one per source image): the source's identity, kind,
  algorithm version, whether it was analysed, and the study's summary line it shows. An image
  whose bytes and study conclusion did not change keeps its result UIDs across re-runs of its
  study; the others get new ones, and the superseded objects are withdrawn;
- tracking identifiers of the SR and GSPS findings: the source's identity, algorithm version and
  the finding's index;
- the study's SR: study UID, the identities of all analysed images, algorithm version and the
  SOP Instance UID of the SR it replaces (its predecessor document), if any. A new generation of
  the study (an image added or replaced, or anything else that made it run again) therefore
  always gets a new SR naming the previous one, and never names itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

#: Default root for generated UIDs; deployments should configure their organisation's root.
DEFAULT_UID_PREFIX = PYDICOM_ROOT_UID

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ResultKind(StrEnum):
    """The kinds of DICOM object the node writes."""

    SR = "sr"
    SECONDARY_CAPTURE = "sc"
    PRESENTATION_STATE = "gsps"
    REJECTION_NOTE = "kos"


@dataclass(frozen=True, order=True)
class SourceIdentity:
    """What a source image is for UID derivation: its SOP Instance UID and the SHA-256 (lower-case
    hex) of the stored instance's bytes. Two sends of one UID with different bytes differ."""

    sop_instance_uid: str
    sha256: str

    def __post_init__(self) -> None:
        if not self.sop_instance_uid:
            raise ValueError("a source identity needs a SOP Instance UID")
        if _SHA256_HEX.fullmatch(self.sha256) is None:
            raise ValueError(
                f"sha256 must be 64 lower-case hex digits (a SHA-256 digest), got {self.sha256!r}"
            )


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
    kind: ResultKind,
    source: SourceIdentity,
    version: str,
    prefix: str = DEFAULT_UID_PREFIX,
    *,
    analysed: bool = True,
    study_summary: str = "",
) -> UID:
    """SOP Instance UID of a per-image result (Secondary Capture or presentation state); a
    capture saying the image was not analysed has a UID of its own (``analysed=False``). The
    study's summary line, which every capture and presentation state shows, is part of the
    content: when it changes (a study re-run with another conclusion), the object gets a new UID
    and the old one is withdrawn (see :mod:`dicomnode.writers.kos`)."""
    if kind in (ResultKind.SR, ResultKind.REJECTION_NOTE):
        raise ValueError(f"a {kind.value} covers a whole study: not a per-image result")
    parts = [kind.value, source.sop_instance_uid, source.sha256, version]
    if not analysed:
        parts.append("not analysed")
    if study_summary:
        parts.append(study_summary)
    return derive_uid("instance", *parts, prefix=prefix)


def report_uid(
    study_uid: str,
    sources: Iterable[SourceIdentity],
    version: str,
    prefix: str = DEFAULT_UID_PREFIX,
    *,
    predecessor: str | None = None,
    not_analysed: Iterable[SourceIdentity] = (),
) -> UID:
    """SOP Instance UID of the study's SR.

    It changes when the analysed images (their UIDs or bytes), the images reported as not
    analysed, the model version or the replaced SR (``predecessor``, the SOP Instance UID named
    in the Predecessor Documents Sequence) change. The order of ``sources`` does not matter;
    one SOP Instance UID with two different contents in one report is refused (ValueError).
    """
    skipped = sorted(set(not_analysed))
    unique = sorted(set(sources) | set(skipped))
    if not unique:
        raise ValueError("an SR needs at least one source image")
    uids = [source.sop_instance_uid for source in unique]
    if len(set(uids)) != len(uids):
        raise ValueError("one SOP Instance UID with two different contents in one report")
    if predecessor is not None and not predecessor:
        raise ValueError("predecessor must be a SOP Instance UID or None")
    replaces = "first" if predecessor is None else f"replaces {predecessor}"
    parts = [part for source in unique for part in (source.sop_instance_uid, source.sha256)]
    parts += [f"not analysed {source.sop_instance_uid}" for source in skipped]
    return derive_uid("report", study_uid, version, replaces, *parts, prefix=prefix)


def tracking_uid(
    source: SourceIdentity, version: str, index: int, prefix: str = DEFAULT_UID_PREFIX
) -> UID:
    """Tracking Unique Identifier of finding ``index`` of an image (0: the image, 1..n: boxes)."""
    return derive_uid(
        "tracking", source.sop_instance_uid, source.sha256, version, str(index), prefix=prefix
    )
