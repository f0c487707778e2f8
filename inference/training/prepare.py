"""Pre-process a dataset once per input size and keep it as arrays (cached on disk).

Every image is cropped, resized and padded to ``size`` with its LCN counterpart (the same
``inference.preprocess.preprocess`` the node runs), and its ground-truth fracture map is drawn
directly in model space by mapping the polygon (or box) corners through the same transform, so the
map and the image stay aligned to the sub-pixel. Arrays are kept as float16 (images) and uint8
(maps): 256 px, 3,219 images take about 1 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from inference.imageio import read_grayscale
from inference.preprocess import PreprocessSettings, Transform
from inference.training.dataset import Record

CACHE_FORMAT = 1


@dataclass(frozen=True)
class PreparedData:
    """Model-space arrays for a list of records, in the records' order.

    ``images``: (N, 2, S, S) float16, channel 0 raw, channel 1 LCN, both in [-1, 1].
    ``masks``: (N, S, S) uint8 ground-truth fracture maps. ``labels``: (N,) 0/1.
    ``gt_boxes``: per image, ground-truth boxes in model space (x0, y0, x1, y1).
    """

    ids: tuple[str, ...]
    size: int
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    gt_boxes: tuple[tuple[tuple[float, float, float, float], ...], ...]

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        position = {image_id: i for i, image_id in enumerate(self.ids)}
        return np.array([position[i] for i in ids], dtype=np.int64)


def _model_polygons(record: Record, transform: Transform) -> list[np.ndarray]:
    """Fracture outlines (polygons where given, else the boxes) in model-space coordinates."""
    shapes: list[np.ndarray] = []
    for (x0, y0, x1, y1), outline in zip(record.boxes, record.polygons, strict=True):
        parts = [np.asarray(part, dtype=np.float64) for part in outline if len(part) >= 3]
        shapes += parts or [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)]
    return [transform.to_model_points(s) for s in shapes]


def model_mask(record: Record, transform: Transform, size: int) -> np.ndarray:
    """The record's ground-truth map in model space (uint8 0/1)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    shift = 4  # cv2 sub-pixel precision: coordinates in 1/16 px
    polygons = [
        np.round((p - 0.5) * (1 << shift)).astype(np.int32)  # edge -> centre convention
        for p in _model_polygons(record, transform)
    ]
    if polygons:
        cv2.fillPoly(mask, polygons, color=1, lineType=cv2.LINE_8, shift=shift)
    return mask


def model_boxes(record: Record, transform: Transform) -> tuple[tuple[float, ...], ...]:
    """Ground-truth boxes mapped to model space."""
    boxes = []
    for x0, y0, x1, y1 in record.boxes:
        pts = transform.to_model_points(np.array([[x0, y0], [x1, y1]], dtype=np.float64))
        boxes.append((float(pts[0, 0]), float(pts[0, 1]), float(pts[1, 0]), float(pts[1, 1])))
    return tuple(boxes)


def _prepare_one(
    args: tuple[Record, int, PreprocessSettings],
) -> tuple[np.ndarray, np.ndarray, tuple[tuple[float, ...], ...]]:
    record, size, settings = args
    prepared = replace(settings, size=size).apply(read_grayscale(record.path), want_lcn=True)
    assert prepared.lcn is not None
    planes = np.stack([prepared.raw, prepared.lcn]).astype(np.float16)
    return planes, model_mask(record, prepared.transform, size), model_boxes(
        record, prepared.transform)


def _cache_key(records: Sequence[Record], size: int, settings: PreprocessSettings) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT, size, settings.to_mapping()], sort_keys=True,
                             default=str).encode())
    for record in records:
        stat = Path(record.path).stat()
        digest.update(f"{record.image_id}|{stat.st_size}|{stat.st_mtime_ns}|"
                      f"{record.boxes}|{len(record.polygons)}".encode())
    return digest.hexdigest()[:20]


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 1)))


def prepare(
    records: Sequence[Record],
    *,
    size: int,
    settings: PreprocessSettings,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> PreparedData:
    """Pre-process all records at ``size`` (in parallel), reusing a cache in ``cache_dir``."""
    key = _cache_key(records, size, settings)
    cache = cache_dir / f"prepared-{size}-{key}" if cache_dir else None
    if cache is not None and (cache / "done").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        return PreparedData(
            ids=tuple(meta["ids"]),
            size=size,
            images=np.load(cache / "images.npy", mmap_mode="r"),
            masks=np.load(cache / "masks.npy", mmap_mode="r"),
            labels=np.load(cache / "labels.npy"),
            gt_boxes=tuple(tuple(tuple(b) for b in boxes) for boxes in meta["gt_boxes"]),
        )
    n = len(records)
    images = np.zeros((n, 2, size, size), dtype=np.float16)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    boxes: list[tuple[tuple[float, ...], ...]] = []
    jobs = [(record, size, settings) for record in records]
    count = workers or default_workers()
    if count > 1:
        with ProcessPoolExecutor(max_workers=count) as pool:
            results = pool.map(_prepare_one, jobs, chunksize=16)
            for i, (planes, mask, gt) in enumerate(results):
                images[i], masks[i] = planes, mask
                boxes.append(gt)
    else:
        for i, job in enumerate(jobs):
            planes, mask, gt = _prepare_one(job)
            images[i], masks[i] = planes, mask
            boxes.append(gt)
    data = PreparedData(
        ids=tuple(r.image_id for r in records),
        size=size,
        images=images,
        masks=masks,
        labels=np.array([int(r.fractured) for r in records], dtype=np.int64),
        gt_boxes=tuple(tuple(tuple(float(v) for v in b) for b in g) for g in boxes),  # type: ignore[misc]
    )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "images.npy", data.images)
        np.save(cache / "masks.npy", data.masks)
        np.save(cache / "labels.npy", data.labels)
        (cache / "meta.json").write_text(json.dumps({"ids": data.ids, "gt_boxes": data.gt_boxes}))
        (cache / "done").write_text("ok\n")
    return data
