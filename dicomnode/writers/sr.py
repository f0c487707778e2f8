"""Comprehensive 3D SR, TID 1500 Measurement Report: the study's machine-readable AI result.

Per analysed image one TID 1501 group (image level): finding Fracture, qualitative evaluation
present / suspected / absent from the decision, the score as a measurement (Probability,
``{probability}``), the finding site and the algorithm (TID 4019 with the operating point); and
per box one TID 1410 group whose image region is a closed POLYLINE SCOORD of the box corners on
the source image. The document is PRELIMINARY, PARTIAL and UNVERIFIED: an AI result, not a
physician's report.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.uids import ResultKind, report_uid, tracking_uid
from dicomnode.writers.common import (
    DECISION_CODES,
    FRACTURE,
    PRESENCE,
    PROBABILITY,
    PROBABILITY_UNIT,
    RADIOGRAPHY,
    ImageFinding,
    NodeIdentity,
    PreviousReport,
    algorithm_identification,
    box_polyline,
    result_header,
    result_identity,
    study_uid_of,
)
from inference.records import AlgorithmInfo

Group = MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations


def build_report(
    findings: Sequence[ImageFinding],
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    previous: PreviousReport | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The study's TID 1500 measurement report (not yet written to disk)."""
    findings = tuple(findings)
    study_uid = study_uid_of(findings)
    groups: list[Group] = []
    for number, finding in enumerate(findings, start=1):
        groups.extend(_image_groups(number, finding, algorithm, node))
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.device_uid,
            name=node.station_name,
            manufacturer_name=node.manufacturer,
            model_name=f"{node.model_name} / {algorithm.name} {algorithm.version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=RADIOGRAPHY,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=_library_images(findings),
    )
    uid = report_uid(
        study_uid,
        [finding.view.source for finding in findings],
        algorithm.version,
        node.uid_prefix,
        predecessor=None if previous is None else previous.sop_instance_uid,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[result_header(finding.view.header) for finding in findings],
        content=report,
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=None if previous is None else [previous.as_reference()],
        **result_identity(ResultKind.SR, study_uid, uid, 1, algorithm, node),
    )


def _library_images(findings: tuple[ImageFinding, ...]) -> list[Dataset] | None:
    """Headers for the optional Image Library (TID 1600), or None to leave it out.

    highdicom describes a radiograph in the library by its Patient Orientation (two values) and
    Imager Pixel Spacing; many CR headers lack them, and then the library is omitted rather
    than filled with guesses (images stay referenced from every measurement group).
    """
    headers = [finding.view.header for finding in findings]
    if all(
        len(h.get("PatientOrientation") or []) == 2 and h.get("ImagerPixelSpacing") for h in headers
    ):
        return headers
    return None


def _image_groups(
    number: int, finding: ImageFinding, algorithm: AlgorithmInfo, node: NodeIdentity
) -> list[Group]:
    """The image-level group of one image followed by one planar ROI group per box."""
    view, result = finding.view, finding.result
    algorithm_id = algorithm_identification(algorithm, result)
    site = finding.finding_site_code
    sites = [] if site is None else [FindingSite(site)]
    evaluation = [QualitativeEvaluation(PRESENCE, DECISION_CODES[result.decision])]
    image_group: Group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(view.source, algorithm.version, 0, node.uid_prefix),
            identifier=f"image {number} fracture assessment",
        ),
        finding_type=FRACTURE,
        algorithm_id=algorithm_id,
        finding_sites=sites,
        measurements=[_probability(result.score, finding)],
        qualitative_evaluations=evaluation,
        source_images=[SourceImageForMeasurementGroup.from_source_image(view.header)],
    )
    box_groups: list[Group] = [
        PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=tracking_uid(view.source, algorithm.version, index, node.uid_prefix),
                identifier=f"image {number} fracture region {index}",
            ),
            referenced_region=ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(box, view),
                source_image=SourceImageForRegion.from_source_image(view.header),
            ),
            finding_type=FRACTURE,
            algorithm_id=algorithm_id,
            finding_sites=sites,
            measurements=[_probability(box.score, finding)],
            qualitative_evaluations=evaluation,
        )
        for index, box in enumerate(result.boxes, start=1)
    ]
    return [image_group, *box_groups]


def _probability(value: float, finding: ImageFinding) -> Measurement:
    """A score in [0, 1] as a TID 300 measurement inferred from the source image."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"score {value} is outside [0, 1]")
    return Measurement(
        name=PROBABILITY,
        value=float(value),
        unit=PROBABILITY_UNIT,
        referenced_images=[SourceImageForMeasurement.from_source_image(finding.view.header)],
    )
