"""``dicomnode export-training``: real FracAtlas radiographs wrapped as DICOM in several encodings
are exported through the node's decode chain, and the shipped ensemble scores the exported PNGs
as it scores the source image files; regions from the header or the CSV; bad input reported
with reasons and no patient data; a tiny ensemble trains and evaluates on an export.

Measured (shipped ensemble, CPU, 4 FracAtlas images x 8 encodings), |score(exported PNG) -
score(source JPEG)|: at most 1.6e-7 where the export is the source exactly (8-bit, MONOCHROME1,
VOI window, JPEG 2000: x * 257 in 16 bits) and 1.5e-5 where the node stretches min..max to
[0, 1] (12-bit, 16-bit with rescale, RLE, JPEG-LS); :data:`SCORE_TOLERANCE` is 1e-3.
"""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicomnode.cli import main
from dicomnode.demo import Patient, dx_from_image
from dicomnode.training_export import read_labels
from inference.imageio import read_grayscale
from inference.manifest import read_manifest
from inference.training.dataset import load_dataset

from .conftest import FRACATLAS, REPO, pick_images

SCORE_TOLERANCE = 1e-3
"""Largest accepted |score(exported PNG) - score(source JPEG)| (measured maximum: 1.5e-5)."""

PATIENT = Patient(name="Doe^Jane", patient_id="PID-4711-SECRET", accession_number="ACC-0815")
IDENTIFIERS = ("Doe", "Jane", "PID-4711-SECRET", "ACC-0815")

EXPORT_IMAGES = ("IMG0000007.jpg", "IMG0000092.jpg", "IMG0002303.jpg", "IMG0002544.jpg")
"""Hand (not fractured), leg, shoulder and hip (fractured), 819x1024 to 373x454 px."""


# -- DICOM encodings of one radiograph --------------------------------------------------------


def _words(ds: Dataset, stored: np.ndarray, bits: int) -> Dataset:
    """``ds`` with 16-bit words holding ``stored`` (``bits`` of them used), no window."""
    ds = copy.deepcopy(ds)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16)).tobytes()
    del ds.WindowCenter, ds.WindowWidth
    return ds


def eight_bit(p: np.ndarray, **header: str) -> Dataset:
    return dx_from_image(p, patient=PATIENT, **{"body_part": "HAND", **header})


def twelve_bit(p: np.ndarray) -> Dataset:
    return _words(eight_bit(p), p.astype(np.uint16) * 16, 12)


def sixteen_bit_rescaled(p: np.ndarray) -> Dataset:
    ds = _words(eight_bit(p), p.astype(np.uint16) * 250 + 1000, 16)
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
    return ds


def monochrome1(p: np.ndarray) -> Dataset:
    return dx_from_image(p, body_part="HAND", patient=PATIENT, monochrome1=True)


def voi_window(p: np.ndarray) -> Dataset:
    """16-bit values 5000 + 100 p and a linear window mapping exactly [5000, 30500] to [0, 1]."""
    ds = _words(eight_bit(p), p.astype(np.uint16) * 100 + 5000, 16)
    low, high = 5000, 30500
    ds.WindowWidth = high - low + 1
    ds.WindowCenter = (low + high) / 2 + 0.5
    return ds


def compressed(make: Callable[[np.ndarray], Dataset], syntax: str) -> Callable[..., Dataset]:
    def encode(p: np.ndarray) -> Dataset:
        ds = make(p)
        ds.compress(syntax)
        return ds

    return encode


ENCODINGS: dict[str, Callable[[np.ndarray], Dataset]] = {
    "8-bit": eight_bit,
    "12-bit": twelve_bit,
    "16-bit rescale": sixteen_bit_rescaled,
    "MONOCHROME1": monochrome1,
    "VOI window": voi_window,
    "RLE lossless": compressed(sixteen_bit_rescaled, RLELossless),
    "JPEG-LS lossless": compressed(twelve_bit, JPEGLSLossless),
    "JPEG 2000 lossless": compressed(voi_window, JPEG2000Lossless),
}


# -- helpers ----------------------------------------------------------------------------------


def write_instance(ds: Dataset, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_labels(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def export(
    dicom: Path, labels: Path, out: Path, capsys: pytest.CaptureFixture[str], workers: int = 1
) -> tuple[int, str, str]:
    status = main(
        ["export-training", str(dicom), "--labels", str(labels), "--out", str(out),
         "--workers", str(workers)]
    )
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def exported_labels(out: Path) -> dict[str, dict[str, str]]:
    with (out / "labels.csv").open(newline="") as handle:
        return {Path(row["image"]).stem: row for row in csv.DictReader(handle)}


def assert_no_patient_data(*texts: str) -> None:
    for text in texts:
        for identifier in IDENTIFIERS:
            assert identifier not in text, f"{identifier!r} leaked into: {text}"


def fracatlas(name: str) -> np.ndarray:
    image = read_grayscale(FRACATLAS / "images" / name)
    assert image.dtype == np.uint8
    return image


# -- 1. the same radiograph as an image file and as DICOM in several encodings -----------------


@pytest.mark.slow
def test_exported_pngs_score_as_the_source_image_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.ensemble import Ensemble

    dicom, rows, uids = tmp_path / "dicom", [], {}
    for name in EXPORT_IMAGES:
        pixels = fracatlas(name)
        for encoding, make in ENCODINGS.items():
            ds = make(pixels)
            # a PACS export's file names may hold patient data: never echoed
            write_instance(ds, dicom / name, f"Doe_Jane_{encoding.replace(' ', '_')}.dcm")
            uids[name, encoding] = str(ds.SOPInstanceUID)
            rows.append({"sop_instance_uid": ds.SOPInstanceUID, "fractured": 1})
    out = tmp_path / "export"
    status, stdout, stderr = export(
        dicom, write_labels(tmp_path / "labels.csv", rows), out, capsys, workers=2
    )
    assert status == 0, stderr
    assert f"exported {len(rows)} of {len(rows)} labelled instances" in stdout
    assert_no_patient_data(stdout, stderr)
    assert len(load_dataset(out)) == len(rows)

    ensemble = Ensemble.load(REPO / "ensemble_weights", device="cpu")
    worst = 0.0
    for name in EXPORT_IMAGES:
        source = fracatlas(name)
        exported = {
            encoding: read_grayscale(out / "images" / f"{uids[name, encoding]}.png")
            for encoding in ENCODINGS
        }
        for encoding, png in exported.items():
            assert png.dtype == np.uint16 and png.shape == source.shape, encoding
        # an 8-bit rendition is the source exactly (x / 255 stored as round(x / 255 * 65535));
        # the lossless codecs decode to exactly what their uncompressed twins give
        for encoding in ("8-bit", "MONOCHROME1", "VOI window", "JPEG 2000 lossless"):
            assert np.array_equal(exported[encoding], source.astype(np.uint16) * 257), encoding
        for encoding in ("RLE lossless", "JPEG-LS lossless"):
            assert np.array_equal(exported[encoding], exported["12-bit"]), encoding
        # score each distinct array once (identical pixels give identical scores)
        distinct: list[np.ndarray] = [source]
        for png in exported.values():
            if not any(a.dtype == png.dtype and np.array_equal(a, png) for a in distinct):
                distinct.append(png)
        scores = [output.score for output in ensemble.predict(distinct)]
        for png, score in zip(distinct[1:], scores[1:], strict=True):
            which = [e for e, p in exported.items() if np.array_equal(p, png)]
            print(f"{name}: source {scores[0]:.5f}, {which}: {score - scores[0]:+.1e}")
            worst = max(worst, abs(score - scores[0]))
    print(f"largest |score difference|: {worst:.1e} (tolerance {SCORE_TOLERANCE})")
    assert worst <= SCORE_TOLERANCE


# -- 2. regions: the header by the worker's rule, the CSV's column first -----------------------


def test_region_comes_from_the_header_unless_the_labels_give_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixels = fracatlas("IMG0002544.jpg")  # 454 x 373, small and fast
    made = {
        "body part": eight_bit(pixels, body_part="HAND"),
        "description": eight_bit(pixels, body_part="", description="Handgelenk re"),
        "labels win": eight_bit(pixels, body_part="HAND"),
        "labels, two": eight_bit(pixels, body_part="HAND"),
        "nothing": eight_bit(pixels, body_part="", description="Röntgen"),
    }
    regions = {"labels win": "leg", "labels, two": "Shoulder;clavicle"}
    dicom = tmp_path / "dicom"
    rows = []
    for index, (case, ds) in enumerate(made.items()):
        write_instance(ds, dicom, f"{index}.dcm")
        rows.append({"sop_instance_uid": ds.SOPInstanceUID, "fractured": 0,
                     "region": regions.get(case, "")})
    out = tmp_path / "export"
    status, stdout, stderr = export(dicom, write_labels(tmp_path / "l.csv", rows), out, capsys)
    assert status == 0, stderr
    written = exported_labels(out)
    got = {case: written[str(ds.SOPInstanceUID)]["region"] for case, ds in made.items()}
    assert got == {
        "body part": "hand",
        "description": "wrist",
        "labels win": "leg",
        "labels, two": "shoulder;clavicle",
        "nothing": "unknown",
    }
    assert "region from: header 2, labels 2, unknown 1" in stdout
    records = {r.image_id: r for r in load_dataset(out)}
    assert records[f"{made['nothing'].SOPInstanceUID}.png"].regions == ("unknown",)


# -- 3. bad input ------------------------------------------------------------------------------


def test_bad_rows_are_skipped_with_reasons_and_no_patient_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixels = fracatlas("IMG0002544.jpg")
    dicom = tmp_path / "dicom" / "Doe^Jane PID-4711-SECRET"  # folder names from a PACS export
    good = write_instance(eight_bit(pixels), dicom, "Doe_Jane_1.dcm")
    broken = eight_bit(pixels)
    broken.PixelData = broken.PixelData[:1000]  # truncated: the header reads, the pixels do not
    write_instance(broken, dicom, "Doe_Jane_2.dcm")
    outside = write_instance(eight_bit(pixels), dicom, "Doe_Jane_3.dcm")
    tiny = write_instance(eight_bit(pixels[:20, :20]), dicom, "Doe_Jane_4.dcm")
    same_group = write_instance(eight_bit(pixels), dicom, "Doe_Jane_5.dcm")
    write_instance(eight_bit(pixels), dicom, "not-listed.dcm")
    (dicom / "copy").mkdir()
    (dicom / "copy" / "IM0001").write_bytes(good.read_bytes())  # an identical second copy
    twin_a, twin_b = eight_bit(pixels), eight_bit(pixels[::-1].copy())
    twin_b.SOPInstanceUID = twin_b.file_meta.MediaStorageSOPInstanceUID = twin_a.SOPInstanceUID
    write_instance(twin_a, dicom, "twin-a.dcm")
    write_instance(twin_b, dicom, "twin-b.dcm")
    (dicom / "Doe_Jane.txt").write_text("not DICOM")
    missing = "1.2.826.0.1.3680043.8.498.1"
    uid = {path: read_labels_uid(path) for path in (good, outside, tiny, same_group)}
    rows = [
        {"sop_instance_uid": uid[good], "fractured": 1, "boxes": "[[10, 20, 110.5, 220]]",
         "hardware": "1", "views": "frontal", "dup_group": "p-0001"},
        {"sop_instance_uid": str(broken.SOPInstanceUID), "fractured": 0},
        {"sop_instance_uid": missing, "fractured": 0},
        {"sop_instance_uid": uid[outside], "fractured": 1, "boxes": "[[0, 0, 374, 10]]"},
        {"sop_instance_uid": uid[tiny], "fractured": 0},
        {"sop_instance_uid": uid[same_group], "fractured": 0, "dup_group": "PID-4711-SECRET"},
        {"sop_instance_uid": str(twin_a.SOPInstanceUID), "fractured": 0},
    ]
    out = tmp_path / "export"
    status, stdout, stderr = export(dicom.parent, write_labels(tmp_path / "l.csv", rows), out,
                                    capsys)
    assert status == 0, stderr
    print(stdout)
    assert_no_patient_data(stdout, stderr)
    lines = stdout.splitlines()
    assert any(
        line.startswith(f"skipped {broken.SOPInstanceUID} (labels line 3): cannot be decoded: ")
        for line in lines
    ), stdout
    assert f"skipped {missing} (labels line 4): not found in the DICOM folder" in stdout
    assert f"skipped {uid[outside]} (labels line 5): box outside the image: " \
        "[0.0, 0.0, 374.0, 10.0] is not inside the 373x454 image" in stdout
    assert any(line.startswith(f"skipped {uid[tiny]} (labels line 6): refused by inference: ")
               and "smaller than 32 px" in line for line in lines), stdout
    assert f"skipped {twin_a.SOPInstanceUID} (labels line 8): several different files " \
        "carry this SOP Instance UID: 2 files" in stdout
    assert "exported 2 of 7 labelled instances" in stdout
    assert "ignored 1 DICOM instances not in the labels and 1 other files" in stdout
    assert "warning: 1 rows use the Patient ID or Accession Number itself as dup_group" in stdout
    written = exported_labels(out)
    assert set(written) == {uid[good], uid[same_group]}
    assert written[uid[good]] == {"image": f"{uid[good]}.png", "region": "hand", "fractured": "1",
                                  "hardware": "1", "views": "frontal", "dup_group": "p-0001"}
    (record, _) = sorted(load_dataset(out), key=lambda r: not r.fractured)
    assert record.boxes == ((10.0, 20.0, 110.5, 220.0),)
    assert record.shape == pixels.shape and record.hardware and record.dup_group == "p-0001"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{u}.png" for u in (uid[good], uid[same_group]))


def read_labels_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


UID = "1.2.826.0.1.3680043.8.498.2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sop_instance_uid,region\n1.2.3,hand\n", "header lacks required column(s) ['fractured']"),
        (f"sop_instance_uid,fractured\n{UID},1\n{UID},0,extra\n", "line 3: wrong number of cells"),
        (f"sop_instance_uid,fractured\n{UID},maybe\n", "line 2: fractured must be 0 or 1"),
        ("sop_instance_uid,fractured\nDoe^Jane,1\n", "line 2: sop_instance_uid is not a valid"),
        (f"sop_instance_uid,fractured\n{UID},1\n{UID},1\n", f"line 3: {UID} is listed twice"),
        (f'sop_instance_uid,fractured,boxes\n{UID},0,"[[1, 2, 3, 4]]"\n',
         "line 2: boxes on a row with fractured = 0"),
        (f'sop_instance_uid,fractured,boxes\n{UID},1,"[[1, 2, 3]]"\n',
         "line 2: box [1, 2, 3] is not [x0, y0, x1, y1]"),
        (f'sop_instance_uid,fractured,boxes\n{UID},1,"[[5, 2, 3, 4]]"\n', "has no area"),
        (f"sop_instance_uid,fractured,boxes\n{UID},1,[[1\n", "line 2: boxes is not valid JSON"),
        (f"sop_instance_uid,fractured,region\n{UID},1,elbow;knees\n",
         "line 2: unknown region 'knees'"),
        ("sop_instance_uid,fractured\n", "no data rows"),
    ],
)
def test_a_malformed_labels_csv_is_a_one_line_error_with_status_2(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    (tmp_path / "dicom").mkdir()
    status, stdout, stderr = export(tmp_path / "dicom", labels, tmp_path / "out", capsys)
    assert status == 2 and stdout == ""
    assert stderr.startswith(f"dicomnode: error: {labels}: ") and stderr.count("\n") == 1
    assert message in stderr
    assert_no_patient_data(stderr)
    assert not (tmp_path / "out").exists()  # nothing is written before the CSV is checked


def test_bad_usage_is_a_one_line_error_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"sop_instance_uid,fractured\n{UID},1\n")
    (tmp_path / "dicom").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    cases = [
        (tmp_path / "nope", labels, tmp_path / "o1", 1, "no such folder"),
        (tmp_path / "dicom", tmp_path / "nope.csv", tmp_path / "o2", 1, "cannot read"),
        (tmp_path / "dicom", labels, tmp_path / "full", 1, "exists and is not an empty folder"),
        (tmp_path / "dicom", labels, tmp_path / "o3", 0, "--workers must be at least 1"),
    ]
    for dicom, csv_path, out, workers, message in cases:
        status, _, stderr = export(dicom, csv_path, out, capsys, workers=workers)
        assert status == 2 and stderr.startswith("dicomnode: error: "), stderr
        assert message in stderr and stderr.count("\n") == 1
    # nothing found at all: the command ran, but failed (status 1)
    status, stdout, stderr = export(tmp_path / "dicom", labels, tmp_path / "o4", capsys)
    assert status == 1 and "no labelled instance could be exported" in stderr
    assert f"skipped {UID} (labels line 2): not found in the DICOM folder" in stdout


def test_read_labels_accepts_the_documented_format(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "\ufeffsop_instance_uid,fractured,region,boxes,hardware,views,dup_group,note\n"
        f'{UID},1,hand;Wrist,"[[0, 0.5, 10, 20], [3, 4, 5, 6]]",,Frontal;lateral, g1 ,free text\n'
        f"{UID}.1,false,,,0,,,\n"
    )
    first, second = read_labels(labels)
    assert (first.line, first.sop_instance_uid, first.fractured) == (2, UID, True)
    assert first.regions == ("hand", "wrist") and first.hardware is None
    assert first.boxes == ((0.0, 0.5, 10.0, 20.0), (3.0, 4.0, 5.0, 6.0))
    assert first.views == ("frontal", "lateral") and first.dup_group == "g1"
    assert (second.fractured, second.regions, second.boxes, second.hardware) == (
        False, (), (), False)


# -- 4. a tiny ensemble trains and evaluates on an export --------------------------------------

MEMBER = """
[member]
name = "tiny"
arch = "drn_d_22"
input = "both"
size = 48
[member.options]
width = 0.25
map_head = true
[training]
epochs = 1
batch_size = 8
balanced_epochs = 1
"""

BODY_PARTS = {"hand": "HAND", "leg": "KNEE", "hip": "HIP", "shoulder": "SHOULDER"}


def inference_cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "inference", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_a_tiny_ensemble_trains_and_evaluates_on_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.training.split import load_split

    with (FRACATLAS / "labels.csv").open(newline="") as handle:
        atlas = {row["image"]: row for row in csv.DictReader(handle)}
    # 40 real images, both labels of each FracAtlas region; the split needs a stratum of 10
    per_region = {"hand": 10, "leg": 5, "shoulder": 3, "hip": 2}
    names, taken = [], Counter[tuple[str, str]]()
    for name in pick_images(10):
        stratum = (atlas[name]["region"], atlas[name]["fractured"])
        if taken[stratum] < per_region[stratum[0]]:
            taken[stratum] += 1
            names.append(name)
    assert len(names) == 40
    coco = json.loads((FRACATLAS / "boxes.json").read_text())
    ids = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, list[list[float]]] = {}
    for annotation in coco["annotations"]:
        if annotation["category_id"] == 1 and ids[annotation["image_id"]] in names:
            x, y, w, h = annotation["bbox"]
            boxes.setdefault(ids[annotation["image_id"]], []).append([x, y, x + w, y + h])
    dicom, rows = tmp_path / "dicom", []
    for index, name in enumerate(names):
        region = atlas[name]["region"]
        ds = eight_bit(fracatlas(name), body_part=BODY_PARTS[region])
        write_instance(ds, dicom / f"study{index // 2}", f"{index}.dcm")
        rows.append({
            "sop_instance_uid": ds.SOPInstanceUID,
            "fractured": atlas[name]["fractured"],
            # every other image: the region from the header (hand, knee, hip, shoulder keys)
            "region": region if index % 2 else "",
            "boxes": json.dumps(boxes.get(name, [])) if name in boxes else "",
            "hardware": atlas[name]["hardware"],
            "views": atlas[name]["views"],
            "dup_group": f"patient-{index // 2}",  # two images per (pseudonymous) patient
        })
    assert sum(bool(r["boxes"]) for r in rows) >= 10
    data = tmp_path / "export"
    status, stdout, stderr = export(dicom, write_labels(tmp_path / "labels.csv", rows), data,
                                    capsys)
    assert status == 0, stderr
    assert "exported 40 of 40 labelled instances" in stdout
    records = load_dataset(data)
    assert sum(r.localized for r in records) == sum(bool(r["boxes"]) for r in rows)

    (tmp_path / "tiny.toml").write_text(MEMBER)
    (tmp_path / "ensemble.toml").write_text(
        '[ensemble]\nname = "site"\nversion = "s1"\nmembers = ["tiny.toml"]\n')
    weights = tmp_path / "weights"
    inference_cli("train", "--config", str(tmp_path / "ensemble.toml"), "--data", str(data),
                  "--out", str(weights), "--runs", str(tmp_path / "runs"), "--device", "cpu",
                  "--no-progress", "--workers", "1")
    manifest = read_manifest(weights)
    assert [m.name for m in manifest.members] == ["tiny"] and manifest.trained
    split = load_split(weights / "split.json")
    sets = {image: which for which, images in
            (("train", split.train), ("tuning", split.tuning), ("validation", split.validation))
            for image in images}
    assert len(sets) == 40
    group = {r.image_id: r.dup_group for r in records}
    for a in group:  # a patient's two images always share a set
        assert all(sets[a] == sets[b] for b in group if group[b] == group[a])

    inference_cli("calibrate", "--weights", str(weights), "--data", str(data), "--device", "cpu")
    out = tmp_path / "eval"
    inference_cli("evaluate", "--weights", str(weights), "--data", str(data), "--out", str(out),
                  "--device", "cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 40
    assert set(metrics["per_region"]) == {"hand", "leg", "knee", "hip", "shoulder"}
