"""Tests for inference.calibration (operating points and map binarization threshold)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from inference.calibration import (
    GLOBAL_GROUP,
    binarization_threshold,
    box_agreement,
    calibrate_groups,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from inference.records import Thresholds


def _sensitivity(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    return float(np.mean(scores[labels == 1] >= t))


def _specificity(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    return float(np.mean(scores[labels == 0] < t))


def test_sensitivity_threshold_hand_example() -> None:
    # positives 0.9, 0.8, 0.6, 0.3: 3 of 4 (75 %) at >= 0.6, all 4 only at >= 0.3.
    labels = [1, 1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.1]
    assert threshold_for_sensitivity(labels, scores, 0.75) == 0.6
    assert threshold_for_sensitivity(labels, scores, 0.76) == 0.3
    assert threshold_for_sensitivity(labels, scores) == 0.3  # 92.5 % needs all four


def test_sensitivity_threshold_ties_move_together() -> None:
    # Three positives tie at 0.5: asking for 50 % gives 100 % (nothing between 25 % and 100 %).
    labels = [1, 1, 1, 1, 0]
    scores = [0.5, 0.5, 0.5, 0.9, 0.5]
    assert threshold_for_sensitivity(labels, scores, 0.5) == 0.5


def test_specificity_threshold_hand_example() -> None:
    # negatives 0.1, 0.2, 0.4, 0.7. 75 % specificity needs t > 0.4: the lowest observed score
    # above 0.4 is 0.5 (a positive's). 100 % needs t > 0.7: the lowest observed one is 0.8.
    labels = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.4, 0.7, 0.5, 0.8, 0.9]
    assert threshold_for_specificity(labels, scores, 0.75) == 0.5
    assert threshold_for_specificity(labels, scores, 1.0) == 0.8
    # The highest score is a negative's: 100 % needs a threshold just above it.
    top = threshold_for_specificity([0, 1], [0.9, 0.2], 1.0)
    assert top == np.nextafter(0.9, 1.0)


@pytest.mark.parametrize(
    ("func", "labels", "message"),
    [
        (threshold_for_sensitivity, [0, 0], "positive"),
        (threshold_for_specificity, [1, 1], "negative"),
    ],
)
def test_threshold_needs_its_class(func: object, labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        func(labels, [0.2, 0.4])  # type: ignore[operator]


def test_target_out_of_range() -> None:
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity([0, 1], [0.1, 0.2], 0.0)
    with pytest.raises(ValueError, match="target"):
        threshold_for_specificity([0, 1], [0.1, 0.2], 1.5)


# Scores from a coarse grid so that ties are common.
_samples = st.lists(
    st.tuples(st.integers(0, 1), st.integers(0, 20).map(lambda k: k / 20)), min_size=1, max_size=60
)
_targets = st.floats(0.01, 1.0)


@settings(max_examples=300, deadline=None)
@given(_samples, _targets)
def test_sensitivity_threshold_property(samples: list, target: float) -> None:
    labels = np.array([label for label, _ in samples])
    scores = np.array([score for _, score in samples])
    assume(labels.any())
    t = threshold_for_sensitivity(labels, scores, target)
    assert t in scores
    assert _sensitivity(labels, scores, t) >= target
    higher = scores[scores > t]
    if higher.size:
        assert _sensitivity(labels, scores, higher.min()) < target


@settings(max_examples=300, deadline=None)
@given(_samples, _targets)
def test_specificity_threshold_property(samples: list, target: float) -> None:
    labels = np.array([label for label, _ in samples])
    scores = np.array([score for _, score in samples])
    assume(not labels.all())
    t = threshold_for_specificity(labels, scores, target)
    assert t in scores or t == np.nextafter(scores.max(), np.inf)
    assert _specificity(labels, scores, t) >= target
    lower = scores[scores < t]
    if lower.size:
        assert _specificity(labels, scores, lower.max()) < target


# --------------------------------------------------------------------------- groups


def _grouped_data() -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """300 hand and 200 leg images (40 of them both), 40 hip images with only 3 fractures."""
    rng = np.random.default_rng(11)
    groups: list[list[str]] = [["hand"]] * 260 + [["hand", "leg"]] * 40 + [["leg"]] * 160
    groups += [["hip"]] * 40
    labels = np.r_[rng.random(460) < 0.3, np.arange(40) < 3].astype(int)
    scores = np.clip(rng.normal(0.3 + 0.35 * labels, 0.15), 0, 1)
    return groups, labels, scores


def test_calibrate_groups_per_group_and_pooled() -> None:
    groups, labels, scores = _grouped_data()
    cal = calibrate_groups(groups, labels, scores)
    assert list(cal) == [GLOBAL_GROUP, "hand", "hip", "leg"]

    pooled = cal[GLOBAL_GROUP]
    assert pooled.calibrated and pooled.reason is None
    assert (pooled.n, pooled.n_positive) == (500, int(labels.sum()))
    assert pooled.sensitivity_threshold == threshold_for_sensitivity(labels, scores, 0.925)
    assert pooled.high_specificity_threshold == threshold_for_specificity(labels, scores, 0.90)

    hand = np.array(["hand" in g for g in groups])
    assert cal["hand"].n == 300  # the 40 hand+leg images count in both groups
    assert cal["leg"].n == 200
    assert cal["hand"].calibrated
    assert cal["hand"].sensitivity_threshold == threshold_for_sensitivity(
        labels[hand], scores[hand], 0.925
    )
    assert _sensitivity(labels[hand], scores[hand], cal["hand"].sensitivity_threshold) >= 0.925
    assert _specificity(labels[hand], scores[hand], cal["hand"].high_specificity_threshold) >= 0.9


def test_group_with_few_positives_falls_back_flagged() -> None:
    groups, labels, scores = _grouped_data()
    cal = calibrate_groups(groups, labels, scores)
    hip = cal["hip"]
    assert not hip.calibrated
    assert hip.reason is not None and "3 positives < min_positives=10" in hip.reason
    assert (hip.n, hip.n_positive) == (40, 3)
    assert hip.sensitivity_threshold == cal[GLOBAL_GROUP].sensitivity_threshold
    assert hip.high_specificity_threshold == cal[GLOBAL_GROUP].high_specificity_threshold
    # With a lower minimum the hip is calibrated on its own images.
    assert calibrate_groups(groups, labels, scores, min_positives=3)["hip"].calibrated


def test_pooled_entry_flagged_when_below_minimums() -> None:
    cal = calibrate_groups(["a"] * 6, [1, 1, 0, 0, 0, 0], [0.9, 0.6, 0.5, 0.4, 0.2, 0.1])
    assert not cal[GLOBAL_GROUP].calibrated
    assert "2 positives" in (cal[GLOBAL_GROUP].reason or "")
    assert cal["a"].sensitivity_threshold == 0.6  # the pooled thresholds are still computed


def test_high_specificity_threshold_clamped_to_sensitivity_threshold() -> None:
    # Perfectly separated classes: 90 % specificity is reached below the 92.5 % sensitivity
    # threshold, so the high-specificity threshold is raised to it.
    labels = np.r_[np.ones(20), np.zeros(20)].astype(int)
    scores = np.r_[np.linspace(0.6, 0.9, 20), np.linspace(0.05, 0.3, 20)]
    sens = threshold_for_sensitivity(labels, scores)
    assert threshold_for_specificity(labels, scores) < sens
    entry = calibrate_groups([["x"]] * 40, labels, scores)["x"]
    assert entry.high_specificity_threshold == entry.sensitivity_threshold == sens
    assert entry.thresholds(0.5) == Thresholds(sens, sens, 0.5, calibrated=True)


def test_global_tag_joins_no_specific_group() -> None:
    # An image tagged "global" (a region without calibration group) is only pooled.
    cal = calibrate_groups([["global"], ["a", "global"], ["a"]], [0, 1, 0], [0.2, 0.8, 0.3])
    assert set(cal) == {GLOBAL_GROUP, "a"}
    assert (cal[GLOBAL_GROUP].n, cal["a"].n) == (3, 2)


def test_string_entry_is_one_group() -> None:
    cal = calibrate_groups(
        ["hand;leg", "hand;leg"], [0, 1], [0.2, 0.8], min_positives=1, min_negatives=1
    )
    assert set(cal) == {GLOBAL_GROUP, "hand;leg"}


@pytest.mark.parametrize(
    ("groups", "labels", "message"),
    [
        ([["a"]], [0, 1], "one entry per image"),
        ([["a"], [""]], [0, 1], "non-empty"),
        ([["a"], ["a"]], [1, 1], "one positive and one negative"),
    ],
)
def test_calibrate_groups_bad_input(groups: list, labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate_groups(groups, labels, [0.2, 0.8])


# --------------------------------------------------------------------------- binarization


def _components(prob_map: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
    """Boxes around the 8-connected components of ``prob_map >= threshold``."""
    mask = (prob_map >= threshold).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [(x, y, x + w, y + h) for x, y, w, h, _ in stats[1:n]]


def _synthetic_map(offset: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A fracture blob (0.62) inside a faint halo (0.32) plus a spurious blob (0.47).

    Binarized at t <= 0.30 the halo merges into a 30x30 box (IoU 100/900 with the fracture:
    a miss) and the spurious blob is a false positive; at 0.30 < t <= 0.45 the fracture is found
    but the spurious blob remains (F1 2/3); at 0.45 < t <= 0.62 only the fracture is boxed
    (F1 1); above 0.62 nothing is. The best default candidate is therefore 0.50.
    """
    m = np.zeros((64, 64))
    o = offset
    m[10 + o : 40 + o, 10:40] = 0.32
    m[20 + o : 30 + o, 20:30] = 0.62
    m[50:56, 50:56] = 0.47
    return m, [(20, 20 + o, 30, 30 + o)]


def test_binarization_threshold_finds_known_best() -> None:
    data = [_synthetic_map(o) for o in (0, 3, 7)]
    maps, gt = [m for m, _ in data], [g for _, g in data]
    assert binarization_threshold(maps, gt, extract=_components) == pytest.approx(0.5)
    # Candidates in any order; ties still go to the lowest.
    assert binarization_threshold(
        maps, gt, extract=_components, candidates=[0.6, 0.2, 0.55]
    ) == pytest.approx(0.55)
    middle = box_agreement(maps, gt, 0.4, extract=_components)
    assert (middle.recall, middle.precision) == (1.0, 0.5)
    assert middle.f1 == pytest.approx(2 / 3)
    assert box_agreement(maps, gt, 0.2, extract=_components).f1 == 0.0


def test_binarization_threshold_bad_input() -> None:
    m, g = _synthetic_map(0)
    with pytest.raises(ValueError, match="same images"):
        binarization_threshold([m, m], [g], extract=_components)
    with pytest.raises(ValueError, match="ground-truth box"):
        binarization_threshold([m], [[]], extract=_components)
    with pytest.raises(ValueError, match="candidates"):
        binarization_threshold([m], [g], extract=_components, candidates=[])
