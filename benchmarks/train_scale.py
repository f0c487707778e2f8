"""Training at a hospital's scale: how fast the data pipeline feeds a GPU, and how long the
``paper`` configuration takes on 1, 4 and 8 GPUs, from measured figures.

    python benchmarks/train_scale.py                     # the real run (several minutes)
    python benchmarks/train_scale.py --images 16 --quick # a short validation run

1. **Hospital-like inputs**: ``--images`` FracAtlas radiographs enlarged to a PACS-like size
   (``--side`` px long side, 12-bit values in 16-bit PNG: what ``dicomnode export-training``
   writes) in the training layout, in a temporary folder.
2. **Loading alone** (images per second, all of one epoch's work except the network):
   streamed (PNG decode, crop, resize, LCN, ground-truth map, augmentation in the data loader's
   worker processes) with 1 .. ``--workers`` workers; writing the pre-processing cache (parallel);
   reading the cache (memory-mapped float16) with augmentation.
3. **Training on this machine**: images per second of one ``paper`` member (forward, joint loss,
   backward, Adam) at the same size, bf16 where the CPU has it: what a CPU can do.
4. **The GPU figure**: the rate one H200 reached training the ``gpu-reference`` ensemble
   (``benchmarks/results/gpu-reference-2026-11-27/``: 5 members in parallel, 6 minutes; the
   loader fixes of 2026-12-04 since made epochs 1.5-2.5x faster, so this is conservative), as
   FLOP/s: the members' FLOPs are counted here (``FlopCounterMode`` on the meta
   device), a training image costs 3 forward passes (forward + backward), a tuning image one.
5. **The estimate**: the ``paper`` ensemble (10 members, 1024 px) on ``--radiographs``
   radiographs (80 % train, 10 % tuning), ``--epochs`` epochs each (the cap; early stopping may
   end members sooner), at that measured rate on 1, 4 and 8 GPUs with ideal scaling (data
   parallel training of convolutional networks on one machine usually keeps 85-95 %, not
   measured here: no GPU was lent), and how many loading workers each GPU needs to be fed.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from inference_speed import Member, flops_per_image, paper_members
from machine import machine_facts, print_facts, print_table
from torch.utils.data import DataLoader

from inference.imageio import read_grayscale
from inference.models import build_model
from inference.precision import resolve_speed
from inference.preprocess import PreprocessSettings
from inference.training.augment import AugmentSettings
from inference.training.config import load_config
from inference.training.dataset import load_dataset
from inference.training.loss import joint_loss
from inference.training.prepare import StreamingData, TrainingData, prepare
from inference.training.train import CHANNELS, Samples

REPO = Path(__file__).resolve().parents[1]
FRACATLAS = REPO.parent / "shared" / "datasets" / "fracatlas"


def hospital_like(target: Path, count: int, side: int) -> Path:
    """``count`` FracAtlas images (fractured ones first, with their boxes) enlarged to ``side`` px
    on the long side as 12-bit values in 16-bit PNGs, in the training layout."""
    coco = json.loads((FRACATLAS / "boxes.json").read_text())
    by_name = {im["file_name"]: im for im in coco["images"]}
    records = sorted(load_dataset(FRACATLAS), key=lambda r: (not r.fractured, r.image_id))[:count]
    (target / "images").mkdir(parents=True)
    images, annotations, rows = [], [], ["image,region,fractured"]
    for k, record in enumerate(records):
        grey = read_grayscale(record.path).astype(np.float32)
        scale = side / max(grey.shape)
        big = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        span = float(big.max() - big.min()) or 1.0
        pixels = np.clip((big - big.min()) / span * 4095, 0, 4095).astype(np.uint16)
        name = f"{Path(record.image_id).stem}.png"
        cv2.imwrite(str(target / "images" / name), pixels)
        images.append({"id": k, "file_name": name, "height": pixels.shape[0],
                       "width": pixels.shape[1]})
        for x0, y0, x1, y1 in record.boxes:
            bbox = [x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale]
            annotations.append({"id": len(annotations), "image_id": k, "category_id": 1,
                                "bbox": bbox})
        rows.append(f"{name},{';'.join(record.regions)},{int(record.fractured)}")
        assert by_name[record.image_id]  # a real FracAtlas image
    (target / "labels.csv").write_text("\n".join(rows) + "\n")
    (target / "boxes.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "fracture"}]}))
    return target


def loader_rate(data: TrainingData, workers: int, batch: int = 4) -> float:
    """Images per second through one epoch's loader (augmented, both channels)."""
    samples = Samples(data, np.arange(len(data.ids)), CHANNELS["both"], AugmentSettings(), (0, 0))
    loader = DataLoader(samples, batch_size=batch, num_workers=workers,
                        persistent_workers=False)
    start = time.perf_counter()
    seen = sum(len(label) for _, _, label in loader)
    return seen / (time.perf_counter() - start)


def training_rate(member: Member, steps: int, batch: int) -> tuple[float, str]:
    """Images per second of training steps of one member on this machine (bf16 where native)."""
    device = torch.device("cpu")
    speed = resolve_speed("auto", False, device)
    model = member.build().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, member.in_chans, member.size, member.size)
    mask = (torch.rand(batch, 1, member.size, member.size) > 0.99).float()
    label = torch.tensor([1.0, 0.0] * (batch // 2) + [1.0] * (batch % 2))
    timings = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with speed.autocast(device)():
            out = model(x)
        loss = joint_loss(out.score_logit.float(),
                          None if out.map_logit is None else out.map_logit.float(), label, mask)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        timings.append(time.perf_counter() - t0)
    best = sorted(timings[1:])[0] if len(timings) > 1 else timings[0]
    return batch / best, speed.precision


def h200_rate() -> tuple[float, str]:
    """FLOP/s the H200 reached training ``gpu-reference`` (all members together, wall clock)."""
    weights = REPO / "benchmarks" / "results" / "gpu-reference-2026-11-27"  # shipped until 12-04
    log = json.loads((weights / "training.json").read_text())
    console = (weights / "training-logs" / "console.log").read_text()
    stamps = dict(re.findall(r"\[(\d\d:\d\d:\d\d)\] (train in parallel|trained)", console)[::1])
    times = {v: k for k, v in stamps.items()}
    start, end = (sum(int(p) * m for p, m in zip(times[key].split(":"), (3600, 60, 1),
                                                  strict=True))
                  for key in ("train in parallel", "trained"))
    split = json.loads((REPO / "ensemble_weights" / "split.json").read_text())  # same train/tune
    n_train, n_tune = len(split["train"]), len(split["tuning"])
    config = load_config(REPO / "configs" / "gpu-reference.toml")
    total = 0.0
    for member in config.members:
        draft = member.draft
        options = draft.model_options()
        flops = flops_per_image([Member(draft.name, draft.size, options.in_chans,
                                        lambda d=draft, o=options: build_model(
                                            d.arch, **o.to_mapping()))])
        total += log[draft.name]["epochs_run"] * (3 * n_train + n_tune) * flops
    seconds = end - start
    return total / seconds, f"{len(config.members)} members, {seconds} s wall"


def estimate_rows(
    members: Sequence[Member], rate: float, radiographs: int, epochs: int, gpus: Sequence[int]
) -> list[list[object]]:
    flops = [flops_per_image([m]) for m in members]
    n_train, n_tune = int(0.8 * radiographs), int(0.1 * radiographs)
    work = sum(epochs * (3 * n_train + n_tune) * f for f in flops)
    per_member_rate = [rate / (3 * f) for f in flops]  # training images/s of one member
    rows = []
    for count in gpus:
        hours = work / (rate * count) / 3600
        rows.append([count, f"{hours:,.0f} h ({hours / 24:.1f} days)",
                     f"{min(per_member_rate):.0f}-{max(per_member_rate):.0f}"])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=3000, help="long side of the inputs (px)")
    parser.add_argument("--size", type=int, default=1024, help="network input size (px)")
    parser.add_argument("--workers", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=3, help="training steps timed")
    parser.add_argument("--radiographs", type=int, default=700_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, no CPU training")
    args = parser.parse_args(argv)
    print_facts("train_scale.py: data pipeline and training time at scale", machine_facts())
    settings = PreprocessSettings()
    with tempfile.TemporaryDirectory() as tmp:
        folder = hospital_like(Path(tmp) / "data", args.images, args.side)
        records = load_dataset(folder)
        print(f"\n{len(records)} radiographs of {args.side} px (16-bit PNG) to {args.size} px\n")
        rows: list[list[object]] = []
        stream = StreamingData(tuple(records), args.size, settings)
        for workers in range(1, args.workers + 1):
            rows.append([f"streamed, {workers} worker(s)", f"{loader_rate(stream, workers):.1f}"])
        t0 = time.perf_counter()
        cached = prepare(records, size=args.size, settings=settings,
                         cache_dir=Path(tmp) / "cache", workers=args.workers)
        rows.append([f"writing the cache, {args.workers} processes",
                     f"{len(records) / (time.perf_counter() - t0):.1f}"])
        for workers in range(1, args.workers + 1):
            rows.append([f"from the cache, {workers} worker(s)",
                         f"{loader_rate(cached, workers):.1f}"])
        per_image = cached.images[0].nbytes + cached.masks[0].nbytes
        print_table(["loading", "images/s"], rows)
        print(f"\ncache: {per_image / 1e6:.1f} MB per image at {args.size} px")
    members = paper_members(REPO / "configs" / "paper.toml", None)
    if not args.quick:
        d22 = next(m for m in members if "d22" in m.name)
        speed, precision = training_rate(d22, args.steps, 2)
        print(f"\ntraining {d22.name} at {d22.size} px on this CPU: {speed:.3f} images/s "
              f"({precision})")
    rate, what = h200_rate()
    print(f"\nH200, measured training gpu-reference ({what}): {rate / 1e12:.1f} TFLOP/s")
    print(f"\n`paper` ensemble, {args.radiographs:,} radiographs, {args.epochs} epochs, "
          f"that rate per GPU, ideal scaling:\n")
    print_table(["GPUs", "wall time", "training images/s per member and GPU"],
                estimate_rows(members, rate, args.radiographs, args.epochs, (1, 4, 8)))


if __name__ == "__main__":
    main()
