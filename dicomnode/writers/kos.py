"""Withdrawing superseded results the IHE IOCM way: a Key Object Selection rejection note.

When a study runs again (a late or corrected image), its new results replace the old ones: the
new SR names the old one as its predecessor, per-image objects of unchanged images keep their
UIDs (a re-send overwrites), and everything else the previous version sent is withdrawn by a
Key Object Selection Document whose title is (113001, DCM, "Rejected for Quality Reasons")
(CID 7011, the rejection note of IHE Imaging Object Change Management). An archive that
implements IOCM hides the referenced instances from viewers; one that does not keeps them,
with the KOS beside them saying they are superseded.

The note goes into the study, in its own series, to the same destinations as the results. Its
UID follows the withdrawn instances and the replacing SR, so a re-send overwrites it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.uids import ResultKind, derive_uid
from dicomnode.writers.common import (
    NodeIdentity,
    copy_context,
    instance_number,
    result_header,
    result_identity,
)
from inference.records import AlgorithmInfo

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons


@dataclass(frozen=True)
class Withdrawn:
    """A result object of an earlier version to withdraw (what the state database recorded)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


def _reference(item: Withdrawn, study_header: Dataset) -> Dataset:
    """The withdrawn object's header (from its file when it is still there, else its UIDs in the
    study's patient and study context), as highdicom reads evidence."""
    if item.path.is_file():
        return result_header(pydicom.dcmread(item.path, stop_before_pixels=True))
    reference = Dataset()
    copy_context(study_header, reference)
    reference.StudyInstanceUID = study_header.StudyInstanceUID
    reference.SeriesInstanceUID = item.series_instance_uid
    reference.SOPClassUID = item.sop_class_uid
    reference.SOPInstanceUID = item.sop_instance_uid
    return reference


def build_rejection_note(
    withdrawn: Sequence[Withdrawn],
    study_header: Dataset,
    replacing_sr: str | None,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    *,
    version: int,
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS that withdraws ``withdrawn`` (superseded by the study's result ``version``);
    ``study_header`` is a source header of the study (patient and study context)."""
    if not withdrawn:
        raise ValueError("a rejection note needs at least one withdrawn object")
    header = result_header(study_header)
    references = [_reference(item, header) for item in withdrawn]
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.device_uid,
            name=node.station_name,
            manufacturer_name=node.manufacturer,
            model_name=node.model_name,
            serial_number=node.device_serial_number,
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=references,
        observer_device_context=observer,
        description=f"AI fracture detection results superseded by result version {version}"
        + (f" (report {replacing_sr})" if replacing_sr else ""),
    )
    study_uid = str(header.StudyInstanceUID)
    uid = derive_uid(
        "rejection",
        study_uid,
        algorithm.version,
        str(version),
        *sorted(item.sop_instance_uid for item in withdrawn),
        prefix=node.uid_prefix,
    )
    identity = result_identity(
        ResultKind.REJECTION_NOTE,
        study_uid,
        uid,
        instance_number(version, 1),
        algorithm,
        node,
        [header],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=references,
        content=content,
        series_instance_uid=identity["series_instance_uid"],
        series_number=identity["series_number"],
        sop_instance_uid=identity["sop_instance_uid"],
        instance_number=identity["instance_number"],
        manufacturer=identity["manufacturer"],
        institution_name=identity["institution_name"],
        contributing_equipment=identity["contributing_equipment"],
        series_description=identity["series_description"],
    )
    copy_context(header, kos)
    return kos
