"""Tests for inference.postprocess: decisions at the operating points and boxes from maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from inference.postprocess import (
    DEFAULT_MIN_AREA_FRACTION,
    boxes_to_original,
    decide,
    extract_boxes,
    postprocess,
)
from inference.records import Box, Decision, Thresholds

THRESHOLDS = Thresholds(sensitivity=0.3, high_specificity=0.7, binarize=0.5)
RANK = {Decision.NO_FRACTURE: 0, Decision.POSSIBLE_FRACTURE: 1, Decision.FRACTURE: 2}


def below(value: float) -> float:
    """The largest float smaller than ``value``."""
    return math.nextafter(value, -math.inf)


def two_blob_map() -> np.ndarray:
    """A 20 x 30 map with blob A (rows 2-4, cols 3-5, peak 0.9) and B (rows 10-13, cols 20-24)."""
    prob = np.full((20, 30), 0.05, dtype=np.float64)
    prob[2:5, 3:6] = 0.6
    prob[3, 4] = 0.9
    prob[10:14, 20:25] = 0.55
    prob[12, 22] = 0.7
    return prob


# --- decide ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (0.0, Decision.NO_FRACTURE),
        (below(0.3), Decision.NO_FRACTURE),
        (0.3, Decision.POSSIBLE_FRACTURE),
        (below(0.7), Decision.POSSIBLE_FRACTURE),
        (0.7, Decision.FRACTURE),
        (1.0, Decision.FRACTURE),
    ],
)
def test_decision_at_and_around_each_threshold(score: float, expected: Decision) -> None:
    assert decide(score, THRESHOLDS) is expected


def test_equal_operating_points_leave_no_possible_band() -> None:
    same = Thresholds(sensitivity=0.4, high_specificity=0.4, binarize=0.5)
    assert decide(0.4, same) is Decision.FRACTURE
    assert decide(below(0.4), same) is Decision.NO_FRACTURE


@pytest.mark.parametrize("score", [math.nan, -0.01, 1.01, math.inf])
def test_decide_refuses_non_probabilities(score: float) -> None:
    with pytest.raises(ValueError, match="score"):
        decide(score, THRESHOLDS)


_unit = st.floats(min_value=0.0, max_value=1.0)


@given(a=_unit, b=_unit, s1=_unit, s2=_unit)
def test_decision_is_monotone_in_the_score(a: float, b: float, s1: float, s2: float) -> None:
    thresholds = Thresholds(sensitivity=min(a, b), high_specificity=max(a, b), binarize=0.5)
    low, high = sorted((s1, s2))
    assert RANK[decide(low, thresholds)] <= RANK[decide(high, thresholds)]
    assert (decide(s1, thresholds) is not Decision.NO_FRACTURE) == (s1 >= thresholds.sensitivity)
    assert (decide(s1, thresholds) is Decision.FRACTURE) == (s1 >= thresholds.high_specificity)


# --- extract_boxes --------------------------------------------------------------------------


def test_two_blobs_give_two_exact_boxes_highest_peak_first() -> None:
    boxes = extract_boxes(two_blob_map(), threshold=0.5)
    assert boxes == [
        Box(x0=3.0, y0=2.0, x1=6.0, y1=5.0, score=0.9),
        Box(x0=20.0, y0=10.0, x1=25.0, y1=14.0, score=0.7),
    ]


def test_threshold_is_inclusive_and_components_are_8_connected() -> None:
    prob = np.zeros((6, 6))
    prob[1, 1] = 0.5
    prob[2, 2] = 0.5  # touches (1, 1) only diagonally
    assert extract_boxes(prob, threshold=0.5, min_area_fraction=0.0) == [
        Box(x0=1.0, y0=1.0, x1=3.0, y1=3.0, score=0.5)
    ]
    assert extract_boxes(prob, threshold=math.nextafter(0.5, 1.0)) == []


def test_max_boxes_keeps_the_highest_peaks() -> None:
    prob = two_blob_map()
    prob[15:17, 5:8] = 0.8
    boxes = extract_boxes(prob, threshold=0.5, max_boxes=2)
    assert [box.score for box in boxes] == pytest.approx([0.9, 0.8])
    assert len(extract_boxes(prob, threshold=0.5)) == 3


def test_padding_outside_the_valid_rectangle_is_ignored() -> None:
    prob = np.zeros((20, 30), dtype=np.float64)
    prob[5:9, 12:18] = 0.6  # straddles the content edge at x = 15
    prob[6, 16] = 0.95  # its peak lies in the padding
    prob[2:4, 20:25] = 0.9  # entirely in the padding
    boxes = extract_boxes(prob, threshold=0.5, valid=(0, 0, 15, 20))
    assert boxes == [Box(x0=12.0, y0=5.0, x1=15.0, y1=9.0, score=0.6)]


def test_boxes_are_in_map_pixels_when_the_content_is_offset() -> None:
    prob = two_blob_map()
    boxes = extract_boxes(prob, threshold=0.5, valid=(2, 1, 30, 20))
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(3, 2, 6, 5), (20, 10, 25, 14)]


def test_components_below_the_minimum_area_are_dropped() -> None:
    prob = np.zeros((100, 100))
    prob[10:13, 10:13] = 0.8  # 9 pixels
    prob[50:53, 50:54] = 0.6  # 12 pixels
    boxes = extract_boxes(prob, threshold=0.5, min_area_fraction=1e-3)  # at least 10 pixels
    assert boxes == [Box(x0=50.0, y0=50.0, x1=54.0, y1=53.0, score=0.6)]
    assert len(extract_boxes(prob, threshold=0.5, min_area_fraction=0.0)) == 2


def test_default_minimum_area_is_relative_to_the_content() -> None:
    prob = np.zeros((200, 200))
    prob[20, 20] = 0.9  # one pixel: 0.0025 % of the map, below the 0.01 % default
    prob[100:102, 100:102] = 0.7  # four pixels: 0.01 %
    assert pytest.approx(1e-4) == DEFAULT_MIN_AREA_FRACTION
    boxes = extract_boxes(prob, threshold=0.5)
    assert boxes == [Box(x0=100.0, y0=100.0, x1=102.0, y1=102.0, score=0.7)]
    # On a 50 x 50 content rectangle the same single pixel is 0.04 % and is kept.
    assert len(extract_boxes(prob, threshold=0.5, valid=(0, 0, 50, 50))) == 1


def test_force_one_boxes_the_half_maximum_region_around_the_peak() -> None:
    prob = np.full((30, 40), 0.05)
    prob[10:15, 20:25] = 0.2  # above half the peak (0.15) ...
    prob[12, 22] = 0.3  # ... around the peak, all under the 0.5 threshold
    prob[25:28, 2:5] = 0.2  # above half the peak too, but not connected to it
    assert extract_boxes(prob, threshold=0.5) == []
    boxes = extract_boxes(prob, threshold=0.5, force_one=True)
    assert boxes == [Box(x0=20.0, y0=10.0, x1=25.0, y1=15.0, score=0.3)]
    row, col = np.unravel_index(np.argmax(prob), prob.shape)
    assert boxes[0].x0 <= col < boxes[0].x1 and boxes[0].y0 <= row < boxes[0].y1


def test_force_one_replaces_components_that_were_all_too_small() -> None:
    prob = np.full((100, 100), 0.1)
    prob[40:44, 60:66] = 0.4
    prob[42, 63] = 0.6  # the only pixel above threshold: too small for 1e-3 (10 pixels)
    assert extract_boxes(prob, threshold=0.5, min_area_fraction=1e-3) == []
    forced = extract_boxes(prob, threshold=0.5, min_area_fraction=1e-3, force_one=True)
    assert forced == [Box(x0=60.0, y0=40.0, x1=66.0, y1=44.0, score=0.6)]


def test_force_one_on_a_flat_zero_map_boxes_the_whole_content() -> None:
    boxes = extract_boxes(np.zeros((12, 16)), threshold=0.5, valid=(2, 1, 14, 11), force_one=True)
    assert boxes == [Box(x0=2.0, y0=1.0, x1=14.0, y1=11.0, score=0.0)]


def test_force_one_does_not_add_a_box_when_components_exist() -> None:
    assert extract_boxes(two_blob_map(), threshold=0.5, force_one=True) == extract_boxes(
        two_blob_map(), threshold=0.5
    )


@given(
    prob=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=14),
        elements=st.sampled_from([0.0, 0.2, 0.5, 0.6, 1.0]),
    ),
    threshold=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_boxes_match_scipy_labelling(prob: np.ndarray, threshold: float) -> None:
    labels, count = ndimage.label(prob >= threshold, structure=np.ones((3, 3)))
    expected = {
        (
            float(sl[1].start),
            float(sl[0].start),
            float(sl[1].stop),
            float(sl[0].stop),
            float(prob[labels == index].max()),
        )
        for index, sl in enumerate(ndimage.find_objects(labels), start=1)
    }
    boxes = extract_boxes(prob, threshold=threshold, min_area_fraction=0.0)
    assert len(boxes) == count
    assert {(b.x0, b.y0, b.x1, b.y1, b.score) for b in boxes} == expected
    assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)


@pytest.mark.parametrize(
    ("prob", "message"),
    [
        (np.zeros((2, 3, 4)), "2-D"),
        (np.zeros((0, 5)), "2-D"),
        (np.zeros((4, 4), dtype=np.uint8), "floating"),
        (np.array([[0.1, math.nan]]), "NaN"),
        (np.array([[0.1, 1.5]]), "outside"),
        (np.array([[-0.1, 0.5]]), "outside"),
    ],
)
def test_extract_boxes_refuses_bad_maps(prob: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extract_boxes(prob, threshold=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.5, "valid": (5, 0, 5, 10)}, "valid rectangle"),
        ({"threshold": 0.5, "valid": (0, 0, 11, 10)}, "valid rectangle"),
        ({"threshold": 0.5, "valid": (0.0, 0, 5, 5)}, "four integers"),
        ({"threshold": 0.5, "min_area_fraction": 1.0}, "min_area_fraction"),
        ({"threshold": 0.5, "max_boxes": 0}, "max_boxes"),
    ],
)
def test_extract_boxes_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extract_boxes(np.zeros((10, 10)), **kwargs)


# --- mapping and the whole step -------------------------------------------------------------


def scale_then_shift(
    x0: float, y0: float, x1: float, y1: float
) -> tuple[float, float, float, float]:
    """A canvas-to-original mapping: undo a 0.5 resize, then a (10, 20) crop offset."""
    return x0 * 2 + 10, y0 * 2 + 20, x1 * 2 + 10, y1 * 2 + 20


def test_boxes_to_original_applies_the_mapping_and_keeps_scores() -> None:
    boxes = [Box(3.0, 2.0, 6.0, 5.0, 0.9), Box(20.0, 10.0, 25.0, 14.0, 0.7)]
    assert boxes_to_original(boxes, scale_then_shift) == [
        Box(16.0, 24.0, 22.0, 30.0, 0.9),
        Box(50.0, 40.0, 60.0, 48.0, 0.7),
    ]
    assert boxes_to_original([], scale_then_shift) == []


def test_boxes_to_original_refuses_an_inverting_mapping() -> None:
    with pytest.raises(ValueError, match="inverted"):
        boxes_to_original([Box(1.0, 1.0, 2.0, 2.0, 0.5)], lambda x0, y0, x1, y1: (x1, y0, x0, y1))
    with pytest.raises(ValueError, match="finite"):
        boxes_to_original(
            [Box(1.0, 1.0, 2.0, 2.0, 0.5)], lambda x0, y0, x1, y1: (x0, y0, math.inf, y1)
        )


def test_negative_images_get_no_boxes_whatever_the_map() -> None:
    assert postprocess(below(0.3), two_blob_map(), THRESHOLDS) == (Decision.NO_FRACTURE, [])


def test_positive_images_get_boxes_mapped_to_the_original() -> None:
    decision, boxes = postprocess(0.8, two_blob_map(), THRESHOLDS, box_to_original=scale_then_shift)
    assert decision is Decision.FRACTURE
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(16, 24, 22, 30), (50, 40, 60, 48)]


def test_possible_fracture_is_forced_to_show_a_box() -> None:
    prob = np.full((20, 20), 0.05)
    prob[4:7, 8:10] = 0.3  # nothing reaches the 0.5 binarization threshold
    decision, boxes = postprocess(0.3, prob, THRESHOLDS, valid=(0, 0, 20, 20))
    assert decision is Decision.POSSIBLE_FRACTURE
    assert boxes == [Box(x0=8.0, y0=4.0, x1=10.0, y1=7.0, score=0.3)]


def test_without_a_map_there_are_no_boxes() -> None:
    assert postprocess(0.9, None, THRESHOLDS) == (Decision.FRACTURE, [])


def test_postprocess_uses_the_binarization_threshold_of_the_group() -> None:
    strict = Thresholds(sensitivity=0.3, high_specificity=0.7, binarize=0.8)
    _, boxes = postprocess(0.9, two_blob_map(), strict)
    assert boxes == [Box(x0=4.0, y0=3.0, x1=5.0, y1=4.0, score=0.9)]
