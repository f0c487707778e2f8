"""The node's durable state: received instances, studies, jobs, results and deliveries.

One SQLite database (``state.sqlite`` in the state directory) in WAL mode with
``synchronous=FULL``, so a committed row survives a crash or power loss and the listener, the
worker and ``dicomnode status`` can use it from separate processes at once. Every write is one
``BEGIN IMMEDIATE`` transaction. Times are seconds since the epoch (``time.time()``), passed in as
``now`` so tests and callers control the clock.

Study assembly: each new or changed instance bumps its study's ``revision`` and
``last_received_at``. A study is ready when nothing arrived for ``stable_seconds`` and its revision
is newer than the one its newest job covers; it then gets a job with the next ``version``. An
instance arriving after a job was leased therefore makes the study run again as version + 1, and
that job's ``predecessors`` name the result files the new results replace. A job attempt that
fails with a retryable error is queued again with ``not_before`` set by the exponential back-off
of ``[queue]`` (``RetryPolicy.backoff``, the formula deliveries use too), so a study whose
inference keeps crashing does not spin the worker; ``dicomnode status`` shows when it is due.

The layout has a version (SQLite ``user_version``, :data:`SCHEMA_VERSION`); a database written by
an older version is upgraded in place when opened.

The roles use the queue through :class:`dicomnode.queue.protocol.JobQueue` (re-exported here);
:class:`SqliteJobQueue` is its implementation on this database. With ``queue.backend =
"rabbitmq"`` the site keeps this queue and its dispatcher leases ready jobs to the worker pool
under the owner ``broker`` (:mod:`dicomnode.queue.remote`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Config, DeliveryConfig, QueueBackend, RetryPolicy
from dicomnode.queue.protocol import JobQueue, LeaseLostError
from dicomnode.records import (
    Delivery,
    DeliveryOutcome,
    DeliveryState,
    Destination,
    JobState,
    QueueDepth,
    ResultFile,
    StoredInstance,
    StudyJob,
    StudyState,
    StudyStatus,
)

#: Version of the database layout (SQLite ``user_version``). Older state databases are
#: upgraded in place by :data:`_MIGRATIONS` when opened; newer ones are refused.
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    revision INTEGER NOT NULL,
    queued_revision INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at REAL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    not_before REAL,
    note TEXT,
    UNIQUE (study_uid, version)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE TABLE IF NOT EXISTS results (
    job_id INTEGER NOT NULL REFERENCES jobs(job_id),
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(job_id),
    dest_ae TEXT NOT NULL,
    dest_host TEXT NOT NULL,
    dest_port INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (job_id, dest_ae, dest_host, dest_port)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
"""

#: Statements that upgrade a state database from version ``v`` (the key) to ``v + 1``.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: a queued job may wait (back-off after a retryable failure) until ``not_before``.
    1: ("ALTER TABLE jobs ADD COLUMN not_before REAL",),
    # 3: what an analysed job left out (views skipped, with their reasons), for ``status``.
    2: ("ALTER TABLE jobs ADD COLUMN note TEXT",),
}


_IDLE_STUDIES = """
SELECT s.study_uid FROM studies s
WHERE s.last_received_at < :cutoff AND s.revision = s.queued_revision {only}
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid
                  AND (j.state NOT IN ('delivered', 'failed') OR j.updated_at >= :cutoff))
  AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON d.job_id = j.job_id
                  WHERE j.study_uid = s.study_uid
                  AND (d.state = 'pending' OR d.updated_at >= :cutoff))
ORDER BY s.last_received_at
"""
"""Studies with nothing left to do and no activity since ``:cutoff``: every revision queued,
every job and delivery delivered or failed, nothing received, run or sent since then."""


OPEN_TIMEOUT_SECONDS = 30.0
"""How long opening the database or a write waits for another connection's lock."""


def _enable_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """Switch the database to WAL mode, retrying while another connection holds it.

    Converting a new database to WAL takes an exclusive lock, and SQLite answers "database is
    locked" at once, without its busy handler, when another connection is converting or creating
    the same file (the listener and sender threads of ``serve`` open it together at start).
    """
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class StateDB:
    """The SQLite connection, schema, instance and study rows, and status queries.

    Thread-safe: one connection guarded by a lock (pynetdicom runs each association in its own
    thread). Several processes may open the same file; SQLite's locking serialises writers.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=OPEN_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        try:
            _enable_wal(self._conn, deadline=time.monotonic() + OPEN_TIMEOUT_SECONDS)
        except sqlite3.Error:
            self._conn.close()
            raise
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        found = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if not 0 <= found <= SCHEMA_VERSION:
            self._conn.close()
            raise ValueError(
                f"{self.path}: state schema version {found} is newer than this node's "
                f"{SCHEMA_VERSION} (written by a newer version of dicomnode)"
            )
        if found == 0:
            self._conn.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
        elif found < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Upgrade an older state database in place, in one transaction.

        The version is read again under the write lock: another role opening the same database
        at the same moment may have upgraded it already.
        """
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(
        self, sql: str, params: Sequence[object] | dict[str, object] = ()
    ) -> list[sqlite3.Row]:
        """Run a read-only query and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- instances and studies ---------------------------------------------------------------

    def instance(self, sop_instance_uid: str) -> StoredInstance | None:
        """The stored instance with this SOP Instance UID, if any."""
        rows = self.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return _instance(rows[0]) if rows else None

    def instances_of(self, study_uid: str) -> tuple[StoredInstance, ...]:
        """Every stored instance of a study, oldest first."""
        rows = self.query(
            "SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at, sop_instance_uid",
            (study_uid,),
        )
        return tuple(_instance(r) for r in rows)

    def record_instance(self, inst: StoredInstance, now: float | None = None) -> None:
        """Insert or replace the row of ``inst`` and mark its study as changed.

        One row per SOP Instance UID: a replacement (same UID, new content) overwrites the row.
        The caller skips identical re-sends so they do not make the study run again.
        """
        now = time.time() if now is None else now
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_instance_uid) DO UPDATE SET study_uid = excluded.study_uid, "
                "series_uid = excluded.series_uid, sop_class_uid = excluded.sop_class_uid, "
                "transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path, "
                "size = excluded.size, sha256 = excluded.sha256, "
                "calling_ae = excluded.calling_ae, received_at = excluded.received_at",
                (
                    inst.sop_instance_uid,
                    inst.study_instance_uid,
                    inst.series_instance_uid,
                    inst.sop_class_uid,
                    inst.transfer_syntax_uid,
                    str(inst.path),
                    inst.size,
                    inst.sha256,
                    inst.calling_ae,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO studies (study_uid, first_received_at, last_received_at, revision) "
                "VALUES (?, ?, ?, 1) ON CONFLICT (study_uid) DO UPDATE SET "
                "last_received_at = excluded.last_received_at, revision = revision + 1",
                (inst.study_instance_uid, now, now),
            )

    def idle_studies(self, cutoff: float) -> tuple[str, ...]:
        """Studies retention may remove: finished, and no activity since ``cutoff``."""
        rows = self.query(_IDLE_STUDIES.format(only=""), {"cutoff": cutoff})
        return tuple(str(r[0]) for r in rows)

    def forget_study(self, study_uid: str, cutoff: float) -> bool:
        """Delete every row of ``study_uid`` if it is still idle since ``cutoff`` (checked again
        in the same transaction); False if it is not (e.g. an instance arrived meanwhile)."""
        with self.transaction() as conn:
            params = {"cutoff": cutoff, "study": study_uid}
            sql = _IDLE_STUDIES.format(only="AND s.study_uid = :study")
            if not conn.execute(sql, params).fetchall():
                return False
            jobs = "SELECT job_id FROM jobs WHERE study_uid = :study"
            conn.execute(f"DELETE FROM deliveries WHERE job_id IN ({jobs})", params)
            conn.execute(f"DELETE FROM results WHERE job_id IN ({jobs})", params)
            for table in ("jobs", "instances", "studies"):
                conn.execute(f"DELETE FROM {table} WHERE study_uid = :study", params)
        return True

    # -- status ------------------------------------------------------------------------------

    def queue_depth(self) -> QueueDepth:
        """Job counts per state and delivery counts, for ``dicomnode status``."""
        jobs = self._counts("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        deliveries = self._counts("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        return QueueDepth(
            queued=jobs.get(JobState.QUEUED, 0),
            leased=jobs.get(JobState.LEASED, 0),
            results_written=jobs.get(JobState.RESULTS_WRITTEN, 0),
            delivered=jobs.get(JobState.DELIVERED, 0),
            failed=jobs.get(JobState.FAILED, 0),
            deliveries_pending=deliveries.get(DeliveryState.PENDING, 0),
            deliveries_failed=deliveries.get(DeliveryState.FAILED, 0),
        )

    def _counts(self, sql: str) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self.query(sql)}

    def recent_studies(self, limit: int = 20) -> tuple[StudyStatus, ...]:
        """The ``limit`` most recently received studies with their state, newest first."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        rows = self.query(
            "SELECT s.study_uid, s.last_received_at, s.revision, s.queued_revision, "
            "(SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid) AS n, "
            "j.state, j.version, j.last_error, j.not_before, j.note "
            "FROM studies s LEFT JOIN jobs j ON j.job_id = "
            "(SELECT MAX(job_id) FROM jobs WHERE study_uid = s.study_uid) "
            "ORDER BY s.last_received_at DESC, s.study_uid LIMIT ?",
            (limit,),
        )
        return tuple(_study_status(r) for r in rows)

    def recent_deliveries(self, limit: int = 20) -> tuple[Delivery, ...]:
        """Up to ``limit`` deliveries for ``dicomnode status``: pending ones first (with their
        attempts, next attempt and last error), then failed, then delivered; newest first."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        with self._lock:
            ids = [
                r[0]
                for r in self._conn.execute(
                    "SELECT delivery_id FROM deliveries ORDER BY CASE state WHEN ? THEN 0 "
                    "WHEN ? THEN 1 ELSE 2 END, updated_at DESC, delivery_id DESC LIMIT ?",
                    (DeliveryState.PENDING, DeliveryState.FAILED, limit),
                )
            ]
            return tuple(_delivery(self._conn, i) for i in ids)

    def destination_summaries(self) -> tuple[DestinationSummary, ...]:
        """Deliveries per destination (every destination that has any), for the metrics and
        the readiness checks: counts by state, the back-off step and the latest outcome."""
        counts = self.query(
            "SELECT dest_ae, dest_host, dest_port, SUM(state = :pending), "
            "SUM(state = :delivered), SUM(state = :failed), "
            "MAX(CASE WHEN state = :pending THEN attempts ELSE 0 END) "
            "FROM deliveries GROUP BY dest_ae, dest_host, dest_port",
            {
                "pending": DeliveryState.PENDING.value,
                "delivered": DeliveryState.DELIVERED.value,
                "failed": DeliveryState.FAILED.value,
            },
        )
        latest = {
            Destination(r[0], r[1], r[2]).key: r
            for r in self.query(
                "SELECT dest_ae, dest_host, dest_port, state, updated_at, last_error FROM "
                "(SELECT *, ROW_NUMBER() OVER (PARTITION BY dest_ae, dest_host, dest_port "
                "ORDER BY updated_at DESC, delivery_id DESC) AS n FROM deliveries "
                "WHERE attempts > 0) WHERE n = 1"
            )
        }
        summaries = []
        for r in counts:
            key = Destination(r[0], r[1], r[2]).key
            last = latest.get(key)
            summaries.append(
                DestinationSummary(
                    destination=key,
                    pending=int(r[3]),
                    delivered=int(r[4]),
                    failed=int(r[5]),
                    retrying_attempts=int(r[6]),
                    last_state=None if last is None else DeliveryState(last[3]),
                    last_at=None if last is None else float(last[4]),
                    last_error=None if last is None else last[5],
                )
            )
        return tuple(sorted(summaries, key=lambda s: s.destination))


@dataclass(frozen=True)
class DestinationSummary:
    """The deliveries to one destination (``Destination.key``), as the state database has them.

    ``retrying_attempts``: the most attempts among its pending deliveries (0: none has failed
    yet), the step of the back-off it waits out now. ``last_state``: the state of the delivery
    attempted most recently (``delivered``; ``failed``, or ``pending`` after a failed attempt
    that will be retried); None when no delivery to it was attempted yet. ``last_at`` and
    ``last_error`` belong to that delivery."""

    destination: str
    pending: int
    delivered: int
    failed: int
    retrying_attempts: int
    last_state: DeliveryState | None
    last_at: float | None
    last_error: str | None

    @property
    def last_failed(self) -> bool:
        """The latest attempt to this destination did not deliver."""
        return self.last_state is not None and self.last_state is not DeliveryState.DELIVERED


def _study_status(row: sqlite3.Row) -> StudyStatus:
    pending = row["revision"] > row["queued_revision"] and row["state"] != JobState.QUEUED
    state = StudyState.RECEIVING if row["state"] is None or pending else StudyState(row["state"])
    return StudyStatus(
        study_instance_uid=row["study_uid"],
        state=state,
        instance_count=row["n"],
        last_received_at=row["last_received_at"],
        version=row["version"] or 0,
        last_error=row["last_error"],
        next_attempt_at=row["not_before"] if state is StudyState.QUEUED else None,
        note=row["note"],
    )


def _instance(row: sqlite3.Row) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        study_instance_uid=row["study_uid"],
        series_instance_uid=row["series_uid"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
        path=Path(row["path"]),
        size=row["size"],
        sha256=row["sha256"],
        calling_ae=row["calling_ae"],
    )


def _result(row: sqlite3.Row) -> ResultFile:
    return ResultFile(
        kind=row["kind"],
        sop_class_uid=row["sop_class_uid"],
        series_instance_uid=row["series_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        path=Path(row["path"]),
    )


class SqliteJobQueue:
    """:class:`JobQueue` on the node's SQLite state database."""

    def __init__(
        self,
        db: StateDB,
        *,
        stable_seconds: float,
        lease_seconds: float,
        max_attempts: int,
        delivery: DeliveryConfig,
        job_retry: RetryPolicy,
    ) -> None:
        """``job_retry``: how long a job waits after an attempt failed with a retryable error
        (``[queue]``); ``delivery``: the deliveries' back-off and give-up window."""
        if stable_seconds <= 0 or lease_seconds <= 0 or max_attempts < 1:
            raise ValueError(
                "stable_seconds and lease_seconds must be > 0 and max_attempts >= 1, got "
                f"{stable_seconds}, {lease_seconds}, {max_attempts}"
            )
        self.db = db
        self.stable_seconds = stable_seconds
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.delivery = delivery
        self.job_retry = job_retry

    @classmethod
    def from_config(cls, db: StateDB, config: Config) -> SqliteJobQueue:
        """The queue with the ``[study]``, ``[queue]`` and ``[delivery]`` settings of ``config``."""
        return cls(
            db,
            stable_seconds=config.study.stable_seconds,
            lease_seconds=config.queue.lease_seconds,
            max_attempts=config.queue.max_attempts,
            delivery=config.delivery,
            job_retry=config.queue,
        )

    # -- jobs --------------------------------------------------------------------------------

    def enqueue_stable_studies(self, now: float | None = None) -> tuple[str, ...]:
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            ready = [
                r[0]
                for r in conn.execute(
                    "SELECT study_uid FROM studies s WHERE revision > queued_revision "
                    "AND last_received_at <= ? AND NOT EXISTS (SELECT 1 FROM jobs j "
                    "WHERE j.study_uid = s.study_uid AND j.state = ?) ORDER BY last_received_at",
                    (now - self.stable_seconds, JobState.QUEUED),
                )
            ]
            for study_uid in ready:
                conn.execute(
                    "INSERT INTO jobs (study_uid, version, state, created_at, updated_at) "
                    "SELECT ?, COALESCE(MAX(version), 0) + 1, ?, ?, ? FROM jobs "
                    "WHERE study_uid = ?",
                    (study_uid, JobState.QUEUED, now, now, study_uid),
                )
                conn.execute(
                    "UPDATE studies SET queued_revision = revision WHERE study_uid = ?",
                    (study_uid,),
                )
        return tuple(ready)

    def next_stable_at(self) -> float | None:
        """When the next study :meth:`enqueue_stable_studies` would queue becomes stable (epoch
        seconds; past when it is stable now), or None when there is none: the listener wakes up
        then to queue it."""
        row = self.db.query(
            "SELECT MIN(last_received_at) FROM studies s WHERE revision > queued_revision "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid "
            "AND j.state = ?)",
            (JobState.QUEUED,),
        )
        first = row[0][0] if row else None
        return None if first is None else float(first) + self.stable_seconds

    def _return_expired(self, conn: sqlite3.Connection, now: float) -> None:
        expired = conn.execute(
            "SELECT job_id, attempt FROM jobs WHERE state = ? AND lease_expires_at <= ?",
            (JobState.LEASED, now),
        ).fetchall()
        for job_id, attempt in expired:
            final = attempt >= self.max_attempts
            reason = f"lease expired in attempt {attempt} (worker stopped or too slow)"
            _set_job_state(conn, job_id, JobState.FAILED if final else JobState.QUEUED, reason, now)

    def lease(self, owner: str, now: float | None = None) -> StudyJob | None:
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            self._return_expired(conn, now)
            row = conn.execute(
                "SELECT j.job_id FROM jobs j JOIN studies s ON s.study_uid = j.study_uid "
                "WHERE j.state = ? AND s.last_received_at <= ? AND NOT EXISTS (SELECT 1 FROM "
                "jobs o WHERE o.study_uid = j.study_uid AND o.state = ?) "
                "AND (j.not_before IS NULL OR j.not_before <= ?) ORDER BY j.job_id LIMIT 1",
                (JobState.QUEUED, now - self.stable_seconds, JobState.LEASED, now),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = ?, attempt = attempt + 1, lease_owner = ?, "
                "lease_expires_at = ?, updated_at = ?, not_before = NULL WHERE job_id = ?",
                (JobState.LEASED, owner, now + self.lease_seconds, now, row[0]),
            )
            conn.execute(
                "UPDATE studies SET queued_revision = revision WHERE study_uid = "
                "(SELECT study_uid FROM jobs WHERE job_id = ?)",
                (row[0],),
            )
            return _study_job(conn, row[0])

    def _held(self, conn: sqlite3.Connection, job: StudyJob, now: float) -> None:
        row = conn.execute(
            "SELECT state, lease_owner, lease_expires_at, attempt FROM jobs WHERE job_id = ?",
            (job.job_id,),
        ).fetchone()
        held = (
            row is not None
            and row["state"] == JobState.LEASED
            and row["lease_owner"] == job.lease_owner
            and row["attempt"] == job.attempt
            and row["lease_expires_at"] > now
        )
        if not held:
            raise LeaseLostError(f"job {job.job_id} is no longer leased by {job.lease_owner!r}")

    def held_job(
        self, job_id: int, attempt: int, owner: str, now: float | None = None
    ) -> StudyJob | None:
        """Job ``job_id`` if ``owner`` holds its lease in ``attempt`` now, else None (answered
        or given up meanwhile, published again as a later attempt, or the lease ran out)."""
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT 1 FROM jobs WHERE job_id = ? AND state = ? AND lease_owner = ? "
                "AND attempt = ? AND lease_expires_at > ?",
                (job_id, JobState.LEASED, owner, attempt, now),
            ).fetchone()
            return None if row is None else _study_job(conn, job_id)

    def release(self, job: StudyJob, now: float | None = None) -> bool:
        """Give a held job back to the queue as if it had not been leased (its attempt is not
        counted): the site's dispatcher, when publishing it to the broker failed. True if it
        was still held."""
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            try:
                self._held(conn, job, now)
            except LeaseLostError:
                return False
            conn.execute(
                "UPDATE jobs SET attempt = attempt - 1 WHERE job_id = ?", (job.job_id,)
            )
            _set_job_state(conn, job.job_id, JobState.QUEUED, None, now)
            return True

    def renew(self, job: StudyJob, now: float | None = None) -> StudyJob:
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            self._held(conn, job, now)
            conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE job_id = ?",
                (now + self.lease_seconds, now, job.job_id),
            )
            return _study_job(conn, job.job_id)

    def complete(
        self,
        job: StudyJob,
        results: Sequence[ResultFile],
        destinations: Sequence[Destination],
        now: float | None = None,
        note: str | None = None,
    ) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            self._held(conn, job, now)
            conn.execute("UPDATE jobs SET note = ? WHERE job_id = ?", (note, job.job_id))
            conn.executemany(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        job.job_id,
                        r.kind,
                        r.sop_class_uid,
                        r.series_instance_uid,
                        r.sop_instance_uid,
                        str(r.path),
                    )
                    for r in results
                ],
            )
            conn.executemany(
                "INSERT INTO deliveries (job_id, dest_ae, dest_host, dest_port, state, "
                "next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (job.job_id, d.ae_title, d.host, d.port, DeliveryState.PENDING, now, now, now)
                    for d in destinations
                ],
            )
            state = JobState.RESULTS_WRITTEN if destinations else JobState.DELIVERED
            _set_job_state(conn, job.job_id, state, None, now)

    def fail(
        self, job: StudyJob, reason: str, *, retryable: bool, now: float | None = None
    ) -> JobState:
        """Record a failed attempt: a retryable one goes back to the queue, to be leased again
        only after the back-off (``job_retry.backoff(attempt)``), until ``max_attempts``."""
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            self._held(conn, job, now)
            again = retryable and job.attempt < self.max_attempts
            state = JobState.QUEUED if again else JobState.FAILED
            _set_job_state(conn, job.job_id, state, reason, now)
            if again:
                conn.execute(
                    "UPDATE jobs SET not_before = ? WHERE job_id = ?",
                    (now + self.job_retry.backoff(job.attempt), job.job_id),
                )
            return state

    def retry(self, study_uid: str | None = None, now: float | None = None) -> int:
        """Re-queue failed jobs: re-run those without results, re-send those with results.

        A job that failed before writing results goes back to ``queued`` with its attempts
        reset. A job whose results exist but whose delivery failed keeps its results; its failed
        deliveries go back to ``pending``, due now, with a fresh give-up window.
        """
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            sql, params = "SELECT job_id FROM jobs WHERE state = ?", [JobState.FAILED.value]
            if study_uid is not None:
                sql, params = sql + " AND study_uid = ?", [*params, study_uid]
            failed = [r[0] for r in conn.execute(sql, params)]
            for job_id in failed:
                has_results = conn.execute(
                    "SELECT 1 FROM results WHERE job_id = ? LIMIT 1", (job_id,)
                ).fetchone()
                if has_results:
                    conn.execute(
                        "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ?, "
                        "created_at = ?, updated_at = ? WHERE job_id = ? AND state = ?",
                        (DeliveryState.PENDING, now, now, now, job_id, DeliveryState.FAILED),
                    )
                    _set_job_state(conn, job_id, JobState.RESULTS_WRITTEN, None, now)
                else:
                    conn.execute(
                        "UPDATE jobs SET attempt = 0, not_before = NULL WHERE job_id = ?",
                        (job_id,),
                    )
                    _set_job_state(conn, job_id, JobState.QUEUED, None, now)
        return len(failed)

    def depth(self) -> QueueDepth:
        return self.db.queue_depth()

    def job_state(self, job_id: int) -> tuple[JobState, str | None]:
        """A job's state and last error (for status and tests)."""
        rows = self.db.query("SELECT state, last_error FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            raise ValueError(f"no job {job_id}")
        return JobState(rows[0]["state"]), rows[0]["last_error"]

    # -- deliveries --------------------------------------------------------------------------

    def claim_deliveries(
        self, claim_seconds: float, limit: int = 16, now: float | None = None
    ) -> tuple[Delivery, ...]:
        """Take up to ``limit`` due pending deliveries.

        A claim pushes ``next_attempt_at`` ``claim_seconds`` ahead instead of adding a state, so
        a sender that dies mid-send leaves the delivery due again once the claim runs out.
        """
        now = time.time() if now is None else now
        if claim_seconds <= 0 or limit < 1:
            raise ValueError(f"claim_seconds must be > 0 and limit >= 1: {claim_seconds}, {limit}")
        with self.db.transaction() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT delivery_id FROM deliveries WHERE state = ? AND next_attempt_at <= ? "
                    "ORDER BY next_attempt_at, delivery_id LIMIT ?",
                    (DeliveryState.PENDING, now, limit),
                )
            ]
            conn.executemany(
                "UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE delivery_id = ?",
                [(now + claim_seconds, now, i) for i in ids],
            )
            return tuple(_delivery(conn, i) for i in ids)

    def extend_claim(
        self, delivery: Delivery, claim_seconds: float, now: float | None = None
    ) -> bool:
        """Push a claimed delivery's ``next_attempt_at`` ``claim_seconds`` ahead of ``now``.

        Only while it is still pending with the attempt count it was claimed with: once the
        sender recorded its attempt (and, for a retry, its back-off), the claim is over.
        """
        now = time.time() if now is None else now
        if claim_seconds <= 0:
            raise ValueError(f"claim_seconds must be > 0: {claim_seconds}")
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE deliveries SET next_attempt_at = ?, updated_at = ? "
                "WHERE delivery_id = ? AND state = ? AND attempts = ?",
                (
                    now + claim_seconds,
                    now,
                    delivery.delivery_id,
                    DeliveryState.PENDING,
                    delivery.attempts,
                ),
            )
            return cursor.rowcount == 1

    def record_delivery_attempt(
        self,
        delivery_id: int,
        outcome: DeliveryOutcome,
        error: str | None = None,
        now: float | None = None,
    ) -> Delivery:
        """Record one attempt; transient failures back off, then give up after the window.

        When the job's last pending delivery settles, the job becomes ``delivered`` (all
        delivered) or ``failed`` (with the first failed destination's reason).
        """
        now = time.time() if now is None else now
        if outcome is not DeliveryOutcome.DELIVERED and not error:
            raise ValueError(f"a {outcome} needs an error message")
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT job_id, attempts, created_at, state FROM deliveries WHERE delivery_id = ?",
                (delivery_id,),
            ).fetchone()
            if row is None:
                raise ValueError(f"no delivery {delivery_id}")
            if row["state"] != DeliveryState.PENDING:
                raise ValueError(f"delivery {delivery_id} is already {row['state']}")
            attempts = row["attempts"] + 1
            state, next_at, message = self._next_delivery_step(
                outcome, attempts, now - row["created_at"], now, error
            )
            conn.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, "
                "last_error = ?, updated_at = ? WHERE delivery_id = ?",
                (state, attempts, next_at, message, now, delivery_id),
            )
            _settle_job(conn, row["job_id"], now)
            return _delivery(conn, delivery_id)

    def _next_delivery_step(
        self, outcome: DeliveryOutcome, attempts: int, age: float, now: float, error: str | None
    ) -> tuple[DeliveryState, float, str | None]:
        if outcome is DeliveryOutcome.DELIVERED:
            return DeliveryState.DELIVERED, now, None
        if outcome is DeliveryOutcome.PERMANENT_FAILURE:
            return DeliveryState.FAILED, now, error
        if age >= self.delivery.give_up_after_seconds:
            return DeliveryState.FAILED, now, f"gave up after {attempts} attempts: {error}"
        return DeliveryState.PENDING, now + self.delivery.backoff(attempts), error


def _set_job_state(
    conn: sqlite3.Connection, job_id: int, state: JobState, error: str | None, now: float
) -> None:
    """Move a job to ``state``; leaving ``leased`` clears the lease."""
    conn.execute(
        "UPDATE jobs SET state = ?, last_error = ?, updated_at = ?, "
        "lease_owner = CASE WHEN ? = 'leased' THEN lease_owner END, "
        "lease_expires_at = CASE WHEN ? = 'leased' THEN lease_expires_at END WHERE job_id = ?",
        (state, error, now, state, state, job_id),
    )


def _settle_job(conn: sqlite3.Connection, job_id: int, now: float) -> None:
    states = [
        r[0] for r in conn.execute("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))
    ]
    if DeliveryState.PENDING in states:
        return
    failed = conn.execute(
        "SELECT dest_ae, dest_host, dest_port, last_error FROM deliveries "
        "WHERE job_id = ? AND state = ? ORDER BY delivery_id LIMIT 1",
        (job_id, DeliveryState.FAILED),
    ).fetchone()
    if failed is None:
        _set_job_state(conn, job_id, JobState.DELIVERED, None, now)
    else:
        dest = Destination(failed[0], failed[1], failed[2]).key
        _set_job_state(
            conn, job_id, JobState.FAILED, f"delivery to {dest} failed: {failed[3]}", now
        )


def _study_job(conn: sqlite3.Connection, job_id: int) -> StudyJob:
    job = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    instances = conn.execute(
        "SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at, sop_instance_uid",
        (job["study_uid"],),
    ).fetchall()
    predecessors = conn.execute(
        "SELECT r.* FROM results r WHERE r.job_id = (SELECT j.job_id FROM jobs j WHERE "
        "j.study_uid = ? AND j.version < ? AND EXISTS (SELECT 1 FROM results x WHERE "
        "x.job_id = j.job_id) ORDER BY j.version DESC LIMIT 1) ORDER BY r.kind, r.sop_instance_uid",
        (job["study_uid"], job["version"]),
    ).fetchall()
    return StudyJob(
        job_id=job["job_id"],
        study_instance_uid=job["study_uid"],
        version=job["version"],
        attempt=job["attempt"],
        lease_owner=job["lease_owner"],
        lease_expires_at=job["lease_expires_at"],
        instances=tuple(_instance(r) for r in instances),
        predecessors=tuple(_result(r) for r in predecessors),
    )


def _delivery(conn: sqlite3.Connection, delivery_id: int) -> Delivery:
    row = conn.execute(
        "SELECT d.*, j.study_uid FROM deliveries d JOIN jobs j ON j.job_id = d.job_id "
        "WHERE d.delivery_id = ?",
        (delivery_id,),
    ).fetchone()
    files = conn.execute(
        "SELECT path FROM results WHERE job_id = ? ORDER BY kind, sop_instance_uid",
        (row["job_id"],),
    ).fetchall()
    return Delivery(
        delivery_id=row["delivery_id"],
        job_id=row["job_id"],
        study_instance_uid=row["study_uid"],
        destination=Destination(row["dest_ae"], row["dest_host"], row["dest_port"]),
        state=DeliveryState(row["state"]),
        attempts=row["attempts"],
        last_error=row["last_error"],
        next_attempt_at=row["next_attempt_at"],
        files=tuple(Path(f[0]) for f in files),
    )


def open_queue(db: StateDB, config: Config) -> JobQueue:
    """The job queue the roles use: the SQLite queue on the node's state database.

    With ``queue.backend = "rabbitmq"`` this is the site's queue, whose only leaseholder is the
    dispatcher that publishes jobs to the worker pool: its lease is ``queue.dispatch_seconds``,
    how long the site waits for the pool's answer before publishing a job again.
    """
    queue = SqliteJobQueue.from_config(db, config)
    broker = config.queue.broker
    if config.queue.backend is QueueBackend.RABBITMQ and broker is not None:
        queue.lease_seconds = broker.dispatch_seconds
    return queue
