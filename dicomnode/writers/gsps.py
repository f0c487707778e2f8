"""Grayscale Softcopy Presentation State per image: boxes as graphic annotations, not burned in.

Each box is a closed POLYLINE in PIXEL units on the source image, labelled with its kind and
score; text annotations in DISPLAY units state the study's conclusion, this image's decision and
score, and the disclaimer. The presentation state carries its source's patient and study
context like every result object.
The source's Modality LUT and VOI are carried over by highdicom; MONOCHROME1 sources get an
INVERSE presentation LUT so that the presentation looks like the image itself (bone bright).
A VOI the presentation state cannot carry (a VOI LUT whose descriptor does not match its data,
an empty VOI LUT Sequence, window centres and widths that do not pair up or are not finite, a
width below 1) is left out, and so is a rescale without both a finite slope and intercept
(:func:`presentation_source`); a VOI LUT Sequence wins over a window,
as it does when the node decodes the image; LUT Data encoded as US values becomes OW bytes, and
a LUT of 10-15 bits per entry is scaled to 16 (a presentation state's VOI LUT has 8 or 16: the
entries kept as they were would display at a sixteenth of the brightness).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    TextObject,
)
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.uids import ResultKind, tracking_uid
from dicomnode.writers.common import (
    DECISION_TEXT,
    ImageFinding,
    NodeIdentity,
    StudySummary,
    banner_lines,
    box_polyline,
    copy_context,
    image_result_identity,
    instance_number,
    result_header,
    set_series_context,
)
from inference.records import AlgorithmInfo

LAYER = "AI_FRACTURE"
CONTENT_LABEL = "AI_FRACTURE"


def build_presentation_state(
    finding: ImageFinding,
    index: int,
    algorithm: AlgorithmInfo,
    node: NodeIdentity,
    *,
    summary: StudySummary,
    version: int = 1,
    context: Mapping[str, str] | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS of the ``index``-th image of the study's result ``version``: its boxes and
    text annotations."""
    view, result = finding.view, finding.result
    header = result_header(view.header)
    layer = GraphicLayer(layer_name=LAYER, order=1, description="AI fracture detection")
    label = DECISION_TEXT[result.decision].lower()
    graphics = [
        GraphicObject(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(box, view),
            units=AnnotationUnitsValues.PIXEL,
            tracking_id=f"fracture region {index}",
            tracking_uid=tracking_uid(view.source, algorithm.version, index, node.uid_prefix),
        )
        for index, box in enumerate(result.boxes, start=1)
    ]
    texts = [
        *(
            TextObject(
                text_value=line,
                units=AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.01, 0.01 + 0.05 * row, 0.99, 0.055 + 0.05 * row),
            )
            for row, line in enumerate(banner_lines(result, summary))
        ),
        *(
            TextObject(
                text_value=f"{label} {box.score:.2f}",
                units=AnnotationUnitsValues.PIXEL,
                anchor_point=(box.x0, box.y0),
                anchor_point_visible=False,
            )
            for box in result.boxes
        ),
    ]
    header = presentation_source(header)
    annotation = GraphicAnnotation(
        referenced_images=[header],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )
    inverse = str(view.header.PhotometricInterpretation).strip() == "MONOCHROME1"
    shape = PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        content_label=CONTENT_LABEL,
        content_description="AI fracture detection, for review by a physician",
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        presentation_lut_transformation=PresentationLUTTransformation(presentation_lut_shape=shape),
        **image_result_identity(
            ResultKind.PRESENTATION_STATE,
            view.source,
            header,
            instance_number(version, index),
            algorithm,
            node,
            summary=summary,
        ),
    )
    copy_context(header, gsps)
    set_series_context(gsps, context or {})
    return gsps


_VOI = ("VOILUTSequence", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
        "VOILUTFunction")
_RESCALE = ("RescaleSlope", "RescaleIntercept", "RescaleType")
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def presentation_source(header: Dataset) -> Dataset:
    """``header`` with only a Modality LUT and VOI the presentation state can carry (highdicom
    copies them): the rescale if slope and intercept are both there and finite; the VOI LUT
    Sequence if every item is usable, else the window if it is, else none."""
    luts = _voi_luts(header)
    window = None if luts else _window(header)
    rescale = _rescale(header)
    source = Dataset()
    if hasattr(header, "file_meta"):
        source.file_meta = header.file_meta
    for tag in list(header.keys()):
        if keyword_for_tag(tag) not in (*_VOI, *_RESCALE):
            source[tag] = header[tag]
    if rescale:
        for keyword in _RESCALE:
            # an empty Rescale Type (Type 1C in the presentation state's Modality LUT) is left
            # out: highdicom then writes its default, US (fuzz case 20261204:3817)
            if keyword not in header:
                continue
            if keyword != "RescaleType" or str(header[keyword].value or "").strip():
                source[keyword] = header[keyword]
    if luts:
        source.VOILUTSequence = luts
    elif window is not None:
        source.WindowCenter, source.WindowWidth = window
        function = str(header.get("VOILUTFunction", "") or "")
        if function in _VOI_FUNCTIONS:
            source.VOILUTFunction = function
    return source


def _rescale(header: Dataset) -> bool:
    """Whether Rescale Slope and Intercept are both there, single and finite."""
    try:
        values = [float(header[k].value) for k in _RESCALE[:2]]
    except (KeyError, TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in values)


def _voi_luts(header: Dataset) -> list[Dataset] | None:
    """The VOI LUT items as highdicom reads them (LUT Data as bytes), None if there are none or
    one is unusable (LUT Descriptor not three numbers, bits outside 8-16, data not matching the
    number of entries)."""
    items = header.get("VOILUTSequence") or []
    luts = [_voi_lut(item) for item in items]
    if not luts or any(lut is None for lut in luts):
        return None
    return [lut for lut in luts if lut is not None]


def _voi_lut(item: Dataset) -> Dataset | None:
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except (AttributeError, TypeError, ValueError):
        return None
    entries = entries or 65536
    dtype = np.uint8 if bits == 8 else np.uint16
    if not 8 <= bits <= 16:
        return None
    if isinstance(data, bytes):
        values = np.frombuffer(data[: len(data) - len(data) % np.dtype(dtype).itemsize], dtype)
    else:
        values = np.asarray(data if isinstance(data, list | MultiValue) else [data])
    if values.size != entries or values.min() < 0 or values.max() >= 1 << bits:
        return None
    if bits not in (8, 16):  # a presentation state's VOI LUT has 8 or 16 bits (PS3.3 C.11.8)
        values = np.rint(values.astype(np.float64) * 65535.0 / ((1 << bits) - 1))
        bits, dtype = 16, np.uint16
    values = values.astype(dtype)
    lut = Dataset()
    lut.LUTDescriptor = [entries % 65536, first, bits]
    lut["LUTDescriptor"].VR = "SS" if first < 0 else "US"
    lut.LUTData = values.astype(f"<{np.dtype(dtype).str[1:]}").tobytes()
    lut["LUTData"].VR = "OW"
    if item.get("LUTExplanation"):
        lut.LUTExplanation = item.LUTExplanation
    return lut


def _window(header: Dataset) -> tuple[list[float], list[float]] | None:
    """Window centres and widths that pair up, are finite and have widths of at least 1."""
    try:
        centers = [float(v) for v in _values(header.get("WindowCenter"))]
        widths = [float(v) for v in _values(header.get("WindowWidth"))]
    except (TypeError, ValueError):
        return None
    usable = all(math.isfinite(v) for v in (*centers, *widths)) and all(w >= 1 for w in widths)
    if not centers or len(centers) != len(widths) or not usable:
        return None
    return centers, widths


def _values(value: object) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]
