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
) -> ResultObjects:
    """Build and write every result object of one study; return what was written.

    ``findings`` must be non-empty and all from one study (ValueError otherwise). ``previous``
    is the SR sent earlier for this study, referenced as predecessor document.
    """
    findings = tuple(findings)
    if not findings:
        raise ValueError("no analysed images: nothing to report")
    report = build_report(findings, algorithm, node, previous)
    report_file = written(ResultKind.SR, report, save(report, out_dir), None)
    captures = []
    states = []
    for number, finding in enumerate(findings, start=1):
        source = finding.view.sop_instance_uid
        sc = build_secondary_capture(finding, number, algorithm, node)
        captures.append(written(ResultKind.SECONDARY_CAPTURE, sc, save(sc, out_dir), source))
        if presentation_states:
            pr = build_presentation_state(finding, number, algorithm, node)
            states.append(written(ResultKind.PRESENTATION_STATE, pr, save(pr, out_dir), source))
    return ResultObjects(
        report=report_file, secondary_captures=tuple(captures), presentation_states=tuple(states)
    )
