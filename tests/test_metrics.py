"""Tests for inference.metrics (image- and box-level statistics) and inference.report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from inference.metrics import (
    BinaryMetrics,
    Interval,
    binary_metrics,
    box_iou,
    localization_metrics,
    pairwise_iou,
    roc_points,
    wilson_interval,
)
from inference.records import Box
from inference.report import EvaluationResult, write_report

# A 10-image example worked out by hand.
#   positives: 0.9, 0.8, 0.6, 0.3       negatives: 0.7, 0.5, 0.4, 0.2, 0.1, 0.05
# At threshold 0.5 (positive when score >= 0.5):
#   TP = 3 (0.9, 0.8, 0.6)  FN = 1 (0.3)  FP = 2 (0.7, 0.5: ties count as positive)  TN = 4
#   sensitivity = 3/4, specificity = 4/6, PPV = 3/(3+2), NPV = 4/(4+1)
# AUC = share of (positive, negative) pairs ranked correctly, out of 4 * 6 = 24:
#   0.9 beats 6, 0.8 beats 6, 0.6 beats 5 (not 0.7), 0.3 beats 3 (0.2, 0.1, 0.05) -> 20/24
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])


@pytest.fixture(scope="module")
def example() -> BinaryMetrics:
    return binary_metrics(LABELS, SCORES, 0.5, n_bootstrap=300, seed=1)


def test_hand_worked_point_estimates(example: BinaryMetrics) -> None:
    assert (example.tp, example.fn, example.fp, example.tn) == (3, 1, 2, 4)
    assert (example.n, example.n_positive) == (10, 4)
    assert example.sensitivity == pytest.approx(3 / 4)
    assert example.specificity == pytest.approx(4 / 6)
    assert example.ppv == pytest.approx(3 / 5)
    assert example.npv == pytest.approx(4 / 5)
    assert example.auc == pytest.approx(20 / 24)
    assert example.threshold == 0.5


def test_wilson_textbook_value() -> None:
    # 8 successes out of 10: Wilson 95 % interval [0.490, 0.943] (e.g. Newcombe 1998, table I).
    ci = wilson_interval(8, 10)
    assert ci.low == pytest.approx(0.490, abs=5e-4)
    assert ci.high == pytest.approx(0.943, abs=5e-4)


def test_sensitivity_interval_is_wilson() -> None:
    # 10 positives, 8 of them at or above 0.5; 10 negatives all below.
    labels = np.r_[np.ones(10), np.zeros(10)]
    scores = np.r_[np.full(8, 0.9), np.full(2, 0.1), np.full(10, 0.2)]
    m = binary_metrics(labels, scores, 0.5, n_bootstrap=50)
    assert m.sensitivity == pytest.approx(0.8)
    assert m.sensitivity_ci.low == pytest.approx(0.490, abs=5e-4)
    assert m.sensitivity_ci.high == pytest.approx(0.943, abs=5e-4)
    # 10 / 10 specificity: the Wilson interval reaches 1 but not 0.
    assert m.specificity == 1.0
    assert m.specificity_ci.high == pytest.approx(1.0)
    assert 0.6 < m.specificity_ci.low < 0.8


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    return labels.astype(int), scores


def test_bootstrap_intervals_contain_estimate_and_narrow_with_n() -> None:
    small = binary_metrics(*_synthetic(60, 3), 0.5, n_bootstrap=300, seed=0)
    large = binary_metrics(*_synthetic(1500, 3), 0.5, n_bootstrap=300, seed=0)
    for m in (small, large):
        for name in ("auc", "ppv", "npv", "sensitivity", "specificity"):
            assert getattr(m, f"{name}_ci").contains(getattr(m, name)), name
    for name in ("auc", "ppv", "npv"):
        width_small = getattr(small, f"{name}_ci").high - getattr(small, f"{name}_ci").low
        width_large = getattr(large, f"{name}_ci").high - getattr(large, f"{name}_ci").low
        assert width_large < width_small / 2, name


def test_bootstrap_is_reproducible_with_seed() -> None:
    labels, scores = _synthetic(120, 5)
    a = binary_metrics(labels, scores, 0.5, n_bootstrap=200, seed=7)
    b = binary_metrics(labels, scores, 0.5, n_bootstrap=200, seed=7)
    c = binary_metrics(labels, scores, 0.5, n_bootstrap=200, seed=8)
    assert a == b
    assert (a.auc_ci, a.ppv_ci, a.npv_ci) != (c.auc_ci, c.ppv_ci, c.npv_ci)
    assert a.auc == c.auc


def test_single_class_resamples_are_skipped_and_counted() -> None:
    # One positive among 5: a resample misses it with probability (4/5)^5 = 0.328.
    m = binary_metrics([1, 0, 0, 0, 0], [0.9, 0.1, 0.2, 0.3, 0.4], 0.5, n_bootstrap=1000)
    assert 0.27 < m.auc_bootstrap_skipped / 1000 < 0.39
    assert m.auc == 1.0
    assert m.auc_ci == Interval(1.0, 1.0)


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_is_degenerate_not_an_error(label: int) -> None:
    m = binary_metrics([label] * 6, [0.1, 0.2, 0.4, 0.6, 0.8, 0.9], 0.5, n_bootstrap=100)
    assert math.isnan(m.auc)
    assert math.isnan(m.auc_ci.low) and math.isnan(m.auc_ci.high)
    assert m.auc_bootstrap_skipped == 100
    undefined, defined = ("sensitivity", "specificity")[:: 1 if label == 0 else -1]
    assert math.isnan(getattr(m, undefined))
    assert getattr(m, f"{undefined}_ci").to_list() == [None, None]
    assert getattr(m, defined) == pytest.approx(0.5)
    mapping = m.to_mapping()
    assert mapping["auc"] is None and mapping["auc_ci"] == [None, None]
    json.dumps(mapping, allow_nan=False)  # NaN never reaches the JSON


def test_per_image_thresholds() -> None:
    # Image i is positive when SCORES[i] >= its own threshold: 0.85 for the first five
    # (0.9, 0.8, 0.6, 0.3 positive; 0.7 negative), 0.15 for the rest (all negative):
    #   TP = 1 (0.9); FN = 3 (0.8, 0.6, 0.3); FP = 3 (0.5, 0.4, 0.2); TN = 3 (0.7, 0.1, 0.05).
    thresholds = np.r_[np.full(5, 0.85), np.full(5, 0.15)]
    m = binary_metrics(LABELS, SCORES, thresholds, n_bootstrap=20)
    assert (m.tp, m.fn, m.fp, m.tn) == (1, 3, 3, 3)
    assert m.threshold is None
    assert m.to_mapping()["threshold"] is None


@pytest.mark.parametrize(
    ("labels", "scores", "kwargs", "message"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], {}, "0 or 1"),
        ([0, 1, 1], [0.1, 0.2], {}, "shape"),
        ([0, 1], [0.1, float("nan")], {}, "NaN"),
        ([], [], {}, "empty"),
        ([0, 1], [0.1, 0.2], {"n_bootstrap": 0}, "n_bootstrap"),
        ([0, 1], [0.1, 0.2], {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_input_raises(labels: list, scores: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binary_metrics(labels, scores, 0.5, **kwargs)


def test_to_mapping_fields(example: BinaryMetrics) -> None:
    mapping = example.to_mapping()
    for name in ("auc", "sensitivity", "specificity", "ppv", "npv"):
        low, high = mapping[f"{name}_ci"]
        assert low <= mapping[name] <= high
    assert mapping["n"] == 10 and mapping["n_positive"] == 4
    json.dumps(mapping, allow_nan=False)


def test_roc_points() -> None:
    roc = roc_points(LABELS, SCORES)
    assert (roc.fpr[0], roc.tpr[0]) == (0.0, 0.0)
    assert (roc.fpr[-1], roc.tpr[-1]) == (1.0, 1.0)
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(20 / 24)
    with pytest.raises(ValueError, match="both"):
        roc_points([0, 0, 0], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- boxes


def test_box_iou_known_values() -> None:
    # Overlap of (0,0,2,2) and (1,1,3,3) is the unit square; union 4 + 4 - 1 = 7.
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou(Box(0, 0, 2, 2, score=0.7), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0  # touching edges share no pixel
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # empty boxes: 0, not NaN
    with pytest.raises(ValueError, match="x1 < x0"):
        box_iou((2, 0, 0, 2), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="four"):
        box_iou((0, 0, 1), (0, 0, 1, 1))


_coord = st.floats(0, 100, allow_nan=False)
_box = st.tuples(_coord, _coord, _coord, _coord).map(
    lambda c: (min(c[0], c[2]), min(c[1], c[3]), max(c[0], c[2]), max(c[1], c[3]))
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_box, max_size=5), st.lists(_box, max_size=5))
def test_pairwise_iou_is_symmetric_and_bounded(a: list, b: list) -> None:
    iou = pairwise_iou(a, b)
    assert iou.shape == (len(a), len(b))
    assert np.all((iou >= 0) & (iou <= 1 + 1e-12))
    np.testing.assert_allclose(iou, pairwise_iou(b, a).T)


def test_localization_metrics_hand_example() -> None:
    gt = [[(0, 0, 10, 10), (20, 20, 30, 30)], [(0, 0, 10, 10)]]
    pred = [
        [(0, 0, 10, 12)],  # IoU with first gt = 100 / 120 = 0.83: hit; second gt missed
        [(5, 5, 15, 15), Box(50, 50, 60, 60, score=0.9)],  # IoU 25 / 175 = 0.14: miss
    ]
    loc = localization_metrics(gt, pred)
    assert (loc.n_images, loc.n_gt_boxes, loc.n_gt_hit) == (2, 3, 1)
    assert loc.gt_hit_rate == pytest.approx(1 / 3)
    assert (loc.n_pred_boxes, loc.n_pred_hit) == (3, 1)
    assert loc.mean_boxes_per_image == pytest.approx(1.5)
    loose = localization_metrics(gt, pred, iou_threshold=0.1)
    assert loose.gt_hit_rate == pytest.approx(2 / 3)
    assert loose.to_mapping()["gt_hit_rate"] == pytest.approx(2 / 3)


def test_localization_metrics_without_predictions_and_bad_input() -> None:
    loc = localization_metrics([[(0, 0, 4, 4)]], [[]])
    assert loc.gt_hit_rate == 0.0 and loc.mean_boxes_per_image == 0.0
    assert math.isnan(loc.pred_precision) and loc.to_mapping()["pred_precision"] is None
    with pytest.raises(ValueError, match="same images"):
        localization_metrics([[(0, 0, 4, 4)]], [])
    with pytest.raises(ValueError, match="iou_threshold"):
        localization_metrics([[(0, 0, 4, 4)]], [[]], iou_threshold=0.0)


# --------------------------------------------------------------------------- report


def _result() -> EvaluationResult:
    regions = [["hand"], ["leg"], ["hand", "leg"], ["leg"], ["hand"], ["leg"], ["hand"]] + [
        ["hip"]
    ] * 3
    per_region = {}
    for region in ("hand", "leg", "hip"):
        member = np.array([region in r for r in regions])
        per_region[region] = binary_metrics(LABELS[member], SCORES[member], 0.5, n_bootstrap=50)
    overall = binary_metrics(LABELS, SCORES, 0.5, n_bootstrap=50)
    return EvaluationResult(
        overall=overall,
        per_region=per_region,
        subgroups={"no_hardware": overall},
        unambiguous=overall,
        localization=localization_metrics([[(0, 0, 10, 10)]], [[(0, 0, 10, 12)]]),
        labels=LABELS.astype(bool),
        scores=SCORES,
        regions=regions,
    )


def test_write_report(tmp_path: Path) -> None:
    result = _result()
    files = write_report(result, tmp_path / "out")

    text = files.markdown.read_text(encoding="utf-8")
    for heading in ("## Overall", "## Per region", "## Subgroups", "## Unambiguous", "## Local"):
        assert heading in text
    assert f"{20 / 24:.3f}" in text  # the AUC
    assert "0.750" in text and "0.667" in text  # sensitivity, specificity
    assert (
        "| hip | 3 | 0 | n/a | n/a | 1.000 [0.439, 1.000] |" in text
    )  # region without fractures: AUC undefined
    assert "roc.png" in text

    with Image.open(files.roc_png) as png:
        assert png.format == "PNG"
        png.verify()

    assert (files.markdown.parent, files.roc_png.parent) == (tmp_path / "out",) * 2


def test_evaluation_result_mapping() -> None:
    mapping = json.loads(json.dumps(_result().to_mapping(), allow_nan=False))
    for key in ("n", "n_positive", "auc", "auc_ci", "sensitivity", "sensitivity_ci"):
        assert key in mapping
    for key in ("specificity_ci", "ppv", "ppv_ci", "npv", "npv_ci"):
        assert key in mapping
    assert set(mapping["per_region"]) == {"hand", "leg", "hip"}
    assert mapping["per_region"]["hip"]["auc"] is None
    assert mapping["auc"] == pytest.approx(20 / 24)
    assert mapping["localization"]["gt_hit_rate"] == 1.0
    assert mapping["unambiguous"]["n"] == 10


def test_evaluation_result_rejects_mismatched_data() -> None:
    good = _result()
    with pytest.raises(ValueError, match="regions"):
        EvaluationResult(
            overall=good.overall,
            per_region={},
            subgroups={},
            unambiguous=good.unambiguous,
            localization=good.localization,
            labels=good.labels,
            scores=good.scores,
            regions=good.regions[:3],
        )


def test_reliability_bins_hand_worked() -> None:
    from inference.report import reliability_bins

    labels = [0, 0, 1, 0, 1, 1, 1]
    scores = [0.05, 0.15, 0.12, 0.55, 0.58, 0.95, 1.0]
    bins = reliability_bins(labels, scores, bins=10)
    # bins [0, .1): 0.05; [.1, .2): 0.15 and 0.12; [.5, .6): 0.55 and 0.58; [.9, 1]: 0.95, 1.0
    assert [(round(m, 3), r, c) for m, r, c in bins] == [
        (0.05, 0.0, 1), (0.135, 0.5, 2), (0.565, 0.5, 2), (0.975, 1.0, 2)]
