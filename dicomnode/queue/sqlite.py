"""The SQLite backend of the job queue: :class:`SqliteJobQueue` on the node's state database
(:mod:`dicomnode.state`), the default for one machine and each site's own queue in a
multi-host deployment.

Study assembly: each new or changed instance bumps its study's ``revision`` and
``last_received_at``. A study is ready when nothing arrived for ``stable_seconds`` and its revision
is newer than the one its newest job covers; it then gets a job with the next ``version``. An
instance arriving after a job was leased therefore makes the study run again as version + 1, and
that job's ``predecessors`` name the result files the new results replace. A job attempt that
fails with a retryable error is queued again with ``not_before`` set by the exponential back-off
of ``[queue]`` (``RetryPolicy.backoff``, the formula deliveries use too), so a study whose
inference keeps crashing does not spin the worker; ``dicomnode status`` shows when it is due.

Every write is one ``BEGIN IMMEDIATE`` transaction of :meth:`StateDB.transaction`. With
``queue.backend = "rabbitmq"`` the site keeps this queue and its dispatcher leases ready jobs to
the worker pool under the owner ``broker`` (:mod:`dicomnode.queue.remote`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

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
    StudyJob,
)
from dicomnode.state import StateDB, read_delivery, read_instance, read_result


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
            return study_job(conn, row[0])

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
            return None if row is None else study_job(conn, job_id)

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

    def record_broker_deliveries(self, job: StudyJob, deliveries: int) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET broker_deliveries = ? WHERE job_id = ?", (deliveries, job.job_id)
            )

    def renew(self, job: StudyJob, now: float | None = None) -> StudyJob:
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            self._held(conn, job, now)
            conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE job_id = ?",
                (now + self.lease_seconds, now, job.job_id),
            )
            return study_job(conn, job.job_id)

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
            return tuple(read_delivery(conn, i) for i in ids)

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
            return read_delivery(conn, delivery_id)

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


def study_job(conn: sqlite3.Connection, job_id: int) -> StudyJob:
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
        instances=tuple(read_instance(r) for r in instances),
        predecessors=tuple(read_result(r) for r in predecessors),
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
