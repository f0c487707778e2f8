"""The evaluation's outputs: the ``metrics.json`` structure, a Markdown report and ROC curves.

:class:`EvaluationResult` is what the evaluate command fills; :meth:`EvaluationResult.to_mapping`
is the ``metrics.json`` structure (the command writes it, adding its own provenance), and
:func:`write_report` writes ``OUTDIR/report.md`` (the same numbers as readable tables),
``OUTDIR/roc.png`` (ROC curves overall and per region with the operating points marked) and
``OUTDIR/calibration.png`` (a reliability diagram: observed fracture rate per score bin against
the mean score, with the count of images per bin, so a site sees whether a score of 0.3 means
three fractures in ten images). Plots
use matplotlib's Agg canvas directly, with no pyplot global state, so this works headless and
from any thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import binned_statistic

from inference.metrics import (
    BinaryMetrics,
    Interval,
    LocalizationMetrics,
    as_binary_labels,
    as_scores,
    roc_points,
)


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """All evaluation numbers, plus the per-image data the ROC plot needs.

    ``labels``, ``scores`` and ``regions`` (the region names of each image; an image may carry
    several) describe the same images as ``overall``. ``per_region`` keys are region names as
    they appear in ``regions``; ``subgroups`` keys are free labels (e.g. ``"hardware"``,
    ``"no_hardware"``, ``"frontal"``).
    """

    overall: BinaryMetrics
    per_region: Mapping[str, BinaryMetrics]
    subgroups: Mapping[str, BinaryMetrics]
    unambiguous: BinaryMetrics
    localization: LocalizationMetrics
    labels: npt.NDArray[np.bool_]
    scores: npt.NDArray[np.float64]
    regions: Sequence[Sequence[str]]

    def __post_init__(self) -> None:
        labels = as_binary_labels(self.labels)
        as_scores(self.scores, labels.size)
        if len(self.regions) != labels.size:
            raise ValueError(f"regions has {len(self.regions)} entries for {labels.size} images")
        if self.overall.n != labels.size:
            raise ValueError(
                f"overall metrics cover {self.overall.n} images but {labels.size} labels given"
            )
        if any(isinstance(r, str) for r in self.regions):
            raise ValueError("each regions entry must be a sequence of region names, not a str")

    def to_mapping(self) -> dict[str, Any]:
        """The ``metrics.json`` structure: overall fields at top level, then the breakdowns."""
        return {
            **self.overall.to_mapping(),
            "per_region": {k: v.to_mapping() for k, v in self.per_region.items()},
            "subgroups": {k: v.to_mapping() for k, v in self.subgroups.items()},
            "unambiguous": self.unambiguous.to_mapping(),
            "localization": self.localization.to_mapping(),
        }


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the files :func:`write_report` wrote."""

    markdown: Path
    roc_png: Path
    calibration_png: Path


# --------------------------------------------------------------------------- Markdown


def _num(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _ci(interval: Interval) -> str:
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return "n/a"
    return f"[{interval.low:.3f}, {interval.high:.3f}]"


def _with_ci(value: float, interval: Interval) -> str:
    return f"{_num(value)} {_ci(interval)}" if math.isfinite(value) else "n/a"


def _threshold(metrics: BinaryMetrics) -> str:
    return "per region" if metrics.threshold is None else _num(metrics.threshold)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


_METRIC_HEADER = (
    "group",
    "n",
    "positives",
    "AUC",
    "sensitivity",
    "specificity",
    "PPV",
    "NPV",
    "threshold",
)


def _metric_row(name: str, m: BinaryMetrics) -> list[str]:
    return [
        name,
        str(m.n),
        str(m.n_positive),
        _with_ci(m.auc, m.auc_ci),
        _with_ci(m.sensitivity, m.sensitivity_ci),
        _with_ci(m.specificity, m.specificity_ci),
        _with_ci(m.ppv, m.ppv_ci),
        _with_ci(m.npv, m.npv_ci),
        _threshold(m),
    ]


def _metric_table(groups: Mapping[str, BinaryMetrics]) -> list[str]:
    if not groups:
        return ["(none in the data)"]
    return _table(_METRIC_HEADER, [_metric_row(k, v) for k, v in groups.items()])


def _overall_section(m: BinaryMetrics) -> list[str]:
    rows = [
        ["AUC", _num(m.auc), _ci(m.auc_ci)],
        ["sensitivity", _num(m.sensitivity), _ci(m.sensitivity_ci)],
        ["specificity", _num(m.specificity), _ci(m.specificity_ci)],
        ["PPV", _num(m.ppv), _ci(m.ppv_ci)],
        ["NPV", _num(m.npv), _ci(m.npv_ci)],
    ]
    level = f"{m.confidence:.0%} CI"
    counts = f"TP {m.tp}, FP {m.fp}, TN {m.tn}, FN {m.fn}; threshold: {_threshold(m)}."
    return [*_table(("metric", "value", level), rows), "", counts]


def _localization_section(loc: LocalizationMetrics) -> list[str]:
    rows = [
        ["fractured images", str(loc.n_images)],
        ["ground-truth boxes", str(loc.n_gt_boxes)],
        [f"ground-truth boxes hit (IoU >= {loc.iou_threshold:g})", str(loc.n_gt_hit)],
        ["share of ground-truth boxes hit", _num(loc.gt_hit_rate)],
        ["predicted boxes", str(loc.n_pred_boxes)],
        ["predicted boxes on a fracture", str(loc.n_pred_hit)],
        ["share of predicted boxes on a fracture", _num(loc.pred_precision)],
        ["mean predicted boxes per image", _num(loc.mean_boxes_per_image)],
    ]
    return _table(("measure", "value"), rows)


def render_markdown(result: EvaluationResult, roc_name: str = "roc.png") -> str:
    """The report as Markdown tables (3 decimals, undefined values as ``n/a``)."""
    o = result.overall
    intro = (
        f"{o.n} images, {o.n_positive} with a fracture. Intervals are {o.confidence:.0%}: "
        f"Wilson for sensitivity and specificity, percentile bootstrap over {o.n_bootstrap} "
        f"resamples of images for AUC, PPV and NPV. An image is called positive when its score "
        f"is at or above the operating-point threshold."
    )
    lines = [
        "# Fracture detection evaluation",
        "",
        intro,
        "",
        "## Overall",
        "",
        *_overall_section(o),
        "",
        "## Per region",
        "",
        *_metric_table(result.per_region),
        "",
        "## Subgroups",
        "",
        *_metric_table(result.subgroups),
        "",
        "## Unambiguous labels",
        "",
        "Images whose labels conflict are left out.",
        "",
        *_metric_table({"unambiguous": result.unambiguous}),
        "",
        "## Localization",
        "",
        *_localization_section(result.localization),
        "",
        "## ROC",
        "",
        f"![ROC curves overall and per region]({roc_name})",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- ROC plot


def _plot_curve(
    ax: Any,
    labels: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float64],
    metrics: BinaryMetrics,
    name: str,
    style: Mapping[str, Any],
) -> None:
    """One ROC curve with its operating point; skipped where the images hold one class."""
    if labels.all() or not labels.any():
        return
    roc = roc_points(labels, scores)
    (line,) = ax.plot(roc.fpr, roc.tpr, label=f"{name} (AUC {_num(metrics.auc)})", **style)
    if math.isfinite(metrics.sensitivity) and math.isfinite(metrics.specificity):
        ax.plot(
            1 - metrics.specificity,
            metrics.sensitivity,
            "o",
            color=line.get_color(),
            markeredgecolor="black",
            clip_on=False,
        )


def render_roc(result: EvaluationResult, path: Path) -> None:
    """Save ROC curves overall and per region, operating points as dots, to a PNG.

    A region whose images hold a single class has no curve (its AUC is undefined).
    """
    labels = as_binary_labels(result.labels)
    scores = as_scores(result.scores, labels.size)
    fig = Figure(figsize=(6.5, 6.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    _plot_curve(ax, labels, scores, result.overall, "overall", {"color": "black", "linewidth": 2})
    for region, metrics in result.per_region.items():
        member = np.array([region in names for names in result.regions], dtype=bool)
        _plot_curve(ax, labels[member], scores[member], metrics, region, {"linewidth": 1.2})
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title="ROC (dots: operating points)",
    )
    ax.set_aspect("equal")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, format="png")


RELIABILITY_BINS = 10


def reliability_bins(
    labels: npt.ArrayLike, scores: npt.ArrayLike, bins: int = RELIABILITY_BINS
) -> list[tuple[float, float, int]]:
    """(mean score, observed fracture rate, images) of each non-empty bin of equal width over
    [0, 1] (a score of exactly 1 falls in the last bin), computed with scipy's
    ``binned_statistic``."""
    y = as_binary_labels(labels).astype(np.float64)
    s = as_scores(scores, y.size)
    edges = np.linspace(0.0, 1.0, bins + 1)
    mean_score = binned_statistic(s, s, "mean", bins=edges).statistic
    rate = binned_statistic(s, y, "mean", bins=edges).statistic
    count = binned_statistic(s, y, "count", bins=edges).statistic
    return [
        (float(m), float(r), int(c))
        for m, r, c in zip(mean_score, rate, count, strict=True)
        if c > 0
    ]


def render_reliability(result: EvaluationResult, path: Path) -> None:
    """Save the reliability diagram (overall) with a histogram of the scores below it."""
    labels = as_binary_labels(result.labels)
    scores = as_scores(result.scores, labels.size)
    points = reliability_bins(labels, scores)
    fig = Figure(figsize=(6.0, 7.0), dpi=120)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="perfectly calibrated")
    top.plot(
        [p[0] for p in points],
        [p[1] for p in points],
        "o-",
        color="black",
        label=f"observed ({len(labels)} images)",
    )
    for mean, rate, count in points:
        top.annotate(
            str(count),
            (mean, rate),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize="x-small",
        )
    top.set(
        xlim=(0, 1),
        ylim=(-0.01, 1.01),
        ylabel="observed fracture rate",
        title="Reliability (numbers: images per bin)",
    )
    top.legend(loc="upper left", fontsize="small")
    edges = np.linspace(0, 1, RELIABILITY_BINS + 1)
    bottom.hist(
        [scores[~labels], scores[labels]],
        bins=edges,
        stacked=True,
        label=["no fracture", "fracture"],
        color=["0.7", "0.2"],
    )
    bottom.set(xlabel="ensemble score", ylabel="images")
    bottom.legend(loc="upper right", fontsize="x-small")
    fig.savefig(path, format="png")


def write_report(result: EvaluationResult, out_dir: Path | str) -> ReportFiles:
    """Write ``report.md``, ``roc.png`` and ``calibration.png`` into ``out_dir`` (created if
    missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / "report.md", out / "roc.png", out / "calibration.png")
    files.markdown.write_text(render_markdown(result, files.roc_png.name), encoding="utf-8")
    render_roc(result, files.roc_png)
    render_reliability(result, files.calibration_png)
    return files
