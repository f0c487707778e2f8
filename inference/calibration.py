"""Operating points of the ensemble, chosen on pooled tuning + validation predictions.

As in the paper (Jones et al. 2020), each calibration group (anatomical region) gets

* a *sensitivity* threshold: the highest score threshold that keeps sensitivity at or above
  92.5 % (score >= it: at least ``possible_fracture``);
* a *high-specificity* threshold: the lowest threshold that reaches 90 % specificity
  (score >= it: ``fracture``);
* a *binarization* threshold for the averaged probability map, chosen to maximise box agreement
  with the ground truth on fractured images (F1 of box matching at IoU >= 0.3).

A group with too few positives or negatives to calibrate falls back to the pooled thresholds and
is flagged ``calibrated=False`` with the reason.

Ties: an image whose score equals the threshold counts as positive (score >= t), the same rule
as :func:`inference.metrics.binary_metrics`. The image thresholds are always observed scores (or,
for specificity, one ulp above the highest score where nothing lower reaches the target), so
tied scores move together: the sensitivity reached may exceed the target when positives tie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from inference.metrics import BoxLike, BoxMatch, as_binary_labels, as_scores, match_boxes
from inference.records import Thresholds
from inference.regions import GLOBAL_GROUP

DEFAULT_SENSITIVITY_TARGET = 0.925
"""The paper's operating point: 92.5 % sensitivity per anatomical region."""

DEFAULT_SPECIFICITY_TARGET = 0.90
"""Target of the high-specificity (``fracture``) threshold."""

DEFAULT_BINARIZATION_CANDIDATES: npt.NDArray[np.float64] = np.linspace(0.05, 0.95, 19)

BoxExtractor: TypeAlias = Callable[[npt.NDArray[np.floating], float], Sequence[BoxLike]]
"""``extract(prob_map, threshold) -> boxes``: draws boxes on a probability map."""


def _check_target(name: str, target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {target}")


def threshold_for_sensitivity(
    labels: npt.ArrayLike, scores: npt.ArrayLike, target: float = DEFAULT_SENSITIVITY_TARGET
) -> float:
    """The highest observed score ``t`` with sensitivity (positives with score >= t) >= target.

    Any higher distinct score gives a sensitivity below ``target``. Positives tied at ``t`` all
    count as detected, so the sensitivity at ``t`` may exceed the target. Needs >= 1 positive.
    """
    _check_target("target", target)
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    positives = np.sort(s[y])
    if positives.size == 0:
        raise ValueError("a sensitivity threshold needs at least one positive label")
    candidates = np.unique(s)[::-1]  # distinct scores, highest first
    detected = positives.size - np.searchsorted(positives, candidates, side="left")
    reached = detected / positives.size >= target
    return float(candidates[np.argmax(reached)])  # the lowest score always reaches 100 %


def threshold_for_specificity(
    labels: npt.ArrayLike, scores: npt.ArrayLike, target: float = DEFAULT_SPECIFICITY_TARGET
) -> float:
    """The lowest threshold ``t`` with specificity (negatives with score < t) >= target.

    Candidates are the observed distinct scores plus the float just above the highest score
    (which always gives 100 % specificity); any lower distinct score gives a specificity below
    ``target``. Negatives tied at a score fall on the same side of every threshold. This function
    knows nothing of the sensitivity threshold: :func:`calibrate_groups` clamps the result up to
    it. Needs >= 1 negative.
    """
    _check_target("target", target)
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    negatives = np.sort(s[~y])
    if negatives.size == 0:
        raise ValueError("a specificity threshold needs at least one negative label")
    candidates = np.append(np.unique(s), np.nextafter(s.max(), np.inf))  # lowest first
    rejected = np.searchsorted(negatives, candidates, side="left")
    reached = rejected / negatives.size >= target
    return float(candidates[np.argmax(reached)])


@dataclass(frozen=True)
class GroupCalibration:
    """Image-level operating points of one calibration group.

    ``n`` and ``n_positive`` are the group's own counts even where the thresholds are the pooled
    fallback (``calibrated=False``, ``reason`` says why).
    """

    group: str
    sensitivity_threshold: float
    high_specificity_threshold: float
    n: int
    n_positive: int
    calibrated: bool
    reason: str | None

    def thresholds(self, binarize: float) -> Thresholds:
        """This group's operating points with a map binarization threshold, as the shared record."""
        return Thresholds(
            sensitivity=self.sensitivity_threshold,
            high_specificity=self.high_specificity_threshold,
            binarize=binarize,
            calibrated=self.calibrated,
        )


def _normalise_groups(groups: Sequence[str | Sequence[str]], n: int) -> list[frozenset[str]]:
    """One set of group names per image; a plain string is one group name (not split).

    The pooled group's name (``"global"``) is dropped: every image is pooled anyway, so an image
    tagged only ``"global"`` (a region without a calibration group) joins no specific group.
    """
    if len(groups) != n:
        raise ValueError(f"groups must list one entry per image: {len(groups)} != {n}")
    out: list[frozenset[str]] = []
    for entry in groups:
        names = frozenset([entry] if isinstance(entry, str) else entry)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"group names must be non-empty strings, got {name!r}")
        out.append(names - {GLOBAL_GROUP})
    return out


def _shortfall(n_pos: int, n_neg: int, min_positives: int, min_negatives: int) -> str | None:
    """Why a group cannot be calibrated on its own, or None if it can."""
    problems = []
    if n_pos < min_positives:
        problems.append(f"{n_pos} positives < min_positives={min_positives}")
    if n_neg < min_negatives:
        problems.append(f"{n_neg} negatives < min_negatives={min_negatives}")
    return "; ".join(problems) if problems else None


def _operating_points(
    y: npt.NDArray[np.bool_], s: npt.NDArray[np.float64], sens_target: float, spec_target: float
) -> tuple[float, float]:
    """(sensitivity threshold, high-specificity threshold clamped up to the former).

    Where the specificity target is already met below the sensitivity threshold, the
    high-specificity threshold is raised to the sensitivity threshold: the ``possible_fracture``
    band is then empty and every image over the sensitivity threshold is ``fracture``.
    """
    sens = threshold_for_sensitivity(y, s, sens_target)
    spec = threshold_for_specificity(y, s, spec_target)
    return sens, max(spec, sens)


def calibrate_groups(
    groups: Sequence[str | Sequence[str]],
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    min_positives: int = 10,
    min_negatives: int = 10,
    sensitivity_target: float = DEFAULT_SENSITIVITY_TARGET,
    specificity_target: float = DEFAULT_SPECIFICITY_TARGET,
) -> dict[str, GroupCalibration]:
    """Per-group operating points, plus a ``"global"`` entry computed on all images pooled.

    ``groups[i]`` names the groups of image ``i`` (FracAtlas regions overlap, e.g. hand and leg):
    the image counts in each of them. A group with fewer than ``min_positives`` positives or
    ``min_negatives`` negatives gets the pooled thresholds, ``calibrated=False`` and the reason.
    The pooled entry itself is flagged the same way when it is below the minimums, and the pooled
    data must hold at least one positive and one negative. Keys: ``"global"``, then the groups
    sorted by name.
    """
    if min_positives < 1 or min_negatives < 1:
        raise ValueError("min_positives and min_negatives must be >= 1")
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    per_image = _normalise_groups(groups, y.size)
    if y.all() or not y.any():
        raise ValueError("calibration needs at least one positive and one negative image")

    pooled = _operating_points(y, s, sensitivity_target, specificity_target)
    n_pos = int(np.count_nonzero(y))
    reason = _shortfall(n_pos, y.size - n_pos, min_positives, min_negatives)
    result = {
        GLOBAL_GROUP: GroupCalibration(
            GLOBAL_GROUP,
            *pooled,
            n=int(y.size),
            n_positive=n_pos,
            calibrated=reason is None,
            reason=reason,
        )
    }
    for name in sorted(set().union(*per_image)):
        member = np.array([name in names for names in per_image])
        gy, gs = y[member], s[member]
        n_pos = int(np.count_nonzero(gy))
        reason = _shortfall(n_pos, gy.size - n_pos, min_positives, min_negatives)
        points = (
            _operating_points(gy, gs, sensitivity_target, specificity_target)
            if reason is None
            else pooled
        )
        result[name] = GroupCalibration(
            name,
            *points,
            n=int(gy.size),
            n_positive=n_pos,
            calibrated=reason is None,
            reason=None if reason is None else f"{reason}: pooled thresholds used",
        )
    return result


def box_agreement(
    maps: Sequence[npt.NDArray[np.floating]],
    gt_boxes: Sequence[Sequence[BoxLike]],
    threshold: float,
    *,
    extract: BoxExtractor,
    iou: float = 0.3,
) -> BoxMatch:
    """Box matches between ``extract(map, threshold)`` and the ground truth, over all images."""
    predicted = [list(extract(prob_map, threshold)) for prob_map in maps]
    return match_boxes(gt_boxes, predicted, iou)


def binarization_threshold(
    maps: Sequence[npt.NDArray[np.floating]],
    gt_boxes: Sequence[Sequence[BoxLike]],
    *,
    extract: BoxExtractor,
    candidates: npt.ArrayLike = DEFAULT_BINARIZATION_CANDIDATES,
    iou: float = 0.3,
) -> float:
    """The map binarization threshold with the best box agreement on fractured images.

    Criterion: F1 of box matching at IoU >= ``iou`` with counts summed over all images (a
    ground-truth box is hit when some predicted box overlaps it with IoU >= ``iou``; a predicted
    box is a true positive when it hits some ground-truth box); see
    :class:`inference.metrics.BoxMatch`. F1 rewards finding the fractures (recall) while
    penalising spurious boxes (precision). Ties go to the lower threshold (the more sensitive
    one). ``extract(prob_map, threshold)`` draws the boxes, e.g.
    ``inference.postprocess.extract_boxes``.
    """
    if len(maps) != len(gt_boxes):
        raise ValueError(
            f"maps and gt_boxes must list the same images: {len(maps)} != {len(gt_boxes)}"
        )
    if sum(len(boxes) for boxes in gt_boxes) == 0:
        raise ValueError("binarization calibration needs at least one ground-truth box")
    grid = np.unique(np.asarray(candidates, dtype=np.float64))  # sorted ascending
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
        raise ValueError("candidates must be a non-empty 1-D sequence of finite thresholds")
    f1 = [box_agreement(maps, gt_boxes, float(t), extract=extract, iou=iou).f1 for t in grid]
    return float(grid[int(np.argmax(f1))])  # argmax takes the first (lowest) of ties
