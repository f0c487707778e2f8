"""DICOM result objects for one study, all built with highdicom.

:func:`write_results` writes the study's Comprehensive 3D SR (TID 1500), one Secondary Capture
per source image (burned-in result, or "not analysed" and why), when asked one Grayscale
Softcopy Presentation State per analysed image, and, for a re-run, a Key Object Selection
rejection note withdrawing what the previous version sent and this one does not replace under
the same UID; each to ``out_dir/<SOPInstanceUID>.dcm`` with deterministic UIDs (see
:mod:`dicomnode.uids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicomnode.uids import ResultKind
from dicomnode.writers.common import (
    ImageFinding,
    NodeIdentity,
    NotAnalysedImage,
    PreviousReport,
    ResultContext,
    ResultObjects,
    StudySummary,
    WrittenObject,
    result_header,
    save,
    series_context,
    written,
)
from dicomnode.writers.gsps import build_presentation_state
from dicomnode.writers.kos import Withdrawn, build_rejection_note
from dicomnode.writers.sc import (
    build_not_analysed_capture,
    build_secondary_capture,
    render_annotated,
    render_png,
)
from dicomnode.writers.sr import build_report
from inference.records import AlgorithmInfo

__all__ = [
    "ImageFinding",
    "NodeIdentity",
    "NotAnalysedImage",
    "PreviousReport",
    "ResultObjects",
    "StudySummary",
    "Withdrawn",
    "WrittenObject",
    "build_presentation_state",
    "build_rejection_note",
    "build_report",
    "build_secondary_capture",
    "render_annotated",
    "render_png",
    "write_results",
]


def write_results(
    findings: Sequence[ImageFinding],
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    out_dir: Path,
    *,
    previous: PreviousReport | None = None,
    presentation_states: bool = False,
    report: bool = True,
    secondary_captures: bool = True,
    not_analysed: Sequence[NotAnalysedImage] = (),
    version: int = 1,
    withdraw: Sequence[Withdrawn] = (),
) -> ResultObjects:
    """Build and write the result objects of one study that are asked for; return them.

    ``findings`` (analysed images) and ``not_analysed`` (images that got no decision, with the
    reason) must together be non-empty and all from one study, and at least one kind must be
    asked for (ValueError otherwise). ``previous`` is the SR sent earlier for this study,
    referenced as predecessor document; its UID enters the new SR's UID, so a replacing SR never
    reuses it. ``version`` is the study's result generation: Instance Numbers grow with it.
    ``withdraw``: objects of the previous version to withdraw with a rejection note (those whose
    UIDs this version does not write again are withdrawn; the others are overwritten).
    ``report``, ``secondary_captures`` and ``presentation_states`` follow the node's
    ``[outputs]`` keys ``sr``, ``sc`` and ``gsps``.
    """
    findings, not_analysed = tuple(findings), tuple(not_analysed)
    if not findings and not not_analysed:
        raise ValueError("no source image: nothing to report")
    if not (report or secondary_captures or presentation_states):
        raise ValueError("no result kind asked for: enable at least one of SR, SC and GSPS")
    summary = StudySummary.of(findings, not_analysed)
    headers = [f.view.header for f in findings] + [n.header for n in not_analysed]
    context = series_context([result_header(h) for h in headers])
    report_file = None
    if report:
        sr = build_report(
            findings, algorithm, node, previous, not_analysed=not_analysed, version=version
        )
        report_file = written(ResultKind.SR, sr, save(sr, out_dir), None)
    captures = []
    states = []
    options = ResultContext(summary=summary, version=version, context=context)
    for index, finding in enumerate(findings, start=1):
        source = finding.view.sop_instance_uid
        if secondary_captures:
            sc = build_secondary_capture(finding, index, algorithm, node, **options)
            captures.append(written(ResultKind.SECONDARY_CAPTURE, sc, save(sc, out_dir), source))
        if presentation_states:
            pr = build_presentation_state(finding, index, algorithm, node, **options)
            states.append(written(ResultKind.PRESENTATION_STATE, pr, save(pr, out_dir), source))
    if secondary_captures or (not report and not_analysed):
        for index, image in enumerate(not_analysed, start=len(findings) + 1):
            sc = build_not_analysed_capture(image, index, algorithm, node, **options)
            captures.append(
                written(ResultKind.SECONDARY_CAPTURE, sc, save(sc, out_dir), image.sop_instance_uid)
            )
    objects = ResultObjects(
        report=report_file, secondary_captures=tuple(captures), presentation_states=tuple(states)
    )
    kept = {obj.sop_instance_uid for obj in objects.all}
    superseded = [item for item in withdraw if item.sop_instance_uid not in kept]
    if not superseded:
        return objects
    note = build_rejection_note(
        superseded,
        headers[0],
        None if report_file is None else report_file.sop_instance_uid,
        algorithm,
        node,
        version=version,
    )
    rejection = written(ResultKind.REJECTION_NOTE, note, save(note, out_dir), None)
    return ResultObjects(
        report=report_file,
        secondary_captures=tuple(captures),
        presentation_states=tuple(states),
        rejection_note=rejection,
    )
