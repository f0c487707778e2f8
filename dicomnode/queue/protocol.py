"""The queue protocol every role uses (listener: study assembly; worker; sender; the site's
dispatcher and result intake), whatever the backend.

Backends: :class:`dicomnode.queue.sqlite.SqliteJobQueue` (one machine, and each site's own queue in
a multi-host deployment) and the broker path (:mod:`dicomnode.queue.rabbitmq`,
:mod:`dicomnode.queue.remote`), in which the site's SQLite queue leases ready jobs to the
worker pool through RabbitMQ and records the pool's answers through this same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dicomnode.records import (
    Delivery,
    DeliveryOutcome,
    Destination,
    JobState,
    QueueDepth,
    ResultFile,
    StudyJob,
)


class LeaseLostError(RuntimeError):
    """The job's lease expired or moved to another worker; its outcome is not recorded."""


class JobQueue(Protocol):
    """The work pipeline's queue: study jobs and their result deliveries.

    Every method takes ``now`` (seconds since the epoch; ``None``: the current time).
    """

    def enqueue_stable_studies(self, now: float | None = None) -> tuple[str, ...]:
        """Queue a job for every study that is stable and changed since its last job."""
        ...

    def next_stable_at(self) -> float | None:
        """When the next study :meth:`enqueue_stable_studies` would queue becomes stable (epoch
        seconds), or None when none waits."""
        ...

    def lease(self, owner: str, now: float | None = None) -> StudyJob | None:
        """Take the oldest ready job for ``owner`` (first returning expired leases), or None.

        A job that failed retryably is not ready before its back-off has passed."""
        ...

    def held_job(
        self, job_id: int, attempt: int, owner: str, now: float | None = None
    ) -> StudyJob | None:
        """The job if ``owner`` holds its lease in ``attempt`` now, else None (the site's
        result intake matches the worker pool's answers to the jobs it published)."""
        ...

    def release(self, job: StudyJob, now: float | None = None) -> bool:
        """Return a held job to the queue without counting its attempt (it never ran: e.g. the
        broker did not confirm its publication); True if it was still held."""
        ...

    def record_broker_deliveries(self, job: StudyJob, deliveries: int) -> None:
        """Record how often the broker delivered ``job`` to the worker pool before its answer
        (the site's result intake; 1: once, more: redelivered), shown by ``status``."""
        ...

    def renew(self, job: StudyJob, now: float | None = None) -> StudyJob:
        """Extend a held lease; raises :class:`LeaseLostError` if it is no longer held."""
        ...

    def complete(
        self,
        job: StudyJob,
        results: Sequence[ResultFile],
        destinations: Sequence[Destination],
        now: float | None = None,
        note: str | None = None,
    ) -> None:
        """Record the written results and create one pending delivery per destination;
        ``note`` says what the results leave out (e.g. views skipped), shown by ``status``."""
        ...

    def fail(
        self, job: StudyJob, reason: str, *, retryable: bool, now: float | None = None
    ) -> JobState:
        """Record a failed attempt; returns the job's new state (queued again after a back-off,
        or failed)."""
        ...

    def retry(self, study_uid: str | None = None, now: float | None = None) -> int:
        """Re-queue failed jobs (of one study or all); returns how many."""
        ...

    def depth(self) -> QueueDepth:
        """Counts per job and delivery state."""
        ...

    def claim_deliveries(
        self, claim_seconds: float, limit: int = 16, now: float | None = None
    ) -> tuple[Delivery, ...]:
        """Take due pending deliveries, hidden from other senders for ``claim_seconds``."""
        ...

    def extend_claim(
        self, delivery: Delivery, claim_seconds: float, now: float | None = None
    ) -> bool:
        """Keep a claimed delivery hidden ``claim_seconds`` longer, unless an attempt was
        recorded since it was claimed; True if it was extended."""
        ...

    def record_delivery_attempt(
        self,
        delivery_id: int,
        outcome: DeliveryOutcome,
        error: str | None = None,
        now: float | None = None,
    ) -> Delivery:
        """Record one send attempt's outcome and schedule the next (exponential back-off)."""
        ...
