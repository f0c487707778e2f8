"""Grayscale Softcopy Presentation State per image: boxes as graphic annotations, not burned in.

Each box is a closed POLYLINE in PIXEL units on the source image, labelled with its kind and
score; text annotations in DISPLAY units state the study's conclusion, this image's decision and
score, and the disclaimer. The presentation state carries its source's patient and study
context like every result object.
The source's Modality LUT and VOI are carried over by highdicom; MONOCHROME1 sources get an
INVERSE presentation LUT so that the presentation looks like the image itself (bone bright).
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    TextObject,
)

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
