"""``dicomnode export-training``: a hospital's DICOM files + a labels CSV -> a training folder.

The result is the folder layout ``python -m inference train / calibrate / evaluate`` read
(:mod:`inference.training.dataset`): ``images/<SOPInstanceUID>.png``, ``labels.csv`` and
``boxes.json``. Every labelled instance is decoded by the node's own chain
(:func:`dicomnode.pixels.load_view`: Modality LUT, VOI LUT or window, MONOCHROME1 inversion,
pixel padding), so a model trains on exactly the grey levels it is given in service. The
float32 ``[0, 1]`` pixels are written as lossless 16-bit grayscale PNG (``round(x * 65535)``, a
step of 1/65535). Measured with the shipped ensemble on 4 FracAtlas radiographs, each wrapped as
DICOM in 8 encodings (8-bit, 12-bit, 16-bit with Rescale Slope/Intercept, MONOCHROME1, a VOI
window, RLE, JPEG-LS and JPEG 2000 lossless): the score of an exported PNG differs from that of
the source JPEG by at most 1.6e-7 where the export equals the source (8-bit values, MONOCHROME1,
a window mapping the range) and 1.5e-5 where the node stretches the values' min..max to
[0, 1]; ``tests/test_training_export.py`` allows 1e-3.

Labels CSV (UTF-8, a header row, one row per instance; other columns are ignored):

* ``sop_instance_uid`` (required): the instance's SOP Instance UID (0008,0018);
* ``fractured`` (required): ``1`` or ``0`` (``true``/``false`` also read);
* ``region`` (optional): ``;``-joined region keys of :mod:`inference.regions` (``wrist``,
  ``tibia_fibula`` ...) or FracAtlas groups (``hand``, ``leg``, ``hip``, ``shoulder``). Empty
  or absent: the region comes from the header by the worker's own rule
  (:func:`dicomnode.worker.resolve_view_region`: Body Part Examined, then Series Description,
  Protocol Name, Study Description); where that names none, the image is written with region
  ``unknown``. ``load_dataset`` accepts any region name, and calibration and evaluation put an
  unknown one in the pooled ``global`` group, which is what the node does in service with an
  image whose region it cannot tell;
* ``boxes`` (optional): a JSON list of fracture boxes ``[[x0, y0, x1, y1], ...]`` in pixels of
  the stored image (continuous coordinates as in :mod:`inference.records`: pixel ``(i, j)``
  covers ``[j, j + 1) x [i, i + 1)``), empty = none. A non-fractured row with boxes is an
  error; a fractured row without boxes is allowed (image-level label only);
* ``hardware`` (0/1, empty = unknown), ``views`` (``;``-joined, e.g. ``frontal;lateral``) and
  ``dup_group`` (optional): passed through. Use a *pseudonymous patient key* as ``dup_group``
  (e.g. an HMAC of the Patient ID with a site secret): the split keeps a group in one set, so
  no patient's images land in both training and validation (which would inflate the
  validation figures), and the training folder, which may leave the hospital, carries no
  patient identifier. Rows whose ``dup_group`` equals the instance's Patient ID or Accession
  Number are counted in a warning.

A malformed CSV (a missing column, a bad cell, a repeated UID, boxes on a non-fractured row) is
refused before anything is decoded, with the file and line (:class:`ExportError`, exit status
2). Then the DICOM folder is searched recursively (any file names; files that are not DICOM
Part 10 are counted and ignored, as are instances the CSV does not list), and each row's
instance is decoded and written, in ``workers`` processes. A row whose instance is missing,
found twice with different contents, undecodable, refused by ``inference`` (too small,
constant) or whose boxes leave the image is skipped with its reason. Messages carry SOP
Instance UIDs, CSV line numbers and reasons only, never patient data or file names (an
export's file names may hold patient names). ``out`` must be new or empty; an export in which no
row could be written is a failure (exit status 1).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.pixels import View, load_view
from dicomnode.storage import check_uid, file_sha256
from dicomnode.worker import decode_reason, resolve_view_region
from inference.preprocess import MIN_SIDE, preprocess
from inference.regions import CALIBRATION_GROUPS, GLOBAL_GROUP, REGIONS
from inference.training.dataset import BOXES_FILE, IMAGES_DIR, LABELS_FILE, load_dataset

REQUIRED_COLUMNS = ("sop_instance_uid", "fractured")
UNKNOWN_REGION = "unknown"
"""The region written for an image whose region neither the CSV nor the header names."""
FRACTURE_CATEGORY = {"id": 1, "name": "fracture"}
OUTPUT_COLUMNS = ("image", "region", "fractured", "hardware", "views", "dup_group")
PNG_MAX = 65535
_BOUNDS_TOLERANCE = 1e-3
"""Pixels a box may exceed the image by (float noise), as :mod:`inference.training.dataset`."""
_GROUPS = tuple(g for g in CALIBRATION_GROUPS if g != GLOBAL_GROUP)

BoxTuple = tuple[float, float, float, float]
T = TypeVar("T")
R = TypeVar("R")


class ExportError(ValueError):
    """Bad usage or a malformed labels CSV (the message names the file and line): exit 2."""


class SkipReason(StrEnum):
    """Why a labelled instance was left out of the export (the summary counts by these)."""

    MISSING = "not found in the DICOM folder"
    AMBIGUOUS = "several different files carry this SOP Instance UID"
    UNDECODABLE = "cannot be decoded"
    REFUSED = "refused by inference"
    BOX_OUTSIDE = "box outside the image"


@dataclass(frozen=True)
class LabelRow:
    """One row of the labels CSV, checked. ``regions`` is empty where the header decides."""

    line: int
    sop_instance_uid: str
    fractured: bool
    regions: tuple[str, ...] = ()
    boxes: tuple[BoxTuple, ...] = ()
    hardware: bool | None = None
    views: tuple[str, ...] = ()
    dup_group: str = ""


@dataclass(frozen=True)
class FolderScan:
    """The DICOM instances found under a folder: SOP Instance UID -> its file(s), sorted."""

    files: Mapping[str, tuple[Path, ...]]
    not_dicom: int


@dataclass(frozen=True)
class ExportTask:
    """One instance to decode and write (crosses into a worker process)."""

    row: LabelRow
    source: Path
    png: Path


@dataclass(frozen=True)
class Exported:
    """An instance written as ``png``: its size and the region its header names (key or None)."""

    row: LabelRow
    rows: int
    cols: int
    header_region: str | None
    dup_group_identifies: bool = False
    """The row's dup_group equals the instance's Patient ID or Accession Number."""


@dataclass(frozen=True)
class Skipped:
    """A labelled instance left out, and why (UIDs and reasons only, no patient data)."""

    row: LabelRow
    kind: SkipReason
    detail: str

    def line(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return (
            f"skipped {self.row.sop_instance_uid} (labels line {self.row.line}): "
            f"{self.kind.value}{detail}"
        )


@dataclass(frozen=True)
class ExportSummary:
    """What an export did: images written, rows skipped, files ignored."""

    out: Path
    exported: tuple[Exported, ...]
    skipped: tuple[Skipped, ...]
    not_listed: int
    not_dicom: int
    region_sources: Mapping[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The printed report: one line per skipped row, then the counts."""
        total = len(self.exported) + len(self.skipped)
        lines = [s.line() for s in self.skipped]
        lines.append(
            f"exported {len(self.exported)} of {total} labelled instances to {self.out} "
            f"({LABELS_FILE}, {BOXES_FILE}, {IMAGES_DIR}/)"
        )
        if self.region_sources:
            counts = ", ".join(f"{k} {v}" for k, v in self.region_sources.items())
            lines.append(f"  region from: {counts}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} labelled instances:")
            for kind, count in Counter(s.kind for s in self.skipped).most_common():
                lines.append(f"  {kind.value}: {count}")
        lines.append(
            f"ignored {self.not_listed} DICOM instances not in the labels and "
            f"{self.not_dicom} other files (not DICOM instances)"
        )
        identifying = sum(e.dup_group_identifies for e in self.exported)
        if identifying:
            lines.append(
                f"warning: {identifying} rows use the Patient ID or Accession Number itself as "
                "dup_group; the training folder then carries patient identifiers (use a "
                "pseudonymous key)"
            )
        return lines


# -- the labels CSV ---------------------------------------------------------------------------


def read_labels(path: Path) -> tuple[LabelRow, ...]:
    """Read and check the labels CSV; :class:`ExportError` naming the file and line if bad."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ExportError(f"{path}: cannot read the labels CSV ({exc.strerror})") from None
    rows: list[LabelRow] = []
    seen: set[str] = set()
    with handle:
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ExportError(f"{path}: header lacks required column(s) {missing}")
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                if None in row or any(value is None for value in row.values()):
                    raise ExportError(f"{where}: wrong number of cells for the header")
                try:
                    parsed = parse_row(row, reader.line_num)
                except ValueError as exc:
                    raise ExportError(f"{where}: {exc}") from None
                if parsed.sop_instance_uid in seen:
                    raise ExportError(f"{where}: {parsed.sop_instance_uid} is listed twice")
                seen.add(parsed.sop_instance_uid)
                rows.append(parsed)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ExportError(
                f"{path}: line {reader.line_num}: not a readable CSV ({exc})"
            ) from None
    if not rows:
        raise ExportError(f"{path}: no data rows")
    return tuple(rows)


def parse_row(row: Mapping[str, str], line: int) -> LabelRow:
    """One CSV row as a :class:`LabelRow` (ValueError saying which cell is wrong)."""
    fractured = parse_flag(row["fractured"], "fractured")
    if fractured is None:
        raise ValueError("fractured is empty (0 or 1 expected)")
    boxes = parse_boxes(row.get("boxes") or "")
    if boxes and not fractured:
        raise ValueError("boxes on a row with fractured = 0")
    return LabelRow(
        line=line,
        sop_instance_uid=parse_uid(row["sop_instance_uid"]),
        fractured=fractured,
        regions=parse_regions(row.get("region") or ""),
        boxes=boxes,
        hardware=parse_flag(row.get("hardware") or "", "hardware"),
        views=split_list(row.get("views") or "", "views"),
        dup_group=(row.get("dup_group") or "").strip(),
    )


def parse_uid(text: str) -> str:
    """A SOP Instance UID cell; the value is not echoed (a wrong cell may hold anything)."""
    try:
        return check_uid(text.strip(), "sop_instance_uid")
    except ValueError:
        raise ValueError(
            "sop_instance_uid is not a valid UID (1-64 digits and single dots)"
        ) from None


def parse_flag(text: str, column: str) -> bool | None:
    """``1/0/true/false`` -> bool, empty -> None, anything else ValueError."""
    value = text.strip().lower()
    if not value:
        return None
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise ValueError(f"{column} must be 0 or 1, got {text!r}")


def split_list(text: str, column: str) -> tuple[str, ...]:
    """``a;b`` -> ``("a", "b")`` lower case; empty or repeated entries are refused."""
    if not text.strip():
        return ()
    items = tuple(item.strip().lower() for item in text.split(";"))
    if any(not item for item in items) or len(set(items)) != len(items):
        raise ValueError(f"{column} {text!r} has empty or repeated entries")
    return items


def parse_regions(text: str) -> tuple[str, ...]:
    """Region keys of :mod:`inference.regions` or FracAtlas group names, ``;``-joined."""
    regions = split_list(text, "region")
    for region in regions:
        if region not in REGIONS and region not in _GROUPS:
            raise ValueError(
                f"unknown region {region!r}; use a region key ({', '.join(REGIONS)}) or a "
                f"FracAtlas group ({', '.join(_GROUPS)})"
            )
    return regions


def parse_boxes(text: str) -> tuple[BoxTuple, ...]:
    """A JSON list of ``[x0, y0, x1, y1]`` boxes (empty cell: none); each must have an area."""
    if not text.strip():
        return ()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"boxes is not valid JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise ValueError("boxes must be a JSON list of [x0, y0, x1, y1] lists")
    boxes = []
    for box in value:
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f"box {box!r} is not [x0, y0, x1, y1] with 4 numbers")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"box {box!r} has no area (x1 > x0 and y1 > y0 needed)")
        boxes.append((x0, y0, x1, y1))
    return tuple(boxes)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


# -- the DICOM folder -------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapper:
    """``map`` over a process pool of ``workers`` processes (inline without a pool)."""

    pool: ProcessPoolExecutor | None = None
    workers: int = 1

    def __call__(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        if self.pool is None:
            return map(fn, items)
        chunk = max(1, min(64, len(items) // (4 * self.workers)))
        return self.pool.map(fn, items, chunksize=chunk)


def read_sop_instance_uid(path: Path) -> str | None:
    """The SOP Instance UID of a DICOM Part 10 file, or None (not DICOM, or none in it)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except InvalidDicomError:
        return None
    except Exception:  # a damaged file: pydicom raises many kinds of error
        return None
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    return uid or None


def scan_folder(root: Path, mapper: Mapper) -> FolderScan:
    """Every regular file under ``root`` (recursively, any name) by its SOP Instance UID."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    found: dict[str, list[Path]] = {}
    not_dicom = 0
    for path, uid in zip(paths, mapper(read_sop_instance_uid, paths), strict=True):
        if uid is None:
            not_dicom += 1
        else:
            found.setdefault(uid, []).append(path)
    return FolderScan({uid: tuple(p) for uid, p in found.items()}, not_dicom)


def choose_source(paths: Sequence[Path]) -> Path | None:
    """The file for a UID: the first, if all copies are identical; None if they differ."""
    if len(paths) > 1 and len({file_sha256(p) for p in paths}) > 1:
        return None
    return paths[0]


# -- one instance -----------------------------------------------------------------------------


def to_png16(pixels: np.ndarray) -> np.ndarray:
    """``[0, 1]`` float pixels as the uint16 grey levels of the PNG: ``round(x * 65535)``."""
    return np.round(np.clip(pixels, 0.0, 1.0) * PNG_MAX).astype(np.uint16)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write a uint16 image as a lossless 16-bit grayscale PNG (temporary file, then rename)."""
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"cannot encode {path.name} as PNG")
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(encoded.tobytes())
    os.replace(partial, path)


def box_outside(boxes: Sequence[BoxTuple], rows: int, cols: int) -> BoxTuple | None:
    """The first box that leaves a ``cols x rows`` image (beyond float noise), or None."""
    tol = _BOUNDS_TOLERANCE
    for box in boxes:
        x0, y0, x1, y1 = box
        if x0 < -tol or y0 < -tol or x1 > cols + tol or y1 > rows + tol:
            return box
    return None


def inference_refusal(pixels: np.ndarray) -> str | None:
    """Why ``inference`` would refuse this image in service (too small, constant...), or None."""
    try:
        preprocess(pixels, size=MIN_SIDE, want_lcn=False)
    except ValueError as exc:
        return str(exc)
    return None


def _identifies(view: View, dup_group: str) -> bool:
    """Whether ``dup_group`` is the instance's Patient ID or Accession Number in clear."""
    if not dup_group:
        return False
    header = view.header
    values = (str(header.get(k, "") or "").strip() for k in ("PatientID", "AccessionNumber"))
    return dup_group in {v for v in values if v}


def export_one(task: ExportTask) -> Exported | Skipped:
    """Decode one instance with the node's chain and write its PNG, or say why not."""
    row = task.row
    try:
        view = load_view(task.source)
    except Exception as exc:
        # load_view names the file, whose name may hold patient data in an export
        reason = decode_reason(exc).replace(task.source.name, "the file")
        return Skipped(row, SkipReason.UNDECODABLE, reason)
    if view.sop_instance_uid != row.sop_instance_uid:  # the file changed since the scan
        return Skipped(row, SkipReason.MISSING, "the file now holds another instance")
    refusal = inference_refusal(view.pixels)
    if refusal is not None:
        return Skipped(row, SkipReason.REFUSED, refusal)
    outside = box_outside(row.boxes, view.rows, view.columns)
    if outside is not None:
        return Skipped(
            row,
            SkipReason.BOX_OUTSIDE,
            f"{list(outside)} is not inside the {view.columns}x{view.rows} image",
        )
    write_png(task.png, to_png16(view.pixels))
    match = resolve_view_region(view)
    return Exported(
        row=row,
        rows=view.rows,
        cols=view.columns,
        header_region=None if match.region is None else match.region.key,
        dup_group_identifies=_identifies(view, row.dup_group),
    )


# -- the training folder ----------------------------------------------------------------------


def image_name(uid: str) -> str:
    return f"{uid}.png"


def regions_of(item: Exported) -> tuple[tuple[str, ...], str]:
    """The regions written for an image and where they came from (labels, header, unknown)."""
    if item.row.regions:
        return item.row.regions, "labels"
    if item.header_region is not None:
        return (item.header_region,), "header"
    return (UNKNOWN_REGION,), UNKNOWN_REGION


def write_labels(path: Path, exported: Sequence[Exported]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(OUTPUT_COLUMNS)
        for item in exported:
            row = item.row
            writer.writerow(
                (
                    image_name(row.sop_instance_uid),
                    ";".join(regions_of(item)[0]),
                    int(row.fractured),
                    "" if row.hardware is None else int(row.hardware),
                    ";".join(row.views),
                    row.dup_group,
                )
            )


def coco_document(exported: Sequence[Exported]) -> dict[str, object]:
    """``boxes.json``: every image listed, one category-1 annotation per box."""
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for image_id, item in enumerate(exported, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": image_name(item.row.sop_instance_uid),
                "width": item.cols,
                "height": item.rows,
            }
        )
        for x0, y0, x1, y1 in item.row.boxes:
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": FRACTURE_CATEGORY["id"],
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [],
                }
            )
    return {"images": images, "annotations": annotations, "categories": [FRACTURE_CATEGORY]}


def prepare_out(out: Path) -> Path:
    """Create ``out/images``; an existing non-empty ``out`` is refused (no stale mixture)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder")
    images = out / IMAGES_DIR
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create it ({exc.strerror})") from None
    return images


# -- the whole export -------------------------------------------------------------------------


def export_training(dicom_dir: Path, labels: Path, out: Path, workers: int) -> ExportSummary:
    """Export the labelled instances under ``dicom_dir`` into the training folder ``out``.

    Raises :class:`ExportError` on bad usage or a malformed CSV (before anything is written),
    ``RuntimeError`` if a decoding process died.
    """
    if workers < 1:
        raise ExportError(f"--workers must be at least 1, got {workers}")
    if not dicom_dir.is_dir():
        raise ExportError(f"{dicom_dir}: no such folder (the DICOM files to export)")
    rows = read_labels(labels)
    images_dir = prepare_out(out)
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context) if workers > 1 else None
    try:
        mapper = Mapper(pool, workers)
        scan = scan_folder(dicom_dir, mapper)
        tasks: list[ExportTask] = []
        skipped: list[Skipped] = []
        for row in rows:
            paths = scan.files.get(row.sop_instance_uid)
            source = None if paths is None else choose_source(paths)
            if paths is None:
                skipped.append(Skipped(row, SkipReason.MISSING, ""))
            elif source is None:
                skipped.append(Skipped(row, SkipReason.AMBIGUOUS, f"{len(paths)} files"))
            else:
                png = images_dir / image_name(row.sop_instance_uid)
                tasks.append(ExportTask(row, source, png))
        outcomes = list(mapper(export_one, tasks))
    except BrokenProcessPool:
        raise RuntimeError(
            "a decoding process died (a decoder crash?); run with --workers 1 to find the file"
        ) from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    exported = [o for o in outcomes if isinstance(o, Exported)]
    skipped += [o for o in outcomes if isinstance(o, Skipped)]
    skipped.sort(key=lambda s: s.row.line)
    listed = {row.sop_instance_uid for row in rows}
    summary = ExportSummary(
        out=out,
        exported=tuple(exported),
        skipped=tuple(skipped),
        not_listed=sum(uid not in listed for uid in scan.files),
        not_dicom=scan.not_dicom,
        region_sources=dict(Counter(regions_of(e)[1] for e in exported)),
    )
    if exported:
        write_labels(out / LABELS_FILE, exported)
        (out / BOXES_FILE).write_text(json.dumps(coco_document(exported)), encoding="utf-8")
        load_dataset(out)  # what train/calibrate/evaluate will read: must load
    return summary
