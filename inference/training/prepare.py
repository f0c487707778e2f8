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

import numpy as np

from inference.imageio import read_grayscale
from inference.preprocess import PreprocessSettings, Transform
from inference.training.dataset import Record, ground_truth_map

CACHE_FORMAT = 2


@dataclass(frozen=True)
class PreparedData:
    """Model-space arrays for a list of records, in the records' order.

    ``images``: (N, 2, S, S) float16, channel 0 raw, channel 1 LCN, both in [-1, 1].
    ``masks``: (N, S, S) uint8 ground-truth fracture maps. ``labels``: (N,) 0/1.
    """

    ids: tuple[str, ...]
    size: int
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        position = {image_id: i for i, image_id in enumerate(self.ids)}
        return np.array([position[i] for i in ids], dtype=np.int64)


def model_mask(record: Record, transform: Transform, size: int) -> np.ndarray:
    """The record's ground-truth map in model space (uint8 0/1), drawn through the transform."""
    return ground_truth_map(record, (size, size), to_target=transform.to_model_points)


def _prepare_one(args: tuple[Record, int, PreprocessSettings]) -> tuple[np.ndarray, np.ndarray]:
    record, size, settings = args
    prepared = replace(settings, size=size).apply(read_grayscale(record.path), want_lcn=True)
    assert prepared.lcn is not None
    planes = np.stack([prepared.raw, prepared.lcn]).astype(np.float16)
    return planes, model_mask(record, prepared.transform, size)


def _cache_key(records: Sequence[Record], size: int, settings: PreprocessSettings) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [CACHE_FORMAT, size, settings.to_mapping()], sort_keys=True, default=str
        ).encode()
    )
    for record in records:
        stat = Path(record.path).stat()
        digest.update(
            f"{record.image_id}|{stat.st_size}|{stat.st_mtime_ns}|"
            f"{record.boxes}|{len(record.polygons)}".encode()
        )
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
        )
    n = len(records)
    images = np.zeros((n, 2, size, size), dtype=np.float16)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    jobs = [(record, size, settings) for record in records]
    count = workers or default_workers()
    if count > 1:
        with ProcessPoolExecutor(max_workers=count) as pool:
            for i, (planes, mask) in enumerate(pool.map(_prepare_one, jobs, chunksize=16)):
                images[i], masks[i] = planes, mask
    else:
        for i, job in enumerate(jobs):
            images[i], masks[i] = _prepare_one(job)
    data = PreparedData(
        ids=tuple(r.image_id for r in records),
        size=size,
        images=images,
        masks=masks,
        labels=np.array([int(r.fractured) for r in records], dtype=np.int64),
    )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "images.npy", data.images)
        np.save(cache / "masks.npy", data.masks)
        np.save(cache / "labels.npy", data.labels)
        (cache / "meta.json").write_text(json.dumps({"ids": data.ids}))
        (cache / "done").write_text("ok\n")
    return data
