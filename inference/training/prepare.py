"""Training inputs: every image cropped, resized and padded to ``size`` with its LCN counterpart
(the same ``inference.preprocess.preprocess`` the node runs), and its ground-truth fracture map
drawn directly in model space by mapping the polygon (or box) corners through the same transform,
so the map and the image stay aligned to the sub-pixel.

Two sources with one interface (:class:`TrainingData`: ``item(i)``, ``labels``, ``ids``):

* :class:`PreparedData`, pre-processed once and kept as arrays: float16 images ``(N, 2, S, S)``
  and uint8 maps ``(N, S, S)``. With a cache folder (what ``train`` uses) the arrays are written
  straight into memory-mapped ``.npy`` files there by parallel worker processes, so the data set
  may be larger than memory (256 px: 3,219 images take about 1 GB; 1024 px: 4.2 MB per image,
  about 2.9 TB for 700,000 radiographs) and every epoch reads it at disk speed;
* :class:`StreamingData`, decoded and pre-processed on demand (``train --stream``): no disk
  beyond the images themselves, at the price of decoding every image in every epoch, spread
  over the data loader's worker processes.

``benchmarks/train_scale.py`` measures both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from inference.imageio import read_grayscale
from inference.preprocess import PreprocessSettings, Transform
from inference.training.dataset import Record, ground_truth_map

CACHE_FORMAT = 2


class TrainingData(Protocol):
    """What training reads: per-image model inputs and maps, labels and ids."""

    @property
    def ids(self) -> tuple[str, ...]: ...

    @property
    def size(self) -> int: ...

    @property
    def labels(self) -> np.ndarray: ...

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i``: float16 ``(2, S, S)`` (raw, LCN) and its uint8 ``(S, S)`` map."""
        ...

    def index_of(self, ids: Sequence[str]) -> np.ndarray: ...


def positions(ids: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """Indices of ``wanted`` ids in ``ids`` (int64)."""
    position = {image_id: i for i, image_id in enumerate(ids)}
    return np.array([position[i] for i in wanted], dtype=np.int64)


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

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.images[i]), np.asarray(self.masks[i])

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        return positions(self.ids, ids)


@dataclass(frozen=True)
class StreamingData:
    """The same inputs as :class:`PreparedData`, decoded and pre-processed when asked for."""

    records: tuple[Record, ...]
    size: int
    settings: PreprocessSettings

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.image_id for r in self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(r.fractured) for r in self.records], dtype=np.int64)

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return prepare_one((self.records[i], self.size, self.settings))

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        return positions(self.ids, ids)


def model_mask(record: Record, transform: Transform, size: int) -> np.ndarray:
    """The record's ground-truth map in model space (uint8 0/1), drawn through the transform."""
    return ground_truth_map(record, (size, size), to_target=transform.to_model_points)


def prepare_one(args: tuple[Record, int, PreprocessSettings]) -> tuple[np.ndarray, np.ndarray]:
    """One record's float16 (raw, LCN) planes and uint8 map at the given size."""
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


def _fill(
    images: np.ndarray,
    masks: np.ndarray,
    jobs: Sequence[tuple[Record, int, PreprocessSettings]],
    workers: int,
) -> None:
    """Pre-process ``jobs`` into the arrays (which may be memory maps), in parallel."""
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, (planes, mask) in enumerate(pool.map(prepare_one, jobs, chunksize=16)):
                images[i], masks[i] = planes, mask
    else:
        for i, job in enumerate(jobs):
            images[i], masks[i] = prepare_one(job)


def _load_cache(cache: Path, size: int) -> PreparedData:
    meta = json.loads((cache / "meta.json").read_text())
    return PreparedData(
        ids=tuple(meta["ids"]),
        size=size,
        images=np.load(cache / "images.npy", mmap_mode="r"),
        masks=np.load(cache / "masks.npy", mmap_mode="r"),
        labels=np.load(cache / "labels.npy"),
    )


def prepare(
    records: Sequence[Record],
    *,
    size: int,
    settings: PreprocessSettings,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> PreparedData:
    """Pre-process all records at ``size`` (in parallel). With ``cache_dir``, the arrays are
    written straight into memory-mapped files of a cache folder named by the records, size and
    settings (reused when complete), never held whole in memory; without, kept in memory."""
    n = len(records)
    jobs = [(record, size, settings) for record in records]
    count = workers or default_workers()
    labels = np.array([int(r.fractured) for r in records], dtype=np.int64)
    ids = tuple(r.image_id for r in records)
    if cache_dir is None:
        images = np.zeros((n, 2, size, size), dtype=np.float16)
        masks = np.zeros((n, size, size), dtype=np.uint8)
        _fill(images, masks, jobs, count)
        return PreparedData(ids=ids, size=size, images=images, masks=masks, labels=labels)
    cache = cache_dir / f"prepared-{size}-{_cache_key(records, size, settings)}"
    if (cache / "done").is_file():
        return _load_cache(cache, size)
    cache.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        cache / "images.npy", mode="w+", dtype=np.float16, shape=(n, 2, size, size)
    )
    masks = np.lib.format.open_memmap(
        cache / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)
    )
    _fill(images, masks, jobs, count)
    images.flush()
    masks.flush()
    del images, masks
    np.save(cache / "labels.npy", labels)
    (cache / "meta.json").write_text(json.dumps({"ids": ids}))
    (cache / "done").write_text("ok\n")
    return _load_cache(cache, size)
