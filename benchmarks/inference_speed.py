"""Inference speed of the ensembles on this machine, against the machine's own GEMM peak.

    python benchmarks/inference_speed.py                  # the real run (several minutes)
    python benchmarks/inference_speed.py --quick          # a short validation run
    python benchmarks/inference_speed.py --ensemble shipped --runs 7 --threads 1,2

(Named ``inference_speed.py``, not ``inference.py``: a script runs with its folder first on
``sys.path``, so a ``benchmarks/inference.py`` would shadow the ``inference`` package for every
script in this folder.)

For each ensemble, the shipped one (``ensemble_weights/``, real weights, loaded through
``inference.ensemble.Ensemble``) and the ``paper`` one (``configs/paper.toml``, 10 full-width
members at 1024 px, random weights built by the model registry):

1. FLOPs of one radiograph: every member once at its input size (``FlopCounterMode`` on the meta
   device, so counting costs no compute);
2. the peak matrix-multiply rate of this machine in the same run and dtype: the faster of a large
   square ``torch.matmul`` and the same product as a 1x1 convolution (best of several each: the
   two may run in different libraries and kernels, and the members' convolutions in a third);
3. latency of all members on a batch of one view and of a three-view study (median of ``--runs``
   after a warm-up), radiographs per second, peak memory (RSS high-water mark, reset before each
   variant through ``/proc/self/clear_refs``; ``torch.cuda.max_memory_allocated`` on a GPU) and
   **efficiency = achieved FLOP/s / peak FLOP/s of the same dtype**;
   variants: fp32 / bf16 autocast x plain / channels-last layout (all under
   ``torch.inference_mode``), then the thread count for the fastest variant;
4. on a CUDA device: the same in fp32 (TF32 off), bf16 and fp16 with channels-last at batch 1 and
   a sweep of batch sizes, and ``torch.compile`` (mode ``max-autotune-no-cudagraphs`` and
   ``reduce-overhead``, which captures CUDA graphs) where it wins;
5. agreement of the speed settings with fp32 through the real ``Ensemble`` (pre-processing,
   members, post-processing) on FracAtlas validation images of the shipped split: largest and
   mean score difference, decisions (global operating point) that change, and the AUC of both
   when the images hold both classes; plus the whole ``analyse`` time per radiograph.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import machine_facts, median, print_facts, print_table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from inference.ensemble import Ensemble, build_member
from inference.imageio import read_grayscale
from inference.manifest import read_manifest
from inference.models import build_model
from inference.precision import SpeedSettings, fast_bf16
from inference.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Member:
    """One member to time: its name, input size and channels, and a builder of the network."""

    name: str
    size: int
    in_chans: int
    build: Callable[[], nn.Module]


@dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile_mode: str | None = None

    @property
    def label(self) -> str:
        parts = [self.precision, "channels_last" if self.channels_last else "plain"]
        if self.compile_mode:
            parts.append(f"compile:{self.compile_mode}")
        return " ".join(parts)


# -- members of the two ensembles ----------------------------------------------------------------


def shipped_members(weights: Path, device: torch.device) -> list[Member]:
    """The shipped ensemble's members with their real weights (loaded once, through Ensemble)."""
    ensemble = Ensemble.load(weights, device=device.type)
    return [
        Member(spec.name, spec.size, spec.in_chans, lambda m=model: m)
        for spec, model in zip(ensemble.manifest.members, ensemble.models, strict=True)
    ]


def paper_members(config: Path, size: int | None) -> list[Member]:
    """The ``paper`` ensemble's architecture with random weights (``size`` overrides 1024 px)."""
    members = []
    for member in load_config(config).members:
        draft = member.draft
        options = draft.model_options()
        members.append(
            Member(
                draft.name,
                size or draft.size,
                options.in_chans,
                lambda d=draft, o=options: build_model(d.arch, **o.to_mapping()).eval(),
            )
        )
    return members


def shipped_flop_members(weights: Path) -> list[Member]:
    """The shipped architecture as builders (for FLOP counting on the meta device)."""
    manifest = read_manifest(weights)
    return [
        Member(s.name, s.size, s.in_chans, lambda s=s: build_member(s).eval())
        for s in manifest.members
    ]


# -- FLOPs and peak --------------------------------------------------------------------------


def flops_per_image(members: Sequence[Member]) -> int:
    """FLOPs (2 per multiply-add) of one radiograph through every member, counted on meta."""
    total = 0
    for member in members:
        with torch.device("meta"):
            model = member.build()
            x = torch.randn(1, member.in_chans, member.size, member.size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        total += int(counter.get_total_flops())
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``run`` (after one warm-up call)."""
    run()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_matmul(dtype: torch.dtype, device: torch.device, n: int, repeats: int) -> float:
    """FLOP/s of the best of ``repeats`` square n x n matrix products (``torch.matmul``)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_seconds(lambda: torch.matmul(a, b), device, repeats)


def peak_gemm_as_conv(dtype: torch.dtype, device: torch.device, n: int, repeats: int) -> float:
    """FLOP/s of the same n x n x n product done as a 1x1 convolution (n channels in and out
    over n pixels), best of ``repeats``.

    On a CPU this runs in oneDNN, the library the members' convolutions run in; ``torch.matmul``
    may use another BLAS. The peak efficiency is measured against is the faster of the two.
    """
    side = max(1, round(n**0.5))
    x = torch.randn(1, n, side, side, device=device).to(dtype)
    w = torch.randn(n, n, 1, 1, device=device).to(dtype)
    with torch.inference_mode():
        seconds = best_seconds(lambda: torch.nn.functional.conv2d(x, w), device, repeats)
    return 2 * n * n * side * side / seconds


# -- memory ----------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with suppress(OSError):  # Linux: "5" resets the RSS high-water mark (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- timing ----------------------------------------------------------------------------------


def prepared_models(
    members: Sequence[Member], variant: Variant, device: torch.device
) -> list[Callable[[torch.Tensor], Any]]:
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    models: list[Callable[[torch.Tensor], Any]] = []
    for member in members:
        model = member.build().to(device=device, memory_format=layout).eval()
        if variant.compile_mode:
            models.append(torch.compile(model, mode=variant.compile_mode))
        else:
            models.append(model)
    return models


def autocast(variant: Variant, device: torch.device) -> Any:
    if variant.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[variant.precision])


def time_variant(
    members: Sequence[Member], variant: Variant, device: torch.device, batch: int, runs: int
) -> tuple[float, float]:
    """Median seconds of one pass of every member over ``batch`` images, and peak MiB."""
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    reset_peak_memory(device)
    models = prepared_models(members, variant, device)
    inputs = [
        torch.randn(batch, m.in_chans, m.size, m.size, device=device).contiguous(
            memory_format=layout
        )
        for m in members
    ]

    def one_pass() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(variant, device):
            for model, x in zip(models, inputs, strict=True):
                out = model(x)
                torch.sigmoid(out.score_logit.float())
                if out.map_logit is not None:
                    torch.sigmoid(out.map_logit.float())
        synchronize(device)
        return time.perf_counter() - t0

    for _ in range(3 if variant.compile_mode else 1):  # warm-up (compile: autotune, graphs)
        one_pass()
    seconds = median([one_pass() for _ in range(runs)])
    return seconds, peak_memory_mib(device)


def result_row(
    name: str,
    variant: Variant,
    batch: int,
    seconds: float,
    memory: float,
    flops: int,
    peaks: dict[str, float],
    threads: int | str,
) -> list[object]:
    achieved = flops * batch / seconds
    peak = peaks[variant.precision]
    return [
        name,
        variant.label,
        threads,
        batch,
        f"{seconds / batch * 1000:.0f}",
        f"{batch / seconds:.2f}",
        f"{achieved / 1e9:.0f}",
        f"{peak / 1e9:.0f}",
        f"{achieved / peak:.2f}",
        f"{memory:.0f}",
    ]


HEADER = [
    "ensemble",
    "variant",
    "threads",
    "batch",
    "ms / radiograph",
    "radiographs / s",
    "achieved GFLOP/s",
    "peak GFLOP/s",
    "efficiency",
    "peak MiB",
]


#: CPU variants: all four for the shipped ensemble; the reference and the fast one for paper.
ALL_CPU_VARIANTS = [
    Variant("fp32", False),
    Variant("fp32", True),
    Variant("bf16", False),
    Variant("bf16", True),
]
FEW_CPU_VARIANTS = [Variant("fp32", False), Variant("bf16", True)]


def show(args: argparse.Namespace, row: list[object]) -> None:
    if args.verbose:
        print_table(HEADER, [row])


def bench_cpu(
    name: str,
    members: Sequence[Member],
    flops: int,
    peaks: dict[str, float],
    args: argparse.Namespace,
    plan: tuple[Sequence[Variant], Sequence[int], Sequence[int]],
) -> list[list[object]]:
    """``plan``: the variants, the batch sizes, and the other thread counts to try with the
    variant fastest at batch 1."""
    device = torch.device("cpu")
    variants, batches, thread_counts = plan
    rows = []
    best: tuple[float, Variant] | None = None
    threads = torch.get_num_threads()
    for variant in variants:
        for batch in batches:
            seconds, memory = time_variant(members, variant, device, batch, args.runs)
            rows.append(result_row(name, variant, batch, seconds, memory, flops, peaks, threads))
            show(args, rows[-1])
            if batch == 1 and (best is None or seconds < best[0]):
                best = (seconds, variant)
    if best is None:
        return rows
    if args.cpu_compile:
        rows += compiled_rows(name, members, flops, peaks, args, best[1])
    for count in thread_counts:
        if count == threads:
            continue
        torch.set_num_threads(count)
        seconds, memory = time_variant(members, best[1], device, 1, args.runs)
        rows.append(result_row(name, best[1], 1, seconds, memory, flops, peaks, count))
    torch.set_num_threads(threads)
    return rows


def compiled_rows(
    name: str,
    members: Sequence[Member],
    flops: int,
    peaks: dict[str, float],
    args: argparse.Namespace,
    fastest: Variant,
) -> list[list[object]]:
    """``torch.compile`` (inductor, default mode) of the fastest CPU variant, at batch 1 and 3;
    prints how long the warm-up (the compilation) took before the first timed pass."""
    device, threads = torch.device("cpu"), torch.get_num_threads()
    compiled = Variant(fastest.precision, fastest.channels_last, "default")
    rows = []
    for batch in (1, 3):
        t0 = time.perf_counter()
        seconds, memory = time_variant(members, compiled, device, batch, args.runs)
        warm_up = time.perf_counter() - t0 - seconds * args.runs
        print(f"# torch.compile on the CPU, batch {batch}: {warm_up:.0f} s of compilation and "
              "warm-up before the first timed pass (again for every new batch size)")
        rows.append(result_row(name, compiled, batch, seconds, memory, flops, peaks, threads))
        show(args, rows[-1])
    return rows


def bench_cuda(
    name: str,
    members: Sequence[Member],
    flops: int,
    peaks: dict[str, float],
    args: argparse.Namespace,
) -> list[list[object]]:
    """Batch 1 and a batch sweep per precision; compile modes for the best precision."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    best: tuple[float, Variant, int] | None = None  # (radiographs/s, variant, batch)
    variants = [Variant("fp32", False), Variant("bf16", True), Variant("fp16", True)]
    for variant in variants:
        for batch in [1, *args.gpu_batches]:
            try:
                seconds, memory = time_variant(members, variant, device, batch, args.runs)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            rows.append(result_row(name, variant, batch, seconds, memory, flops, peaks, "-"))
            show(args, rows[-1])
            if variant.precision != "fp32" and (best is None or batch / seconds > best[0]):
                best = (batch / seconds, variant, batch)
    if best is None or args.no_compile:
        return rows
    for mode in ("max-autotune-no-cudagraphs", "reduce-overhead"):
        compiled = Variant(best[1].precision, best[1].channels_last, mode)
        for batch in sorted({1, best[2]}):
            try:
                seconds, memory = time_variant(members, compiled, device, batch, args.runs)
            except Exception as exc:  # a compiler failure is a result to report, not a crash
                print(f"# torch.compile {mode} batch {batch} failed: {type(exc).__name__}: {exc}")
                break
            rows.append(result_row(name, compiled, batch, seconds, memory, flops, peaks, "-"))
    return rows


# -- agreement with fp32 through the real Ensemble ---------------------------------------------


def validation_images(data: Path, weights: Path, count: int) -> list[tuple[Path, bool]]:
    """The first ``count`` images of the shipped split's validation subset, with their labels."""
    names = json.loads((weights / "split.json").read_text())["validation"][:count]
    with (data / "labels.csv").open(newline="") as handle:
        labels = {row["image"]: row["fractured"] == "1" for row in csv.DictReader(handle)}
    return [(data / "images" / name, labels[name]) for name in names]


def agreement(args: argparse.Namespace, settings: Sequence[SpeedSettings]) -> None:
    from sklearn.metrics import roc_auc_score

    images = validation_images(args.data, args.weights, args.agreement_images)
    if not images:
        return
    pixels = [read_grayscale(path) for path, _ in images]
    labels = np.array([label for _, label in images])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = [("fp32", Ensemble.load(args.weights, device, precision="fp32", channels_last=False))]
    runs += [
        (s.describe(), Ensemble.load(args.weights, device, s.precision, s.channels_last))
        for s in settings
    ]
    scores: dict[str, list[float]] = {"fp32": []}
    decisions: dict[str, list[str]] = {"fp32": []}
    seconds: dict[str, list[float]] = {"fp32": []}
    for image in pixels:
        for label, ensemble in runs:
            results, timings = ensemble.analyse([image], [None])
            scores.setdefault(label, []).append(results[0].score)
            decisions.setdefault(label, []).append(str(results[0].decision))
            total = timings.preprocess + timings.inference + timings.postprocess
            seconds.setdefault(label, []).append(total)
    ref_scores = np.array(scores["fp32"])
    both = bool(labels.any() and (~labels).any())
    rows = []
    for label, _ in runs:
        diff = np.abs(np.array(scores[label]) - ref_scores)
        flips = sum(a != b for a, b in zip(decisions[label], decisions["fp32"], strict=True))
        auc = f"{roc_auc_score(labels, scores[label]):.4f}" if both else "-"
        rows.append([
            label,
            len(pixels),
            f"{diff.max():.5f}",
            f"{diff.mean():.5f}",
            flips,
            auc,
            f"{median(seconds[label]) * 1000:.0f}",
        ])
    print(f"## Agreement with fp32 through Ensemble.analyse on {device} ({len(pixels)} FracAtlas "
          f"validation images, {int(labels.sum())} fractured; decisions at the global operating "
          "point)")
    print_table(
        ["settings", "images", "max abs diff to fp32", "mean abs diff to fp32",
         "decisions changed", "AUC", "analyse ms / radiograph (median)"],
        rows,
    )


# -- main ------------------------------------------------------------------------------------


def thread_list(text: str) -> list[int]:
    return sorted({int(t) for t in text.split(",") if t.strip()})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensemble", choices=("shipped", "paper", "both"), default="both")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument("--threads", type=thread_list, default=[1, cores],
                        help=f"thread counts for the fastest variant (default 1,{cores})")
    parser.add_argument("--paper-size", type=int, default=None,
                        help="input size of the paper members (default: theirs, 1024 px)")
    parser.add_argument("--paper-runs", type=int, default=2, help="timed runs of paper on a CPU")
    parser.add_argument("--gpu-batches", type=thread_list, default=[2, 4, 8, 16, 32])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="also time torch.compile (inductor) of the fastest CPU variant")
    parser.add_argument("--no-cpu-paper", action="store_true",
                        help="do not time the paper ensemble on the CPU (minutes per pass)")
    parser.add_argument("--no-cpu", action="store_true", help="time on CUDA only")
    parser.add_argument("--agreement-only", action="store_true",
                        help="only the agreement check (no peak, FLOPs or timing)")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul side (CPU 4096)")
    parser.add_argument("--agreement-images", type=int, default=50,
                        help="validation images for the fp32 agreement check (0: skip)")
    parser.add_argument("--weights", type=Path, default=REPO / "ensemble_weights")
    parser.add_argument("--paper-config", type=Path, default=REPO / "configs" / "paper.toml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets"
                        / "fracatlas")
    parser.add_argument("--quick", action="store_true",
                        help="validation: 2 runs, paper at 256 px, 5 agreement images")
    parser.add_argument("--verbose", action="store_true", help="print each row as measured")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = min(args.runs, 2)
        args.paper_runs = 1
        args.paper_size = args.paper_size or 256
        args.agreement_images = min(args.agreement_images, 5)
        args.threads = [t for t in args.threads if t == cores]
        args.gpu_batches = [4]
    return args


def peak_rates(device: torch.device, args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(dtype, kernel, FLOP/s) of matmul and of the same GEMM as a 1x1 convolution."""
    n = args.peak_size or (8192 if device.type == "cuda" else (2048 if args.quick else 4096))
    dtypes = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    rates = []
    for name in dtypes:
        rates.append((name, "matmul", peak_matmul(DTYPES[name], device, n, 10)))
        rates.append((name, "1x1 conv", peak_gemm_as_conv(DTYPES[name], device, n, 10)))
    return rates


def best_peaks(rates: Sequence[tuple[str, str, float]]) -> dict[str, float]:
    """Per dtype, the fastest kernel's rate: the peak efficiency is measured against."""
    peaks: dict[str, float] = {}
    for dtype, _kernel, rate in rates:
        peaks[dtype] = max(peaks.get(dtype, 0.0), rate)
    return peaks


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cpu = torch.device("cpu")
    facts = machine_facts({
        "auto_picks_bf16_on_cpu": fast_bf16(cpu),
        "runs": args.runs,
        "mode": "quick" if args.quick else "full",
    })
    print_facts("benchmarks/inference_speed.py " + " ".join(sys.argv[1:]), facts)
    if args.agreement_only:
        agreement(args, [SpeedSettings("fp32", True), SpeedSettings("bf16", True)])
        return 0
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cpu_rates = peak_rates(cpu, args)
    gpu_rates = peak_rates(torch.device("cuda"), args) if use_cuda else []
    cpu_peaks, gpu_peaks = best_peaks(cpu_rates), best_peaks(gpu_rates)
    print("## Peak matrix-multiply rate (best of 10; peak = the faster kernel per dtype)")
    print_table(["device", "dtype", "kernel", "GFLOP/s"],
                [["cpu", d, k, f"{v / 1e9:.0f}"] for d, k, v in cpu_rates]
                + [["cuda", d, k, f"{v / 1e9:.0f}"] for d, k, v in gpu_rates])

    ensembles: list[tuple[str, list[Member], list[Member], int]] = []
    if args.ensemble in ("shipped", "both"):
        ensembles.append(("shipped", shipped_flop_members(args.weights),
                          shipped_members(args.weights, cpu), args.runs))
    if args.ensemble in ("paper", "both"):
        paper = paper_members(args.paper_config, args.paper_size)
        ensembles.append(("paper", paper, paper, min(args.runs, args.paper_runs)))

    flops_rows, rows, gpu_rows = [], [], []
    for name, flop_members, members, runs in ensembles:
        flops = flops_per_image(flop_members)
        sizes = sorted({m.size for m in members})
        flops_rows.append([name, len(members), "/".join(map(str, sizes)), f"{flops / 1e9:.1f}"])
        cpu_args = argparse.Namespace(**{**vars(args), "runs": runs})
        if name == "shipped" and not args.no_cpu:
            plan = (ALL_CPU_VARIANTS, [1, 3], args.threads)
            rows += bench_cpu(name, members, flops, cpu_peaks, cpu_args, plan)
        elif name == "paper" and not (args.no_cpu or args.no_cpu_paper):
            plan = (FEW_CPU_VARIANTS, [1], [])
            rows += bench_cpu(name, members, flops, cpu_peaks, cpu_args, plan)
        if use_cuda:
            gpu_members = members
            if name == "shipped":  # move copies of the real weights, keep the CPU ones
                gpu_members = shipped_members(args.weights, torch.device("cuda"))
            gpu_rows += bench_cuda(name, gpu_members, flops, gpu_peaks, args)
    print("## FLOPs of one radiograph (all members, FlopCounterMode)")
    print_table(["ensemble", "members", "input px", "GFLOP / radiograph"], flops_rows)
    if rows:
        print("## CPU: all members, model time only (inputs already pre-processed); median of "
              "runs")
        print_table(HEADER, rows)
    if gpu_rows:
        print(f"## CUDA ({torch.cuda.get_device_name(0)}): model time only; median of runs")
        print_table(HEADER, gpu_rows)
    if args.agreement_images > 0 and args.ensemble != "paper":
        settings = [SpeedSettings("fp32", True), SpeedSettings("bf16", True)]
        agreement(args, settings)
    print(f"# finished; 1-minute load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
