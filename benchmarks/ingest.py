"""Ingest throughput: DCMTK storescu sends real-size radiographs to DCMTK storescp (syncing each
file) and to ``dicomnode listen`` (temporary file, fsync, rename, directory fsync, SQLite row),
side by side in one invocation.

    python benchmarks/ingest.py                         # 100 instances, 1/4/16 senders, 3 runs
    python benchmarks/ingest.py --quick                 # 12 instances, 1/4 senders, 1 run
    python benchmarks/ingest.py --profile               # also: where the node's time goes (py-spy)
    python benchmarks/ingest.py --idle                  # also: the node's CPU, associations idle

Instances: DX, 2560 x 2048, 16 bit, Explicit VR Little Endian, about 10 MB each (wrapped with
``dicomnode.demo.dx_from_image`` and widened to 16 bit), written once into a temporary folder on
the same file system as the receivers' output (``--workdir``; it must not be a tmpfs, where fsync
costs nothing). Each run starts a fresh receiver with an empty output folder, sends all instances
with ``--senders`` concurrent ``storescu`` processes (each one association with its share of the
files) and times from the first start to the last exit; every instance must be acknowledged
and on disk. Targets alternate within a run, so all see the same machine load; the table gives
the median of ``--runs`` and the ratio node / storescp.

What is compared, with the same settings on both sides (printed with the figures):

* **Environment**: every process, senders and receivers alike, runs with ``TCP_NODELAY=1`` (DCMTK
  turns Nagle's algorithm off only where that variable is set; the node turns it off on every
  accepted socket). Before 2026-12-04 only the senders had it: storescp's replies then waited
  for delayed acknowledgements, which capped it near 190 MB/s and flattered the node.
* **PDU**: both receivers offer 131072 bytes, storescp's largest receive PDU (the node's
  ``node.max_pdu`` is set to it here; its default is 4 MiB).
* **Durability**: storescp 3.6.7 has no option to sync what it writes, so it runs as
  ``storescp --fork +B -pdu 131072 -xcr "/usr/bin/sync #p/#f #p" -xs``: bit-preserving write,
  then synchronously (before the C-STORE response) ``sync FILE DIR``, which fsyncs the file and
  its directory: the same guarantee the node gives (plus the node's SQLite commit). ``--fork``
  gives each association its own process, as the node gives each its own thread.
* **Ceiling**: ``storescp --fork --ignore -pdu 131072`` receives every instance and writes
  nothing: the loopback network and DIMSE cost alone, an upper bound neither receiver can pass
  (a receiver above it would mean a measuring error).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from machine import machine_facts, median, print_facts, print_table

from dicomnode.demo import (
    LOOPBACK,
    STORESCP,
    STORESCU,
    Patient,
    dx_from_image,
    free_port,
    stop_process,
    wait_until_bound,
)

NODE_AE, SCP_AE, MODALITY_AE = "FRACTURE_AI", "STORESCP", "MODALITY"
SYNC = "/usr/bin/sync"
PDU = 131072  # storescp's largest receive PDU; the node offers the same here
#: The one environment of every process of a measurement (senders and receivers)
ENVIRONMENT = {**os.environ, "TCP_NODELAY": "1"}
TARGETS = ("ceiling", "storescp", "node")


@dataclass(frozen=True)
class Measurement:
    target: str
    senders: int
    seconds: float
    instances: int
    megabytes: float
    cpu_seconds: float  # of the receiver's processes while the senders ran


@dataclass(frozen=True)
class Receiver:
    port: int
    ae_title: str
    out: Path
    pid: int  # the receiver's first process (its children and theirs count too)


# -- instances -------------------------------------------------------------------------------


def radiograph16(rows: int, cols: int, seed: int) -> np.ndarray:
    """A 12-bit-range radiograph-like uint16 image (smooth gradient, disc, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    disc = ((x - cols / 2) ** 2 + (y - rows / 2) ** 2) < (min(rows, cols) / 3) ** 2
    image = 600 + 1500 * y / rows + 1200 * disc + rng.normal(0, 40, (rows, cols))
    return np.clip(image, 0, 4095).astype(np.uint16)


def make_instances(folder: Path, count: int, rows: int, cols: int) -> list[Path]:
    """``count`` DX instances of one study (16 bit, ``rows`` x ``cols``), as files."""
    folder.mkdir(parents=True, exist_ok=True)
    base = radiograph16(rows, cols, seed=0)
    template = dx_from_image(np.zeros((8, 8), np.uint8), body_part="HAND", patient=Patient())
    paths = []
    for index in range(count):
        ds = dx_from_image(np.zeros((8, 8), np.uint8), body_part="HAND", patient=Patient(),
                           study_uid=str(template.StudyInstanceUID),
                           series_uid=str(template.SeriesInstanceUID), instance_number=index + 1)
        pixels = np.roll(base, index * 7, axis=1)  # distinct content per instance
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.LossyImageCompression = "00"
        del ds.LossyImageCompressionMethod
        ds.PixelData = pixels.tobytes()
        path = folder / f"dx{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- receivers -------------------------------------------------------------------------------


def storescp_command(out: Path, port: int, *, ignore: bool = False) -> list[str]:
    """storescp syncing each file and its folder before answering, or (``ignore``) receiving
    and discarding every instance: the ceiling."""
    common = [str(STORESCP), "--fork", "-aet", SCP_AE, "-pdu", str(PDU)]
    if ignore:
        return [*common, "--ignore", str(port)]
    return [*common, "+B", "-od", str(out), "-xcr", f"{SYNC} #p/#f #p", "-xs", str(port)]


@contextmanager
def storescp(workdir: Path, *, ignore: bool = False) -> Iterator[Receiver]:
    """DCMTK storescp (see :func:`storescp_command`) in the measurement's environment."""
    out = workdir / "storescp-out"
    out.mkdir(parents=True)
    port = free_port()
    cmd = storescp_command(out, port, ignore=ignore)
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ENVIRONMENT)
    try:
        wait_until_bound(port, process, time.monotonic() + 15)
        yield Receiver(port, SCP_AE, out, process.pid)
    finally:
        stop_process(process)


def node_env() -> dict[str, str]:
    """The node's environment: the senders' and receivers' (``TCP_NODELAY=1``), unbuffered."""
    return {**ENVIRONMENT, "PYTHONUNBUFFERED": "1"}


def node_config(state_dir: Path, port: int, receive_processes: int | None) -> str:
    """``receive_processes``: None keeps the node's default (``auto``)."""
    processes = "" if receive_processes is None else f"receive_processes = {receive_processes}\n"
    return (
        f'[node]\nae_title = "{NODE_AE}"\nbind = "{LOOPBACK}"\nport = {port}\n'
        f'state_dir = "{state_dir}"\nmax_associations = 32\nmax_pdu = {PDU}\n{processes}\n'
        "[study]\nstable_seconds = 3600\n"  # no study is queued during the measurement
    )


def listener_command(config: Path, profile_out: Path | None, py_spy: str | None) -> list[str]:
    node = [sys.executable, "-m", "dicomnode", "listen", "--config", str(config)]
    if profile_out is None or py_spy is None:
        return node
    return [py_spy, "record", "--format", "raw", "--rate", "200", "--nonblocking", "--function",
            "--subprocesses",
            "-o", str(profile_out), "--", *node]


def has_event(log: Path, event: str) -> bool:
    return f'"event": "{event}"' in log.read_text(errors="replace")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` now (started by any of its threads)."""
    found: list[int] = []
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError):
                found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now."""
    return [pid, *(member for child in children(pid) for member in process_tree(child))]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``'s process tree so far, including descendants that
    ended and were waited for (their time is in their parent's cutime / cstime)."""
    ticks = 0
    for member in process_tree(pid):
        with suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def node_listener(
    workdir: Path,
    receive_processes: int | None = None,
    profile_out: Path | None = None,
    py_spy: str | None = None,
) -> Iterator[Receiver]:
    """``python -m dicomnode listen`` with a fresh state folder (``Receiver.out``)."""
    state = workdir / "node-state"
    port = free_port()
    config = workdir / "node.toml"
    config.write_text(node_config(state, port, receive_processes))
    log = workdir / "node.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            listener_command(config, profile_out, py_spy), stdout=handle,
            stderr=subprocess.STDOUT, env=node_env(),
        )
    try:
        deadline = time.monotonic() + 60
        while not has_event(log, "service_ready"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the listener did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Receiver(port, NODE_AE, state, process.pid)
    finally:
        # under py-spy the node is py-spy's child; otherwise its children are receivers
        under_py_spy = children(process.pid) if profile_out is not None else []
        for child in under_py_spy:  # stop the node; py-spy then writes its profile and exits
            os.kill(child, signal.SIGTERM)
        if under_py_spy:
            with suppress(subprocess.TimeoutExpired):
                process.wait(60)
        stop_process(process, grace=60)


# -- sending ---------------------------------------------------------------------------------


def send(port: int, ae: str, files: Sequence[Path], senders: int) -> float:
    """Seconds for ``senders`` concurrent storescu processes to send ``files`` (round-robin)."""
    shares = [list(files[i::senders]) for i in range(senders)]
    env = ENVIRONMENT
    t0 = time.perf_counter()
    processes = [
        subprocess.Popen(
            [str(STORESCU), "-aec", ae, "-aet", MODALITY_AE, LOOPBACK, str(port),
             *map(str, share)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )
        for share in shares if share
    ]
    outputs = [p.communicate(timeout=3600)[0] for p in processes]
    seconds = time.perf_counter() - t0
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed ({process.returncode}): {output.decode()[-800:]}")
    return seconds


def measure(
    target: str,
    workdir: Path,
    files: Sequence[Path],
    senders: int,
    processes: int | None,
) -> Measurement:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=workdir))
    try:
        receiver = (
            storescp(run_dir, ignore=target == "ceiling") if target != "node"
            else node_listener(run_dir, processes)
        )
        with receiver as running:
            cpu_before = tree_cpu_seconds(running.pid)
            seconds = send(running.port, running.ae_title, files, senders)
            cpu_seconds = tree_cpu_seconds(running.pid) - cpu_before
            stored = len(files) if target == "ceiling" else count_stored(target, running.out)
        if stored != len(files):
            raise RuntimeError(f"{target}: {stored} of {len(files)} instances on disk")
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        return Measurement(target, senders, seconds, len(files), megabytes, cpu_seconds)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def count_stored(target: str, out: Path) -> int:
    if target == "storescp":
        return sum(1 for p in out.iterdir() if p.is_file())
    return sum(1 for p in (out / "instances").rglob("*") if p.is_file())


# -- idle associations -----------------------------------------------------------------------

IDLE_SECONDS = 5.0


def idle_cost(
    workdir: Path, counts: Sequence[int], processes: int | None
) -> list[list[object]]:
    """The node's CPU while ``n`` associations are open and idle, for each ``n`` in ``counts``:
    what pynetdicom's per-association polling costs when nothing arrives. The requestors are
    pynetdicom associations of this process (DCMTK's tools cannot hold one open idle)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    run_dir = Path(tempfile.mkdtemp(prefix="idle-", dir=workdir))
    rows: list[list[object]] = []
    try:
        with node_listener(run_dir, processes) as running:
            ae = AE(ae_title=MODALITY_AE)
            ae.add_requested_context(DigitalXRayImageStorageForPresentation)
            for count in counts:
                assocs = [ae.associate(LOOPBACK, running.port, ae_title=running.ae_title)
                          for _ in range(count)]
                try:
                    if not all(a.is_established for a in assocs):
                        raise RuntimeError(f"the node refused one of {count} associations")
                    time.sleep(1.0)
                    before = tree_cpu_seconds(running.pid)
                    time.sleep(IDLE_SECONDS)
                    used = tree_cpu_seconds(running.pid) - before
                finally:
                    for assoc in assocs:
                        assoc.release()
                rows.append([count, f"{100 * used / IDLE_SECONDS:.0f} %"])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


# -- profile ---------------------------------------------------------------------------------


#: Where a sample of an association thread is counted: the first pattern (leaf to root) that a
#: frame of its stack contains.
CATEGORIES = (
    ("SpoolFile.write", "spool write (datapath.SpoolFile, writev)"),
    ("start_writeback", "spool write-back started (datapath.SpoolFile, sync_file_range)"),
    ("DataPath._receive", "socket receive (datapath.DataPath, readv)"),
    ("DataPath", "PDU parsing and hand-over (datapath.DataPath)"),
    ("Waiter.wait", "waiting loops (reactor: select / event wait)"),
    ("deepcopy", "association set-up (pynetdicom copies of presentation contexts)"),
    ("move_durably", "storage.move_durably: spool file into place (link, fsync)"),
    ("copy_durably", "storage.copy_durably: copy spool -> state (read, SHA-256, write, fsync)"),
    ("fsync", "other fsync (directory)"),
    ("sqlite", "SQLite record"),
    ("state.py", "SQLite record"),
    ("pydicom/", "pydicom (header parse)"),
    ("tempfile", "spool write (pynetdicom's own chunked receive)"),
    ("AssociationSocket.ready", "pynetdicom's loops (association and DUL threads)"),
    ("Association._run_reactor", "pynetdicom's loops (association and DUL threads)"),
    ("DULServiceProvider.run_reactor", "pynetdicom's loops (association and DUL threads)"),
    ("transport.py", "socket receive (pynetdicom transport)"),
    ("pynetdicom/", "DICOM protocol handling (pynetdicom DUL/DIMSE, Python)"),
    ("dicomnode/", "other node code"),
)


def category(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for pattern, name in CATEGORIES:
            if pattern in frame:
                return name
    return "other"


def profile_node(
    workdir: Path, files: Sequence[Path], py_spy: str, senders: int, processes: int | None
) -> None:
    """One extra node run under py-spy: where the association threads spend their samples."""
    run_dir = Path(tempfile.mkdtemp(prefix="profile-", dir=workdir))
    raw = run_dir / "node.pyspy.txt"
    with node_listener(run_dir, processes, raw, py_spy) as running:
        send(running.port, running.ae_title, files, senders)
    shares: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        if not count_text.isdigit() or not any("Thread.run" in f for f in frames):
            continue  # start-up and main threads
        shares[category(frames)] += int(count_text)
        leaf[frames[-1]] += int(count_text)
    total = sum(shares.values()) or 1
    print(f"## Where the node's threads spend their time (py-spy at 200 Hz, all receiving "
          f"processes, {senders} sender(s), {total} samples of busy threads)")
    print_table(["category", "share"], [[c, f"{n / total:.1%}"] for c, n in shares.most_common()])
    print_table(["leaf function", "share"],
                [[f"`{f}`", f"{n / total:.1%}"] for f, n in leaf.most_common(10)])
    shutil.rmtree(run_dir, ignore_errors=True)


# -- main ------------------------------------------------------------------------------------


def counts(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2560)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3, help="runs per target (median)")
    parser.add_argument("--senders", type=counts, default=[1, 4, 16],
                        help="concurrent storescu processes, comma-separated (1,4,16)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where instances and received files go (default: $TMPDIR)")
    parser.add_argument("--receive-processes", type=int, default=None,
                        help="node.receive_processes of the node (default: its auto)")
    parser.add_argument("--idle", action="store_true",
                        help="also measure the node's CPU with as many idle associations as "
                             "--senders says (what waiting costs)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one node run with py-spy (--py-spy)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy executable")
    parser.add_argument("--quick", action="store_true",
                        help="validation: 12 instances, 1 and 4 senders, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances = min(args.instances, 12)
        args.senders = [s for s in args.senders if s <= 4]
        args.runs = 1
    return args


def filesystem(path: Path) -> str:
    """Type and device of the mount holding ``path`` (from /proc/mounts)."""
    best = ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind = line.split()[:3]
        if str(path.resolve()).startswith(mount) and len(mount) >= len(best[2]):
            best = (kind, device, mount)
    return f"{best[0]} ({best[1]} on {best[2]})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=args.workdir))
    try:
        files = make_instances(workdir / "source", args.instances, args.rows, args.cols)
        size = sum(f.stat().st_size for f in files) / 1e6
        facts = machine_facts({
            "instances": f"{len(files)} x {args.rows}x{args.cols} 16 bit, {size:.0f} MB in all",
            "workdir": f"{workdir} on {filesystem(workdir)}",
            "dcmtk": subprocess.run([str(STORESCP), "--version"], capture_output=True,
                                    text=True).stdout.splitlines()[0].strip(),
            "runs": args.runs,
            "environment": "TCP_NODELAY=1 for every sender and receiver",
            "storescp": " ".join(storescp_command(Path("OUT"), 0)[1:-1]) + " PORT",
            "ceiling": " ".join(storescp_command(Path("OUT"), 0, ignore=True)[1:-1]) + " PORT",
            "node": f"dicomnode listen, max_pdu {PDU}, receive_processes "
            f"{args.receive_processes or 'auto'}, TCP_NODELAY on accepted sockets",
            "storescu": f"{STORESCU} -aec AE -aet {MODALITY_AE} HOST PORT FILES...",
        })
        print_facts("benchmarks/ingest.py " + " ".join(sys.argv[1:]), facts)
        results: list[Measurement] = []
        for senders in args.senders:
            for run in range(args.runs):
                order = TARGETS if run % 2 == 0 else TARGETS[::-1]
                for target in order:
                    results.append(measure(target, workdir, files, senders,
                                           args.receive_processes))
                    m = results[-1]
                    print(f"# {target:8s} senders {senders:2d} run {run + 1}: {m.seconds:.2f} s, "
                          f"receiver CPU {m.cpu_seconds:.2f} s", flush=True)
        rows = []
        for senders in args.senders:
            runs = {target: [m for m in results if m.target == target and m.senders == senders]
                    for target in TARGETS}
            med = {target: median([m.seconds for m in runs[target]]) for target in runs}
            for target in TARGETS:
                cpu = median([m.cpu_seconds for m in runs[target]])
                rows.append([senders, target, f"{med[target]:.2f}", f"{size / med[target]:.0f}",
                             f"{len(files) / med[target]:.1f}",
                             f"{med['storescp'] / med[target]:.2f}", f"{cpu:.2f}",
                             f"{cpu / (size / 1000):.2f}"])
        print(f"## Ingest of {len(files)} instances ({size:.0f} MB), median of {args.runs} "
              "run(s); ratio = throughput / storescp throughput; ceiling = storescp --ignore "
              "(nothing written); receiver CPU = user + system seconds of the receiver's "
              "processes while the senders ran")
        print_table(["senders", "receiver", "seconds", "MB/s", "instances/s",
                     "throughput vs storescp", "receiver CPU s", "CPU s per GB"], rows)
        if args.idle:
            print(f"## The node's CPU with idle associations ({IDLE_SECONDS:.0f} s each, "
                  "pynetdicom requestors in the benchmark's process)")
            print_table(["idle associations", "node CPU (of one core)"],
                        idle_cost(workdir, args.senders, args.receive_processes))
        if args.profile:
            if not args.py_spy:
                print("# --profile: py-spy not found (pip install py-spy, or --py-spy PATH)")
            else:
                profile_node(workdir, files, args.py_spy, args.senders[-1],
                             args.receive_processes)
        print(f"# finished; 1-minute load average now {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
