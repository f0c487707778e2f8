"""Small frozen records that cross module boundaries inside ``dicomnode``.

The listener produces :class:`StoredInstance`; the job queue hands :class:`StudyJob` to the worker;
the worker reports :class:`ResultFile` objects back; the sender works through :class:`Delivery`
rows. None of them holds patient data: only UIDs, paths, sizes, hashes, states and reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

IDLE_POLL_SECONDS = 0.2
"""How often an idle worker or sender looks for work in the state database (a lease query each
time): a study's job and its deliveries start at most this long after they are ready."""


class EventLike(Protocol):
    """The stop flag the role loops wait on: a ``threading.Event`` or a ``multiprocessing``
    event (the worker in ``dicomnode serve`` runs in a child process)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class JobState(StrEnum):
    """Life cycle of one study job (persisted as these strings)."""

    QUEUED = "queued"
    LEASED = "leased"
    RESULTS_WRITTEN = "results_written"
    DELIVERED = "delivered"
    FAILED = "failed"


class DeliveryState(StrEnum):
    """Life cycle of one (job, destination) delivery (persisted as these strings)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class DeliveryOutcome(StrEnum):
    """What one send attempt came to, as the sender reports it."""

    DELIVERED = "delivered"
    TRANSIENT_FAILURE = "transient_failure"
    PERMANENT_FAILURE = "permanent_failure"


class StudyState(StrEnum):
    """What ``dicomnode status`` shows for a study: the state of its newest job, or receiving."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    LEASED = "leased"
    RESULTS_WRITTEN = "results_written"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP that results are sent to."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    """Send over DICOM TLS (the node's ``[tls]`` certificate as client certificate)."""

    @property
    def key(self) -> str:
        """A stable, readable identifier (``AE@host:port``) used in the state and the logs."""
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of a received instance, read before it is stored."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class StoredInstance:
    """One instance durably stored as received in the state directory."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    sha256: str
    """SHA-256 (hex) of the file, or ``""`` where it was not hashed when stored: the listener
    does not hash what it receives (the worker hashes what it decodes, the site hashes what it
    hands to a worker pool, :func:`dicomnode.storage.file_sha256`)."""
    calling_ae: str


@dataclass(frozen=True)
class ResultFile:
    """One result object the worker wrote for a study (``kind``: ``sr``, ``sc`` or ``gsps``).

    The last version's result files are handed to the next job of the same study as
    ``StudyJob.predecessors``, so a new SR can name the one it replaces.
    """

    kind: str
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class StudyJob:
    """A leased unit of work: process every instance of one study.

    ``version`` counts the jobs of this study (1 for the first run, 2 after a late instance made
    the study run again, ...). ``predecessors`` are the result files of the newest earlier version
    that wrote results (empty for the first). ``lease_expires_at`` is seconds since the epoch; a
    job not completed, failed or renewed by then goes back to the queue.
    """

    job_id: int
    study_instance_uid: str
    version: int
    attempt: int
    lease_owner: str
    lease_expires_at: float
    instances: tuple[StoredInstance, ...]
    predecessors: tuple[ResultFile, ...]


@dataclass(frozen=True)
class Delivery:
    """One (job, destination) delivery and the result files it sends."""

    delivery_id: int
    job_id: int
    study_instance_uid: str
    destination: Destination
    state: DeliveryState
    attempts: int
    last_error: str | None
    next_attempt_at: float
    files: tuple[Path, ...]


@dataclass(frozen=True)
class QueueDepth:
    """Counts for ``dicomnode status``."""

    queued: int
    leased: int
    results_written: int
    delivered: int
    failed: int
    deliveries_pending: int
    deliveries_failed: int


@dataclass(frozen=True)
class StudyStatus:
    """One study as ``dicomnode status`` lists it (UIDs and states only, no patient data).

    ``next_attempt_at``: for a queued job waiting out its back-off after a failed attempt, when
    it may be leased again (seconds since the epoch); None otherwise.
    """

    study_instance_uid: str
    state: StudyState
    instance_count: int
    last_received_at: float
    version: int
    last_error: str | None
    next_attempt_at: float | None
    note: str | None = None
    """What the latest job's results leave out (views skipped and why), if anything."""
    broker_deliveries: int | None = None
    """With the worker pool: how often the broker delivered the latest job before its answer
    (more than 1: redelivered after a worker died or gave it back); None: not through a broker."""
