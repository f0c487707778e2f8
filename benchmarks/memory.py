"""Peak memory of ``Ensemble.analyse`` per study size, with and without chunking (issue 13).

    python benchmarks/memory.py                          # shipped ensemble, 1/3/20/60 views
    python benchmarks/memory.py --long-side 2560         # the views resized to DX size first
    python benchmarks/memory.py --ensemble paper --views 1 3 --fixed 1   # random paper weights
    python benchmarks/memory.py --members                # what ACTIVATION_FACTOR rests on
    python benchmarks/memory.py --device cuda --identity # chunks against one batch on a GPU
    python benchmarks/memory.py --worker --views 60 --long-side 2560   # the whole worker

Every case runs in a fresh process (this script with ``--case``): it loads the ensemble and the
study's images (distinct FracAtlas radiographs as float32 in [0, 1], as the worker decodes
views), analyses one view to warm up, resets the resident-memory high-water mark (writing "5"
to ``/proc/self/clear_refs``), analyses the study once and reads ``VmHWM`` from
``/proc/self/status`` (on CUDA also ``torch.cuda.max_memory_allocated``). Each study size runs as
one batch (``max_batch`` = views, as before chunking), with ``max_batch = auto`` and with a small
fixed ``max_batch``.

``--members``: the resident peak of one member's forward pass at batch 1 and batch 3 (fresh
process each, fp32 and bf16 + channels-last), the peak bytes per extra image, and its ratio to
the member's largest activation for one image (``inference.memory.largest_activation``): the
measurement behind ``inference.memory.ACTIVATION_FACTOR``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from machine import machine_facts, print_facts, print_table

from inference.ensemble import Ensemble, build_member
from inference.export import write_random_ensemble
from inference.imageio import read_grayscale
from inference.manifest import read_manifest
from inference.memory import (
    ACTIVATION_FACTOR,
    AUTO_CAP,
    SAFETY,
    available_bytes,
    largest_activation,
)
from inference.models import build_model
from inference.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "ensemble_weights"
PAPER = REPO / "configs" / "paper.toml"
DATA = REPO.parent / "shared" / "datasets" / "fracatlas"
MIB = 2**20


# -- inside a case process ---------------------------------------------------------------------


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(device: torch.device) -> None:
    """Reset the RSS high-water mark (and CUDA's peak statistics) of this process."""
    Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def study_images(data: Path, count: int, long_side: int | None) -> list[np.ndarray]:
    """``count`` distinct radiographs as float32 in [0, 1] (the worker's decoded views),
    resized to ``long_side`` pixels on the long side when given."""
    paths = sorted((data / "images").iterdir())[:count]
    if len(paths) < count:
        raise SystemExit(f"only {len(paths)} images in {data / 'images'}")
    images = []
    for path in paths:
        raw = read_grayscale(path)
        image: np.ndarray = raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
        if long_side is not None:
            scale = long_side / max(image.shape)
            shape = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = cv2.resize(image, shape, interpolation=cv2.INTER_LINEAR)
        images.append(image)
    return images


def run_study_case(case: dict[str, Any]) -> dict[str, Any]:
    """One study analysed in this (fresh) process: peak memory and time."""
    ensemble = Ensemble.load(case["weights"], case["device"], precision=case["precision"])
    images = study_images(Path(case["data"]), case["views"], case["long_side"])
    regions: list[str | None] = ["wrist"] * len(images)
    ensemble.analyse(images[:1], regions[:1])  # warm-up: first-call costs are not the study's
    max_batch = None if case["max_batch"] == "auto" else int(case["max_batch"])
    chunk = ensemble.batch_size(len(images), max_batch)
    reset_peak(ensemble.device)
    baseline = status_mib("VmRSS")
    cuda = ensemble.device.type == "cuda"
    cuda_before = torch.cuda.memory_allocated() / MIB if cuda else 0.0
    t0 = time.perf_counter()
    ensemble.analyse(images, regions, max_batch=max_batch)
    seconds = time.perf_counter() - t0
    result = {
        "baseline_mib": baseline,
        "peak_mib": status_mib("VmHWM"),
        "images_mib": sum(image.nbytes for image in images) / MIB,
        "chunk": chunk,
        "seconds": seconds,
        "estimate_mib": ensemble.image_bytes / MIB,
        "available_mib": available_bytes(ensemble.device) / MIB,
        "speed": ensemble.speed.describe(),
    }
    if cuda:  # allocated: tensors (weights included); reserved: the caching allocator's hold
        result["cuda_before_mib"] = cuda_before
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        result["cuda_reserved_peak_mib"] = torch.cuda.max_memory_reserved() / MIB
    return result


def write_study(folder: Path, data: Path, views: int, long_side: int | None) -> list[Path]:
    """``views`` distinct FracAtlas radiographs as 8-bit DX files of one study in ``folder``."""
    from pydicom.uid import generate_uid

    from dicomnode.demo import dx_from_image

    study = generate_uid()
    paths = []
    for number, image in enumerate(study_images(data, views, long_side), start=1):
        ds = dx_from_image(
            np.round(image * 255).astype(np.uint8), body_part="HAND", study_uid=study,
            instance_number=number,
        )
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def run_worker_case(case: dict[str, Any]) -> dict[str, Any]:
    """One study through the worker (``StudyProcessor.process``: decode, scope, analyse, write
    the SR and a Secondary Capture per view) in this (fresh) process: peak memory and time."""
    import hashlib

    from dicomnode.config import parse_config
    from dicomnode.records import StoredInstance, StudyJob
    from dicomnode.scp import read_header
    from dicomnode.worker import StudyProcessor, load_ensemble

    state = Path(case["state"])
    inference = {"weights": case["weights"], "device": case["device"],
                 "precision": case["precision"], "max_batch": case["max_batch"]}
    config = parse_config({"node": {"state_dir": str(state)}, "inference": inference}, state)
    ensemble = load_ensemble(config)
    processor = StudyProcessor(config, ensemble)

    def job(paths: list[Path]) -> StudyJob:
        instances = []
        for path in paths:
            header = read_header(path)
            data = path.read_bytes()
            instances.append(StoredInstance(
                header.sop_instance_uid, header.sop_class_uid, header.study_instance_uid,
                header.series_instance_uid, header.transfer_syntax_uid, path, len(data),
                hashlib.sha256(data).hexdigest(), "BENCH"))
        return StudyJob(1, instances[0].study_instance_uid, 1, 1, "bench", time.time() + 86400,
                        tuple(instances), ())

    paths = sorted(Path(case["study"]).glob("*.dcm"))
    processor.process(job(paths[:1]), state / "warm-up")  # first-call costs are not the study's
    reset_peak(ensemble.device)
    baseline = status_mib("VmRSS")
    t0 = time.perf_counter()
    outcome = processor.process(job(paths), state / "results")
    return {
        "baseline_mib": baseline,
        "peak_mib": status_mib("VmHWM"),
        "seconds": time.perf_counter() - t0,
        "results": len(outcome.results),
        "analysed": outcome.analysed,
    }


def workers(args: argparse.Namespace) -> None:
    """The whole worker on studies of ``--views`` DX files, one batch against chunks."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="worker-memory-") as tmp:
        for views in args.views:
            study = Path(tmp) / f"study-{views}"
            study.mkdir()
            write_study(study, args.data, views, args.long_side)
            for max_batch in settings(views, args.fixed):
                state = Path(tmp) / f"state-{views}-{max_batch}"
                case = {"kind": "worker", "weights": str(WEIGHTS), "device": args.device,
                        "precision": args.precision, "study": str(study), "state": str(state),
                        "max_batch": max_batch if max_batch == "auto" else int(max_batch)}
                r = in_fresh_process(case)
                label = "one batch" if max_batch == str(views) else f"max_batch {max_batch}"
                row = [views, label, f"{r['baseline_mib']:.0f}", f"{r['peak_mib']:.0f}",
                       f"{r['peak_mib'] - r['baseline_mib']:.0f}", f"{r['seconds']:.1f}",
                       r["analysed"], r["results"]]
                rows.append(row)
                print("| " + " | ".join(str(c) for c in row) + " |", file=sys.stderr, flush=True)
    print_table(["views", "max_batch", "RSS before MiB", "peak RSS MiB", "peak - before MiB",
                 "s / study", "analysed", "result objects"], rows)


def member_builders(ensemble: str, size: int | None) -> list[tuple[str, int, int, Any]]:
    """(name, size, input channels, builder) of every member of the ensemble."""
    if ensemble == "shipped":
        return [
            (s.name, size or s.size, s.in_chans, partial(build_member, s))
            for s in read_manifest(WEIGHTS).members
        ]
    members = []
    for member in load_config(PAPER).members:
        draft = member.draft
        options = draft.model_options()
        build = partial(build_model, draft.arch, **options.to_mapping())
        members.append((draft.name, size or draft.size, options.in_chans, build))
    return members


def run_member_case(case: dict[str, Any]) -> dict[str, Any]:
    """One member's forward pass at one batch size in this process: peak RSS over the input."""
    _name, size, in_chans, build = next(
        m for m in member_builders(case["ensemble"], case["size"]) if m[0] == case["member"]
    )
    bf16 = case["precision"] == "bf16"
    layout = torch.channels_last if bf16 else torch.contiguous_format
    model = build().eval().to(memory_format=layout)
    batch = torch.rand(case["batch"], in_chans, size, size).mul(2).sub(1)
    batch = batch.to(memory_format=layout)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        model(batch[:1])  # warm-up (oneDNN primitives, autocast weight casts)
    reset_peak(torch.device("cpu"))
    baseline = status_mib("VmRSS")
    with torch.inference_mode(), autocast:
        model(batch)
    return {"extra_mib": status_mib("VmHWM") - baseline}


# -- the parent: cases in fresh processes ------------------------------------------------------


def in_fresh_process(case: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def paper_weights(folder: Path) -> Path:
    """The ``paper`` ensemble's architecture with random weights, written to ``folder``."""
    write_random_ensemble(folder, [m.draft for m in load_config(PAPER).members], name="paper")
    return folder


def settings(views: int, fixed: int) -> list[str]:
    """The max_batch values a study of ``views`` views is measured with."""
    if views == 1:
        return ["1"]
    chosen = [str(views), "auto"]
    return chosen + ([str(fixed)] if fixed < views else [])


def studies(args: argparse.Namespace, weights: Path) -> None:
    rows = []
    for views in args.views:
        for max_batch in settings(views, args.fixed):
            case = {
                "kind": "study",
                "weights": str(weights),
                "device": args.device,
                "precision": args.precision,
                "data": str(args.data),
                "views": views,
                "long_side": args.long_side,
                "max_batch": max_batch,
            }
            r = in_fresh_process(case)
            label = "one batch" if max_batch == str(views) else f"max_batch {max_batch}"
            row = [
                views,
                label,
                r["chunk"],
                f"{r['images_mib']:.0f}",
                f"{r['baseline_mib']:.0f}",
                f"{r['peak_mib']:.0f}",
                f"{r['peak_mib'] - r['baseline_mib']:.0f}",
                f"{r['seconds']:.1f}",
                f"{r['seconds'] / views:.2f}",
            ]
            if "cuda_peak_mib" in r:
                row += [
                    f"{r['cuda_before_mib']:.0f}",
                    f"{r['cuda_peak_mib']:.0f}",
                    f"{r['cuda_peak_mib'] - r['cuda_before_mib']:.0f}",
                    f"{r['cuda_reserved_peak_mib']:.0f}",
                ]
            rows.append(row)
            print("| " + " | ".join(str(c) for c in row) + " |", file=sys.stderr, flush=True)
    print(f"# speed: {r['speed']}; auto's estimate per image: {r['estimate_mib']:.0f} MiB; "
          f"available at the last case: {r['available_mib']:.0f} MiB (auto plans with "
          f"{SAFETY:.0%} of it, at most {AUTO_CAP} views)\n")
    header = [
        "views",
        "max_batch",
        "chunk",
        "images MiB",
        "RSS before MiB",
        "peak RSS MiB",
        "peak - before MiB",
        "s / study",
        "s / view",
    ]
    if rows and len(rows[-1]) > len(header):
        header += [
            "CUDA before MiB",
            "CUDA peak allocated MiB",
            "CUDA peak - before MiB",
            "CUDA peak reserved MiB",
        ]
    print_table(header, rows)


def identity(args: argparse.Namespace, weights: Path) -> None:
    """Chunked analysis against one batch on the chosen device and precision: the largest score
    difference over the study's views and how many decisions and box counts agree."""
    ensemble = Ensemble.load(weights, args.device, precision=args.precision)
    rows = []
    for views in args.views:
        images = study_images(args.data, views, args.long_side)
        regions: list[str | None] = ["wrist"] * views
        one_batch, _ = ensemble.analyse(images, regions, max_batch=views)
        for max_batch in (None, args.fixed, 1):
            if max_batch is not None and max_batch >= views:
                continue
            chunked, _ = ensemble.analyse(images, regions, max_batch=max_batch)
            pairs = list(zip(chunked, one_batch, strict=True))
            rows.append([
                views,
                "auto" if max_batch is None else max_batch,
                ensemble.batch_size(views, max_batch),
                f"{max(abs(a.score - b.score) for a, b in pairs):.1e}",
                f"{sum(a.decision == b.decision for a, b in pairs)}/{views}",
                f"{sum(len(a.boxes) == len(b.boxes) for a, b in pairs)}/{views}",
            ])
    print(f"# speed: {ensemble.speed.describe()}\n")
    print_table(
        ["views", "max_batch", "chunk", "max |score difference| to one batch",
         "same decision", "same box count"],
        rows,
    )


def members(args: argparse.Namespace) -> None:
    rows = []
    ensembles = ["shipped", "paper"] if args.ensemble == "both" else [args.ensemble]
    for ensemble in ensembles:
        size = args.member_size if ensemble == "paper" else None
        for name, member_size, in_chans, build in member_builders(ensemble, size):
            if args.only and name not in args.only:
                continue
            activation = largest_activation(build().eval(), in_chans, member_size) * 4 / MIB
            for precision in ("fp32", "bf16"):
                peaks = {
                    batch: in_fresh_process(
                        {
                            "kind": "member",
                            "ensemble": ensemble,
                            "member": name,
                            "size": size,
                            "precision": precision,
                            "batch": batch,
                        }
                    )["extra_mib"]
                    for batch in (1, 3)
                }
                per_image = (peaks[3] - peaks[1]) / 2
                row = [
                    name,
                    member_size,
                    precision,
                    f"{activation:.1f}",
                    f"{peaks[1]:.0f}",
                    f"{peaks[3]:.0f}",
                    f"{per_image:.1f}",
                    f"{per_image / activation:.2f}",
                ]
                rows.append(row)
                print("| " + " | ".join(str(c) for c in row) + " |", file=sys.stderr, flush=True)
    print(f"# ACTIVATION_FACTOR in inference/memory.py: {ACTIVATION_FACTOR}\n")
    print_table(
        [
            "member",
            "px",
            "precision",
            "largest activation MiB (1 image, fp32)",
            "peak over input, batch 1 MiB",
            "batch 3 MiB",
            "MiB per extra image",
            "ratio",
        ],
        rows,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensemble", choices=("shipped", "paper", "both"), default="shipped")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 3, 20, 60])
    parser.add_argument("--fixed", type=int, default=2, help="the small fixed max_batch")
    parser.add_argument("--worker", action="store_true",
                        help="the whole worker (decode, analyse, write) on DX files, shipped "
                        "ensemble")
    parser.add_argument("--identity", action="store_true",
                        help="compare chunked results with one batch instead of measuring memory")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--data", type=Path, default=DATA, help="a FracAtlas folder")
    parser.add_argument("--long-side", type=int, default=None,
                        help="resize every view to this long side first (DX: 2560)")
    parser.add_argument("--members", action="store_true", help="per-member measurement")
    parser.add_argument("--member-size", type=int, default=512,
                        help="input size of the paper members in --members (theirs: 1024)")
    parser.add_argument("--only", nargs="*", default=[], help="--members: only these members")
    parser.add_argument("--note", default="", help="printed with the machine facts")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        run = {"study": run_study_case, "member": run_member_case, "worker": run_worker_case}[
            case["kind"]
        ]
        print(json.dumps(run(case)))
        return
    facts = machine_facts(
        {
            "memory_total_gib": round(
                int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1
            ),
            "memory_available_gib": round(available_bytes(torch.device("cpu")) / 2**30, 1),
            "ensemble": args.ensemble,
            "precision": args.precision,
            "views_long_side": args.long_side or "as stored (FracAtlas: 1024)",
            **({"note": args.note} if args.note else {}),
        }
    )
    print_facts("benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv), facts)
    if args.members:
        members(args)
        return
    if args.worker:
        workers(args)
        return
    run = identity if args.identity else studies
    if args.ensemble == "paper":
        with tempfile.TemporaryDirectory(prefix="paper-weights-") as folder:
            run(args, paper_weights(Path(folder)))
    else:
        run(args, WEIGHTS)


if __name__ == "__main__":
    main()
