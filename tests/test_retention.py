"""Retention: finished studies idle for ``retention.keep_days`` leave the state directory, and
nothing unfinished or recent ever does."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import Config, parse_config
from dicomnode.records import DeliveryOutcome, Destination, InstanceHeader, JobState, ResultFile
from dicomnode.scp import Listener, read_header
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


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    with Listener(config(tmp_path / "state")) as running:
        yield running


def receive(
    listener: Listener, study: str, now: float, tmp_path: Path, number: int = 1
) -> InstanceHeader:
    """Store a copy of the sample as instance ``number`` of ``study``, received at ``now``."""
    assert listener.store is not None
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
    listener.store.store(spooled, header, "MODALITY", now=now)
    return header


def process(listener: Listener, study: str, now: float, *, deliver: bool) -> Path:
    """Queue, run and (optionally) deliver the study's job at ``now``; its result file."""
    assert listener.queue is not None
    assert listener.queue.enqueue_stable_studies(now=now) == (study,)
    job = listener.queue.lease("worker", now=now)
    assert job is not None and job.study_instance_uid == study
    result = listener.layout.results_dir / study / f"job-{job.job_id}" / "sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"result")
    sr = ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.34", f"{study}.9", f"{study}.9.1", result)
    listener.queue.complete(job, [sr], [PACS], now=now)
    if deliver:
        claimed = listener.queue.claim_deliveries(60, now=now)
        (delivery,) = [d for d in claimed if d.job_id == job.job_id]
        listener.queue.record_delivery_attempt(
            delivery.delivery_id, DeliveryOutcome.DELIVERED, now=now
        )
    return result


def test_only_finished_studies_idle_for_keep_days_are_removed(
    listener: Listener, tmp_path: Path
) -> None:
    assert listener.db is not None and listener.queue is not None
    old, pending, recent = "1.2.1", "1.2.2", "1.2.4"
    files = {s: listener.layout.instance_path(s, f"{s}.1") for s in (old, pending, recent)}
    receive(listener, old, T0, tmp_path)
    results = {old: process(listener, old, T0 + 5, deliver=True)}
    receive(listener, pending, T0 + 10, tmp_path)
    results[pending] = process(listener, pending, T0 + 15, deliver=False)  # PACS never answered
    receive(listener, recent, T0 + 5 * DAY, tmp_path)
    results[recent] = process(listener, recent, T0 + 5 * DAY + 5, deliver=True)

    assert listener.purge(now=T0 + KEEP_DAYS * DAY - 60) == ()  # nothing idle long enough yet
    later = T0 + (KEEP_DAYS + 1) * DAY
    assert listener.purge(now=later) == (old,)
    assert not files[old].exists() and not results[old].exists()
    assert not (listener.layout.instances_dir / old).exists()
    assert listener.db.instances_of(old) == ()
    assert listener.db.query("SELECT COUNT(*) FROM jobs WHERE study_uid = ?", (old,))[0][0] == 0
    # a delivery still pending and a recent study: kept
    for study in (pending, recent):
        assert files[study].exists() and len(listener.db.instances_of(study)) == 1
    assert results[pending].exists() and results[recent].exists()
    states = listener.db.query("SELECT state FROM jobs WHERE study_uid = ?", (pending,))
    assert [r[0] for r in states] == [JobState.RESULTS_WRITTEN]
    # once the recent study is old too, it goes; a re-send of the removed study is new again
    assert listener.purge(now=T0 + (KEEP_DAYS + 6) * DAY) == (recent,)
    receive(listener, old, later + 10, tmp_path)
    assert len(listener.db.instances_of(old)) == 1 and files[old].exists()


def test_an_instance_arriving_after_the_selection_keeps_the_study(
    listener: Listener, tmp_path: Path
) -> None:
    assert listener.db is not None and listener.store is not None
    study = "1.2.5"
    receive(listener, study, T0, tmp_path)
    process(listener, study, T0 + 5, deliver=True)
    cutoff = T0 + DAY
    assert listener.db.idle_studies(cutoff) == (study,)
    receive(listener, study, T0 + 2 * DAY, tmp_path, number=2)  # late, after the selection
    assert listener.store.forget_study(study, cutoff) is False
    assert len(listener.db.instances_of(study)) == 2
    assert listener.layout.instance_path(study, f"{study}.1").exists()


def test_folders_left_without_rows_are_swept_and_keep_days_zero_keeps_all(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    orphan = state / "instances" / "1.2.6"
    orphan.mkdir(parents=True)
    (orphan / "1.2.6.1.dcm").write_bytes(b"left by a crash")
    os.utime(orphan, (T0, T0))
    with Listener(config(state, keep_days=0)) as keep_all:
        assert keep_all.purge(now=T0 + 1000 * DAY) == ()
        assert orphan.exists()
    with Listener(config(state)) as pruning:
        assert pruning.purge(now=T0 + (KEEP_DAYS + 1) * DAY) == ()
        assert not orphan.exists()
