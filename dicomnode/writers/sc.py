"""Secondary Capture per image: the source image (after VOI, 8-bit) with the boxes burned in.

Solid outlines mark ``fracture`` boxes, dashed outlines ``possible_fracture`` boxes; a banner
above the image states the study's conclusion (the same for every capture of the study), this
image's decision and score, and that this is an AI result for review by a physician. The banner
is added above the image (the canvas grows), so no anatomy is hidden and the image's row/column
orientation is unchanged. Burned In Annotation is YES, Image Type DERIVED.

An image that got no decision gets a capture too, saying so and why ("NOT ANALYSED - outside
the intended use (chest)"): the image under that banner where it decoded, else the banner alone
on a text card, so the radiologist always sees that the AI did not run on it.

Every capture carries its source's patient and study context (including Issuer of Patient ID,
Other Patient IDs, the accession number's issuer and the study description), a Source Image
Sequence naming the source, Lossy Image Compression carried over from a lossy source, and the
series' Body Part Examined and Laterality where all sources of the study agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.pixels import View, to_uint8
from dicomnode.uids import ResultKind, SourceIdentity
from dicomnode.writers.common import (
    ImageFinding,
    NodeIdentity,
    NotAnalysedImage,
    StudySummary,
    banner_lines,
    box_polyline,
    copy_context,
    image_result_identity,
    instance_number,
    lossy_compression,
    not_analysed_lines,
    result_header,
    set_series_context,
)
from inference.records import AlgorithmInfo, Box, Decision, ImageResult

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE, _BLACK = 255, 0
_BIPED = {"A", "P", "R", "L", "H", "F"}


def line_width(rows: int, columns: int) -> int:
    """Outline width in pixels, proportional to the image size (about 0.25 % of the short side)."""
    return max(1, round(min(rows, columns) / 400))


def banner_height(rows: int, columns: int) -> int:
    """Height of the three-line text banner above the image: 12 % of the short side, at least
    48 pixels."""
    return max(48, round(0.12 * min(rows, columns)))


def dashed_segments(
    start: tuple[float, float], end: tuple[float, float], dash: float, gap: float
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Split the segment ``start``→``end`` into dashes of length ``dash`` separated by ``gap``."""
    if dash <= 0 or gap < 0:
        raise ValueError(f"dash length must be positive and gap non-negative, got {dash}, {gap}")
    p, q = np.asarray(start, dtype=float), np.asarray(end, dtype=float)
    length = float(np.linalg.norm(q - p))
    if length == 0.0:
        return []
    unit = (q - p) / length
    segments = []
    for offset in np.arange(0.0, length, dash + gap):
        a, b = p + unit * offset, p + unit * min(offset + dash, length)
        segments.append(((float(a[0]), float(a[1])), (float(b[0]), float(b[1]))))
    return segments


def render_annotated(view: View, result: ImageResult, summary: StudySummary) -> np.ndarray:
    """The 8-bit MONOCHROME2 Secondary Capture pixels: banner above, boxes burned in."""
    image = to_uint8(view.pixels)
    rows, columns = image.shape
    width = line_width(rows, columns)
    dashed = result.decision is Decision.POSSIBLE_FRACTURE
    for box in result.boxes:
        box_polyline(box, view)  # validates that the box lies inside the image
        _draw_box(image, box, width, dashed)
    lines = banner_lines(result, summary)
    return np.vstack([_banner(lines, banner_height(rows, columns), columns), image])


TEXT_CARD = (480, 1024)
"""Rows and columns of the capture of an image that is not shown (text only)."""
MIN_SHOWN = 256
"""Images narrower or shorter than this get the text card: a banner would be unreadable."""


def render_not_analysed(image: NotAnalysedImage, summary: StudySummary) -> np.ndarray:
    """The capture of an image that got no decision: its pixels (when it decoded and is large
    enough to carry a readable banner) under the "not analysed" banner, else that banner on a
    black text card."""
    lines = not_analysed_lines(image, summary)
    if image.pixels is None or min(image.pixels.shape) < MIN_SHOWN:
        rows, columns = TEXT_CARD
        return _banner(lines, rows, columns)
    pixels = to_uint8(image.pixels)
    rows, columns = pixels.shape
    return np.vstack([_banner(lines, banner_height(rows, columns), columns), pixels])


def render_png(
    view: View, result: ImageResult, path: str | Path, summary: StudySummary | None = None
) -> Path:
    """Write the annotated image (as in the Secondary Capture) to ``path`` as PNG (the study
    summary of this image alone unless given)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target} does not end in .png")
    finding = ImageFinding(view, result)
    summary = summary or StudySummary.of([finding], [])
    if not cv2.imwrite(str(target), render_annotated(view, result, summary)):
        raise OSError(f"could not write {target}")
    return target


def _pixel_rectangle(box: Box) -> tuple[tuple[int, int], tuple[int, int]]:
    """Integer pixel centres of the outermost pixel ring covered by the box."""
    x0, y0 = int(np.floor(box.x0)), int(np.floor(box.y0))
    x1, y1 = max(x0, int(np.ceil(box.x1)) - 1), max(y0, int(np.ceil(box.y1)) - 1)
    return (x0, y0), (x1, y1)


def _draw_box(image: np.ndarray, box: Box, width: int, dashed: bool) -> None:
    """White outline with a black rim (visible on bright bone and dark background)."""
    (x0, y0), (x1, y1) = _pixel_rectangle(box)
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    edges = list(zip(corners, corners[1:] + corners[:1], strict=True))
    for colour, thickness in ((_BLACK, width + 2), (_WHITE, width)):
        for start, end in edges:
            pieces = (
                dashed_segments(start, end, 6.0 * width, 4.0 * width) if dashed else [(start, end)]
            )
            for a, b in pieces:
                cv2.line(
                    image,
                    (round(a[0]), round(a[1])),
                    (round(b[0]), round(b[1])),
                    colour,
                    thickness,
                    lineType=cv2.LINE_8,
                )


def _banner(lines: Sequence[str], height: int, columns: int) -> np.ndarray:
    """Black strip with white text lines, each sized to fit."""
    banner = np.zeros((height, columns), dtype=np.uint8)
    line_height = min(height / len(lines), max(32.0, height / 4))
    margin = max(2, round(0.02 * columns))
    for index, text in enumerate(lines):
        (base_w, base_h), _ = cv2.getTextSize(text, _FONT, 1.0, 1)
        scale = min(0.6 * line_height / base_h, (columns - 2 * margin) / base_w)
        thickness = max(1, round(scale * 1.5))
        baseline_y = round((index + 1) * line_height - 0.25 * line_height)
        cv2.putText(
            banner,
            text,
            (margin, baseline_y),
            _FONT,
            scale,
            _WHITE,
            thickness,
            lineType=cv2.LINE_AA,
        )
    return banner


def _orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two single-letter biped values."""
    values = [str(v) for v in header.get("PatientOrientation", None) or []]
    if len(values) == 2 and all(v in _BIPED for v in values):
        return values[0], values[1]
    return None


def build_secondary_capture(
    finding: ImageFinding,
    index: int,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    *,
    summary: StudySummary,
    version: int = 1,
    context: Mapping[str, str] | None = None,
) -> hd.sc.SCImage:
    """The burned-in Secondary Capture of the ``index``-th image of the study's result
    ``version``, in the source's study, its own series."""
    view = finding.view
    return _capture(
        view.source,
        view.header,
        render_annotated(view, finding.result, summary),
        instance_number(version, index),
        algorithm,
        node,
        context or {},
        orientation=_orientation(view.header),
        analysed=True,
        summary=summary,
    )


def build_not_analysed_capture(
    image: NotAnalysedImage,
    index: int,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    *,
    summary: StudySummary,
    version: int = 1,
    context: Mapping[str, str] | None = None,
) -> hd.sc.SCImage:
    """The Secondary Capture saying that an image got no decision, and why."""
    return _capture(
        image.source,
        image.header,
        render_not_analysed(image, summary),
        instance_number(version, index),
        algorithm,
        node,
        context or {},
        orientation=None
        if image.pixels is None or min(image.pixels.shape) < MIN_SHOWN
        else _orientation(image.header),
        analysed=False,
        summary=summary,
    )


def _capture(
    source: SourceIdentity,
    source_header: Dataset,
    pixels: np.ndarray,
    number: int,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    context: Mapping[str, str],
    *,
    orientation: tuple[str, str] | None,
    analysed: bool,
    summary: StudySummary,
) -> hd.sc.SCImage:
    header = result_header(source_header)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        # highdicom requires an orientation for PATIENT images; where the source has none the
        # placeholder is replaced by an empty (Type 2) value below.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **image_result_identity(
            ResultKind.SECONDARY_CAPTURE,
            source,
            header,
            number,
            algorithm,
            node,
            analysed=analysed,
            summary=summary,
        ),
    )
    if orientation is None:
        sc.PatientOrientation = []
    copy_context(header, sc)
    set_series_context(sc, context)
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    lossy = lossy_compression(header)
    if lossy:
        sc.LossyImageCompression = lossy
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in header:
                setattr(sc, keyword, header[keyword].value)
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (
        "AI fracture detection result burned into the source image"
        if analysed
        else "AI fracture detection: this image was not analysed (reason in the banner)"
    )
    return sc
