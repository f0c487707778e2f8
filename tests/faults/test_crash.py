"""Crash at any point: ``dicomnode serve`` (and, in some rounds, only its worker child) is
SIGKILLed at seeded random moments while a pynetdicom modality sends a stream of 2-image studies,
and ``serve`` is restarted on the same state directory after each kill of it.

An instance counts as acknowledged only when it got status 0x0000; a send that failed (refused,
aborted, no status) is retried after the restart. At the end every acknowledged instance is on
disk with the dataset bytes that were sent, every study has exactly one current SR at a real
Orthanc (one that no other SR of the study names as its predecessor) covering all its
acknowledged images and one Secondary Capture per image, no result UID was produced with two
different contents, and no study is left undelivered.

``FAULT_KILLS`` (default 8, the CI size) and ``FAULT_SEED`` choose a longer or another run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid

from dicomnode.config import load_config
from dicomnode.demo import OrthancPacs, ReceivedObject, current_objects, read_report
from dicomnode.records import JobState
from dicomnode.state import StateDB
from tests.faults.conftest import (
    dataset_sha256,
    node_config,
    record_counts,
    save,
    small_dx,
    store_file,
)
from tests.test_node_e2e import NodeProcess, by_class, node, wait_for

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(300)]

SEED = int(os.environ.get("FAULT_SEED", "20261128"))
KILLS = int(os.environ.get("FAULT_KILLS", "8"))
#: At most this many studies are sent (the modality stops early once the kills are done).
MAX_STUDIES = 12 + 3 * KILLS
#: Share of the rounds that kill only the worker child (the rest kill ``serve`` itself).
WORKER_SHARE = 0.3
#: A failed send is retried for this long before the modality gives up on it (a test failure).
RETRY_SECONDS = 120.0
SETTLE_SECONDS = 60.0


@dataclass(frozen=True)
class Sent:
    """One acknowledged instance: its study and the SHA-256 of its dataset bytes."""

    study_uid: str
    sha256: str


@dataclass
class Modality:
    """A thread sending 2-image studies, one association per instance, retrying failed sends."""

    port: int
    folder: Path
    stop: threading.Event = field(default_factory=threading.Event)
    acknowledged: dict[str, Sent] = field(default_factory=dict)
    studies: list[str] = field(default_factory=list)
    failed_sends: Counter[str] = field(default_factory=Counter)
    error: str | None = None

    def send_until_acknowledged(self, path: Path) -> bool:
        deadline = time.monotonic() + RETRY_SECONDS
        while time.monotonic() < deadline:
            answer = store_file(self.port, path)
            if answer.success:
                return True
            self.failed_sends[answer.ended if answer.status is None else hex(answer.status)] += 1
            time.sleep(0.2)
        self.error = f"{path.name} not acknowledged within {RETRY_SECONDS:.0f} s"
        return False

    def run(self) -> None:
        for number in range(MAX_STUDIES):
            if self.stop.is_set():
                return
            study_uid, series_uid = generate_uid(), generate_uid()
            self.studies.append(study_uid)
            for image in range(2):
                ds = small_dx(number + image, study_uid=study_uid, series_uid=series_uid)
                path = save(ds, self.folder / f"s{number:03d}-{image}.dcm")
                if not self.send_until_acknowledged(path):
                    return
                self.acknowledged[str(ds.SOPInstanceUID)] = Sent(study_uid, dataset_sha256(path))
            self.stop.wait(0.3)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="modality", daemon=True)
        thread.start()
        return thread


def alive(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def worker_pids(log_path: Path) -> set[int]:
    """PIDs of every worker child any ``serve`` of this log started."""
    events = NodeProcess(None, log_path, 0).events()  # type: ignore[arg-type]
    return {int(e["pid"]) for e in events if e["event"] == "worker_process_started"}


def kill_orphans(pids: set[int]) -> list[int]:
    """SIGKILL those of ``pids`` that still run a multiprocessing worker; their PIDs."""
    killed = []
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if alive(pid) and b"multiprocessing" in cmdline:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def study_pending(db: StateDB, study_uid: str) -> bool:
    """The study still has an instance not yet in a delivered job, or an undelivered job."""
    studies = db.query(
        "SELECT revision, queued_revision FROM studies WHERE study_uid = ?", (study_uid,)
    )
    if not studies or studies[0][0] != studies[0][1]:
        return True
    states = {
        JobState(r[0]) for r in db.query("SELECT state FROM jobs WHERE study_uid = ?", (study_uid,))
    }
    return states != {JobState.DELIVERED}


def predecessors(sr: ReceivedObject) -> set[str]:
    """SOP Instance UIDs an SR names in its Predecessor Documents Sequence."""
    return {
        str(ref.ReferencedSOPInstanceUID)
        for item in sr.dataset().get("PredecessorDocumentsSequence", [])
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def current_reports(objects: list[ReceivedObject]) -> list[ReceivedObject]:
    """The SRs of a study that no other SR of it names as its predecessor."""
    reports = by_class(objects, Comprehensive3DSRStorage)
    replaced = set().union(*(predecessors(sr) for sr in reports))
    return [sr for sr in reports if sr.sop_instance_uid not in replaced]


def kill_at_random(running: NodeProcess, rng: random.Random, kills: Counter[str]) -> None:
    """Kill the worker child or ``serve`` at random moments: return once ``serve`` is killed
    or ``KILLS`` kills were made."""
    while sum(kills.values()) < KILLS:
        time.sleep(rng.uniform(0.2, 3.0))  # the random moment of this kill
        started = running.event("worker_process_started")
        child = int(started["pid"]) if started else None
        if rng.random() < WORKER_SHARE and child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
            kills["worker"] += 1
            continue
        running.process.send_signal(signal.SIGKILL)
        running.process.wait()
        kills["serve"] += 1
        return


def pending(state_dir: Path, studies: list[str]) -> list[str]:
    """The studies not (yet) delivered in full."""
    with StateDB(state_dir / "state.sqlite") as db:
        return [study for study in studies if study_pending(db, study)]


def test_random_kills_lose_nothing_and_leave_one_current_result(
    fault_weights: Path, fault_orthanc: OrthancPacs, tmp_path: Path
) -> None:
    print(f"[faults] crash: seed {SEED}, {KILLS} kills")
    rng = random.Random(SEED)
    config = node_config(tmp_path / "node", fault_weights, fault_orthanc)
    cfg = load_config(config)
    log_path = tmp_path / "node.log"
    modality = Modality(cfg.node.port, tmp_path / "sent")
    kills: Counter[str] = Counter()
    try:
        thread = None
        while sum(kills.values()) < KILLS:
            with node("serve", config, log_path) as running:
                thread = thread or modality.start()
                kill_at_random(running, rng, kills)
        with node("serve", config, log_path):
            modality.stop.set()  # the study being sent is finished first
            assert thread is not None
            thread.join(RETRY_SECONDS + 30)
            with contextlib.suppress(AssertionError):  # what is left is counted as stuck
                wait_for(
                    "every study delivered",
                    lambda: not pending(cfg.node.state_dir, modality.studies),
                    timeout=SETTLE_SECONDS,
                )
            stuck = pending(cfg.node.state_dir, modality.studies)
    finally:
        modality.stop.set()
        orphans = kill_orphans(worker_pids(log_path)) if log_path.exists() else []
    assert modality.error is None, modality.error
    check_outcome(cfg.node.state_dir, fault_orthanc, modality, kills, stuck, orphans)


def stored_hashes(state_dir: Path) -> dict[str, str]:
    """SOP Instance UID -> dataset SHA-256 of every instance file the state records."""
    with StateDB(state_dir / "state.sqlite") as db:
        rows = db.query("SELECT sop_instance_uid, path FROM instances")
    return {uid: dataset_sha256(Path(path)) for uid, path in rows if Path(path).is_file()}


def result_contents(state_dir: Path) -> dict[str, set[str]]:
    """Result SOP Instance UID -> the dataset SHA-256s it was recorded (and delivered) with."""
    with StateDB(state_dir / "state.sqlite") as db:
        rows = db.query(
            "SELECT r.sop_instance_uid, r.path FROM results r JOIN deliveries d "
            "ON d.job_id = r.job_id WHERE d.state = 'delivered'"
        )
    contents: dict[str, set[str]] = {}
    for uid, path in rows:
        contents.setdefault(uid, set()).add(dataset_sha256(Path(path)))
    return contents


def check_outcome(
    state_dir: Path,
    orthanc: OrthancPacs,
    modality: Modality,
    kills: Counter[str],
    stuck: list[str],
    orphans: list[int],
) -> None:
    """Count what was lost, duplicated and stuck; record the counts and assert on them."""
    stored = stored_hashes(state_dir)
    lost = [uid for uid, sent in modality.acknowledged.items() if stored.get(uid) != sent.sha256]
    duplicated = [uid for uid, hashes in result_contents(state_dir).items() if len(hashes) > 1]
    by_study: dict[str, set[str]] = {}
    for uid, sent in modality.acknowledged.items():
        by_study.setdefault(sent.study_uid, set()).add(uid)
    wrong_results = []
    for study_uid, images in by_study.items():
        objects = current_objects(orthanc.received(study_uid))  # as an IOCM archive shows them
        current = current_reports(objects)
        captures = by_class(objects, SecondaryCaptureImageStorage)
        covered = (
            {image.sop_instance_uid for image in read_report(current[0].data)}
            if len(current) == 1
            else set()
        )
        if covered != images or len(captures) != len(images):
            wrong_results.append(study_uid)
    with StateDB(state_dir / "state.sqlite") as db:
        reruns = db.query("SELECT COUNT(*) FROM jobs WHERE version > 1")[0][0]
        attempts = db.query("SELECT COALESCE(SUM(attempt), 0) FROM jobs")[0][0]
    counts = record_counts(
        "crash",
        {
            "seed": SEED,
            "kills": dict(sorted(kills.items())),
            "studies": len(by_study),
            "instances_acknowledged": len(modality.acknowledged),
            "failed_sends_retried": dict(sorted(modality.failed_sends.items())),
            "lost": len(lost),
            "duplicated": len(duplicated),
            "stuck": len(stuck),
            "studies_with_wrong_results": len(wrong_results),
            "rerun_jobs": reruns,
            "job_attempts": attempts,
            "orphaned_workers_killed": len(orphans),
        },
    )
    assert sum(kills.values()) == KILLS
    assert counts["instances_acknowledged"] >= 2 * KILLS // 2, "the stream was too short"
    assert lost == [] and counts["lost"] == 0
    assert duplicated == [] and counts["duplicated"] == 0
    assert stuck == [] and counts["stuck"] == 0
    assert wrong_results == []
