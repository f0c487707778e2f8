"""DICOM result objects for one analysed study, all built with highdicom.

:func:`write_results` writes the study's Comprehensive 3D SR (TID 1500), one burned-in Secondary
Capture per image and, when asked, one Grayscale Softcopy Presentation State per image, each to
``out_dir/<SOPInstanceUID>.dcm`` with deterministic UIDs (see :mod:`dicomnode.uids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicomnode.uids import ResultKind
from dicomnode.writers.common import (
    ImageFinding,
    NodeIdentity,
    PreviousReport,
    ResultObjects,
    WrittenObject,
    save,
    written,
)
from dicomnode.writers.gsps import build_presentation_state
from dicomnode.writers.sc import build_secondary_capture, render_annotated, render_png
from dicomnode.writers.sr import build_report
from inference.records import AlgorithmInfo

__all__ = [
    "ImageFinding",
    "NodeIdentity",
    "PreviousReport",
    "ResultObjects",
    "WrittenObject",
    "build_presentation_state",
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
) -> ResultObjects:
    """Build and write the result objects of one study that are asked for; return them.

    ``findings`` must be non-empty and all from one study, and at least one kind must be asked
    for (ValueError otherwise). ``previous`` is the SR sent earlier for this study, referenced as
    predecessor document; its UID enters the new SR's UID, so a replacing SR never reuses it.
    ``report``, ``secondary_captures`` and ``presentation_states`` follow the node's
    ``[outputs]`` keys ``sr``, ``sc`` and ``gsps``. Result UIDs follow each source image's
    identity (``View.source``: SOP Instance UID and SHA-256 of its bytes), see
    :mod:`dicomnode.uids`.
    """
    findings = tuple(findings)
    if not findings:
        raise ValueError("no analysed images: nothing to report")
    if not (report or secondary_captures or presentation_states):
        raise ValueError("no result kind asked for: enable at least one of SR, SC and GSPS")
    report_file = None
    if report:
        sr = build_report(findings, algorithm, node, previous)
        report_file = written(ResultKind.SR, sr, save(sr, out_dir), None)
    captures = []
    states = []
    for number, finding in enumerate(findings, start=1):
        source = finding.view.sop_instance_uid
        if secondary_captures:
            sc = build_secondary_capture(finding, number, algorithm, node)
            captures.append(written(ResultKind.SECONDARY_CAPTURE, sc, save(sc, out_dir), source))
        if presentation_states:
            pr = build_presentation_state(finding, number, algorithm, node)
            states.append(written(ResultKind.PRESENTATION_STATE, pr, save(pr, out_dir), source))
    return ResultObjects(
        report=report_file, secondary_captures=tuple(captures), presentation_states=tuple(states)
    )
