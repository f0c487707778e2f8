"""Shared helpers of the benchmark scripts: the machine facts every table is printed with, robust
statistics and a plain markdown table printer. Import as ``from machine import ...`` (the scripts
run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The bf16 / AMX / AVX-512 flags of the CPU that matter for inference speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx2")
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return [f for f in wanted if f in flags]


def machine_facts(extra: dict[str, object] | None = None) -> dict[str, object]:
    """What a reader needs to judge a figure: CPU, cores, torch, threads, date and load."""
    facts: dict[str, object] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()) or "-",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    facts.update(extra or {})
    return facts


def print_facts(title: str, facts: dict[str, object]) -> None:
    print(f"# {title}")
    for key, value in facts.items():
        print(f"#   {key}: {value}")
    if float(str(facts.get("load_avg_1min", 0))) > 0.5 * float(str(facts.get("cores", 1))):
        print("#   NOTE: the machine was busy (load average above half the cores): contended")
    print(flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (nearest rank, so never beyond the largest value)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(0.95 * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table (pasteable into docs/ and benchmarks/results/)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print(flush=True)
