"""Load: 16 concurrent DCMTK storescu associations against ``dicomnode listen`` with
``node.max_associations = 16``, and one association above the maximum.

``FAULT_LOAD_INSTANCES`` (default 1600, sized for CI on 2 cores; ``FAULT_LOAD_INSTANCES=16000``
for a release run) small DX instances are split over 16 storescu processes, each sending its
own study in one association, all at once. Every storescu must exit 0 (none is refused at 16
associations), every instance must be stored with the data set bytes that were sent, and the
node's peak resident memory (VmHWM of it and its children, sampled from /proc while it runs)
must stay under a ceiling that does not depend on the number of instances (see
:func:`memory_ceiling`). Throughput and peak memory go to ``results/load.json``; they are
reported, not asserted (speed figures belong in benchmarks/).
"""

from __future__ import annotations

import copy
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.config import DEFAULT_MAX_PDU, load_config
from dicomnode.demo import free_port
from dicomnode.scp import StoreStatus
from dicomnode.storage import StateLayout
from tests.conftest import STORESCU_SYNTAX
from tests.faults.conftest import (
    MODALITY,
    NODE_AE,
    dataset_sha256,
    echo_ok,
    record_counts,
    save,
    scu,
    small_dx,
    store_file,
)
from tests.faults.test_limits import settled
from tests.test_node_e2e import STORESCU, NodeProcess, node, write_config
from tests.test_scp import echoscu, listening, make_config

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(600)]

SENDERS = 16
INSTANCES = int(os.environ.get("FAULT_LOAD_INSTANCES", "1600"))
MIB = 1024 * 1024


def memory_ceiling(baseline_rss: int, max_pdu: int, associations: int) -> int:
    """Bytes of resident memory the node may reach under load, whatever the instance count.

    Data sets are spooled to disk as they arrive and stored by copying files, so what an
    association holds in memory is bounded by PDUs, not instances: the PDU being read
    (at most ``max_pdu``, enforced before it is read) and its decoded P-DATA copy, i.e. about
    2 x ``max_pdu``. On top of the idle process (``baseline_rss``) we allow that per
    association plus 128 MiB for thread stacks, pydicom header parsing, SQLite's page cache and
    allocator slack. Memory growing with the number of instances (a leak, or data sets held
    whole) would cross it at the release size.
    """
    return baseline_rss + associations * 2 * max_pdu + 128 * MIB


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def established_connections(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is ``port`` (the node's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01"
    return count


class PeakSampler:
    """Samples, every 0.1 s in a thread, the summed VmHWM of a process tree (peak resident
    memory) and the number of established connections to its port."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.peak_bytes = self.peak_connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        total = sum(status_kib(p, "VmHWM") for p in process_tree(self.pid)) * 1024
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_connections = max(self.peak_connections, established_connections(self.port))

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def sender_files(folder: Path, bases: list[Dataset], sender: int, count: int) -> dict[str, Path]:
    """``count`` small DX instances of one study (fresh UIDs on copies of ``bases``), by SOP
    Instance UID."""
    study, series = generate_uid(), generate_uid()
    files = {}
    for index in range(count):
        ds = copy.deepcopy(bases[index % len(bases)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        files[ds.SOPInstanceUID] = save(ds, folder / f"sender{sender:02d}" / f"{index:05d}.dcm")
    return files


def storescu_process(port: int, files: Iterable[Path]) -> subprocess.Popen[str]:
    """DCMTK storescu sending ``files`` (Explicit VR Little Endian) in one association.

    ``TCP_NODELAY=1`` makes DCMTK disable Nagle's algorithm, as a modality should, so small
    PDUs are not held back waiting for acknowledgements."""
    cmd = [STORESCU, STORESCU_SYNTAX["1.2.840.10008.1.2.1"], "-aec", NODE_AE, "-aet", MODALITY]
    return subprocess.Popen(
        [*cmd, "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


@contextmanager
def listen_node(folder: Path, max_associations: int) -> Iterator[tuple[NodeProcess, Path]]:
    """``dicomnode listen`` (no worker: only receiving is measured) with the given maximum."""
    config = write_config(folder, folder / "weights-unused", [], port=free_port())
    text = config.read_text().replace(
        "[node]\n", f"[node]\nmax_associations = {max_associations}\n", 1
    )
    config.write_text(text)
    with node("listen", config, folder / "node.log") as running:
        yield running, config


def test_sixteen_concurrent_storescu_associations_store_everything_in_bounded_memory(
    tmp_path: Path,
) -> None:
    bases = [small_dx(i) for i in range(3)]
    per_sender = [INSTANCES // SENDERS + (s < INSTANCES % SENDERS) for s in range(SENDERS)]
    with ThreadPoolExecutor(4) as pool:
        batches = list(
            pool.map(
                lambda s: sender_files(tmp_path / "sent", bases, s, per_sender[s]), range(SENDERS)
            )
        )
    sent = {uid: dataset_sha256(f) for batch in batches for uid, f in batch.items()}
    with listen_node(tmp_path / "node", SENDERS) as (running, config):
        settings = load_config(config)
        baseline = status_kib(running.process.pid, "VmRSS") * 1024
        with PeakSampler(running.process.pid, settings.node.port) as peaks:
            start = time.monotonic()
            senders = [storescu_process(settings.node.port, b.values()) for b in batches]
            outputs = [p.communicate(timeout=540)[0] for p in senders]
            seconds = time.monotonic() - start
        rejected = [e for e in running.events() if e["event"] == "association_rejected"]
        incomplete = [e for e in running.events() if e["event"] == "transfer_incomplete"]
        received = [e for e in running.events() if e["event"] == "instance_received"]
    db = StateLayout(settings.node.state_dir).open_db()
    try:
        stored = {
            r["sop_instance_uid"]: Path(r["path"]) for r in db.query("SELECT * FROM instances")
        }
    finally:
        db.close()
    intact = sum(uid in stored and dataset_sha256(stored[uid]) == sha for uid, sha in sent.items())
    ceiling = memory_ceiling(baseline, DEFAULT_MAX_PDU, SENDERS)
    counts = record_counts(
        "load",
        {
            "associations": SENDERS,
            "instances_sent": len(sent),
            "storescu_exit_codes": sorted({p.returncode for p in senders}),
            "instances_acknowledged": sum(e["status"] == "0x0000" for e in received),
            "instances_stored_intact": intact,
            "peak_concurrent_associations": peaks.peak_connections,
            "associations_rejected": len(rejected),
            "incomplete_transfers": len(incomplete),
            "seconds": round(seconds, 1),
            "instances_per_second": round(len(sent) / seconds, 1),
            "baseline_rss_mib": round(baseline / MIB, 1),
            "peak_rss_mib": round(peaks.peak_bytes / MIB, 1),
            "rss_ceiling_mib": round(ceiling / MIB, 1),
        },
    )
    failed = [out[-500:] for p, out in zip(senders, outputs, strict=True) if p.returncode != 0]
    assert failed == [], failed
    assert counts["instances_stored_intact"] == len(sent) == INSTANCES
    assert counts["instances_acknowledged"] == len(sent)
    assert counts["associations_rejected"] == counts["incomplete_transfers"] == 0
    assert counts["peak_concurrent_associations"] == SENDERS, counts
    assert 0 < peaks.peak_bytes < ceiling, counts


def test_association_above_the_maximum_is_rejected_transient_and_held_ones_keep_working(
    tmp_path: Path,
) -> None:
    """With ``max_associations = 2`` and two associations held open, a third gets
    A-ASSOCIATE-RJ: rejected-transient (2), source service provider, presentation related (3),
    reason local limit exceeded (2) (PS3.8 9.3.4), from pynetdicom and DCMTK echoscu alike; the
    held ones still answer C-ECHO and store, and once they are released new associations are
    accepted."""
    files = [save(small_dx(i), tmp_path / f"dx{i}.dcm") for i in range(3)]
    with listening(make_config(tmp_path, max_associations=2)) as listener:
        modalities = [scu(), scu()]
        held = [ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE) for ae in modalities]
        try:
            assert all(a.is_established for a in held)
            extra_ae = scu(storage=False)
            extra = extra_ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
            extra_ae.shutdown()
            assert extra.is_rejected
            answer = extra.acceptor.primitive
            assert answer is not None
            rejection = (answer.result, answer.result_source, answer.diagnostic)
            dcmtk = echoscu(listener.port)
            statuses = [int(a.send_c_echo().Status) for a in held]
            statuses += [int(a.send_c_store(f).Status) for a, f in zip(held, files, strict=False)]
        finally:
            for assoc in held:
                assoc.release()
            for ae in modalities:
                ae.shutdown()
        settled(listener)
        after = store_file(listener.port, files[2])
        assert echo_ok(listener.port)
    assert rejection == (0x02, 0x03, 0x02), rejection
    assert dcmtk.returncode != 0
    assert "Local Limit Exceeded" in dcmtk.stdout + dcmtk.stderr, dcmtk.stderr
    assert statuses == [StoreStatus.SUCCESS] * 4
    assert after.success
    record_counts(
        "load_above_maximum",
        {
            "max_associations": 2,
            "held": 2,
            "rejection_result_source_reason": list(rejection),
            "held_statuses": [f"0x{s:04X}" for s in statuses],
            "accepted_after_release": after.success,
        },
    )
