"""Image-level and box-level evaluation statistics for the fracture ensemble.

Follows the paper's protocol (Jones et al. 2020): AUC with a percentile bootstrap interval over
m = 1000 resamples of images; sensitivity and specificity with Wilson score intervals; PPV and
NPV with bootstrap intervals. The statistics come from scikit-learn (``roc_auc_score``,
``roc_curve``, ``confusion_matrix``) and scipy (``binomtest(...).proportion_ci``); this module
only validates input, draws the seeded resamples and packs the results into frozen records.

Undefined quantities (a sensitivity without positives, an AUC with one class, a bootstrap
interval without a single usable resample) are NaN in the records and ``None`` in
``to_mapping()``; they never raise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from inference.records import Box

BoxLike: TypeAlias = Box | Sequence[float]
"""A box as a :class:`inference.records.Box` or an ``(x0, y0, x1, y1)`` sequence."""

FloatArray: TypeAlias = npt.NDArray[np.float64]
BoolArray: TypeAlias = npt.NDArray[np.bool_]


def json_float(value: float) -> float | None:
    """``value`` as a plain float for JSON, ``None`` where it is NaN or infinite."""
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Interval:
    """A confidence interval ``[low, high]``; both NaN where it is undefined."""

    low: float
    high: float

    @classmethod
    def undefined(cls) -> Interval:
        return cls(math.nan, math.nan)

    def to_list(self) -> list[float | None]:
        """``[low, high]`` for JSON, NaN as ``None``."""
        return [json_float(self.low), json_float(self.high)]

    def contains(self, value: float) -> bool:
        """Whether ``low <= value <= high`` (False for an undefined interval)."""
        return self.low <= value <= self.high


@dataclass(frozen=True)
class BinaryMetrics:
    """Image-level metrics at one operating point, with their confidence intervals.

    ``threshold`` is the single threshold used, or ``None`` where each image carried its own
    (region-specific operating points). ``auc_bootstrap_skipped`` counts the bootstrap resamples
    left out of the AUC interval because they held a single class.
    """

    n: int
    n_positive: int
    auc: float
    auc_ci: Interval
    sensitivity: float
    sensitivity_ci: Interval
    specificity: float
    specificity_ci: Interval
    ppv: float
    ppv_ci: Interval
    npv: float
    npv_ci: Interval
    threshold: float | None
    tp: int
    fp: int
    tn: int
    fn: int
    confidence: float = 0.95
    n_bootstrap: int = 1000
    auc_bootstrap_skipped: int = 0

    def to_mapping(self) -> dict[str, Any]:
        """A JSON-able dict: intervals as ``[low, high]`` lists, NaN as ``None``."""
        out: dict[str, Any] = {"n": self.n, "n_positive": self.n_positive}
        for name in ("auc", "sensitivity", "specificity", "ppv", "npv"):
            out[name] = json_float(getattr(self, name))
            out[f"{name}_ci"] = getattr(self, f"{name}_ci").to_list()
        out["threshold"] = None if self.threshold is None else json_float(self.threshold)
        out.update(tp=self.tp, fp=self.fp, tn=self.tn, fn=self.fn)
        out.update(
            confidence=self.confidence,
            n_bootstrap=self.n_bootstrap,
            auc_bootstrap_skipped=self.auc_bootstrap_skipped,
        )
        return out


@dataclass(frozen=True)
class BoxMatch:
    """Box agreement counts at an IoU threshold, summed over images.

    A ground-truth box is *hit* when some predicted box overlaps it with IoU >= the threshold;
    a predicted box is a *true positive* when it hits some ground-truth box (no one-to-one
    assignment: one large predicted box may hit two fractures).
    """

    n_gt: int
    n_gt_hit: int
    n_pred: int
    n_pred_hit: int

    @property
    def recall(self) -> float:
        """Share of ground-truth boxes hit; NaN without ground-truth boxes."""
        return self.n_gt_hit / self.n_gt if self.n_gt else math.nan

    @property
    def precision(self) -> float:
        """Share of predicted boxes that hit a ground-truth box; NaN without predictions."""
        return self.n_pred_hit / self.n_pred if self.n_pred else math.nan

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall; 0 where either is 0 or undefined."""
        precision, recall = self.precision, self.recall
        if not (precision > 0 and recall > 0):
            return 0.0
        return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class LocalizationMetrics:
    """Box-level results on fractured images (see :class:`BoxMatch` for what a hit is)."""

    n_images: int
    n_gt_boxes: int
    n_gt_hit: int
    gt_hit_rate: float
    n_pred_boxes: int
    n_pred_hit: int
    pred_precision: float
    mean_boxes_per_image: float
    iou_threshold: float

    def to_mapping(self) -> dict[str, Any]:
        """A JSON-able dict, NaN as ``None``."""
        return {
            "n_images": self.n_images,
            "n_gt_boxes": self.n_gt_boxes,
            "n_gt_hit": self.n_gt_hit,
            "gt_hit_rate": json_float(self.gt_hit_rate),
            "n_pred_boxes": self.n_pred_boxes,
            "n_pred_hit": self.n_pred_hit,
            "pred_precision": json_float(self.pred_precision),
            "mean_boxes_per_image": json_float(self.mean_boxes_per_image),
            "iou_threshold": self.iou_threshold,
        }


@dataclass(frozen=True, eq=False)
class RocPoints:
    """An ROC curve as returned by :func:`sklearn.metrics.roc_curve`."""

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray = field(repr=False)


# --------------------------------------------------------------------------- input checks


def as_binary_labels(labels: npt.ArrayLike) -> BoolArray:
    """Validate 0/1 (or boolean) labels into a 1-D boolean array."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels are empty")
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"labels must be 0/1 numbers, got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"labels must be 0 or 1, found {bad.tolist()}")
    return arr.astype(bool)


def as_scores(scores: npt.ArrayLike, n: int) -> FloatArray:
    """Validate scores into a 1-D finite float array of length ``n``."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) like the labels, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    return arr


def _as_thresholds(threshold: float | npt.ArrayLike, n: int) -> FloatArray:
    """A scalar threshold broadcast to ``n`` images, or one threshold per image."""
    arr = np.asarray(threshold, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    elif arr.shape != (n,):
        raise ValueError(f"threshold must be a scalar or have shape ({n},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("threshold contains NaN or infinite values")
    return arr


# --------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion (undefined for zero trials)."""
    if trials == 0:
        return Interval.undefined()
    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(float(ci.low), float(ci.high))


def percentile_interval(samples: npt.ArrayLike, confidence: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the finite ``samples`` (NaN ones are undefined draws)."""
    arr = np.asarray(samples, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return Interval.undefined()
    alpha = 1.0 - confidence
    low, high = np.percentile(arr, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Interval(float(low), float(high))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def _auc_or_nan(labels: BoolArray, scores: FloatArray) -> float:
    """ROC AUC, NaN where the labels hold a single class."""
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class _BootstrapResult:
    auc_ci: Interval
    auc_skipped: int
    ppv_ci: Interval
    npv_ci: Interval


def _bootstrap(
    labels: BoolArray,
    scores: FloatArray,
    predicted: BoolArray,
    n_bootstrap: int,
    seed: int,
    confidence: float,
) -> _BootstrapResult:
    """Resample images with replacement (seeded) and collect AUC, PPV and NPV per resample.

    Resamples with a single class have no AUC and are skipped (and counted); a resample without
    predicted positives (negatives) has no PPV (NPV) and is left out of that interval only.
    """
    rng = np.random.default_rng(seed)
    n = labels.size
    auc = np.full(n_bootstrap, math.nan)
    ppv = np.full(n_bootstrap, math.nan)
    npv = np.full(n_bootstrap, math.nan)
    for b in range(n_bootstrap):
        idx = rng.integers(0, n, size=n)
        y, p = labels[idx], predicted[idx]
        auc[b] = _auc_or_nan(y, scores[idx])
        ppv[b] = _ratio(int(np.count_nonzero(y & p)), int(np.count_nonzero(p)))
        npv[b] = _ratio(int(np.count_nonzero(~y & ~p)), int(np.count_nonzero(~p)))
    return _BootstrapResult(
        auc_ci=percentile_interval(auc, confidence),
        auc_skipped=int(np.count_nonzero(np.isnan(auc))),
        ppv_ci=percentile_interval(ppv, confidence),
        npv_ci=percentile_interval(npv, confidence),
    )


# --------------------------------------------------------------------------- image level


def binary_metrics(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    threshold: float | npt.ArrayLike,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BinaryMetrics:
    """Image-level metrics at an operating point: an image is positive when score >= threshold.

    ``threshold`` is one value for all images or one per image (region-specific operating
    points, as the paper ships). AUC, PPV and NPV intervals are percentile bootstrap intervals
    over ``n_bootstrap`` seeded resamples of images (the paper's m = 1000); sensitivity and
    specificity intervals are Wilson score intervals. Degenerate data (no positives or no
    negatives) gives NaN for what is undefined and never raises.
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    thresholds = _as_thresholds(threshold, y.size)
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    predicted = s >= thresholds
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[False, True]).ravel())
    boot = _bootstrap(y, s, predicted, n_bootstrap, seed, confidence)
    single = np.unique(thresholds)
    return BinaryMetrics(
        n=int(y.size),
        n_positive=tp + fn,
        auc=_auc_or_nan(y, s),
        auc_ci=boot.auc_ci,
        sensitivity=_ratio(tp, tp + fn),
        sensitivity_ci=wilson_interval(tp, tp + fn, confidence),
        specificity=_ratio(tn, tn + fp),
        specificity_ci=wilson_interval(tn, tn + fp, confidence),
        ppv=_ratio(tp, tp + fp),
        ppv_ci=boot.ppv_ci,
        npv=_ratio(tn, tn + fn),
        npv_ci=boot.npv_ci,
        threshold=float(single[0]) if single.size == 1 else None,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        confidence=confidence,
        n_bootstrap=n_bootstrap,
        auc_bootstrap_skipped=boot.auc_skipped,
    )


def roc_points(labels: npt.ArrayLike, scores: npt.ArrayLike) -> RocPoints:
    """ROC curve points for plotting; needs both classes (ValueError otherwise)."""
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    if y.all() or not y.any():
        raise ValueError("an ROC curve needs both positive and negative labels")
    fpr, tpr, thresholds = roc_curve(y, s)
    return RocPoints(
        fpr=np.asarray(fpr, dtype=np.float64),
        tpr=np.asarray(tpr, dtype=np.float64),
        thresholds=np.asarray(thresholds, dtype=np.float64),
    )


# --------------------------------------------------------------------------- box level


def as_xyxy(boxes: Sequence[BoxLike]) -> FloatArray:
    """Boxes as an ``(n, 4)`` float array of ``x0, y0, x1, y1``, validated."""
    rows = [(b.x0, b.y0, b.x1, b.y1) if isinstance(b, Box) else tuple(b) for b in boxes]
    if any(len(r) != 4 for r in rows):
        raise ValueError("a box must have exactly four coordinates (x0, y0, x1, y1)")
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    if not np.all(np.isfinite(arr)):
        raise ValueError("box coordinates contain NaN or infinite values")
    if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]):
        raise ValueError("a box has x1 < x0 or y1 < y0")
    return arr


def pairwise_iou(a: Sequence[BoxLike], b: Sequence[BoxLike]) -> FloatArray:
    """IoU of every box in ``a`` with every box in ``b``, shape ``(len(a), len(b))``.

    Two empty (zero-area) boxes have IoU 0, not NaN.
    """
    xa, xb = as_xyxy(a)[:, None, :], as_xyxy(b)[None, :, :]
    iw = np.clip(np.minimum(xa[..., 2], xb[..., 2]) - np.maximum(xa[..., 0], xb[..., 0]), 0, None)
    ih = np.clip(np.minimum(xa[..., 3], xb[..., 3]) - np.maximum(xa[..., 1], xb[..., 1]), 0, None)
    inter = iw * ih
    area_a = (xa[..., 2] - xa[..., 0]) * (xa[..., 3] - xa[..., 1])
    area_b = (xb[..., 2] - xb[..., 0]) * (xb[..., 3] - xb[..., 1])
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(a: BoxLike, b: BoxLike) -> float:
    """Intersection over union of two boxes."""
    return float(pairwise_iou([a], [b])[0, 0])


def _check_iou_threshold(iou_threshold: float) -> None:
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")


def match_boxes(
    gt_boxes: Sequence[Sequence[BoxLike]],
    pred_boxes: Sequence[Sequence[BoxLike]],
    iou_threshold: float = 0.3,
) -> BoxMatch:
    """Count hits between per-image ground-truth and predicted boxes, summed over images."""
    _check_iou_threshold(iou_threshold)
    if len(gt_boxes) != len(pred_boxes):
        raise ValueError(
            f"gt_boxes and pred_boxes must list the same images: "
            f"{len(gt_boxes)} != {len(pred_boxes)}"
        )
    n_gt = n_gt_hit = n_pred = n_pred_hit = 0
    for gt, pred in zip(gt_boxes, pred_boxes, strict=True):
        hits = pairwise_iou(gt, pred) >= iou_threshold
        n_gt += len(gt)
        n_pred += len(pred)
        n_gt_hit += int(np.count_nonzero(hits.any(axis=1)))
        n_pred_hit += int(np.count_nonzero(hits.any(axis=0)))
    return BoxMatch(n_gt=n_gt, n_gt_hit=n_gt_hit, n_pred=n_pred, n_pred_hit=n_pred_hit)


def localization_metrics(
    gt_boxes: Sequence[Sequence[BoxLike]],
    pred_boxes: Sequence[Sequence[BoxLike]],
    iou_threshold: float = 0.3,
) -> LocalizationMetrics:
    """Box agreement on fractured images: the share of ground-truth boxes hit by a predicted box
    (IoU >= ``iou_threshold``) and the mean number of predicted boxes per image.

    Pass one entry per fractured image, in the same order in both sequences.
    """
    match = match_boxes(gt_boxes, pred_boxes, iou_threshold)
    n_images = len(gt_boxes)
    return LocalizationMetrics(
        n_images=n_images,
        n_gt_boxes=match.n_gt,
        n_gt_hit=match.n_gt_hit,
        gt_hit_rate=match.recall,
        n_pred_boxes=match.n_pred,
        n_pred_hit=match.n_pred_hit,
        pred_precision=match.precision,
        mean_boxes_per_image=_ratio(match.n_pred, n_images),
        iou_threshold=iou_threshold,
    )
