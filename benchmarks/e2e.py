"""End-to-end latency of the node: from the last instance of a three-view study received to the
results accepted by the receiving PACS, minus ``stable_seconds``.

    python benchmarks/e2e.py                    # 20 studies, shipped weights, DCMTK storescp PACS
    python benchmarks/e2e.py --quick            # 3 studies
    python benchmarks/e2e.py --studies 50 --stable-seconds 2 --pacs orthanc

``dicomnode serve`` runs with the shipped weights (``ensemble_weights/``) and its default outputs
(SR + one Secondary Capture per image), sending to a throwaway PACS (``dicomnode.demo``'s
``StoreScpPacs`` or ``OrthancPacs``). Each study is the three FracAtlas radiographs of
``samples/fracatlas/`` (hand, leg, shoulder) wrapped as DX with new UIDs, sent with one
``storescu`` association; the next study is sent once the previous one is delivered, so no study
waits for another. All times come from the node's JSON log (one clock): ``instance_received`` of
the study's last instance, ``job_leased`` and ``job_results_written`` from the worker, and
``delivery_delivered``, logged once the PACS has answered success for every object of the
delivery (the SR included). Latency = delivered - last received - ``stable_seconds``; the
segments show where it goes: waiting beyond ``stable_seconds`` for the study to be queued and
leased, the job (decode, region, ensemble, SR/SC writing), and the delivery.

For comparison the script first times ``Ensemble.analyse`` on the same three views in its own
process (median of 3): the issue's goal is a latency of at most that plus 1 second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from machine import machine_facts, median, p95, print_facts, print_table

from dicomnode.demo import (
    NODE_AE,
    SAMPLES,
    SAMPLES_DIR,
    WEIGHTS_DIR,
    OrthancPacs,
    Pacs,
    StoreScpPacs,
    dx_from_image,
    free_port,
    node_config,
    running_node,
    storescu,
)
from inference.ensemble import Ensemble
from inference.imageio import read_grayscale

SEGMENTS = (
    "received_to_leased",
    "job",
    "job: decode",
    "job: ensemble (Ensemble.analyse)",
    "job: write SR/SC",
    "results_to_delivered",
    "latency",
)


def views() -> list[tuple[np.ndarray, str]]:
    """The three sample radiographs and their Body Part Examined."""
    return [(read_grayscale(SAMPLES_DIR / name), part) for name, part in SAMPLES.values()]


def write_study(folder: Path, images: Sequence[tuple[np.ndarray, str]]) -> tuple[str, list[Path]]:
    """A three-view study (new UIDs) as DX files; its Study Instance UID and the files."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = ""
    paths = []
    for index, (pixels, body_part) in enumerate(images):
        ds = dx_from_image(pixels, body_part=body_part, study_uid=study_uid or None,
                           instance_number=index + 1)
        study_uid = str(ds.StudyInstanceUID)
        path = folder / f"view{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def events(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def seconds_of(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def study_times(log: Path, study_uid: str) -> dict[str, float] | None:
    """Times of the study's events, or None while it is not delivered yet."""
    mine = [e for e in events(log) if e.get("study_instance_uid") == study_uid]
    received = [seconds_of(e) for e in mine if e["event"] == "instance_received"]
    by_name = {str(e["event"]): e for e in mine}
    if "delivery_delivered" not in by_name or not received:
        return None
    steps = by_name["job_results_written"].get("seconds")
    assert isinstance(steps, dict), "the node logs each job's step times"
    return {
        "received": max(received),
        "leased": seconds_of(by_name["job_leased"]),
        "results": seconds_of(by_name["job_results_written"]),
        "delivered": seconds_of(by_name["delivery_delivered"]),
        **{f"step_{name}": float(value) for name, value in steps.items()},
    }


def analyse_seconds(images: Sequence[tuple[np.ndarray, str]], repeats: int = 3) -> float:
    """Median wall time of ``Ensemble.analyse`` on the three views (one batch) in this process,
    with the speed settings the node's defaults choose (``inference.precision = "auto"``)."""
    ensemble = Ensemble.load(WEIGHTS_DIR, device="auto", precision="auto")
    pixels = [p for p, _ in images]
    regions: list[str | None] = [None] * len(pixels)
    ensemble.analyse(pixels, regions)  # warm-up
    timings = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ensemble.analyse(pixels, regions)
        timings.append(time.perf_counter() - t0)
    return median(timings)


def start_pacs(kind: str, workdir: Path, stack: ExitStack) -> Pacs:
    if kind == "orthanc":
        return stack.enter_context(OrthancPacs(workdir / "orthanc"))
    return stack.enter_context(StoreScpPacs(workdir / "storescp"))


def run(args: argparse.Namespace, workdir: Path) -> list[dict[str, float]]:
    images = views()
    rows = []
    with ExitStack() as stack:
        pacs = start_pacs(args.pacs, workdir, stack)
        port = free_port()
        config = workdir / "node.toml"
        config.write_text(node_config(workdir / "state", port, args.weights, pacs,
                                      stable_seconds=args.stable_seconds))
        log = workdir / "node.log"
        stack.enter_context(running_node(config, log, time.monotonic() + 180))
        for index in range(args.studies):
            study_uid, files = write_study(workdir / f"study{index}", images)
            storescu(port, files, NODE_AE)
            deadline = time.monotonic() + args.timeout
            times = study_times(log, study_uid)
            while times is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"study {index} was not delivered in {args.timeout} s")
                time.sleep(0.05)
                times = study_times(log, study_uid)
            row = {
                "received_to_leased": times["leased"] - times["received"] - args.stable_seconds,
                "job": times["results"] - times["leased"],
                "job: decode": times["step_decode"],
                "job: ensemble (Ensemble.analyse)": times["step_analyse"],
                "job: write SR/SC": times["step_write"],
                "results_to_delivered": times["delivered"] - times["results"],
                "latency": times["delivered"] - times["received"] - args.stable_seconds,
            }
            rows.append(row)
            print(f"# study {index + 1}: latency {row['latency']:.2f} s (job {row['job']:.2f} s)",
                  flush=True)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--pacs", choices=("storescp", "orthanc"), default="storescp")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per study")
    parser.add_argument("--quick", action="store_true", help="validation: 3 studies")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies = min(args.studies, 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    facts = machine_facts({
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "studies": args.studies,
        "stable_seconds": args.stable_seconds,
        "pacs": args.pacs,
    })
    print_facts("benchmarks/e2e.py " + " ".join(sys.argv[1:]), facts)
    analyse = analyse_seconds(views())
    print(f"# Ensemble.analyse of the three views in this process: {analyse:.2f} s (median of 3)"
          f"; goal: latency <= {analyse + 1:.2f} s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    try:
        rows = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = [
        [name, f"{median([r[name] for r in rows]):.2f}", f"{p95([r[name] for r in rows]):.2f}"]
        for name in SEGMENTS
    ]
    print(f"## End-to-end latency over {len(rows)} three-view studies (seconds; latency = "
          f"delivered - last instance received - stable_seconds {args.stable_seconds})")
    print_table(["segment", "median", "p95"], table)
    goal = analyse + 1
    print(f"# Ensemble.analyse alone: {analyse:.2f} s; goal latency <= {goal:.2f} s; median "
          f"latency {median([r['latency'] for r in rows]):.2f} s")
    print(f"# finished; 1-minute load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
