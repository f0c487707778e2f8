"""From the ensemble's outputs to a decision and boxes (the paper's post-processing step).

The ensemble gives one image-level score and, where its members have map heads, one averaged
fracture-probability map. :func:`decide` applies a calibration group's two operating points to
the score; :func:`extract_boxes` binarizes the map at the group's binarization threshold and
draws one box per connected component, as the paper does ("bounding boxes around the site of
high-probability regions within the probability map"); :func:`boxes_to_original` carries boxes
into the original image through a coordinate mapping supplied by the caller (the preprocess
step's ``Transform.box_to_original``). :func:`postprocess` chains the three.

All boxes follow :mod:`inference.records`' pixel-edge convention: a component covering columns
3, 4 and 5 gives ``x0 = 3``, ``x1 = 6``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from inference.records import Box, Decision, Thresholds

BoxMapping = Callable[[float, float, float, float], tuple[float, float, float, float]]
"""Maps a box ``(x0, y0, x1, y1)`` from map pixels to another pixel space."""

ContentRect = tuple[int, int, int, int]
"""The content (non-padding) rectangle ``(x0, y0, x1, y1)`` of a map, pixel-edge convention."""

DEFAULT_MIN_AREA_FRACTION = 1e-4
"""Smallest component kept, as a fraction of the content area: 0.01 %.

Relative so that it means the same on a stride-8 map (128 x 128 content: 2 pixels) as on a map
upsampled to the 1024 network input (105 pixels, about 10 x 10). It only removes speckle: the
smallest fracture box annotated in FracAtlas covers 0.04 % of its image (1st percentile 0.07 %),
four times this limit.
"""

FORCED_BOX_RELATIVE_LEVEL = 0.5
"""For a forced box: the component of ``map >= peak * 0.5`` holding the peak (half maximum)."""


def _check_probability(name: str, value: float) -> None:
    """ValueError unless ``value`` is a finite number in [0, 1]."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value} is not a probability in [0, 1]")


def decide(score: float, thresholds: Thresholds) -> Decision:
    """The image-level decision for an ensemble score under one group's operating points.

    ``score >= high_specificity``: FRACTURE; ``sensitivity <= score < high_specificity``:
    POSSIBLE_FRACTURE; below ``sensitivity``: NO_FRACTURE. A score on a threshold counts as
    above it, as in the paper ("on or above the threshold" is positive).
    """
    _check_probability("score", score)
    if score >= thresholds.high_specificity:
        return Decision.FRACTURE
    if score >= thresholds.sensitivity:
        return Decision.POSSIBLE_FRACTURE
    return Decision.NO_FRACTURE


def _check_map(prob_map: npt.NDArray[np.floating]) -> None:
    """ValueError unless ``prob_map`` is a non-empty 2-D float array of probabilities."""
    if not isinstance(prob_map, np.ndarray) or prob_map.ndim != 2 or prob_map.size == 0:
        shape = getattr(prob_map, "shape", type(prob_map).__name__)
        raise ValueError(f"probability map must be a non-empty 2-D array, got {shape}")
    if not np.issubdtype(prob_map.dtype, np.floating):
        raise ValueError(f"probability map must be floating point, got {prob_map.dtype}")
    if not np.isfinite(prob_map).all():
        raise ValueError("probability map holds NaN or infinite values")
    low, high = float(prob_map.min()), float(prob_map.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"probability map values span [{low}, {high}], outside [0, 1]")


def _check_valid(valid: ContentRect | None, shape: tuple[int, int]) -> ContentRect:
    """The content rectangle, defaulting to the whole map; ValueError if it does not fit."""
    height, width = shape
    if valid is None:
        return 0, 0, width, height
    if len(valid) != 4 or not all(isinstance(v, int | np.integer) for v in valid):
        raise ValueError(f"valid rectangle must be four integers (x0, y0, x1, y1), got {valid}")
    x0, y0, x1, y1 = (int(v) for v in valid)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"valid rectangle {valid} is empty or outside the {width}x{height} map")
    return x0, y0, x1, y1


def _components(
    mask: npt.NDArray[np.bool_],
) -> tuple[int, npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """8-connected components of a mask: count (background included), labels, stats."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    return int(count), np.asarray(labels, dtype=np.int32), np.asarray(stats, dtype=np.int32)


def _box(stats_row: npt.NDArray[np.int32], score: float, offset: tuple[int, int]) -> Box:
    """A box from one row of OpenCV component stats, shifted by ``offset`` = (dx, dy)."""
    left = int(stats_row[cv2.CC_STAT_LEFT]) + offset[0]
    top = int(stats_row[cv2.CC_STAT_TOP]) + offset[1]
    return Box(
        x0=float(left),
        y0=float(top),
        x1=float(left + int(stats_row[cv2.CC_STAT_WIDTH])),
        y1=float(top + int(stats_row[cv2.CC_STAT_HEIGHT])),
        score=score,
    )


def _forced_box(content: npt.NDArray[np.floating], offset: tuple[int, int]) -> Box:
    """One box around the highest-probability region of ``content``.

    The region is the 8-connected component of ``content >= peak * 0.5`` that holds the peak
    (the first one in row-major order if the peak is tied). On an all-zero map that component
    is the whole content: the map cannot say where, and the box says so.
    """
    peak_index = np.unravel_index(int(np.argmax(content)), content.shape)
    peak = float(content[peak_index])
    _, labels, stats = _components(content >= peak * FORCED_BOX_RELATIVE_LEVEL)
    return _box(stats[labels[peak_index]], peak, offset)


def extract_boxes(
    prob_map: npt.NDArray[np.floating],
    *,
    threshold: float,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    valid: ContentRect | None = None,
    force_one: bool = False,
    max_boxes: int | None = None,
) -> list[Box]:
    """Boxes around the connected regions of ``prob_map >= threshold``, highest peak first.

    ``prob_map`` is (H, W), float, in [0, 1]. Only the ``valid`` content rectangle
    ``(x0, y0, x1, y1)`` is looked at (default: the whole map); outside it is resize padding, so
    a component reaching into the padding is cut at the content edge. Each 8-connected
    component of the binarized content gives one box in map pixels, scored with the peak
    probability inside it; components smaller than ``min_area_fraction`` of the content area
    (at least one pixel) are dropped as speckle. Boxes come sorted by score, highest first (ties:
    top-to-bottom, left-to-right), and at most ``max_boxes`` of them when given.

    ``force_one`` is for images already called positive, which must show at least one box:
    when no component survives, the result is the single box of :func:`_forced_box` (the
    half-maximum region around the map's peak), whatever its size.
    """
    _check_map(prob_map)
    _check_probability("threshold", threshold)
    if not (math.isfinite(min_area_fraction) and 0.0 <= min_area_fraction < 1.0):
        raise ValueError(f"min_area_fraction={min_area_fraction} is not in [0, 1)")
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes={max_boxes} must be at least 1 (or None for no cap)")
    x0, y0, x1, y1 = _check_valid(valid, (prob_map.shape[0], prob_map.shape[1]))
    content = prob_map[y0:y1, x0:x1]
    offset = (x0, y0)

    count, labels, stats = _components(content >= threshold)
    min_area = max(1, math.ceil(min_area_fraction * content.size))
    kept = [label for label in range(1, count) if stats[label, cv2.CC_STAT_AREA] >= min_area]
    peaks = ndimage.maximum(content, labels=labels, index=kept) if kept else []
    boxes = [
        _box(stats[label], float(peak), offset) for label, peak in zip(kept, peaks, strict=True)
    ]
    boxes.sort(key=lambda box: (-box.score, box.y0, box.x0))
    if not boxes and force_one:
        boxes = [_forced_box(content, offset)]
    return boxes if max_boxes is None else boxes[:max_boxes]


def boxes_to_original(boxes: Sequence[Box], to_original: BoxMapping) -> list[Box]:
    """Carry boxes into another pixel space (usually the original image), keeping their scores.

    ``to_original`` maps ``(x0, y0, x1, y1)`` to ``(x0, y0, x1, y1)``; a result that is not
    finite or not ordered (``x1 < x0`` or ``y1 < y0``) means a wrong mapping and is a ValueError.
    """
    mapped: list[Box] = []
    for box in boxes:
        coords = tuple(float(v) for v in to_original(box.x0, box.y0, box.x1, box.y1))
        if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
            raise ValueError(f"box mapping returned {coords} for {box}, not four finite numbers")
        mx0, my0, mx1, my1 = coords
        if mx1 < mx0 or my1 < my0:
            raise ValueError(f"box mapping turned {box} into an inverted box {coords}")
        mapped.append(Box(x0=mx0, y0=my0, x1=mx1, y1=my1, score=box.score))
    return mapped


def postprocess(
    score: float,
    prob_map: npt.NDArray[np.floating] | None,
    thresholds: Thresholds,
    *,
    valid: ContentRect | None = None,
    box_to_original: BoxMapping | None = None,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    max_boxes: int | None = None,
) -> tuple[Decision, list[Box]]:
    """Decision and boxes for one image.

    Boxes are drawn only for a positive decision (FRACTURE or POSSIBLE_FRACTURE: the paper's
    positive is "on or above" the sensitivity threshold, and a flagged image should show where
    to look), with ``force_one`` so that every positive has at least one box; a NO_FRACTURE
    image gets none, whatever its map shows. Without a map (an ensemble whose members have no
    map head) there are no boxes. Boxes are in map pixels unless ``box_to_original`` is given;
    the map must then be on the pixel grid that function expects (e.g. the network input).
    """
    decision = decide(score, thresholds)
    if decision is Decision.NO_FRACTURE or prob_map is None:
        return decision, []
    boxes = extract_boxes(
        prob_map,
        threshold=thresholds.binarize,
        min_area_fraction=min_area_fraction,
        valid=valid,
        force_one=True,
        max_boxes=max_boxes,
    )
    if box_to_original is not None:
        boxes = boxes_to_original(boxes, box_to_original)
    return decision, boxes
