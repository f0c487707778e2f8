"""Write a smaller copy of a FracAtlas-layout folder: images resized so that the longest side is at
most N pixels (grayscale JPEG), boxes and polygons scaled with them, labels.csv kept (its width and
height columns updated). Used to carry the training data to a GPU machine with a transfer limit.

    python scripts/shrink_dataset.py --data ../shared/datasets/fracatlas \
        --out .data/fa384 --max-side 384
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2

from inference.imageio import read_grayscale


def shrink(data: Path, out: Path, max_side: int, quality: int) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    coco = json.loads((data / "boxes.json").read_text())
    factors: dict[str, tuple[float, float]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for entry in coco["images"]:
        image = read_grayscale(data / "images" / entry["file_name"])
        rows, cols = image.shape
        scale = min(1.0, max_side / max(rows, cols))
        new_w, new_h = max(1, round(cols * scale)), max(1, round(rows * scale))
        if scale < 1.0:
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / "images" / entry["file_name"]), image,
                    [cv2.IMWRITE_JPEG_QUALITY, quality])
        factors[entry["id"]] = (new_w / cols, new_h / rows)
        sizes[entry["file_name"]] = (new_w, new_h)
        entry["width"], entry["height"] = new_w, new_h
    for ann in coco["annotations"]:
        fx, fy = factors[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * fx, y * fy, w * fx, h * fy]
        ann["segmentation"] = [
            [v * (fx if i % 2 == 0 else fy) for i, v in enumerate(poly)]
            for poly in ann.get("segmentation") or []
        ]
        ann["area"] = ann.get("area", w * h) * fx * fy
    (out / "boxes.json").write_text(json.dumps(coco))
    with (data / "labels.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows_out = list(reader)
        fields = reader.fieldnames or []
    for row in rows_out:
        if "width" in row and row["image"] in sizes:
            row["width"], row["height"] = map(str, sizes[row["image"]])
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--quality", type=int, default=92)
    args = parser.parse_args()
    shrink(args.data, args.out, args.max_side, args.quality)


if __name__ == "__main__":
    main()
