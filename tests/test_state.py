"""The SQLite state and job queue: study assembly, leases, results, deliveries, restarts.

Time is passed explicitly (``now``), so lease expiry and back-off are tested without sleeping.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from dicomnode.config import DeliveryConfig, RetryPolicy, parse_config
from dicomnode.queue.protocol import LeaseLostError
from dicomnode.queue.sqlite import SqliteJobQueue, open_queue
from dicomnode.records import (
    DeliveryOutcome,
    DeliveryState,
    Destination,
    InstanceHeader,
    JobState,
    ResultFile,
    StoredInstance,
    StudyState,
)
from dicomnode.state import SCHEMA_VERSION, StateDB
from dicomnode.storage import InstanceStore, StateLayout, StoreOutcome, move_durably

T0 = 1_800_000_000.0
STABLE = 10.0
LEASE = 60.0
DELIVERY = DeliveryConfig(
    retry_initial_seconds=30.0,
    retry_max_seconds=120.0,
    give_up_after_seconds=3600.0,
    timeout_seconds=60.0,
)
#: Back-off of jobs after a retryable failure: 20 s, 40 s, then 50 s (the cap).
JOB_RETRY = RetryPolicy(retry_initial_seconds=20.0, retry_max_seconds=50.0)
PACS = Destination("PACS", "127.0.0.1", 4242)
ARCHIVE = Destination("ARCHIVE", "127.0.0.1", 4243)
STUDY = "1.2.3.4"


def instance(sop: str, study: str = STUDY) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=Path(f"/state/instances/{study}/{sop}.dcm"),
        size=10,
        sha256=hashlib.sha256(sop.encode()).hexdigest(),
        calling_ae="MODALITY",
    )


KIND_NUMBER = {"sr": 1, "sc": 2, "gsps": 3}


def result(job_version: int, kind: str = "sr") -> ResultFile:
    return ResultFile(
        kind=kind,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
        series_instance_uid="9.9",
        sop_instance_uid=f"9.9.{job_version}.{KIND_NUMBER[kind]}",
        path=Path(f"/state/results/{kind}{job_version}.dcm"),
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite"


@pytest.fixture
def db(db_path: Path) -> Iterator[StateDB]:
    with StateDB(db_path) as state:
        yield state


def make_queue(db: StateDB, max_attempts: int = 2) -> SqliteJobQueue:
    return SqliteJobQueue(
        db,
        stable_seconds=STABLE,
        lease_seconds=LEASE,
        max_attempts=max_attempts,
        delivery=DELIVERY,
        job_retry=JOB_RETRY,
    )


def test_database_is_in_wal_mode(db: StateDB) -> None:
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"


def test_roles_opening_a_new_database_together_all_get_it(tmp_path: Path) -> None:
    # serve's listener and sender threads open a fresh state database at the same moment;
    # switching it to WAL mode must wait for the other connection, not fail with "locked".
    # One round failed about one time in ten before the switch was retried.
    def open_and_close(path: Path) -> str:
        StateDB(path).close()
        return "opened"

    for round_ in range(60):
        path = tmp_path / f"round-{round_}.sqlite"
        with ThreadPoolExecutor(max_workers=6) as pool:
            assert list(pool.map(open_and_close, [path] * 6)) == ["opened"] * 6
        with StateDB(path) as db:
            assert db.query("PRAGMA journal_mode")[0][0] == "wal"
            assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION


def test_rows_recorded_at_once_by_many_threads_share_commits(
    db: StateDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 threads recording at once: every row is there when its call returns, the study's
    revision counts each, and the rows that arrived during a commit went into one of the
    next commits (group commit), not one commit each."""
    from dicomnode import state

    commits: list[int] = []  # rows per commit
    rows = [0]
    insert, transaction = state._insert_instance, StateDB.transaction

    def counted_insert(conn: sqlite3.Connection, inst: StoredInstance, now: float) -> None:
        insert(conn, inst, now)
        rows[0] += 1

    @contextmanager
    def slow_transaction(self: StateDB) -> Iterator[sqlite3.Connection]:
        rows[0] = 0
        with transaction(self) as conn:
            yield conn
            time.sleep(0.01)  # a commit whose sync takes a while, as under load
        commits.append(rows[0])

    monkeypatch.setattr(state, "_insert_instance", counted_insert)
    monkeypatch.setattr(StateDB, "transaction", slow_transaction)

    def record(n: int) -> bool:
        db.record_instance(instance(f"1.2.3.{n}"))
        return db.instance(f"1.2.3.{n}") is not None  # committed when the call returned

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(record, range(32)))
    assert sum(commits) == 32 and len(commits) < 32, commits
    (revision,) = db.query("SELECT revision FROM studies WHERE study_uid = ?", (STUDY,))[0]
    assert revision == 32


def test_a_failed_group_commit_fails_each_of_its_rows_and_the_next_one_works(
    db: StateDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode import state

    insert = state._insert_instance

    def failing(conn: sqlite3.Connection, inst: StoredInstance, now: float) -> None:
        if inst.sop_instance_uid == "1.2.3.99":
            raise sqlite3.OperationalError("disk I/O error")
        insert(conn, inst, now)

    monkeypatch.setattr(state, "_insert_instance", failing)
    with pytest.raises(sqlite3.OperationalError):
        db.record_instance(instance("1.2.3.99"))
    assert db.instance("1.2.3.99") is None
    db.record_instance(instance("1.2.3.100"))
    assert db.instance("1.2.3.100") is not None and not db._pending


def test_study_is_queued_once_after_it_was_quiet_for_stable_seconds(db: StateDB) -> None:
    queue = make_queue(db)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    db.record_instance(instance("1.2.3.4.2"), now=T0 + 5)
    assert queue.enqueue_stable_studies(now=T0 + 5 + STABLE - 0.1) == ()
    assert db.recent_studies()[0].state is StudyState.RECEIVING
    assert queue.enqueue_stable_studies(now=T0 + 5 + STABLE) == (STUDY,)
    assert queue.enqueue_stable_studies(now=T0 + 100) == ()
    assert queue.depth().queued == 1
    status = db.recent_studies()[0]
    assert (status.state, status.instance_count, status.version) == (StudyState.QUEUED, 2, 1)


def test_next_stable_at_is_when_the_listener_can_queue_the_next_study(db: StateDB) -> None:
    """The listener sleeps until then: the first unqueued study's last arrival plus
    stable_seconds; nothing while a study's job waits in the queue (it cannot be queued
    again), its later instances count once the job is leased."""
    queue = make_queue(db)
    assert queue.next_stable_at() is None
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    db.record_instance(instance("1.2.3.4.2"), now=T0 + 5)
    assert queue.next_stable_at() == T0 + 5 + STABLE
    assert queue.enqueue_stable_studies(now=T0 + 5 + STABLE) == (STUDY,)
    assert queue.next_stable_at() is None
    db.record_instance(instance("1.2.3.4.3"), now=T0 + 30)  # while its job is queued
    assert queue.next_stable_at() is None
    assert queue.lease("w1", now=T0 + 30 + STABLE) is not None  # takes the new instance too
    assert queue.next_stable_at() is None
    db.record_instance(instance("1.2.3.4.4"), now=T0 + 40)  # while leased: a re-run is due
    assert queue.next_stable_at() == T0 + 40 + STABLE


def test_lease_hands_out_the_study_with_its_instances(db: StateDB) -> None:
    queue = make_queue(db)
    for i in range(3):
        db.record_instance(instance(f"1.2.3.4.{i}"), now=T0 + i)
    queue.enqueue_stable_studies(now=T0 + 20)
    job = queue.lease("w1", now=T0 + 21)
    assert job is not None
    assert job.study_instance_uid == STUDY
    assert [i.sop_instance_uid for i in job.instances] == ["1.2.3.4.0", "1.2.3.4.1", "1.2.3.4.2"]
    assert (job.version, job.attempt, job.lease_owner) == (1, 1, "w1")
    assert job.lease_expires_at == T0 + 21 + LEASE
    assert job.predecessors == ()
    assert queue.lease("w2", now=T0 + 22) is None
    assert db.recent_studies()[0].state is StudyState.LEASED


def test_expired_lease_returns_the_job_and_the_old_holder_loses_it(db: StateDB) -> None:
    queue = make_queue(db, max_attempts=2)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    first = queue.lease("w1", now=T0 + STABLE)
    assert first is not None
    assert queue.lease("w2", now=first.lease_expires_at - 1) is None
    renewed = queue.renew(first, now=first.lease_expires_at - 1)
    assert renewed.lease_expires_at == first.lease_expires_at - 1 + LEASE
    second = queue.lease("w2", now=renewed.lease_expires_at)
    assert second is not None
    assert (second.job_id, second.attempt, second.lease_owner) == (first.job_id, 2, "w2")
    with pytest.raises(LeaseLostError):
        queue.complete(renewed, [result(1)], [PACS], now=renewed.lease_expires_at + 1)
    # The second lease also runs out: with max_attempts=2 the job fails with a reason.
    assert queue.lease("w3", now=second.lease_expires_at) is None
    state, reason = queue.job_state(first.job_id)
    assert state is JobState.FAILED
    assert reason is not None and "lease expired in attempt 2" in reason
    assert queue.depth().failed == 1


def test_held_job_finds_only_the_current_attempt_of_its_holder(db: StateDB) -> None:
    """The site's result intake matches the pool's answers with held_job: an answer to an
    attempt published earlier, by another owner, after its lease ran out, or to a job already
    answered is not the held job."""
    queue = make_queue(db, max_attempts=3)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    first = queue.lease("broker", now=T0 + STABLE)
    assert first is not None
    held = queue.held_job(first.job_id, 1, "broker", now=T0 + STABLE + 1)
    assert held is not None and held.instances == first.instances and held.attempt == 1
    assert queue.held_job(first.job_id, 2, "broker", now=T0 + STABLE + 1) is None
    assert queue.held_job(first.job_id, 1, "w1", now=T0 + STABLE + 1) is None
    assert queue.held_job(first.job_id + 1, 1, "broker", now=T0 + STABLE + 1) is None
    assert queue.held_job(first.job_id, 1, "broker", now=first.lease_expires_at) is None
    second = queue.lease("broker", now=first.lease_expires_at)  # published again: attempt 2
    assert second is not None and second.attempt == 2
    assert queue.held_job(first.job_id, 1, "broker", now=second.lease_expires_at - 1) is None
    again = queue.held_job(first.job_id, 2, "broker", now=second.lease_expires_at - 1)
    assert again is not None
    queue.complete(again, [result(1)], [PACS], now=second.lease_expires_at - 1)
    assert queue.held_job(first.job_id, 2, "broker", now=second.lease_expires_at - 1) is None


def test_release_returns_a_held_job_without_counting_the_attempt(db: StateDB) -> None:
    queue = make_queue(db, max_attempts=1)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    job = queue.lease("broker", now=T0 + STABLE)
    assert job is not None and job.attempt == 1
    assert queue.release(job, now=T0 + STABLE + 1)
    assert not queue.release(job, now=T0 + STABLE + 1)  # no longer held
    assert queue.job_state(job.job_id) == (JobState.QUEUED, None)
    again = queue.lease("broker", now=T0 + STABLE + 2)  # at once, and still attempt 1 of 1
    assert again is not None and again.attempt == 1


def test_fail_requeues_retryable_errors_until_max_attempts(db: StateDB) -> None:
    queue = make_queue(db, max_attempts=2)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    job = queue.lease("w1", now=T0 + STABLE)
    assert job is not None
    assert queue.fail(job, "GPU out of memory", retryable=True, now=T0 + 11) is JobState.QUEUED
    assert queue.lease("w1", now=T0 + 12) is None  # backing off: 20 s after the 1st failure
    job = queue.lease("w1", now=T0 + 11 + 20)
    assert job is not None and job.attempt == 2
    assert queue.fail(job, "GPU out of memory", retryable=True, now=T0 + 33) is JobState.FAILED
    assert queue.job_state(job.job_id) == (JobState.FAILED, "GPU out of memory")
    status = db.recent_studies()[0]
    assert (status.state, status.last_error) == (StudyState.FAILED, "GPU out of memory")


def test_retryable_failures_back_off_exponentially_and_persistently(db_path: Path) -> None:
    other = "5.6.7"
    with StateDB(db_path) as db:
        queue = make_queue(db, max_attempts=5)
        db.record_instance(instance("1.2.3.4.1"), now=T0)
        queue.enqueue_stable_studies(now=T0 + STABLE)
        failed_at, due, waits = T0, T0 + STABLE, []
        for attempt in range(1, 4):
            job = queue.lease("w1", now=due)
            assert job is not None and job.attempt == attempt
            failed_at = due + 1
            assert queue.fail(job, "crashed", retryable=True, now=failed_at) is JobState.QUEUED
            (status,) = db.recent_studies()
            assert status.state is StudyState.QUEUED and status.next_attempt_at is not None
            waits.append(status.next_attempt_at - failed_at)
            assert queue.lease("w1", now=status.next_attempt_at - 0.01) is None
            due = status.next_attempt_at
        assert waits == [20.0, 40.0, 50.0]
        # a backing-off study does not hold up another one
        db.record_instance(instance("5.6.7.1", study=other), now=failed_at)
        assert queue.enqueue_stable_studies(now=failed_at + STABLE) == (other,)
        later = queue.lease("w2", now=failed_at + STABLE)
        assert later is not None and later.study_instance_uid == other
        assert failed_at + STABLE < due
    with StateDB(db_path) as db:  # the wait survives a restart
        queue = make_queue(db, max_attempts=5)
        (status,) = [s for s in db.recent_studies() if s.study_instance_uid == STUDY]
        assert status.next_attempt_at == due
        assert queue.lease("w1", now=due - 0.01) is None
        job = queue.lease("w1", now=due)
        assert job is not None and job.attempt == 4
        assert [s.next_attempt_at for s in db.recent_studies()] == [None, None]


def test_retry_of_a_failed_job_is_due_at_once(db: StateDB) -> None:
    queue = make_queue(db, max_attempts=2)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    job = queue.lease("w1", now=T0 + STABLE)
    assert job is not None
    queue.fail(job, "inference crashed", retryable=True, now=T0 + 11)
    job = queue.lease("w1", now=T0 + 31)
    assert job is not None
    assert queue.fail(job, "inference crashed", retryable=True, now=T0 + 32) is JobState.FAILED
    assert db.recent_studies()[0].next_attempt_at is None
    assert queue.retry(now=T0 + 33) == 1
    assert db.recent_studies()[0].next_attempt_at is None
    assert queue.lease("w1", now=T0 + 33) is not None


def test_a_version_1_state_database_is_upgraded_in_place(db_path: Path) -> None:
    with StateDB(db_path) as db:
        queue = make_queue(db)
        db.record_instance(instance("1.2.3.4.1"), now=T0)
        queue.enqueue_stable_studies(now=T0 + STABLE)
    # the layout of version 1: the same tables without jobs.not_before (2), jobs.note (3) and
    # jobs.broker_deliveries (4)
    with sqlite3.connect(db_path) as conn:
        for column in ("not_before", "note", "broker_deliveries"):
            conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with StateDB(db_path) as db:
        assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 4
        columns = [row["name"] for row in db.query("PRAGMA table_info(jobs)")]
        assert {"not_before", "note", "broker_deliveries"} <= set(columns)
        assert db.redelivered_jobs() == 0
        assert db.recent_studies()[0].state is StudyState.QUEUED
        job = make_queue(db).lease("w1", now=T0 + STABLE)
        assert job is not None and job.instances[0].sop_instance_uid == "1.2.3.4.1"
    with StateDB(db_path) as db:  # opening an upgraded database again changes nothing
        assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION


def test_a_state_database_from_a_newer_version_is_refused(db_path: Path) -> None:
    StateDB(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ValueError, match="newer than this node's"):
        StateDB(db_path)


def test_permanent_failure_and_retry_of_one_study_or_all(db: StateDB) -> None:
    queue = make_queue(db, max_attempts=3)
    other = "5.6.7"
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    db.record_instance(instance("5.6.7.1", study=other), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    for _ in range(2):
        job = queue.lease("w1", now=T0 + STABLE)
        assert job is not None
        assert (
            queue.fail(job, "no decodable image", retryable=False, now=T0 + 11) is JobState.FAILED
        )
    assert queue.retry(STUDY, now=T0 + 20) == 1
    assert queue.depth().queued == 1 and queue.depth().failed == 1
    retried = queue.lease("w1", now=T0 + 21)
    assert retried is not None
    assert (retried.study_instance_uid, retried.attempt) == (STUDY, 1)
    assert queue.retry(now=T0 + 22) == 1
    assert queue.depth().failed == 0


def test_late_instance_makes_the_study_run_again_with_predecessors(db: StateDB) -> None:
    queue = make_queue(db)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    v1 = queue.lease("w1", now=T0 + STABLE)
    assert v1 is not None
    late_at = T0 + STABLE + 1
    db.record_instance(instance("1.2.3.4.2"), now=late_at)
    assert db.recent_studies()[0].state is StudyState.RECEIVING
    assert queue.enqueue_stable_studies(now=late_at + STABLE) == (STUDY,)
    # Only one job per study runs at a time, so v2 waits for v1's results.
    assert queue.lease("w2", now=late_at + STABLE) is None
    queue.complete(v1, [result(1), result(1, "sc")], [PACS], now=late_at + STABLE)
    v2 = queue.lease("w2", now=late_at + STABLE + 1)
    assert v2 is not None
    assert v2.version == 2
    assert {i.sop_instance_uid for i in v2.instances} == {"1.2.3.4.1", "1.2.3.4.2"}
    assert {(p.kind, p.sop_instance_uid) for p in v2.predecessors} == {
        ("sr", "9.9.1.1"),
        ("sc", "9.9.1.2"),
    }


def test_instance_arriving_before_the_lease_joins_the_queued_job(db: StateDB) -> None:
    queue = make_queue(db)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    db.record_instance(instance("1.2.3.4.2"), now=T0 + STABLE + 1)
    # Not leasable while the study is receiving again.
    assert queue.lease("w1", now=T0 + STABLE + 2) is None
    job = queue.lease("w1", now=T0 + 2 * STABLE + 1)
    assert job is not None and len(job.instances) == 2
    assert queue.enqueue_stable_studies(now=T0 + 100) == ()


def test_states_survive_closing_and_reopening(db_path: Path) -> None:
    with StateDB(db_path) as db:
        queue = make_queue(db)
        db.record_instance(instance("1.2.3.4.1"), now=T0)
        db.record_instance(instance("5.6.7.1", study="5.6.7"), now=T0)
        queue.enqueue_stable_studies(now=T0 + STABLE)
        leased = queue.lease("w1", now=T0 + STABLE)
        assert leased is not None
        queue.complete(leased, [result(1)], [PACS, ARCHIVE], now=T0 + 11)
        leased2 = queue.lease("w1", now=T0 + 12)
        assert leased2 is not None
        before = (db.queue_depth(), db.recent_studies())
    with StateDB(db_path) as db:
        queue = make_queue(db)
        assert (db.queue_depth(), db.recent_studies()) == before
        assert before[0].leased == 1 and before[0].deliveries_pending == 2
        assert queue.lease("w2", now=T0 + 13) is None
        again = queue.lease("w2", now=leased2.lease_expires_at)
        assert again is not None and again.job_id == leased2.job_id and again.attempt == 2
        assert {d.destination for d in queue.claim_deliveries(30, now=T0 + 13)} == {PACS, ARCHIVE}


def completed_job(db: StateDB, destinations: list[Destination]) -> tuple[SqliteJobQueue, int]:
    queue = make_queue(db)
    db.record_instance(instance("1.2.3.4.1"), now=T0)
    queue.enqueue_stable_studies(now=T0 + STABLE)
    job = queue.lease("w1", now=T0 + STABLE)
    assert job is not None
    queue.complete(job, [result(1), result(1, "sc")], destinations, now=T0 + STABLE)
    return queue, job.job_id


def test_job_without_destinations_is_delivered(db: StateDB) -> None:
    queue, job_id = completed_job(db, [])
    assert queue.job_state(job_id) == (JobState.DELIVERED, None)


def test_delivery_backs_off_exponentially_then_succeeds(db: StateDB) -> None:
    queue, job_id = completed_job(db, [PACS])
    now = T0 + STABLE
    (delivery,) = queue.claim_deliveries(claim_seconds=300, now=now)
    assert delivery.state is DeliveryState.PENDING
    assert set(delivery.files) == {Path("/state/results/sr1.dcm"), Path("/state/results/sc1.dcm")}
    assert queue.claim_deliveries(claim_seconds=300, now=now + 299) == ()
    waits = []
    for _ in range(4):
        d = queue.record_delivery_attempt(
            delivery.delivery_id, DeliveryOutcome.TRANSIENT_FAILURE, "connection refused", now=now
        )
        waits.append(d.next_attempt_at - now)
        now = d.next_attempt_at
    assert waits == [30.0, 60.0, 120.0, 120.0]
    assert d.attempts == 4 and d.last_error == "connection refused"
    assert queue.job_state(job_id)[0] is JobState.RESULTS_WRITTEN
    d = queue.record_delivery_attempt(delivery.delivery_id, DeliveryOutcome.DELIVERED, now=now)
    assert (d.state, d.attempts, d.last_error) == (DeliveryState.DELIVERED, 5, None)
    assert queue.job_state(job_id) == (JobState.DELIVERED, None)
    with pytest.raises(ValueError, match="already delivered"):
        queue.record_delivery_attempt(delivery.delivery_id, DeliveryOutcome.DELIVERED, now=now)


def test_delivery_gives_up_after_the_window_and_retry_resends(db: StateDB) -> None:
    queue, job_id = completed_job(db, [PACS, ARCHIVE])
    pacs, archive = sorted(queue.claim_deliveries(60, now=T0 + STABLE), key=lambda d: d.delivery_id)
    queue.record_delivery_attempt(archive.delivery_id, DeliveryOutcome.DELIVERED, now=T0 + 11)
    late = T0 + STABLE + DELIVERY.give_up_after_seconds
    d = queue.record_delivery_attempt(
        pacs.delivery_id, DeliveryOutcome.TRANSIENT_FAILURE, "association rejected", now=late
    )
    assert d.state is DeliveryState.FAILED
    assert d.last_error == "gave up after 1 attempts: association rejected"
    state, reason = queue.job_state(job_id)
    assert state is JobState.FAILED
    assert (
        reason == f"delivery to {PACS.key} failed: gave up after 1 attempts: association rejected"
    )
    assert queue.depth().deliveries_failed == 1
    assert queue.retry(now=late + 1) == 1
    assert queue.job_state(job_id) == (JobState.RESULTS_WRITTEN, None)
    (again,) = queue.claim_deliveries(60, now=late + 1)
    assert (again.destination, again.attempts) == (PACS, 0)
    queue.record_delivery_attempt(
        again.delivery_id,
        DeliveryOutcome.PERMANENT_FAILURE,
        "0xA700 out of resources",
        now=late + 2,
    )
    assert queue.job_state(job_id)[0] is JobState.FAILED


def test_failure_outcomes_need_a_reason(db: StateDB) -> None:
    queue, _ = completed_job(db, [PACS])
    (d,) = queue.claim_deliveries(60, now=T0 + STABLE)
    with pytest.raises(ValueError, match="needs an error message"):
        queue.record_delivery_attempt(d.delivery_id, DeliveryOutcome.PERMANENT_FAILURE, now=T0 + 11)


# -- storage: durable, deduplicated instance files ---------------------------------------------

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "dicom-samples"


def header(sop: str = "1.2.3.4.5") -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        sop_instance_uid=sop,
        study_instance_uid=STUDY,
        series_instance_uid=STUDY + ".1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def test_store_is_byte_identical_and_deduplicates(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state").create()
    src = SAMPLE / "CR_cspine_16x16_dicomdir6154.dcm"
    with layout.open_db() as db:
        store = InstanceStore(layout, db)
        first = store.store(src, header(), "MODALITY", now=T0)
        assert first.outcome is StoreOutcome.NEW
        assert first.instance.path.read_bytes() == src.read_bytes()
        assert first.instance.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
        assert first.instance.size == src.stat().st_size
        again = store.store(src, header(), "MODALITY", now=T0 + 1)
        assert (again.outcome, again.instance) == (StoreOutcome.DUPLICATE, first.instance)
        queue = make_queue(db)
        assert queue.enqueue_stable_studies(now=T0 + STABLE) == (STUDY,)
        assert queue.lease("w1", now=T0 + STABLE) is not None
        # Different bytes under the same SOP Instance UID: replaced, one row, study runs again.
        other = SAMPLE / "DX_highdicom_small.dcm"
        replaced = store.store(other, header(), "MODALITY", now=T0 + 20)
        assert replaced.outcome is StoreOutcome.REPLACED
        assert replaced.instance.path == first.instance.path
        assert replaced.instance.path.read_bytes() == other.read_bytes()
        assert db.instances_of(STUDY) == (replaced.instance,)
        assert db.recent_studies()[0].state is StudyState.RECEIVING
        assert queue.enqueue_stable_studies(now=T0 + 20 + STABLE) == (STUDY,)
        assert list(layout.tmp_dir.iterdir()) == []


def test_store_with_move_takes_the_received_file_itself(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state").create()
    original = SAMPLE / "CR_cspine_16x16_dicomdir6154.dcm"
    spooled = layout.spool_dir / "received.dcm"
    shutil.copyfile(original, spooled)
    inode = spooled.stat().st_ino
    with layout.open_db() as db:
        stored = InstanceStore(layout, db).store(spooled, header(), "MODALITY", move=True)
        assert stored.outcome is StoreOutcome.NEW
        assert not spooled.exists()
        assert stored.instance.path.stat().st_ino == inode  # renamed, not written again
        assert stored.instance.path.read_bytes() == original.read_bytes()
        assert stored.instance.sha256 == ""  # not read back to hash it: the worker hashes
        assert stored.instance.size == original.stat().st_size
        # the same content again: a duplicate, and the received copy is removed too
        shutil.copyfile(original, spooled)
        again = InstanceStore(layout, db).store(spooled, header(), "MODALITY", move=True)
        assert again.outcome is StoreOutcome.DUPLICATE and not spooled.exists()
    assert list(layout.tmp_dir.iterdir()) == []


def test_move_durably_copies_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    src = shm / f"move-durably-{os.getpid()}.dcm"
    src.write_bytes(b"DICM" * 1000)
    try:
        size, sha256 = move_durably(src, tmp_path / "dst.dcm")
        assert (size, sha256) == (4000, hashlib.sha256(b"DICM" * 1000).hexdigest())
        assert (tmp_path / "dst.dcm").read_bytes() == b"DICM" * 1000
        assert src.exists()  # copied, the source left to its owner
    finally:
        src.unlink(missing_ok=True)


@pytest.mark.parametrize("bad", ["../1.2", "1.2/3", "", "1..2", "1.2.", "x" * 3, "1." * 40 + "1"])
def test_instance_paths_refuse_unsafe_uids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid UID"):
        StateLayout(tmp_path).instance_path(STUDY, bad)


def test_clear_tmp_removes_partial_writes_only(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state").create()
    (layout.tmp_dir / "crashed.part").write_bytes(b"partial")
    (layout.tmp_dir / "folder").mkdir()
    kept = layout.instances_dir / "1.2" / "1.2.3.dcm"
    kept.parent.mkdir()
    kept.write_bytes(b"instance")
    layout.create()
    assert len(list(layout.tmp_dir.iterdir())) == 2
    layout.clear_tmp()
    assert list(layout.tmp_dir.iterdir()) == []
    assert kept.read_bytes() == b"instance"


def test_open_queue_is_the_sqlite_queue_of_the_config(db: StateDB, tmp_path: Path) -> None:
    config = parse_config(
        {"node": {"state_dir": "s"}, "study": {"stable_seconds": 3}, "queue": {"max_attempts": 5}},
        tmp_path,
    )
    queue = open_queue(db, config)
    assert isinstance(queue, SqliteJobQueue)
    assert (queue.stable_seconds, queue.max_attempts) == (3.0, 5)


def test_clear_spool_touches_only_the_receiving_processes_folders(tmp_path: Path) -> None:
    """spool/<n> belongs to receiving process n; under the systemd units the spool is also the
    worker's $TMPDIR, so its temporary files there are left alone."""
    layout = StateLayout(tmp_path / "state").create()
    mine = [layout.receiver_spool(n) / f"tmp{n}.dcm" for n in (0, 1)]
    worker_temp = layout.spool_dir / "dicomnode-warm-up-x" / "view.dcm"
    loose = layout.spool_dir / "tmpworker.bin"
    for path in (*mine, worker_temp, loose):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert layout.clear_spool(1) == 1 and mine[0].exists() and not mine[1].exists()
    assert layout.clear_spool() == 1 and not mine[0].exists()
    assert worker_temp.exists() and loose.exists()
    assert layout.spooled_files() == sorted([worker_temp, loose])
