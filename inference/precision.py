"""Inference speed settings: numeric precision and memory layout, chosen per machine.

``precision``:

- ``fp32``: full precision, the reference answers (the default of :meth:`Ensemble.load`);
- ``bf16``: bfloat16 autocast (convolutions and matrix products in bf16, reductions and the
  sigmoid in fp32); scores stay within :data:`BF16_SCORE_TOLERANCE` of fp32 (measured on real
  FracAtlas radiographs with the shipped weights, see ``benchmarks/inference_speed.py``);
- ``auto``: bf16 where the hardware multiplies bf16 natively (a CUDA device with bf16 support, a
  CPU with AMX or AVX-512 BF16), else fp32. On the 2-core AVX-512 BF16 EPYC of this project,
  measured on a quiet machine, bf16 + channels-last ran the shipped ensemble 1.8-1.9x faster than
  fp32 (288-312 against 532-593 ms per radiograph), and on the whole validation split (322
  images) kept the AUC within 0.0002 of fp32 with no decision changed and scores within 0.0037
  (``benchmarks/results/inference-cpu-quiet-2026-11-27.md``). Other CPUs stay in fp32 (bf16
  there is emulated and slow); ``precision = "fp32"`` forces the reference answers anywhere.

``channels_last`` (NHWC memory layout): ``None`` means automatic, which is on with bf16 (oneDNN's
bf16 convolutions on the CPU are fast only in NHWC: NCHW bf16 was 1.5-1.7x *slower* than fp32 on
the AVX-512 BF16 EPYC) and off in fp32 (no consistent gain, and the plain layout keeps fp32 scores
bit-identical to earlier releases).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: Largest absolute difference between a bf16 and the fp32 ensemble score of one image that the
#: tests accept (scores are probabilities in [0, 1]). Measured: see docs/performance.md.
BF16_SCORE_TOLERANCE = 0.02


def cpu_flags() -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: CPU flags of native bf16 matrix instructions.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_has_native_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AMX or AVX-512 BF16)."""
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def fast_bf16(device: torch.device) -> bool:
    """Whether ``auto`` picks bf16 on ``device``: CUDA with bf16 support, or a CPU with native
    bf16 instructions."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


@dataclass(frozen=True)
class SpeedSettings:
    """How the ensemble runs: resolved precision and memory layout (never ``auto``)."""

    precision: Precision = "fp32"
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
        """A factory of the autocast context for ``device`` (a no-op in fp32)."""
        if self.precision == "fp32":
            return nullcontext
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)

    def apply_layout(self, model: ModuleT) -> ModuleT:
        """``model`` with its parameters in this memory layout (in place, returned)."""
        return model.to(memory_format=self.memory_format)  # type: ignore[call-overload]

    def describe(self) -> str:
        return f"{self.precision}{', channels_last' if self.channels_last else ''}"


#: The reference settings: full precision, plain layout.
FP32 = SpeedSettings()


def resolve_speed(
    precision: str, channels_last: bool | None, device: torch.device
) -> SpeedSettings:
    """The settings for ``device`` from the requested ones (``auto`` / ``None`` decided here)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        resolved: Precision = "bf16" if fast_bf16(device) else "fp32"
    else:
        resolved = "bf16" if precision == "bf16" else "fp32"
    layout = resolved == "bf16" if channels_last is None else channels_last
    return SpeedSettings(precision=resolved, channels_last=layout)
