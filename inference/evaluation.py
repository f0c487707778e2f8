"""Calibration and evaluation of a weights folder on a labelled folder (FracAtlas layout).

``calibrate_folder``: as the paper does, on the pooled tuning + validation predictions, per
calibration group, the image threshold for 92.5 % sensitivity, a high-specificity threshold (90 %
specificity) and the map binarization threshold with the best box agreement; the results are
written into the weights' manifest (with a new version).

``evaluate_folder``: metrics at the shipped operating point (the 92.5 % sensitivity threshold of
each image's calibration group), per region, per subgroup, on the unambiguous subset, and box
localization, written as ``metrics.json``, ``report.md`` and ``roc.png``.

An image of several regions (FracAtlas regions overlap, e.g. ``hand;shoulder``) is judged with the
most sensitive (lowest) threshold among its groups, and counts in each of its regions' rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from inference.calibration import (
    DEFAULT_SENSITIVITY_TARGET,
    DEFAULT_SPECIFICITY_TARGET,
    binarization_threshold,
    calibrate_groups,
)
from inference.ensemble import Ensemble, EnsembleOutput, content_rect
from inference.imageio import read_grayscale
from inference.manifest import Manifest, write_manifest
from inference.metrics import BinaryMetrics, binary_metrics, localization_metrics
from inference.postprocess import decide, extract_boxes
from inference.preprocess import Transform
from inference.records import Box, Decision, Thresholds
from inference.regions import CALIBRATION_GROUPS, GLOBAL_GROUP, REGIONS
from inference.report import EvaluationResult, write_report
from inference.training.dataset import Record, load_dataset
from inference.training.split import Split, load_split

VIEWS = ("frontal", "lateral", "oblique")


@dataclass(frozen=True)
class Predictions:
    """Ensemble outputs for a list of records, in order (maps at the ensemble's map size)."""

    records: tuple[Record, ...]
    scores: np.ndarray
    maps: tuple[np.ndarray | None, ...]
    transforms: tuple[Transform, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.fractured for r in self.records], dtype=bool)


def groups_of(record: Record) -> tuple[str, ...]:
    """Calibration groups of a record's regions (a group name, a region key, else global)."""
    groups = []
    for name in record.regions:
        if name in CALIBRATION_GROUPS:
            groups.append(name)
        elif name in REGIONS:
            groups.append(REGIONS[name].group)
        else:
            groups.append(GLOBAL_GROUP)
    return tuple(dict.fromkeys(groups))


def thresholds_of(record: Record, table: Mapping[str, Thresholds]) -> Thresholds:
    """The most sensitive calibrated thresholds among the record's groups (global fallback)."""
    options = [table[g] for g in groups_of(record) if g in table and table[g].calibrated]
    if not options:
        return table[GLOBAL_GROUP]
    return min(options, key=lambda t: t.sensitivity)


def collect_predictions(
    ensemble: Ensemble, records: Sequence[Record], *, batch: int = 16, progress: bool = True
) -> Predictions:
    """Run the ensemble over the records in batches (maps kept as float16)."""
    outputs: list[EnsembleOutput] = []
    for start in tqdm(
        range(0, len(records), batch),
        disable=not progress,
        file=sys.stderr,
        desc="predicting",
        unit="batch",
    ):
        chunk = records[start : start + batch]
        outputs += ensemble.predict([read_grayscale(r.path) for r in chunk])
    return Predictions(
        records=tuple(records),
        scores=np.array([o.score for o in outputs], dtype=np.float64),
        maps=tuple(None if o.prob_map is None else o.prob_map.astype(np.float16) for o in outputs),
        transforms=tuple(o.transform for o in outputs),
    )


def _subset(
    records: Sequence[Record], split_path: Path | None, parts: Sequence[str] | None
) -> list[Record]:
    if not parts:
        return list(records)
    if split_path is None or not split_path.is_file():
        raise ValueError(
            f"a subset ({', '.join(parts)}) needs a split file; {split_path} does not exist"
        )
    split = load_split(split_path)
    wanted: set[str] = set()
    for part in parts:
        wanted |= set(getattr(split, part))
    chosen = [r for r in records if r.image_id in wanted]
    if len(chosen) != len(wanted):
        raise ValueError(
            f"{split_path} names {len(wanted) - len(chosen)} images that are not in the data folder"
        )
    return chosen


def _masked_map(prob_map: np.ndarray, transform: Transform) -> np.ndarray:
    """The map with the resize padding zeroed (boxes are drawn on the content only)."""
    x0, y0, x1, y1 = content_rect(transform)
    masked = np.zeros(prob_map.shape, dtype=np.float32)
    masked[y0:y1, x0:x1] = prob_map[y0:y1, x0:x1]
    return masked


def _model_boxes(record: Record, transform: Transform) -> list[tuple[float, ...]]:
    return [transform.box_to_model(*box) for box in record.boxes]


def _binarize_for(preds: Predictions, members: np.ndarray) -> float | None:
    """Binarization threshold from the fractured, annotated images selected by ``members``."""
    chosen = [
        i for i in np.flatnonzero(members) if preds.records[i].boxes and preds.maps[i] is not None
    ]
    if not chosen:
        return None
    maps = [
        _masked_map(preds.maps[i].astype(np.float32), preds.transforms[i])  # type: ignore[union-attr]
        for i in chosen
    ]
    truth = [_model_boxes(preds.records[i], preds.transforms[i]) for i in chosen]

    def extract(prob_map: np.ndarray, threshold: float) -> list[Box]:
        return extract_boxes(prob_map, threshold=threshold, force_one=True)

    return binarization_threshold(maps, truth, extract=extract)


def calibrate_predictions(
    preds: Predictions, *, min_positives: int = 10
) -> tuple[dict[str, Thresholds], dict[str, object]]:
    """Thresholds per group and a summary table for the manifest's [calibration]."""
    groups = [groups_of(r) for r in preds.records]
    image = calibrate_groups(
        groups,
        preds.labels,
        preds.scores,
        min_positives=min_positives,
        sensitivity_target=DEFAULT_SENSITIVITY_TARGET,
        specificity_target=DEFAULT_SPECIFICITY_TARGET,
    )
    pooled_binarize = _binarize_for(preds, preds.labels) or 0.5
    thresholds: dict[str, Thresholds] = {}
    summary: dict[str, object] = {
        "date": dt.date.today().isoformat(),
        "images": len(preds.records),
        "positives": int(preds.labels.sum()),
        "sensitivity_target": DEFAULT_SENSITIVITY_TARGET,
        "specificity_target": DEFAULT_SPECIFICITY_TARGET,
        "binarize_criterion": "F1 of box matching at IoU >= 0.3 on fractured images",
    }
    for name, cal in image.items():
        members = np.array([name == GLOBAL_GROUP or name in g for g in groups])
        binarize = pooled_binarize
        if cal.calibrated and name != GLOBAL_GROUP:
            binarize = _binarize_for(preds, members & preds.labels) or pooled_binarize
        thresholds[name] = cal.thresholds(binarize)
        summary[f"{name}_n"] = cal.n
        summary[f"{name}_positives"] = cal.n_positive
        if cal.reason:
            summary[f"{name}_note"] = cal.reason
    return thresholds, summary


def out_of_fold_predictions(
    ensemble: Ensemble, records: Sequence[Record], split: Split, *, progress: bool = True
) -> Predictions:
    """Scores of a cross-fitted ensemble's development images, each from the members that did
    not learn from it (those tuned on its fold), in the order of ``records``. Images of a fold
    without a trained member yet are left out."""
    by_fold: dict[int, list[str]] = {}
    for spec in ensemble.manifest.members:
        if spec.fold is None or spec.fold >= len(split.folds):
            raise ValueError(
                f"member {spec.name!r} names fold {spec.fold}, which the split does not have"
            )
        by_fold.setdefault(spec.fold, []).append(spec.name)
    fold_of = split.fold_of()
    parts: list[Predictions] = []
    for fold, names in sorted(by_fold.items()):
        chosen = [r for r in records if fold_of.get(r.image_id) == fold]
        parts.append(collect_predictions(ensemble.restricted(names), chosen, progress=progress))
    merged = concatenate(parts)
    position = {r.image_id: i for i, r in enumerate(records)}
    order = sorted(range(len(merged.records)), key=lambda i: position[merged.records[i].image_id])
    return take(merged, order)


def concatenate(parts: Sequence[Predictions]) -> Predictions:
    """One :class:`Predictions` of several, in turn."""
    return Predictions(
        records=tuple(r for p in parts for r in p.records),
        scores=np.concatenate([p.scores for p in parts]) if parts else np.zeros(0),
        maps=tuple(m for p in parts for m in p.maps),
        transforms=tuple(t for p in parts for t in p.transforms),
    )


def calibration_predictions(
    ensemble: Ensemble, records: Sequence[Record], split: Split, *, progress: bool = True
) -> tuple[Predictions, str]:
    """The predictions the operating points are chosen on, and what they are: out-of-fold
    scores of the development images for a cross-fitted ensemble, else the ensemble's scores of
    the pooled tuning + validation images (the paper's way)."""
    if ensemble.manifest.folds:
        development = set(split.development)
        chosen = [r for r in records if r.image_id in development]
        preds = out_of_fold_predictions(ensemble, chosen, split, progress=progress)
        folds = ensemble.manifest.folds
        return preds, (
            f"out-of-fold scores of the development images (folds {', '.join(map(str, folds))}"
            f" of {len(split.folds)})"
        )
    wanted = set(split.tuning) | set(split.validation)
    chosen = [r for r in records if r.image_id in wanted]
    return collect_predictions(ensemble, chosen, progress=progress), "tuning + validation scores"


def calibrate_folder(
    weights: Path,
    data: Path,
    *,
    split_path: Path | None = None,
    device: str = "auto",
    version: str | None = None,
    progress: bool = True,
    evaluate_out: Path | None = None,
    seed: int = 0,
) -> str:
    """Choose the operating points and write them into the manifest: on the pooled tuning +
    validation predictions (as the paper does), or, for a cross-fitted ensemble, on the
    out-of-fold scores of all development images (the validation split stays untouched).

    With ``evaluate_out``, also evaluate the validation split at the new operating point (for
    the paper's way from the same predictions, without running the ensemble a second time)."""
    ensemble = Ensemble.load(weights, device=device)
    split_path = split_path or weights / "split.json"
    records = _subset(load_dataset(data), split_path, ("train", "tuning", "validation"))
    split = load_split(split_path)
    preds, source = calibration_predictions(ensemble, records, split, progress=progress)
    thresholds, summary = calibrate_predictions(preds)
    summary["scores"] = source
    manifest = replace(
        ensemble.manifest,
        thresholds=thresholds,
        calibration=summary,
        version=version or ensemble.manifest.version,
    )
    write_manifest(manifest)
    lines = [
        f"calibrated {manifest.name} {manifest.version} on {len(preds.records)} images' {source}:"
    ]
    if evaluate_out is not None:  # the validation split at the new thresholds
        wanted = set(split.validation)
        if manifest.folds:
            validation = [r for r in records if r.image_id in wanted]
            valid_preds = collect_predictions(ensemble, validation, progress=progress)
        else:
            valid_preds = take(
                preds, [i for i, r in enumerate(preds.records) if r.image_id in wanted]
            )
        result = evaluate_predictions(valid_preds, thresholds, seed=seed)
        write_evaluation(result, manifest, data, "validation", evaluate_out, valid_preds)
        lines.append(f"evaluated {len(valid_preds.records)} validation images into {evaluate_out}")
    for name, t in thresholds.items():
        flag = "" if t.calibrated else " (fallback: pooled)"
        lines.append(
            f"  {name}: sensitivity {t.sensitivity:.4f}, high specificity "
            f"{t.high_specificity:.4f}, binarize {t.binarize:.2f}{flag}"
        )
    return "\n".join(lines)


def _metrics(
    preds: Predictions, members: np.ndarray, thresholds: np.ndarray, seed: int
) -> BinaryMetrics:
    return binary_metrics(
        preds.labels[members], preds.scores[members], thresholds[members], seed=seed
    )


def predicted_boxes(preds: Predictions, index: int, thresholds: Thresholds) -> list[Box]:
    """Boxes (original pixels) the node would draw for image ``index``."""
    prob_map = preds.maps[index]
    score = float(preds.scores[index])
    if prob_map is None or decide(score, thresholds) is Decision.NO_FRACTURE:
        return []
    transform = preds.transforms[index]
    boxes = extract_boxes(
        prob_map.astype(np.float32),
        threshold=thresholds.binarize,
        valid=content_rect(transform),
        force_one=True,
    )
    return [Box(*transform.box_to_original(b.x0, b.y0, b.x1, b.y1), score=b.score) for b in boxes]


def evaluate_predictions(
    preds: Predictions, table: Mapping[str, Thresholds], *, seed: int = 0
) -> EvaluationResult:
    """All metrics at the shipped operating point."""
    per_image = [thresholds_of(r, table) for r in preds.records]
    cut = np.array([t.sensitivity for t in per_image])
    everyone = np.ones(len(preds.records), dtype=bool)
    regions = sorted({name for r in preds.records for name in r.regions})
    per_region = {
        name: _metrics(preds, np.array([name in r.regions for r in preds.records]), cut, seed)
        for name in regions
    }
    subgroups: dict[str, BinaryMetrics] = {}
    hardware = np.array([r.hardware is True for r in preds.records])
    known = np.array([r.hardware is not None for r in preds.records])
    for name, members in (("hardware", hardware), ("no_hardware", known & ~hardware)):
        if members.any():
            subgroups[name] = _metrics(preds, members, cut, seed)
    for view in VIEWS:
        members = np.array([view in r.views for r in preds.records])
        if members.any():
            subgroups[view] = _metrics(preds, members, cut, seed)
    unambiguous = np.array([not r.label_conflict for r in preds.records])
    fractured = [i for i, r in enumerate(preds.records) if r.boxes]
    localization = localization_metrics(
        [list(preds.records[i].boxes) for i in fractured],
        [predicted_boxes(preds, i, per_image[i]) for i in fractured],
    )
    return EvaluationResult(
        overall=_metrics(preds, everyone, cut, seed),
        per_region=per_region,
        subgroups=subgroups,
        unambiguous=_metrics(preds, unambiguous, cut, seed),
        localization=localization,
        labels=preds.labels,
        scores=preds.scores,
        regions=[r.regions for r in preds.records],
    )


def evaluate_folder(
    weights: Path,
    data: Path,
    out: Path,
    *,
    split_path: Path | None = None,
    subset: str | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate and write ``metrics.json``, ``report.md`` and ``roc.png`` into ``out``."""
    ensemble = Ensemble.load(weights, device=device)
    if subset and split_path is None:
        split_path = weights / "split.json"
    records = _subset(load_dataset(data), split_path, (subset,) if subset else None)
    preds = collect_predictions(ensemble, records, progress=progress)
    result = evaluate_predictions(preds, ensemble.manifest.thresholds, seed=seed)
    write_evaluation(result, ensemble.manifest, data, subset, out, preds)
    return result


def take(preds: Predictions, indices: Sequence[int]) -> Predictions:
    """The predictions of the records at ``indices``, in that order."""
    return Predictions(
        records=tuple(preds.records[i] for i in indices),
        scores=preds.scores[list(indices)],
        maps=tuple(preds.maps[i] for i in indices),
        transforms=tuple(preds.transforms[i] for i in indices),
    )


PREDICTION_COLUMNS = (
    "image",
    "regions",
    "group",
    "label",
    "score",
    "threshold",
    "decision",
    "boxes",
)


def prediction_rows(preds: Predictions, table: Mapping[str, Thresholds]) -> list[dict[str, str]]:
    """One row per image for ``predictions.csv``: its id, regions (``;``-joined), the calibration
    group whose threshold judged it, the label (0/1), the score, that threshold, the decision
    the node would give and its boxes (JSON ``[[x0, y0, x1, y1, peak], ...]`` in original
    pixels; empty for ``no_fracture``)."""
    rows = []
    for index, record in enumerate(preds.records):
        thresholds = thresholds_of(record, table)
        group = next((g for g, t in table.items() if t is thresholds), GLOBAL_GROUP)
        score = float(preds.scores[index])
        boxes = [
            [round(b.x0, 1), round(b.y0, 1), round(b.x1, 1), round(b.y1, 1), round(b.score, 4)]
            for b in predicted_boxes(preds, index, thresholds)
        ]
        rows.append(
            {
                "image": record.image_id,
                "regions": ";".join(record.regions),
                "group": group,
                "label": str(int(record.fractured)),
                "score": f"{score:.6f}",
                "threshold": f"{thresholds.sensitivity:.6f}",
                "decision": str(decide(score, thresholds)),
                "boxes": json.dumps(boxes),
            }
        )
    return rows


def write_predictions(preds: Predictions, table: Mapping[str, Thresholds], path: Path) -> None:
    """``predictions.csv`` (see :func:`prediction_rows`), so that a site can study its errors."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        writer.writerows(prediction_rows(preds, table))


def write_evaluation(
    result: EvaluationResult,
    manifest: Manifest,
    data: Path,
    subset: str | None,
    out: Path,
    preds: Predictions,
) -> None:
    """Write ``metrics.json``, ``predictions.csv``, ``report.md``, ``roc.png`` and
    ``calibration.png`` of ``result`` (computed from ``preds``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **result.to_mapping(),
        "weights": {
            "name": manifest.name,
            "version": manifest.version,
            "trained": manifest.trained,
        },
        "data": {"folder": str(data), "subset": subset or "all"},
        "operating_point": "sensitivity threshold (92.5% target) of each image's group",
    }
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_predictions(preds, manifest.thresholds, out / "predictions.csv")
    write_report(result, out)
