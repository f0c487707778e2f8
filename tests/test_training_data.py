"""Tests of the training data side: dataset reader, split, sampler, augmentation and loss."""

from __future__ import annotations

import collections
import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.path import Path as MplPath
from PIL import Image
from scipy.stats import chisquare

from inference.training.augment import (
    PAD_VALUE,
    AugmentParams,
    AugmentSettings,
    apply_augment,
    augment,
    sample_params,
)
from inference.training.dataset import Record, ground_truth_map, load_dataset, load_grayscale
from inference.training.loss import MAP_WEIGHT_ATTENTION, MAP_WEIGHT_DEFAULT, joint_loss
from inference.training.sampler import (
    EpochSampler,
    balanced_indices,
    balanced_probabilities,
    epoch_indices,
    sampling_strata,
)
from inference.training.split import (
    PARTS,
    Split,
    load_split,
    save_split,
    split_dataset,
    stratum,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FRACATLAS = SHARED / "datasets" / "fracatlas"


@pytest.fixture(scope="module")
def atlas() -> list[Record]:
    return load_dataset(FRACATLAS)


@pytest.fixture(scope="module")
def atlas_by_id(atlas: list[Record]) -> dict[str, Record]:
    return {record.image_id: record for record in atlas}


@pytest.fixture(scope="module")
def atlas_split(atlas: list[Record]) -> Split:
    return split_dataset(atlas, seed=0)


# --------------------------------------------------------------------------- dataset, real


def test_fracatlas_counts_match_readme(atlas: list[Record]) -> None:
    assert len(atlas) == 3219
    assert sum(record.fractured for record in atlas) == 573
    assert sum(len(record.boxes) for record in atlas) == 748
    assert sum(record.label_conflict for record in atlas) == 9
    assert all(record.localized == record.fractured for record in atlas)
    assert {region for record in atlas for region in record.regions} == {
        "hand",
        "leg",
        "hip",
        "shoulder",
    }


def test_fracatlas_counts_match_csv_columns(atlas_by_id: dict[str, Record]) -> None:
    with (FRACATLAS / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        record = atlas_by_id[row["image"]]
        assert len(record.boxes) == int(row["n_boxes"])
        assert record.shape == (int(row["height"]), int(row["width"]))
        assert record.hardware == (row["hardware"] == "1")
        assert record.dup_group == (row["dup_group"] or None)


def test_fracatlas_known_records(atlas_by_id: dict[str, Record]) -> None:
    first = atlas_by_id["IMG0000001.jpg"]
    assert first.path == FRACATLAS / "images" / "IMG0000001.jpg"
    assert first.regions == ("leg",)
    assert not first.fractured and first.boxes == () and first.polygons == ()
    assert first.views == ("frontal", "lateral")
    assert first.dup_group == "dup001"
    assert first.shape == (1024, 842)
    assert first.hardware is False and first.label_conflict is False

    boxed = atlas_by_id["IMG0000019.jpg"]  # COCO annotation 1: bbox [441.6, 330.35, 97.14, 52.38]
    assert boxed.regions == ("hand",) and boxed.fractured
    (box,) = boxed.boxes
    assert box == pytest.approx((441.6, 330.35, 441.6 + 97.14, 330.35 + 52.38))
    (outline,) = boxed.polygons
    assert len(outline) == 1 and len(outline[0]) == 8
    assert outline[0][0] == pytest.approx((450.04, 371.75))

    assert atlas_by_id["IMG0000044.jpg"].regions == ("hand", "shoulder")
    assert atlas_by_id["IMG0000092.jpg"].hardware is True
    conflict = atlas_by_id["IMG0002886.jpg"]
    assert conflict.label_conflict and conflict.dup_group == "dup059"


def test_fracatlas_geometry_lies_inside_the_stored_images(atlas: list[Record]) -> None:
    for record in atlas:
        with Image.open(record.path) as image:
            assert image.size == (record.shape[1], record.shape[0]), record.image_id
        rows, cols = record.shape
        for (x0, y0, x1, y1), outline in zip(record.boxes, record.polygons, strict=True):
            assert 0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows, record.image_id
            for polygon in outline:
                points = np.asarray(polygon)
                assert points.min() >= 0, record.image_id
                assert points[:, 0].max() <= cols and points[:, 1].max() <= rows


def test_load_grayscale_on_real_files(atlas_by_id: dict[str, Record]) -> None:
    # IMG0000001 is stored as R=G=B colour; IMG0000428 had its EXIF rotation applied already.
    for name in ("IMG0000001.jpg", "IMG0000428.jpg", "IMG0000019.jpg"):
        record = atlas_by_id[name]
        pixels = load_grayscale(record.path)
        assert pixels.dtype == np.uint8 and pixels.shape == record.shape
        stored = cv2.imread(str(record.path), cv2.IMREAD_UNCHANGED)
        expected = stored if stored.ndim == 2 else stored[:, :, 0]
        np.testing.assert_array_equal(pixels, expected)


def test_ground_truth_map_covers_the_real_polygon(atlas_by_id: dict[str, Record]) -> None:
    record = atlas_by_id["IMG0000019.jpg"]
    truth = ground_truth_map(record)
    assert truth.shape == record.shape and truth.dtype == np.uint8
    polygon = np.asarray(record.polygons[0][0])
    rows, cols = np.nonzero(truth)
    centres = np.column_stack([cols + 0.5, rows + 0.5])
    assert MplPath(polygon).contains_points(centres).all()
    area = 0.5 * abs(
        np.dot(polygon[:, 0], np.roll(polygon[:, 1], 1))
        - np.dot(polygon[:, 1], np.roll(polygon[:, 0], 1))
    )  # shoelace formula
    perimeter = np.linalg.norm(polygon - np.roll(polygon, 1, axis=0), axis=1).sum()
    assert abs(int(truth.sum()) - area) < perimeter / 2


# ---------------------------------------------------------------------- dataset, synthetic

LABEL_HEADER = ["image", "region", "fractured", "hardware", "views", "dup_group"]


def write_dataset(
    root: Path,
    rows: list[list[str]],
    annotations: list[dict[str, object]],
    *,
    header: list[str] = LABEL_HEADER,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """A small dataset folder: 20x30 PNGs, labels.csv from ``rows``, COCO boxes.json."""
    (root / "images").mkdir(parents=True)
    names = list(dict.fromkeys(row[0] for row in rows))
    sizes = sizes or {}
    images = []
    for index, name in enumerate(names, start=1):
        rows_, cols = sizes.get(name, (20, 30))
        cv2.imwrite(str(root / "images" / name), np.full((rows_, cols), 7 * index, np.uint8))
        images.append({"id": index, "file_name": name, "width": cols, "height": rows_})
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
    (root / "boxes.json").write_text(json.dumps(coco))
    return root


def box_annotation(image_id: int, bbox: list[float], **extra: object) -> dict[str, object]:
    return {"id": 100 + image_id, "image_id": image_id, "category_id": 1, "bbox": bbox, **extra}


GOOD_ROWS = [
    ["a.png", "hand;shoulder", "1", "0", "frontal;lateral", "g1"],
    ["b.png", "leg", "0", "", "", ""],
]


def test_synthetic_dataset_loads(tmp_path: Path) -> None:
    polygon = [[2.0, 2.0, 10.0, 2.0, 6.0, 9.0]]
    root = write_dataset(
        tmp_path,
        GOOD_ROWS,
        [
            box_annotation(1, [2, 2, 8, 7], segmentation=polygon),
            box_annotation(1, [20, 10, 5, 5]),
            {"id": 9, "image_id": 2, "category_id": 2, "bbox": [0, 0, 1, 1]},  # not a fracture
        ],
    )
    first, second = load_dataset(root)
    assert first.image_id == "a.png" and first.regions == ("hand", "shoulder")
    assert first.boxes == ((2.0, 2.0, 10.0, 9.0), (20.0, 10.0, 25.0, 15.0))
    triangle = ((2.0, 2.0), (10.0, 2.0), (6.0, 9.0))
    assert first.polygons == ((triangle,), ())  # one outline part, then a box-only annotation
    assert first.hardware is False and first.views == ("frontal", "lateral")
    assert first.dup_group == "g1" and first.shape == (20, 30)
    assert second.boxes == () and second.hardware is None and second.views == ()
    assert second.dup_group is None and not second.label_conflict
    truth = ground_truth_map(first)
    np.testing.assert_array_equal(truth[10:15, 20:25], 1)  # the box-only annotation
    assert truth[2:9, 2:10].sum() > 0 and truth[9:, :20].sum() == 0


def test_minimal_columns_suffice(tmp_path: Path) -> None:
    root = write_dataset(
        tmp_path, [["a.png", "hip", "0"]], [], header=["image", "region", "fractured"]
    )
    (record,) = load_dataset(root)
    assert record.hardware is None and record.views == () and not record.label_conflict


@pytest.mark.parametrize(
    ("rows", "annotations", "message"),
    [
        ([["a.png", "hand", "2", "0", "", ""]], [], r"line 2: fractured must be 0 or 1"),
        ([["a.png", "", "0", "0", "", ""]], [], r"line 2: region is empty"),
        ([["a.png", "hand;;leg", "0", "0", "", ""]], [], r"line 2: region .* empty or repeated"),
        ([["a.png", "hand", "1", "x", "", ""]], [], r"line 2: hardware must be 0 or 1"),
        ([["a.png", "hand", "0", "0", "", ""]], [box_annotation(1, [1, 1, 2, 2])], "non-fractured"),
        ([["a.png", "hand", "1", "0", "", ""]], [box_annotation(1, [25, 1, 9, 2])], "outside"),
        ([["a.png", "hand", "1", "0", "", ""]], [box_annotation(1, [1, 1, 0, 2])], "no area"),
        ([["a.png", "hand", "1", "0", "", ""]], [box_annotation(7, [1, 1, 2, 2])], "image_id 7"),
        (
            [["a.png", "hand", "1", "0", "", ""]],
            [box_annotation(1, [1, 1, 2, 2], segmentation={"counts": "x", "size": [20, 30]})],
            "RLE",
        ),
        (
            [["a.png", "hand", "1", "0", "", ""]],
            [box_annotation(1, [1, 1, 2, 2], segmentation=[[1, 1, 2, 2]])],
            ">= 3",
        ),
    ],
)
def test_malformed_entries_name_file_and_row(
    tmp_path: Path, rows: list[list[str]], annotations: list[dict[str, object]], message: str
) -> None:
    root = write_dataset(tmp_path, rows, annotations)
    with pytest.raises(ValueError, match=message):
        load_dataset(root)


def test_errors_for_missing_or_mismatched_files(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "one", GOOD_ROWS, [])
    (root / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 3: image file .*b\.png"):
        load_dataset(root)
    root = write_dataset(tmp_path / "two", GOOD_ROWS, [])
    (root / "boxes.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"boxes\.json"):
        load_dataset(root)
    root = write_dataset(tmp_path / "three", GOOD_ROWS, [])
    (root / "boxes.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"boxes\.json: not valid JSON"):
        load_dataset(root)
    root = write_dataset(tmp_path / "four", GOOD_ROWS, [], header=["image", "area", "fractured"])
    with pytest.raises(ValueError, match=r"labels.csv: header lacks .*'region'"):
        load_dataset(root)
    root = write_dataset(tmp_path / "five", [*GOOD_ROWS, GOOD_ROWS[0]], [])
    with pytest.raises(ValueError, match=r"line 4: image 'a\.png' listed twice"):
        load_dataset(root)


def test_csv_and_coco_must_list_the_same_images(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "extra", GOOD_ROWS, [])
    coco = json.loads((root / "boxes.json").read_text())
    coco["images"].append({"id": 3, "file_name": "c.png", "width": 5, "height": 5})
    (root / "boxes.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"1 image\(s\) not in .*labels.csv.*c\.png"):
        load_dataset(root)
    root = write_dataset(tmp_path / "missing", GOOD_ROWS, [])
    coco = json.loads((root / "boxes.json").read_text())
    coco["images"] = coco["images"][:1]
    (root / "boxes.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"line 3: image 'b.png' has no entry"):
        load_dataset(root)


def test_load_grayscale_converts_true_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    np.testing.assert_array_equal(
        load_grayscale(tmp_path / "colour.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    )
    deep = rng.integers(0, 65536, (7, 5), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    loaded = load_grayscale(tmp_path / "deep.png")
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, deep)


def make_record(boxes: list[tuple[float, float, float, float]], shape: tuple[int, int]) -> Record:
    return Record(
        image_id="x",
        path=Path("x.png"),
        regions=("hand",),
        fractured=bool(boxes),
        boxes=tuple(boxes),
        polygons=tuple(() for _ in boxes),
        shape=shape,
    )


def test_ground_truth_map_box_pixels_and_transform() -> None:
    record = make_record([(2.0, 3.0, 6.0, 8.0)], (10, 12))
    expected = np.zeros((10, 12), np.uint8)
    expected[3:8, 2:6] = 1  # records.py: a box covers x0 <= x < x1, y0 <= y < y1
    np.testing.assert_array_equal(ground_truth_map(record), expected)
    doubled = ground_truth_map(record, (20, 24), to_target=lambda points: points * 2.0)
    np.testing.assert_array_equal(doubled, np.kron(expected, np.ones((2, 2), np.uint8)))
    with pytest.raises(ValueError, match="target shape"):
        ground_truth_map(record, to_target=lambda points: points)


def test_ground_truth_map_keeps_a_sliver() -> None:
    record = make_record([(4.1, 2.1, 4.3, 2.4)], (6, 6))  # holds no pixel centre
    truth = ground_truth_map(record)
    assert truth.sum() == 1 and truth[2, 4] == 1


def test_record_validates_itself() -> None:
    with pytest.raises(ValueError, match="index-aligned"):
        Record("x", Path("x"), ("hand",), True, ((0, 0, 1, 1),), (), (4, 4))
    with pytest.raises(ValueError, match="non-fractured"):
        Record("x", Path("x"), ("hand",), False, ((0, 0, 1, 1),), ((),), (4, 4))
    with pytest.raises(ValueError, match="region"):
        Record("x", Path("x"), (), False, (), (), (4, 4))


# ------------------------------------------------------------------------------------ split


def test_split_has_no_leakage(atlas: list[Record], atlas_split: Split) -> None:
    parts = [set(atlas_split.part(name)) for name in PARTS]
    assert sum(map(len, parts)) == len(atlas)
    assert set().union(*parts) == {record.image_id for record in atlas}
    part_of = {image_id: index for index, part in enumerate(parts) for image_id in part}
    groups: dict[str, set[int]] = collections.defaultdict(set)
    for record in atlas:
        if record.dup_group:
            groups[record.dup_group].add(part_of[record.image_id])
    assert len(groups) > 50
    assert all(len(where) == 1 for where in groups.values())


def test_split_fractions_and_strata(atlas: list[Record], atlas_split: Split) -> None:
    strata = {record.image_id: stratum(record) for record in atlas}
    totals = collections.Counter(strata.values())
    for name, fraction in zip(PARTS, (0.8, 0.1, 0.1), strict=True):
        ids = atlas_split.part(name)
        assert abs(len(ids) / len(atlas) - fraction) < 0.005
        counts = collections.Counter(strata[image_id] for image_id in ids)
        for key, total in totals.items():
            if total >= 30:  # a random split would miss by ~sqrt(total * f * (1 - f))
                assert abs(counts[key] - fraction * total) <= 2, (name, key)


def test_split_is_deterministic_by_seed(atlas: list[Record], atlas_split: Split) -> None:
    assert split_dataset(atlas, seed=0) == atlas_split
    other = split_dataset(atlas, seed=1)
    assert set(other.validation) != set(atlas_split.validation)


def test_split_other_fractions_and_save_load(tmp_path: Path, atlas: list[Record]) -> None:
    split = split_dataset(atlas[:600], seed=4, fractions=(0.7, 0.15, 0.15))
    assert abs(len(split.train) / 600 - 0.7) < 0.02
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == split
    tuning = split.select(atlas[:600], "tuning")
    assert [record.image_id for record in tuning] == sorted(split.tuning)


def test_split_refuses_bad_input(tmp_path: Path, atlas: list[Record]) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split_dataset(atlas, fractions=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="multiples of 1/n"):
        split_dataset(atlas, fractions=(0.801, 0.0995, 0.0995))
    with pytest.raises(ValueError, match="not unique"):
        split_dataset([*atlas[:20], atlas[0]])
    with pytest.raises(ValueError, match="shares ids"):
        Split(train=("a", "b"), tuning=("b",), validation=())
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "train": ["a"], "tuning": []}))
    with pytest.raises(ValueError, match="'validation' must be a list"):
        load_split(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------- sampler


def test_balanced_probabilities_hand_worked() -> None:
    # Strata s1 = {A, B}, s2 = {B, C, D}; K = 2.  p_A = 1/(2*2), p_B = 1/(2*2) + 1/(2*3),
    # p_C = p_D = 1/(2*3).
    strata = [("s1",), ("s1", "s2"), ("s2",), ("s2",)]
    np.testing.assert_allclose(balanced_probabilities(strata), [1 / 4, 5 / 12, 1 / 6, 1 / 6])


def test_balanced_draws_each_stratum_equally_often() -> None:
    sizes = {"leg|0": 1500, "hand|1": 300, "hip|1": 8, "shoulder|1": 1}
    strata = [(key,) for key, size in sizes.items() for _ in range(size)]
    draws = balanced_indices(strata, 40_000, np.random.default_rng(11))
    assert draws.dtype == np.int64 and draws.shape == (40_000,)
    drawn = collections.Counter(strata[index][0] for index in draws)
    counts = [drawn[key] for key in sizes]
    assert chisquare(counts).pvalue > 1e-3  # uniform over the four strata
    # Within a stratum, members are equally likely: "hip|1" has 8 members.
    hip = [index for index in draws if strata[index] == ("hip|1",)]
    assert chisquare(np.bincount(np.asarray(hip) - 1800, minlength=8)).pvalue > 1e-3


def test_balanced_draws_follow_overlapping_probabilities(atlas: list[Record]) -> None:
    strata = [sampling_strata(record) for record in atlas[:400]]
    assert any(len(memberships) > 1 for memberships in strata)  # overlaps are exercised
    probabilities = balanced_probabilities(strata)
    n_draws = 100_000
    draws = balanced_indices(strata, n_draws, np.random.default_rng(5))
    # Images with the same set of combinations form disjoint classes: a multinomial test.
    classes = sorted(set(strata), key=sorted)
    class_of = np.array([classes.index(memberships) for memberships in strata])
    observed = np.bincount(class_of[draws], minlength=len(classes))
    expected = n_draws * np.bincount(class_of, weights=probabilities, minlength=len(classes))
    assert chisquare(observed, expected).pvalue > 1e-3


def test_sampling_strata_per_region() -> None:
    record = Record("x", Path("x"), ("hand", "shoulder"), True, (), (), (4, 4))
    assert sampling_strata(record) == {("hand", True), ("shoulder", True)}


def test_epochs_turn_natural_after_the_balanced_ones() -> None:
    strata = [("common",)] * 95 + [("rare",)] * 5
    rng = np.random.default_rng(2)
    balanced = np.concatenate([epoch_indices(epoch, strata, rng) for epoch in range(10)])
    assert len(balanced) == 1000
    rare_share = np.mean(balanced >= 95)
    assert 0.4 < rare_share < 0.6  # half the draws, against 5 % naturally
    for epoch in (10, 11, 25):
        natural = epoch_indices(epoch, strata, rng)
        np.testing.assert_array_equal(np.sort(natural), np.arange(100))
    assert len(epoch_indices(0, strata, rng, n_samples=7)) == 7
    np.testing.assert_array_equal(
        np.sort(epoch_indices(0, strata, rng, balanced_epochs=0)), np.arange(100)
    )


def test_epoch_sampler_is_reproducible_per_epoch() -> None:
    strata = [("a",)] * 30 + [("b",)] * 3
    sampler = EpochSampler(strata, seed=9, n_samples=20)
    sampler.set_epoch(3)
    first = list(sampler)
    assert len(first) == len(sampler) == 20
    again = EpochSampler(strata, seed=9, n_samples=20)
    again.set_epoch(3)
    assert list(again) == first
    again.set_epoch(4)
    assert list(again) != first
    sampler.set_epoch(10)
    assert len(sampler) == 33 and sorted(sampler) == list(range(33))
    loader = torch.utils.data.DataLoader(list(range(33)), sampler=sampler, batch_size=11)
    assert sorted(torch.cat(list(loader)).tolist()) == list(range(33))


def test_sampler_refuses_bad_strata() -> None:
    with pytest.raises(ValueError, match="1-tuple"):
        balanced_probabilities(["hand|1", "leg|0"])
    with pytest.raises(ValueError, match="no stratum"):
        balanced_probabilities([("a",), ()])


# ---------------------------------------------------------------------------------- augment


def random_sample(
    rng: np.random.Generator, channels: int = 2, size: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    image = rng.uniform(-1, 1, (channels, size, size)).astype(np.float32)
    mask = (rng.random((size, size)) > 0.7).astype(np.uint8)
    return image, mask


def test_identity_settings_give_identity() -> None:
    rng = np.random.default_rng(0)
    image, mask = random_sample(rng)
    for _ in range(5):
        out, out_mask = augment(image, mask, rng, AugmentSettings.identity())
        np.testing.assert_array_equal(out, image)
        np.testing.assert_array_equal(out_mask, mask)
        assert out is not image and out_mask is not mask


@pytest.mark.parametrize(
    ("hflip", "vflip", "axes"), [(True, False, (-1,)), (False, True, (-2,)), (True, True, (-2, -1))]
)
def test_flips_are_exact(hflip: bool, vflip: bool, axes: tuple[int, ...]) -> None:
    image, mask = random_sample(np.random.default_rng(1))
    out, out_mask = apply_augment(image, mask, AugmentParams(hflip=hflip, vflip=vflip))
    np.testing.assert_array_equal(out, np.flip(image, axis=axes))
    np.testing.assert_array_equal(out_mask, np.flip(mask, axis=axes))
    assert out.flags.c_contiguous and out_mask.flags.c_contiguous


def test_geometry_matches_hand_made_transforms() -> None:
    image, mask = random_sample(np.random.default_rng(2), size=8)
    turned, turned_mask = apply_augment(image, mask, AugmentParams(angle_deg=90.0))
    np.testing.assert_allclose(turned, np.rot90(image, axes=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(turned_mask, np.rot90(mask))
    moved, moved_mask = apply_augment(image, mask, AugmentParams(shift_x=0.25, shift_y=-0.125))
    np.testing.assert_allclose(moved[:, :7, 2:], image[:, 1:, :6], atol=1e-6)
    np.testing.assert_array_equal(moved[:, :, :2], PAD_VALUE)
    np.testing.assert_array_equal(moved[:, 7, :], PAD_VALUE)
    np.testing.assert_array_equal(moved_mask[:7, 2:], mask[1:, :6])
    assert moved_mask[:, :2].sum() == 0 and moved_mask[7].sum() == 0


def test_intensity_curves_hand_worked() -> None:
    raw = np.array([[[-1.0, 0.0, -0.5, 1.0]]], np.float32)
    image = np.concatenate([raw, raw])  # second channel plays LCN
    mask = np.zeros((1, 4), np.uint8)
    # gamma 2: u = (x + 1) / 2 -> u^2: u = 0.5 -> 0.25 (x = -0.5); u = 0.25 -> 0.0625.
    out, _ = apply_augment(image, mask, AugmentParams(gamma=2.0))
    np.testing.assert_allclose(out[0, 0], [-1.0, -0.5, 2 * 0.0625 - 1, 1.0], atol=1e-6)
    np.testing.assert_array_equal(out[1], image[1])  # LCN untouched
    # contrast 2: u' = u^2 / (u^2 + (1 - u)^2): u = 0.25 -> 0.0625 / 0.625 = 0.1 (x = -0.8).
    out, _ = apply_augment(image, mask, AugmentParams(contrast=2.0))
    np.testing.assert_allclose(out[0, 0], [-1.0, 0.0, -0.8, 1.0], atol=1e-6)
    out, _ = apply_augment(image, mask, AugmentParams(gamma=2.0), raw_channel=None)
    np.testing.assert_array_equal(out, image)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    top=st.integers(28, 40),
    left=st.integers(28, 40),
    side=st.integers(18, 30),
)
def test_image_and_map_stay_aligned(seed: int, top: int, left: int, side: int) -> None:
    size = 96
    image = np.full((2, size, size), PAD_VALUE, np.float32)
    image[:, top : top + side, left : left + side] = 1.0
    mask = np.zeros((size, size), np.uint8)
    mask[top : top + side, left : left + side] = 1
    out, out_mask = augment(image, mask, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.float32
    assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 1}
    assert out.min() >= -1.0 and out.max() <= 1.0
    bright = out[0] > 0.0
    assert np.array_equal(bright, out[1] > 0.0)  # both channels moved together
    union = np.logical_or(bright, out_mask).sum()
    assert np.logical_and(bright, out_mask).sum() / union > 0.95
    rows, cols = np.nonzero(out_mask)
    bright_rows, bright_cols = np.nonzero(bright)
    assert abs(rows.mean() - bright_rows.mean()) < 0.25
    assert abs(cols.mean() - bright_cols.mean()) < 0.25


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.bool_])
@pytest.mark.parametrize("channels", [1, 2])
def test_augment_keeps_shapes_dtypes_and_inputs(dtype: type, channels: int) -> None:
    rng = np.random.default_rng(4)
    image, mask = random_sample(rng, channels=channels)
    mask = mask.astype(dtype)
    image_before, mask_before = image.copy(), mask.copy()
    out, out_mask = augment(image, mask, rng, AugmentSettings(hflip=1.0, vflip=1.0))
    assert out.shape == image.shape and out.dtype == np.float32
    assert out_mask.shape == mask.shape and out_mask.dtype == dtype
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(mask, mask_before)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_drawn_parameters_respect_the_settings(seed: int) -> None:
    chosen = AugmentSettings()
    params = sample_params(chosen, np.random.default_rng(seed))
    assert abs(params.angle_deg) <= chosen.rotation_deg
    assert max(abs(params.shift_x), abs(params.shift_y)) <= chosen.translation
    for name in ("zoom", "gamma", "contrast"):
        low, high = getattr(chosen, name)
        assert low <= getattr(params, name) <= high


def test_augment_settings_mapping_round_trip() -> None:
    custom = AugmentSettings(rotation_deg=5.0, zoom=(0.9, 1.2), vflip=0.0)
    table = json.loads(json.dumps(custom.to_mapping()))
    assert AugmentSettings.from_mapping(table) == custom
    assert AugmentSettings.from_mapping({}) == AugmentSettings()
    with pytest.raises(ValueError, match="unknown augmentation settings"):
        AugmentSettings.from_mapping({"shear": 3})
    with pytest.raises(ValueError, match="gamma"):
        AugmentSettings(gamma=(1.5, 0.7))
    with pytest.raises(ValueError, match="hflip"):
        AugmentSettings(hflip=1.5)


def test_augment_refuses_bad_arrays() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        augment(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8), rng)
    with pytest.raises(ValueError, match="float32"):
        augment(np.zeros((1, 8, 8)), np.zeros((8, 8), np.uint8), rng)
    with pytest.raises(ValueError, match="mask shape"):
        augment(np.zeros((1, 8, 8), np.float32), np.zeros((8, 9), np.uint8), rng)


# ------------------------------------------------------------------------------------- loss


def hand_worked_batch() -> tuple[torch.Tensor, ...]:
    ln3 = math.log(3.0)
    score = torch.tensor([0.0, ln3])  # sigmoid: 0.5, 0.75
    label = torch.tensor([1.0, 0.0])
    maps = torch.tensor([[[[0.0, ln3], [-ln3, 0.0]]], [[[5.0, -5.0], [7.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    return score, maps, label, mask


def test_joint_loss_hand_worked() -> None:
    score, maps, label, mask = hand_worked_batch()
    parts = joint_loss(score, maps, label, mask, map_weight=MAP_WEIGHT_DEFAULT)
    # Image BCE: mean(-ln 0.5, -ln(1 - 0.75)) = (ln 2 + ln 4) / 2.
    image = (math.log(2.0) + math.log(4.0)) / 2
    # Map BCE over image 0 only (the fractured one); probabilities 0.5, 0.75, 0.25, 0.5 with
    # targets 1, 1, 0, 0: (-ln 0.5 - ln 0.75 - ln 0.75 - ln 0.5) / 4.
    map_term = (2 * math.log(2.0) + 2 * math.log(4.0 / 3.0)) / 4
    assert parts.image.item() == pytest.approx(image, rel=1e-6)
    assert parts.map.item() == pytest.approx(map_term, rel=1e-6)
    assert parts.total.item() == pytest.approx(3.0 * map_term + image, rel=1e-6)


def test_map_term_ignores_non_fractured_images() -> None:
    score, maps, label, mask = hand_worked_batch()
    changed = maps.clone()
    changed[1] = -maps[1] * 10
    changed_mask = mask.clone()
    changed_mask[1] = 1.0
    before = joint_loss(score, maps, label, mask, map_weight=3.0)
    after = joint_loss(score, changed, label, changed_mask, map_weight=3.0)
    assert after.total.item() == pytest.approx(before.total.item())
    excluded = joint_loss(
        score, maps, label, mask, map_weight=3.0, localized=torch.tensor([False, False])
    )
    assert excluded.map.item() == 0.0


def test_no_positive_in_batch_gives_zero_map_term_without_nan() -> None:
    score = torch.tensor([0.3, -1.2], requires_grad=True)
    maps = torch.randn(2, 1, 4, 4, requires_grad=True)
    parts = joint_loss(
        score, maps, torch.zeros(2), torch.zeros(2, 1, 4, 4), map_weight=MAP_WEIGHT_ATTENTION
    )
    assert parts.map.item() == 0.0
    assert parts.total.item() == pytest.approx(parts.image.item())
    parts.total.backward()
    assert score.grad is not None and torch.isfinite(score.grad).all()


def test_weights_three_and_ten_to_one() -> None:
    score, maps, label, mask = hand_worked_batch()
    default = joint_loss(score, maps, label, mask)
    attention = joint_loss(score, maps, label, mask, map_weight=MAP_WEIGHT_ATTENTION)
    assert default.total.item() == pytest.approx(3 * default.map.item() + default.image.item())
    assert attention.total.item() == pytest.approx(
        10 * attention.map.item() + attention.image.item()
    )
    halved = joint_loss(score, maps, label, mask, map_weight=5.0, image_weight=0.5)
    assert halved.total.item() == pytest.approx(5 * halved.map.item() + 0.5 * halved.image.item())


def test_loss_without_map_head_and_with_extreme_logits() -> None:
    score, _, label, _ = hand_worked_batch()
    parts = joint_loss(score, None, label, None)
    assert parts.map.item() == 0.0 and parts.total.item() == pytest.approx(parts.image.item())
    extreme = joint_loss(
        torch.tensor([200.0, -200.0]),
        torch.full((2, 1, 2, 2), -300.0),
        torch.tensor([0.0, 1.0]),
        torch.ones(2, 1, 2, 2),
    )
    assert extreme.image.item() == pytest.approx(200.0)
    assert extreme.map.item() == pytest.approx(300.0)


def test_loss_refuses_mismatched_shapes() -> None:
    score, maps, label, mask = hand_worked_batch()
    with pytest.raises(ValueError, match="mask must match"):
        joint_loss(score, maps, label, mask[:, :, :1])
    with pytest.raises(ValueError, match=r"map_logit must be \(B=2, 1, H, W\)"):
        joint_loss(score, maps[:, 0], label, mask[:, 0])
    with pytest.raises(ValueError, match="label shape"):
        joint_loss(score, maps, label[:1], mask)
    with pytest.raises(ValueError, match="score_logit"):
        joint_loss(score[:, None], maps, label, mask)


def test_cosine_schedule_follows_the_epochs_or_the_time_budget_whichever_is_further() -> None:
    from inference.training.config import TrainSettings
    from inference.training.train import _lr_factor

    by_epochs = TrainSettings(epochs=10)
    assert [round(_lr_factor(by_epochs, e), 4) for e in (0, 5)] == [1.0, 0.5]
    assert _lr_factor(by_epochs, 5, elapsed=10_000.0) == pytest.approx(0.5)  # no budget set
    timed = TrainSettings(epochs=30, max_minutes=10.0)
    assert _lr_factor(timed, 1, elapsed=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 30)))
    assert _lr_factor(timed, 1, elapsed=300.0) == pytest.approx(0.5)  # half the 10 minutes used
    assert _lr_factor(timed, 2, elapsed=600.0) == pytest.approx(0.0)  # budget spent
    assert _lr_factor(timed, 2, elapsed=900.0) == pytest.approx(0.0)  # overrun: never negative
    assert _lr_factor(TrainSettings(lr_schedule="constant", max_minutes=1.0), 3, 59.0) == 1.0
