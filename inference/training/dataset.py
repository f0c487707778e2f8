"""Reader for a FracAtlas-style training folder, which any site can fill with its own data.

Layout of ``root``::

    images/       the radiographs (PNG, JPEG or TIFF; 8- or 16-bit; grey or R=G=B colour)
    labels.csv    one row per image (columns below)
    boxes.json    COCO: ``images`` (file_name, width, height) and ``annotations`` of
                  category 1 (fracture) with ``bbox`` [x, y, w, h] and optional polygon
                  ``segmentation``, in pixels of the stored image

``labels.csv`` columns (a header row; extra columns are ignored):

* required: ``image`` (file name inside ``images/``, also the image's id), ``region``
  (``;``-joined body regions, e.g. ``hand;shoulder``; FracAtlas uses hand/leg/hip/shoulder,
  where "hand" covers hand, wrist and forearm), ``fractured`` (0/1);
* optional: ``hardware`` (0/1, empty = unknown), ``views`` (``;``-joined, e.g.
  ``frontal;lateral``), ``dup_group`` (near-duplicate group id, empty = none),
  ``dup_label_conflict`` (0/1: the group's labels disagree).

Every row must have an entry in ``boxes.json`` (non-fractured images with no annotations) and
vice versa, so that a forgotten file is an error rather than a silently unannotated image.
Annotations of other categories are ignored. A fractured image without any annotation is
allowed (image-level label only); a non-fractured image with a fracture annotation is refused.

Coordinates follow :mod:`inference.records`: continuous pixels, ``x`` along columns, pixel
``(i, j)`` covering ``[j, j + 1) x [i, i + 1)``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.path import Path as MplPath

from inference.imageio import read_grayscale

FRACTURE_CATEGORY_ID = 1
"""COCO category id of a fracture annotation."""

LABELS_FILE = "labels.csv"
BOXES_FILE = "boxes.json"
IMAGES_DIR = "images"

REQUIRED_COLUMNS = ("image", "region", "fractured")

_BOUNDS_TOLERANCE = 1e-3
"""Pixels a stored coordinate may exceed the image by (float noise) before it is refused."""

BoxTuple = tuple[float, float, float, float]
Polygon = tuple[tuple[float, float], ...]
"""A closed outline as ``(x, y)`` vertices."""
Outline = tuple[Polygon, ...]
"""The polygon parts of one annotation (COCO allows several; empty: box only)."""


@dataclass(frozen=True)
class Record:
    """One labelled image of the training folder.

    ``boxes[k]`` is ``(x0, y0, x1, y1)`` of fracture annotation ``k`` in stored-image pixels;
    ``polygons[k]`` are that annotation's outline parts (empty where only a box was drawn), so
    the two tuples are index-aligned. ``shape`` is the stored image's ``(rows, cols)`` as
    recorded in ``boxes.json``. ``hardware`` is None where the csv does not say.
    """

    image_id: str
    path: Path
    regions: tuple[str, ...]
    fractured: bool
    boxes: tuple[BoxTuple, ...]
    polygons: tuple[Outline, ...]
    shape: tuple[int, int]
    hardware: bool | None = None
    views: tuple[str, ...] = ()
    dup_group: str | None = None
    label_conflict: bool = False

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError(f"{self.image_id}: a record needs at least one region")
        if len(self.polygons) != len(self.boxes):
            raise ValueError(
                f"{self.image_id}: {len(self.polygons)} polygon entries for "
                f"{len(self.boxes)} boxes (they must be index-aligned)"
            )
        if self.boxes and not self.fractured:
            raise ValueError(f"{self.image_id}: fracture boxes on an image labelled non-fractured")
        for x0, y0, x1, y1 in self.boxes:
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"{self.image_id}: empty box {(x0, y0, x1, y1)}")

    @property
    def localized(self) -> bool:
        """Whether the image has fracture annotations (a usable ground-truth map)."""
        return bool(self.boxes)


def load_dataset(root: Path | str) -> list[Record]:
    """Read ``root/labels.csv`` and ``root/boxes.json`` into records, in csv row order.

    Raises FileNotFoundError for a missing file or image, ValueError (naming the file and the
    csv line or annotation id) for a malformed entry or geometry outside the stored image.
    """
    root = Path(root)
    labels_path = root / LABELS_FILE
    boxes_path = root / BOXES_FILE
    images_dir = root / IMAGES_DIR
    for needed in (labels_path, boxes_path, images_dir):
        if not needed.exists():
            raise FileNotFoundError(f"{needed}: missing (expected in the dataset folder {root})")
    geometry = _read_coco(boxes_path)
    records: list[Record] = []
    seen: set[str] = set()
    for line, row in _read_labels(labels_path):
        where = f"{labels_path}: line {line}"
        name = row["image"].strip()
        if not name:
            raise ValueError(f"{where}: empty 'image' cell")
        if name in seen:
            raise ValueError(f"{where}: image {name!r} listed twice")
        seen.add(name)
        if name not in geometry:
            raise ValueError(f"{where}: image {name!r} has no entry in {boxes_path}")
        path = images_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} is missing")
        try:
            records.append(_make_record(row, path, *geometry[name]))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    unlisted = sorted(set(geometry) - seen)
    if unlisted:
        raise ValueError(
            f"{boxes_path}: {len(unlisted)} image(s) not in {labels_path}, e.g. {unlisted[0]!r}"
        )
    return records


def _make_record(
    row: Mapping[str, str],
    path: Path,
    shape: tuple[int, int],
    annotations: Sequence[tuple[BoxTuple, Outline]],
) -> Record:
    """One csv row plus its COCO geometry as a :class:`Record` (ValueError if malformed)."""
    return Record(
        image_id=row["image"].strip(),
        path=path,
        regions=_split_list(row["region"], "region", required=True),
        fractured=_parse_flag(row["fractured"], "fractured"),
        boxes=tuple(box for box, _ in annotations),
        polygons=tuple(outline for _, outline in annotations),
        shape=shape,
        hardware=_optional_flag(row.get("hardware"), "hardware"),
        views=_split_list(row.get("views") or "", "views", required=False),
        dup_group=(row.get("dup_group") or "").strip() or None,
        label_conflict=bool(_optional_flag(row.get("dup_label_conflict"), "dup_label_conflict")),
    )


def load_grayscale(path: Path | str) -> np.ndarray:
    """The stored pixels as a 2-D uint8/uint16 array, in the frame the boxes refer to.

    R=G=B colour collapses exactly to one channel, true colour becomes luminance (cv2); EXIF
    orientation is not re-applied (FracAtlas already rotated the pixels). Delegates to
    :func:`inference.imageio.read_grayscale` so training and serving read files alike.
    """
    return read_grayscale(path)


def ground_truth_map(
    record: Record,
    shape: tuple[int, int] | None = None,
    *,
    to_target: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The 0/1 uint8 fracture map of ``record`` at ``shape`` (rows, cols).

    Each annotation fills its polygon parts where it has any, else its box. A pixel is set
    where its centre lies inside the outline (matplotlib's point-in-polygon test), so a box
    ``(x0, y0, x1, y1)`` with integer corners sets exactly the pixels ``x0 <= j < x1``,
    ``y0 <= i < y1`` of :mod:`inference.records`' convention (cv2.fillPoly would also set the
    pixels its right and bottom edges touch). An outline too thin to hold a pixel centre sets
    the pixel under its mean vertex instead, so no annotation vanishes from the map.

    Without ``to_target`` the map is in stored-image pixels and ``shape`` defaults to
    ``record.shape``. ``to_target`` maps ``(N, 2)`` stored-image ``(x, y)`` points into the
    target frame (e.g. the pre-processing transform's ``to_model_points``); then ``shape`` is
    the target's shape and is required. Geometry outside the target is clipped.
    """
    if shape is None:
        if to_target is not None:
            raise ValueError("ground_truth_map: give the target shape together with to_target")
        shape = record.shape
    rows, cols = shape
    if rows <= 0 or cols <= 0:
        raise ValueError(f"ground_truth_map: shape {shape} must be positive")
    out = np.zeros((int(rows), int(cols)), dtype=np.uint8)
    for points in _outline_points(record):
        target = points if to_target is None else np.asarray(to_target(points), dtype=np.float64)
        if target.shape != points.shape:
            raise ValueError(
                f"ground_truth_map: to_target returned shape {target.shape} for {points.shape}"
            )
        _fill_outline(out, target)
    return out


def _fill_outline(out: np.ndarray, points: np.ndarray) -> None:
    """Set the pixels of ``out`` whose centres lie inside the ``(N, 2)`` outline ``points``."""
    rows, cols = out.shape
    x_lo, y_lo = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
    x_hi = min(int(np.ceil(points[:, 0].max())), cols)
    y_hi = min(int(np.ceil(points[:, 1].max())), rows)
    if x_lo >= x_hi or y_lo >= y_hi:
        return  # entirely outside the target
    ys, xs = np.mgrid[y_lo:y_hi, x_lo:x_hi]
    centres = np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5])
    inside = MplPath(points).contains_points(centres).reshape(xs.shape)
    if inside.any():
        out[y_lo:y_hi, x_lo:x_hi] |= inside.astype(np.uint8)
        return
    mean_x, mean_y = points.mean(axis=0)
    out[
        int(np.clip(np.floor(mean_y), y_lo, y_hi - 1)),
        int(np.clip(np.floor(mean_x), x_lo, x_hi - 1)),
    ] = 1


def _outline_points(record: Record) -> Iterable[np.ndarray]:
    """Every filled outline of ``record`` as an ``(N, 2)`` float64 array of ``(x, y)``."""
    for (x0, y0, x1, y1), outline in zip(record.boxes, record.polygons, strict=True):
        if outline:
            for polygon in outline:
                yield np.asarray(polygon, dtype=np.float64)
        else:
            yield np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _read_labels(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs of the csv, after checking the header."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [column for column in REQUIRED_COLUMNS if column not in header]
        if missing:
            raise ValueError(f"{path}: header lacks required column(s) {missing}; has {header}")
        rows = []
        for row in reader:
            if None in row or any(value is None for value in row.values()):
                raise ValueError(
                    f"{path}: line {reader.line_num}: wrong number of cells for the header"
                )
            rows.append((reader.line_num, row))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def _read_coco(path: Path) -> dict[str, tuple[tuple[int, int], list[tuple[BoxTuple, Outline]]]]:
    """Map file name -> (stored (rows, cols), fracture annotations as (box, outline))."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: top level must be a COCO object")
    images = _json_list(document, "images", path)
    annotations = _json_list(document, "annotations", path)
    by_id: dict[int, str] = {}
    result: dict[str, tuple[tuple[int, int], list[tuple[BoxTuple, Outline]]]] = {}
    for index, entry in enumerate(images):
        where = f"{path}: images[{index}]"
        try:
            image_id = _json_int(entry, "id")
            name = entry["file_name"]
            width = _json_int(entry, "width")
            height = _json_int(entry, "height")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{where}: needs integer id/width/height and file_name ({error})"
            ) from None
        if not isinstance(name, str) or width <= 0 or height <= 0:
            raise ValueError(f"{where}: bad file_name or size")
        if image_id in by_id or name in result:
            raise ValueError(f"{where}: duplicate id {image_id} or file_name {name!r}")
        by_id[image_id] = name
        result[name] = ((height, width), [])
    for index, entry in enumerate(annotations):
        where = f"{path}: annotation {entry.get('id', index) if isinstance(entry, dict) else index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        if entry.get("category_id") != FRACTURE_CATEGORY_ID:
            continue
        owner = entry.get("image_id")
        if owner not in by_id:
            raise ValueError(f"{where}: image_id {owner!r} is not in the images list")
        (rows, cols), found = result[by_id[owner]]
        try:
            box = _coco_box(entry.get("bbox"))
            outline = _coco_outline(entry.get("segmentation", []))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        _check_inside(box, outline, cols, rows, where)
        found.append((box, outline))
    return result


def _json_list(document: Mapping[str, Any], key: str, path: Path) -> list[Any]:
    value = document.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{path}: COCO key {key!r} must be a list")
    return value


def _json_int(entry: Mapping[str, Any], key: str) -> int:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r} is not an integer")
    return value


def _coco_box(bbox: object) -> BoxTuple:
    """COCO ``[x, y, w, h]`` to ``(x0, y0, x1, y1)``."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ValueError(f"bbox must be [x, y, w, h] numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if not (w > 0 and h > 0):
        raise ValueError(f"bbox {bbox!r} has no area")
    return (x, y, x + w, y + h)


def _coco_outline(segmentation: object) -> Outline:
    """COCO polygon segmentation (list of flat ``[x1, y1, x2, y2, ...]``) to vertex tuples."""
    if not isinstance(segmentation, list):
        raise ValueError("segmentation must be a list of polygons (RLE is not supported)")
    parts = []
    for flat in segmentation:
        if (
            not isinstance(flat, list)
            or len(flat) < 6
            or len(flat) % 2
            or not all(_is_number(v) for v in flat)
        ):
            raise ValueError("each polygon must be a flat list of >= 3 (x, y) number pairs")
        parts.append(
            tuple((float(x), float(y)) for x, y in zip(flat[0::2], flat[1::2], strict=True))
        )
    return tuple(parts)


def _check_inside(box: BoxTuple, outline: Outline, cols: int, rows: int, where: str) -> None:
    """Refuse geometry outside the stored ``cols x rows`` image (beyond float noise)."""
    xs = [box[0], box[2], *(x for part in outline for x, _ in part)]
    ys = [box[1], box[3], *(y for part in outline for _, y in part)]
    tol = _BOUNDS_TOLERANCE
    if min(xs) < -tol or min(ys) < -tol or max(xs) > cols + tol or max(ys) > rows + tol:
        raise ValueError(
            f"{where}: geometry x in [{min(xs)}, {max(xs)}], y in [{min(ys)}, {max(ys)}] "
            f"lies outside the stored image {cols}x{rows}"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _parse_flag(text: str, column: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise ValueError(f"{column} must be 0 or 1, got {text!r}")


def _optional_flag(text: str | None, column: str) -> bool | None:
    """A 0/1 cell of an optional column; None where the column or the value is absent."""
    if text is None or not text.strip():
        return None
    return _parse_flag(text, column)


def _split_list(text: str, column: str, *, required: bool) -> tuple[str, ...]:
    """``a;b`` -> ``("a", "b")`` (lower case), refusing empty or repeated entries."""
    if not text.strip():
        if required:
            raise ValueError(f"{column} is empty")
        return ()
    items = tuple(item.strip().lower() for item in text.split(";"))
    if any(not item for item in items) or len(set(items)) != len(items):
        raise ValueError(f"{column} {text!r} has empty or repeated entries")
    return items
