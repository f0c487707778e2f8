"""Shared fixtures: paths to ../shared, small real datasets cut from FracAtlas, random ensembles."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from inference.export import MemberDraft, write_random_ensemble

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FRACATLAS = SHARED / "datasets" / "fracatlas"
DICOM_SAMPLES = SHARED / "dicom-samples"

#: storescu proposes only uncompressed syntaxes unless told; the option that also proposes a
#: file's own (compressed) transfer syntax, so that it is sent as it is on disk.
STORESCU_SYNTAX = {
    "1.2.840.10008.1.2.1": "-x=",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}

torch.set_num_threads(min(2, torch.get_num_threads()))


def subset_fracatlas(target: Path, image_names: Sequence[str]) -> Path:
    """A FracAtlas-layout folder with only the named images (labels and boxes filtered)."""
    (target / "images").mkdir(parents=True)
    wanted = set(image_names)
    with (FRACATLAS / "labels.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row["image"] in wanted]
        fieldnames = reader.fieldnames
    assert fieldnames is not None and len(rows) == len(wanted)
    with (target / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    coco = json.loads((FRACATLAS / "boxes.json").read_text())
    images = [im for im in coco["images"] if im["file_name"] in wanted]
    ids = {im["id"] for im in images}
    coco["images"] = images
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    (target / "boxes.json").write_text(json.dumps(coco))
    for name in image_names:
        shutil.copy(FRACATLAS / "images" / name, target / "images" / name)
    return target


def pick_images(n_per_stratum: int) -> list[str]:
    """A deterministic, stratified pick: the first images of each (region, fractured) pair."""
    picked: dict[tuple[str, str], list[str]] = {}
    with (FRACATLAS / "labels.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["dup_group"]:
                continue
            key = (row["region"], row["fractured"])
            if key[0] in ("hand", "leg", "hip", "shoulder"):
                picked.setdefault(key, [])
                if len(picked[key]) < n_per_stratum:
                    picked[key].append(row["image"])
    return sorted(name for names in picked.values() for name in names)


@pytest.fixture(scope="session")
def tiny_fracatlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """75 real FracAtlas images (up to 10 per region x label) in the FracAtlas layout."""
    return subset_fracatlas(tmp_path_factory.mktemp("fracatlas") / "data", pick_images(10))


SMALL_MEMBERS = (
    MemberDraft("raw-map", "drn_d_22", "raw", 64, {"width": 0.25, "map_head": True}),
    MemberDraft("both-spp", "drn_c_26", "both", 48, {"width": 0.25, "pool": "spp"}),
    MemberDraft("lcn-att", "drn_d_22", "lcn", 64,
                {"width": 0.25, "map_head": True, "attention": True}),
)


@pytest.fixture()
def random_weights(tmp_path: Path) -> Path:
    """A small randomly initialised ensemble (3 members: raw/both/LCN, map/SPP/attention)."""
    folder = tmp_path / "weights"
    write_random_ensemble(folder, SMALL_MEMBERS)
    return folder
