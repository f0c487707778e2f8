"""Retention: finished studies idle for ``retention.keep_days`` leave the state directory, and
nothing unfinished or recent ever does."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.assembly import StudyAssembler
from dicomnode.config import Config, parse_config
from dicomnode.queue.sqlite import open_queue
from dicomnode.records import DeliveryOutcome, Destination, InstanceHeader, JobState, ResultFile
from dicomnode.scp import read_header
from dicomnode.storage import InstanceStore
from tests.conftest import DICOM_SAMPLES

DAY = 86400.0
T0 = 1_800_000_000.0
KEEP_DAYS = 7
PACS = Destination("PACS", "127.0.0.1", 4242)
SAMPLE = DICOM_SAMPLES / "CR_cspine_16x16_dicomdir6154.dcm"


def config(state: Path, keep_days: int = KEEP_DAYS) -> Config:
    raw = {
        "node": {"state_dir": str(state), "port": 0},
        "study": {"stable_seconds": 1.0},
        "retention": {"keep_days": keep_days},
        "destinations": [{"ae_title": PACS.ae_title, "host": PACS.host, "port": PACS.port}],
    }
    return parse_config(raw, state.parent)


class Node:
    """The study assembly role on a state directory, with the store the node writes through
    and the queue the worker and sender use (no network: retention needs none)."""

    def __init__(self, config: Config) -> None:
        self.assembler = StudyAssembler(config)
        self.layout = self.assembler.layout
        self.db = self.layout.create().open_db()
        self.store = InstanceStore(self.layout, self.db)
        self.queue = open_queue(self.db, config)

    def purge(self, now: float) -> tuple[str, ...]:
        return self.assembler.purge(now=now)

    def close(self) -> None:
        self.assembler.stop()
        self.db.close()


@contextlib.contextmanager
def running(config: Config) -> Iterator[Node]:
    node = Node(config)
    node.assembler.start()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running(config(tmp_path / "state")) as node:
        yield node


def receive(
    node: Node, study: str, now: float, tmp_path: Path, number: int = 1
) -> InstanceHeader:
    """Store a copy of the sample as instance ``number`` of ``study``, received at ``now``."""
    base = read_header(SAMPLE)
    header = InstanceHeader(
        sop_class_uid=base.sop_class_uid,
        sop_instance_uid=f"{study}.{number}",
        study_instance_uid=study,
        series_instance_uid=f"{study}.0",
        transfer_syntax_uid=base.transfer_syntax_uid,
    )
    spooled = tmp_path / f"{study}.{number}.dcm"
    shutil.copyfile(SAMPLE, spooled)
    node.store.store(spooled, header, "MODALITY", now=now)
    return header


def process(node: Node, study: str, now: float, *, deliver: bool) -> Path:
    """Queue, run and (optionally) deliver the study's job at ``now``; its result file."""
    assert node.queue.enqueue_stable_studies(now=now) == (study,)
    job = node.queue.lease("worker", now=now)
    assert job is not None and job.study_instance_uid == study
    result = node.layout.results_dir / study / f"job-{job.job_id}" / "sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"result")
    sr = ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.34", f"{study}.9", f"{study}.9.1", result)
    node.queue.complete(job, [sr], [PACS], now=now)
    if deliver:
        claimed = node.queue.claim_deliveries(60, now=now)
        (delivery,) = [d for d in claimed if d.job_id == job.job_id]
        node.queue.record_delivery_attempt(
            delivery.delivery_id, DeliveryOutcome.DELIVERED, now=now
        )
    return result


def test_only_finished_studies_idle_for_keep_days_are_removed(
    node: Node, tmp_path: Path
) -> None:
    old, pending, recent = "1.2.1", "1.2.2", "1.2.4"
    files = {s: node.layout.instance_path(s, f"{s}.1") for s in (old, pending, recent)}
    receive(node, old, T0, tmp_path)
    results = {old: process(node, old, T0 + 5, deliver=True)}
    receive(node, pending, T0 + 10, tmp_path)
    results[pending] = process(node, pending, T0 + 15, deliver=False)  # PACS never answered
    receive(node, recent, T0 + 5 * DAY, tmp_path)
    results[recent] = process(node, recent, T0 + 5 * DAY + 5, deliver=True)

    assert node.purge(now=T0 + KEEP_DAYS * DAY - 60) == ()  # nothing idle long enough yet
    later = T0 + (KEEP_DAYS + 1) * DAY
    assert node.purge(now=later) == (old,)
    assert not files[old].exists() and not results[old].exists()
    assert not (node.layout.instances_dir / old).exists()
    assert node.db.instances_of(old) == ()
    assert node.db.query("SELECT COUNT(*) FROM jobs WHERE study_uid = ?", (old,))[0][0] == 0
    # a delivery still pending and a recent study: kept
    for study in (pending, recent):
        assert files[study].exists() and len(node.db.instances_of(study)) == 1
    assert results[pending].exists() and results[recent].exists()
    states = node.db.query("SELECT state FROM jobs WHERE study_uid = ?", (pending,))
    assert [r[0] for r in states] == [JobState.RESULTS_WRITTEN]
    # once the recent study is old too, it goes; a re-send of the removed study is new again
    assert node.purge(now=T0 + (KEEP_DAYS + 6) * DAY) == (recent,)
    receive(node, old, later + 10, tmp_path)
    assert len(node.db.instances_of(old)) == 1 and files[old].exists()


def test_an_instance_arriving_after_the_selection_keeps_the_study(
    node: Node, tmp_path: Path
) -> None:
    study = "1.2.5"
    receive(node, study, T0, tmp_path)
    process(node, study, T0 + 5, deliver=True)
    cutoff = T0 + DAY
    assert node.db.idle_studies(cutoff) == (study,)
    receive(node, study, T0 + 2 * DAY, tmp_path, number=2)  # late, after the selection
    assert node.store.forget_study(study, cutoff) is False
    assert len(node.db.instances_of(study)) == 2
    assert node.layout.instance_path(study, f"{study}.1").exists()


def test_folders_left_without_rows_are_swept_and_keep_days_zero_keeps_all(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    orphan = state / "instances" / "1.2.6"
    orphan.mkdir(parents=True)
    (orphan / "1.2.6.1.dcm").write_bytes(b"left by a crash")
    os.utime(orphan, (T0, T0))
    with running(config(state, keep_days=0)) as keep_all:
        assert keep_all.purge(now=T0 + 1000 * DAY) == ()
        assert orphan.exists()
    with running(config(state)) as pruning:
        assert pruning.purge(now=T0 + (KEEP_DAYS + 1) * DAY) == ()
        assert not orphan.exists()
