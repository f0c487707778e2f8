"""Study assembly and retention: the role between the listener and the worker.

The listener only receives: it stores each instance durably and records it. This role turns
what was received into work and keeps the state directory from growing without end:

- **assembly**: every pass queues a job for each study quiet for ``study.stable_seconds`` whose
  instances changed since its last job (:meth:`JobQueue.enqueue_stable_studies`). The loop wakes
  exactly when the next study becomes stable (:meth:`JobQueue.next_stable_at`), and at least
  every quarter of ``stable_seconds`` (at most 1 s).
- **retention**: at start and every :data:`PURGE_INTERVAL` seconds, finished studies idle for
  ``retention.keep_days`` are removed (rows, instances, results), and so are study folders a
  crash left without rows.

It talks to the queue only through :class:`~dicomnode.queue.protocol.JobQueue` and runs
wherever the listener runs (``listen``, ``serve``, a site of a multi-host deployment): it needs
the listener's state directory, not its network edge.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from dicomnode.config import Config
from dicomnode.logging import get_logger
from dicomnode.queue.protocol import JobQueue
from dicomnode.queue.sqlite import open_queue
from dicomnode.records import EventLike
from dicomnode.state import StateDB
from dicomnode.storage import InstanceStore, StateLayout

log = get_logger(__name__)

PURGE_INTERVAL = 3600.0
"""Seconds between two retention passes (the first runs at start)."""
MIN_WAIT_SECONDS = 0.01
"""The shortest wait between two passes of study assembly."""


class StudyAssembler:
    """Study assembly and retention on the node's state directory.

    Call :meth:`start`, then :meth:`stop` (idempotent); ``now`` arguments are seconds since
    the epoch (``None``: the current time)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = StateLayout(config.node.state_dir)
        self._db: StateDB | None = None
        self._queue: JobQueue | None = None
        self._store: InstanceStore | None = None

    def start(self) -> StudyAssembler:
        self._db = self.layout.open_db()
        self._queue = open_queue(self._db, self.config)
        self._store = InstanceStore(self.layout, self._db)
        return self

    def stop(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db = self._queue = self._store = None

    def _running(self) -> tuple[StateDB, JobQueue, InstanceStore]:
        if self._db is None or self._queue is None or self._store is None:
            raise RuntimeError("study assembly is not running")
        return self._db, self._queue, self._store

    def assemble(self, now: float | None = None) -> tuple[str, ...]:
        """Queue a job for every study quiet for ``stable_seconds``; returns their UIDs."""
        _, queue, _ = self._running()
        queued = queue.enqueue_stable_studies(now)
        for study_uid in queued:
            log.info("study_queued", study_instance_uid=study_uid)
        return queued

    def seconds_to_next_stable(self, now: float | None = None) -> float | None:
        """Seconds until the next study can be queued (0 if one can now; None: none waits)."""
        _, queue, _ = self._running()
        due = queue.next_stable_at()
        if due is None:
            return None
        return max(0.0, due - (time.time() if now is None else now))

    def purge(self, now: float | None = None) -> tuple[str, ...]:
        """Remove the finished studies idle for ``retention.keep_days`` (and folders a crash
        left without rows); returns the removed Study Instance UIDs."""
        db, _, store = self._running()
        keep_days = self.config.retention.keep_days
        if keep_days <= 0:
            return ()
        cutoff = (time.time() if now is None else now) - keep_days * 86400.0
        removed = tuple(
            uid for uid in db.idle_studies(cutoff) if store.forget_study(uid, cutoff)
        )
        orphans = store.sweep_orphans(cutoff)
        if removed or orphans:
            log.info(
                "studies_purged",
                studies=len(removed),
                orphan_folders=orphans,
                keep_days=keep_days,
                study_instance_uids=list(removed),
            )
        return removed

    def run_once(self, next_purge: float) -> tuple[float | None, float]:
        """One pass: assemble, purge when ``next_purge`` (monotonic) has come; returns the
        seconds to the next stable study (None: none waits) and the next purge time."""
        self.assemble()
        if time.monotonic() >= next_purge:
            next_purge = time.monotonic() + PURGE_INTERVAL
            self.purge()
        return self.seconds_to_next_stable(), next_purge


def run_assembler(
    config: Config, stop: EventLike, heartbeat: Callable[[], None] | None = None
) -> None:
    """Assemble studies and apply retention until ``stop`` is set. A failed pass (the database
    busy past its timeout, a full disk) is logged and tried again at the next poll."""
    poll = min(1.0, config.study.stable_seconds / 4)
    next_purge = 0.0  # at start, then every PURGE_INTERVAL seconds
    assembler = StudyAssembler(config).start()
    try:
        wait = 0.0
        while not stop.wait(wait):
            if heartbeat is not None:
                heartbeat()
            wait = poll
            try:
                due, next_purge = assembler.run_once(next_purge)
            except (sqlite3.Error, OSError) as exc:
                log.error("study_housekeeping_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if due is not None:  # wake when it is stable, not up to a poll later
                wait = min(poll, max(MIN_WAIT_SECONDS, due))
    finally:
        assembler.stop()
