"""How many views of a study go through the ensemble at once: memory bounded by configuration.

:meth:`inference.ensemble.Ensemble.analyse` cuts a study's views into chunks of at most
``max_batch`` images and pre-processes, runs and post-processes one chunk after the other, so its
memory grows with ``max_batch``, never with the number of views. The results do not depend on the
chunking (members run in eval mode, pre-processing and map averaging are per image).

``max_batch = "auto"`` (``None`` here) sizes the chunk for each call from the memory the device
has free at that moment (:func:`available_bytes`) and an estimate of what one image costs
(:func:`image_bytes`):

    max_batch = clamp(floor(SAFETY * available / image_bytes), 1, AUTO_CAP[device type])

- ``available``: on CUDA the free device memory (``torch.cuda.mem_get_info``) plus what PyTorch's
  caching allocator holds but does not use; on the CPU ``MemAvailable`` of ``/proc/meminfo``
  (``os.sysconf`` where there is none), or less where the process's cgroup (a systemd
  ``MemoryMax=``, a container limit) leaves less room: limit minus the cgroup's usage, without its
  reclaimable page cache (``inactive_file``).
- ``image_bytes``: what one more image adds to the peak, for the largest member (members run one
  after the other) plus what stays alive per image during the call. The largest member's share is
  ``ACTIVATION_FACTOR`` times its largest single activation tensor for one image, in fp32 (found
  by running the member once on a 64 px probe image and scaling by the area), doubled with the
  ``hflip`` test-time augmentation. ``ACTIVATION_FACTOR`` was measured (``python
  benchmarks/memory.py --members``, ``docs/memory.md``): the resident-memory high-water mark per
  extra image of every shipped and ``paper`` member, in fp32 and bf16, divided by that largest
  activation, rounded up with margin.
- ``SAFETY``: only half of what is free is planned for: the estimate is of one process, while the
  listener's receivers, the sender and the page cache compete for the same memory.
- ``AUTO_CAP``: beyond a few images a larger batch no longer runs faster, on a CPU nor on a GPU
  (measured on an H200: the worker's analysis of 60 views took as long in chunks of 4 as in
  chunks of 32 or in one batch, its pre- and post-processing running on the CPU; see
  ``docs/memory.md``), while its memory keeps growing, so ``auto`` takes at most ``AUTO_CAP``
  views even on a machine with plenty free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

FP32_BYTES = 4

#: Peak resident bytes one more image adds while a member runs, in units of the member's largest
#: activation tensor for one image in fp32. Measured 2.1-8.3 (docs/memory.md); 10 leaves margin.
ACTIVATION_FACTOR = 10.0

#: Share of the available memory that ``auto`` plans to use.
SAFETY = 0.5

#: Largest chunk ``auto`` picks, per device type.
AUTO_CAP: dict[str, int] = {"cpu": 8, "cuda": 8}

#: Input size (px) of the probe pass that finds a member's largest activation.
PROBE = 64

#: Largest ``max_batch`` accepted from configuration.
MAX_BATCH_LIMIT = 1024


def check_max_batch(value: object) -> int | None:
    """``value`` if it is a valid setting: None (auto) or an integer in 1..MAX_BATCH_LIMIT."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_LIMIT:
        raise ValueError(
            f"max_batch must be None (auto) or an integer in 1..{MAX_BATCH_LIMIT}, got {value!r}"
        )
    return value


def chunk_bounds(count: int, max_batch: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks covering ``count`` items, each at most
    ``max_batch`` long and of sizes differing by at most one (33 views at 32: 17 + 16)."""
    if count < 0 or max_batch < 1:
        raise ValueError(f"need count >= 0 and max_batch >= 1, got {count}, {max_batch}")
    if count == 0:
        return []
    chunks = math.ceil(count / max_batch)
    base, extra = divmod(count, chunks)
    bounds, start = [], 0
    for index in range(chunks):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def auto_max_batch(available: int, image_bytes: int, cap: int, safety: float = SAFETY) -> int:
    """The chunk size ``auto`` uses: as many images as ``safety`` x ``available`` bytes hold at
    ``image_bytes`` each, at least 1 (one image must always go through), at most ``cap``."""
    if image_bytes <= 0 or cap < 1 or not 0 < safety <= 1:
        raise ValueError(f"need image_bytes > 0, cap >= 1, 0 < safety <= 1; got "
                         f"{image_bytes}, {cap}, {safety}")
    fits = int(max(available, 0) * safety) // image_bytes
    return max(1, min(cap, fits))


# -- the estimate per image --------------------------------------------------------------------


def largest_activation(model: nn.Module, in_chans: int, size: int, probe: int = PROBE) -> int:
    """Elements of the largest tensor any layer of ``model`` outputs for one ``in_chans x size x
    size`` image. Measured on a ``probe`` px image (a few milliseconds) and scaled by the area:
    every layer of a fully convolutional network is a fixed number of channels times a fixed
    fraction of the input area (exact for sizes that are multiples of the output stride)."""
    side = min(size, probe)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    largest = in_chans * side * side

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, in_chans, side, side, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return math.ceil(largest * (size / side) ** 2)


def member_image_bytes(activation: int, flip: bool, factor: float = ACTIVATION_FACTOR) -> int:
    """Peak bytes one image adds while a member runs (its mirror too with ``hflip``)."""
    return math.ceil(factor * activation * FP32_BYTES * (2 if flip else 1))


def retained_image_bytes(sizes: dict[int, bool], map_size: int, maps: bool) -> int:
    """Bytes kept per image for the whole chunk: the pre-processed raw (and LCN) planes at each
    input size (``sizes``: size -> needs LCN), the member input built from them, and the map
    sum plus one resized member map at ``map_size``."""
    planes = sum(size * size * (2 if lcn else 1) for size, lcn in sizes.items())
    member_input = max(size * size * (2 if lcn else 1) for size, lcn in sizes.items())
    map_planes = 2 * map_size * map_size if maps else 0
    return (planes + member_input + map_planes) * FP32_BYTES


def image_bytes(member_bytes: Sequence[int], retained: int) -> int:
    """The estimate ``auto`` divides by: the largest member's share plus what each image keeps."""
    return max(member_bytes) + retained


# -- what the device has free ------------------------------------------------------------------


def meminfo_available(text: str) -> int | None:
    """``MemAvailable`` of a ``/proc/meminfo`` text, in bytes (None when absent)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            return int(fields[1]) * 1024 if len(fields) >= 2 and fields[1].isdigit() else None
    return None


def _stat_value(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def cgroup_room(limit: str, usage: str, stat: str, *, v1: bool) -> int | None:
    """Room left under one cgroup's memory limit (None: no limit): the limit minus the usage
    without reclaimable page cache. ``limit``/``usage``/``stat`` are the texts of
    ``memory.max``/``memory.current``/``memory.stat`` (cgroup v2) or ``memory.limit_in_bytes``/
    ``memory.usage_in_bytes``/``memory.stat`` (v1, where "no limit" is a number near 2^63)."""
    limit = limit.strip()
    if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
        return None
    used = int(usage.strip()) if usage.strip().isdigit() else 0
    cache = _stat_value(stat, "total_inactive_file" if v1 else "inactive_file")
    return max(0, int(limit) - max(0, used - cache))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup_dirs(proc_cgroup: str, root: Path) -> list[tuple[Path, bool]]:
    """The memory cgroup folders whose limits apply to this process, with ``True`` for v1: its
    cgroup v2 folder and every ancestor (a slice's limit applies to its services), or the v1
    memory controller's folder."""
    dirs: list[tuple[Path, bool]] = []
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if number == "0" and controllers == "":
            unified = root if (root / "cgroup.controllers").exists() else root / "unified"
            folder = unified / relative.lstrip("/")
            while True:
                dirs.append((folder, False))
                if folder == unified or unified not in folder.parents:
                    break
                folder = folder.parent
        elif "memory" in controllers.split(","):
            dirs.append((root / "memory" / relative.lstrip("/"), True))
            dirs.append((root / "memory", True))  # in a container, the mount is its own cgroup
    return dirs


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The least room left under any memory limit of this process's cgroups (None: no limit)."""
    rooms = []
    for folder, v1 in cgroup_dirs(_read(Path("/proc/self/cgroup")), root):
        names = (
            ("memory.limit_in_bytes", "memory.usage_in_bytes")
            if v1
            else ("memory.max", "memory.current")
        )
        room = cgroup_room(
            _read(folder / names[0]), _read(folder / names[1]), _read(folder / "memory.stat"), v1=v1
        )
        if room is not None:
            rooms.append(room)
    return min(rooms) if rooms else None


def cpu_available_bytes() -> int:
    """Memory this process can still take on the CPU: MemAvailable, or less under a cgroup."""
    available = meminfo_available(_read(Path("/proc/meminfo")))
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = cgroup_headroom()
    return available if room is None else min(available, room)


def cuda_available_bytes(device: torch.device) -> int:
    """Free memory of the CUDA device plus what PyTorch's caching allocator holds unused."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def available_bytes(device: torch.device) -> int:
    """What ``auto`` may plan with on ``device`` (before the safety factor)."""
    if device.type == "cuda":
        return cuda_available_bytes(device)
    return cpu_available_bytes()
