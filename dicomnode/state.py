"""The node's durable state: received instances, studies, jobs, results and deliveries.

One SQLite database (``state.sqlite`` in the state directory) in WAL mode with
``synchronous=FULL``, so a committed row survives a crash or power loss and the listener, the
worker and ``dicomnode status`` can use it from separate processes at once. Every write is one
``BEGIN IMMEDIATE`` transaction. Times are seconds since the epoch (``time.time()``), passed in as
``now`` so tests and callers control the clock.

The layout has a version (SQLite ``user_version``, :data:`SCHEMA_VERSION`); a database written by
an older version is upgraded in place when opened.

:class:`StateDB` holds the database's layout, the instance records the listener writes and the
read-only views ``status`` and the health checks use. The job queue on the same database, with
all of its SQL, is the SQLite backend of the queue package (:mod:`dicomnode.queue.sqlite`); the
roles use it only through :class:`dicomnode.queue.protocol.JobQueue`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomnode.records import (
    Delivery,
    DeliveryState,
    Destination,
    JobState,
    QueueDepth,
    ResultFile,
    StoredInstance,
    StudyState,
    StudyStatus,
)

#: Version of the database layout (SQLite ``user_version``). Older state databases are
#: upgraded in place by :data:`_MIGRATIONS` when opened; newer ones are refused.
SCHEMA_VERSION = 4

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
    broker_deliveries INTEGER,
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
    # 4: how often the broker delivered a job to the worker pool before its answer (>1:
    # redelivered after a worker died or gave it back), for ``status``.
    3: ("ALTER TABLE jobs ADD COLUMN broker_deliveries INTEGER",),
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


@dataclass
class _PendingRow:
    """An instance row waiting for :meth:`StateDB.record_instance`'s group commit."""

    instance: StoredInstance
    received_at: float
    done: bool = False
    error: BaseException | None = None


def _insert_instance(conn: sqlite3.Connection, inst: StoredInstance, now: float) -> None:
    """Insert or replace the row of ``inst`` and count a change of its study (in a
    transaction)."""
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


class StateDB:
    """The SQLite connection, schema, instance and study rows, and status queries.

    Thread-safe: one connection guarded by a lock (pynetdicom runs each association in its own
    thread). Several processes may open the same file; SQLite's locking serialises writers.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingRow] = []  # rows waiting for a group commit
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
        return read_instance(rows[0]) if rows else None

    def instances_of(self, study_uid: str) -> tuple[StoredInstance, ...]:
        """Every stored instance of a study, oldest first."""
        rows = self.query(
            "SELECT * FROM instances WHERE study_uid = ? ORDER BY received_at, sop_instance_uid",
            (study_uid,),
        )
        return tuple(read_instance(r) for r in rows)

    def record_instance(self, inst: StoredInstance, now: float | None = None) -> None:
        """Insert or replace the row of ``inst`` and mark its study as changed; return once the
        row is committed (raise, and nothing of it is recorded, if the commit fails).

        One row per SOP Instance UID: a replacement (same UID, new content) overwrites the row.
        The caller skips identical re-sends so they do not make the study run again.

        Group commit: rows recorded by other threads of this process while a commit is running
        are committed together by whichever of them gets the connection next, in one
        transaction and one sync of the write-ahead log. Storing many instances at once then
        waits for a few syncs instead of queueing for one sync per instance.
        """
        entry = _PendingRow(inst, time.time() if now is None else now)
        with self._pending_lock:
            self._pending.append(entry)
        with self._lock:
            if not entry.done:
                self._commit_pending()
        if entry.error is not None:
            raise entry.error

    def _commit_pending(self) -> None:
        """Commit every row waiting in :meth:`record_instance` in one transaction (under
        ``self._lock``); each waiting caller learns the outcome from its entry."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        try:
            with self.transaction() as conn:
                for entry in batch:
                    _insert_instance(conn, entry.instance, entry.received_at)
        except BaseException as exc:
            for entry in batch:
                entry.error = exc
            raise
        finally:
            for entry in batch:
                entry.done = True

    def idle_studies(self, cutoff: float) -> tuple[str, ...]:
        """Studies retention may remove: finished, and no activity since ``cutoff``."""
        rows = self.query(_IDLE_STUDIES.format(only=""), {"cutoff": cutoff})
        return tuple(str(r[0]) for r in rows)

    def study_uids(self) -> set[str]:
        """Every study the database has rows of."""
        return {str(r[0]) for r in self.query("SELECT study_uid FROM studies")}

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
            "j.state, j.version, j.last_error, j.not_before, j.note, j.broker_deliveries "
            "FROM studies s LEFT JOIN jobs j ON j.job_id = "
            "(SELECT MAX(job_id) FROM jobs WHERE study_uid = s.study_uid) "
            "ORDER BY s.last_received_at DESC, s.study_uid LIMIT ?",
            (limit,),
        )
        return tuple(_study_status(r) for r in rows)

    def redelivered_jobs(self) -> int:
        """Jobs the broker delivered to the worker pool more than once before their answer
        (``queue.backend = "rabbitmq"``; always 0 on one machine)."""
        return int(self.query("SELECT COUNT(*) FROM jobs WHERE broker_deliveries > 1")[0][0])

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
            return tuple(read_delivery(self._conn, i) for i in ids)

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
        broker_deliveries=row["broker_deliveries"],
    )


def read_instance(row: sqlite3.Row) -> StoredInstance:
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


def read_result(row: sqlite3.Row) -> ResultFile:
    return ResultFile(
        kind=row["kind"],
        sop_class_uid=row["sop_class_uid"],
        series_instance_uid=row["series_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        path=Path(row["path"]),
    )


def read_delivery(conn: sqlite3.Connection, delivery_id: int) -> Delivery:
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
