"""The roles that connect a site's state database to the broker, and the worker that serves it.

Site side (on the listener's host, beside the listener and the sender):

- :class:`JobDispatcher`: leases the site's ready jobs from its SQLite queue under the owner
  ``broker`` (for ``dispatch_seconds``, after which an unanswered job is published again as a
  new attempt) and publishes each as a :class:`JobMessage` at its priority level;
- :class:`ResultIntake`: takes the site's results queue (result files, then each job's outcome)
  and dead-letter queue, writes the files into the site's results folder and records the outcome
  in the state database, which creates the deliveries the sender then makes: results reach the
  PACS from the site that received the study, with the sender's durable retries.

Worker side: :class:`BrokerWorker` takes one job at a time, fetches its instances from the site
(:mod:`dicomnode.queue.transfer`), analyses and writes the results like the local worker, sends
every result file and then the outcome to the site's results queue (each confirmed), and only
then acknowledges the job. A worker killed at any point leaves the job unacknowledged: the broker
gives it to another worker; result objects have deterministic UIDs, so a file sent twice is the
same object twice, and the site records each job's outcome once.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
from pika.exceptions import AMQPError
from pika.spec import BasicProperties

from dicomnode import metrics
from dicomnode.logging import get_logger
from dicomnode.queue.messages import (
    InstanceRef,
    JobMessage,
    MessageError,
    OutcomeMessage,
    ResultFileMessage,
    ResultRef,
    decode_job,
    decode_outcome,
    decode_result_file,
)
from dicomnode.queue.protocol import JobQueue
from dicomnode.queue.rabbitmq import Broker, ReceivedJob, death_reason
from dicomnode.queue.transfer import TransferError, fetch_instances
from dicomnode.records import Destination, ResultFile, StoredInstance, StudyJob
from dicomnode.storage import file_sha256

log = get_logger(__name__)

BROKER_OWNER = "broker"
"""Lease owner of the site's jobs that are out in the worker pool."""


# -- priority ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorityRule:
    """Jobs of studies with an instance from this calling AE title or station name go to
    ``level`` (0 = most urgent)."""

    level: int
    calling_ae: str | None = None
    station_name: str | None = None

    def matches(self, instance: StoredInstance) -> bool:
        if self.calling_ae is not None and instance.calling_ae == self.calling_ae:
            return True
        if self.station_name is not None:
            header = pydicom.dcmread(
                instance.path, stop_before_pixels=True, specific_tags=["StationName"]
            )
            return str(header.get("StationName", "") or "") == self.station_name
        return False


def job_priority(job: StudyJob, rules: Sequence[PriorityRule], default: int) -> int:
    """The most urgent level any rule gives the study, else ``default``."""
    levels = [r.level for r in rules if any(r.matches(i) for i in job.instances)]
    return min(levels, default=default)


# -- site side --------------------------------------------------------------------------------


@dataclass
class JobDispatcher:
    """Publishes the site's ready jobs to the broker."""

    site: str
    queue: JobQueue  # the site's queue (SQLite): leases, results and failures
    broker: Broker
    instance_url: str
    rules: Sequence[PriorityRule] = ()
    default_priority: int = 1

    def message(self, job: StudyJob) -> JobMessage:
        base = self.instance_url.rstrip("/")
        return JobMessage(
            site=self.site,
            job_id=job.job_id,
            attempt=job.attempt,
            study_instance_uid=job.study_instance_uid,
            version=job.version,
            priority=job_priority(job, self.rules, self.default_priority),
            instances=tuple(
                InstanceRef(
                    i.sop_instance_uid,
                    i.sop_class_uid,
                    i.series_instance_uid,
                    i.transfer_syntax_uid,
                    i.size,
                    i.sha256 or file_sha256(i.path),  # the listener does not hash
                    f"{base}/instances/{i.sop_instance_uid}",
                )
                for i in job.instances
            ),
            predecessors=tuple(
                ResultRef(r.kind, r.sop_class_uid, r.series_instance_uid, r.sop_instance_uid)
                for r in job.predecessors
            ),
        )

    def dispatch_ready(self, limit: int = 100) -> int:
        """Publish up to ``limit`` ready jobs; returns how many."""
        sent = 0
        while sent < limit and (job := self.queue.lease(BROKER_OWNER)) is not None:
            try:
                message = self.message(job)
                self.broker.publish_job(message)
            except BaseException:  # not confirmed: back to the queue now, not after the timeout
                self.queue.release(job)
                raise
            log.info(
                "job_dispatched",
                job_id=job.job_id,
                study_instance_uid=job.study_instance_uid,
                attempt=job.attempt,
                priority=message.priority,
            )
            sent += 1
        return sent


@dataclass
class IntakeCounts:
    files: int = 0
    outcomes: int = 0
    duplicates: int = 0
    dead: int = 0
    redelivered: int = 0


@dataclass
class ResultIntake:
    """Records what the worker pool sends back to this site."""

    site: str
    queue: JobQueue  # the site's queue (SQLite): leases, results and failures
    broker: Broker
    results_dir: Path
    destinations: Sequence[Destination]
    counts: IntakeCounts = field(default_factory=IntakeCounts)

    def folder(self, study_uid: str, job_id: int) -> Path:
        return self.results_dir / study_uid / f"job-{job_id}"

    def drain(self) -> int:
        """Handle what waits in the site's results and dead-letter queues."""
        settings = self.broker.settings
        handled = self.broker.drain(settings.results_queue(self.site), self._result)
        return handled + self.broker.drain(settings.dead_queue(self.site), self._dead)

    def _result(self, properties: BasicProperties, body: bytes) -> None:
        headers = properties.headers or {}
        kind = headers.get("kind")
        try:
            if kind == "file":
                self._file(decode_result_file(str(headers.get("header", "")).encode()), body)
            elif kind == "outcome":
                self._outcome(decode_outcome(body))
            else:
                log.error("broker_message_unknown", kind=str(kind))
        except MessageError as exc:  # malformed: acknowledged and dropped, logged
            log.error("broker_message_malformed", error=str(exc))

    def _file(self, header: ResultFileMessage, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != header.sha256:
            log.error(
                "result_file_corrupt",
                job_id=header.job_id,
                sop_instance_uid=header.sop_instance_uid,
            )
            return
        try:
            study = str(
                pydicom.dcmread(
                    io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
                ).StudyInstanceUID
            )
        except Exception as exc:  # not DICOM: dropped (a poison message must not come back)
            log.error(
                "result_file_unreadable",
                job_id=header.job_id,
                sop_instance_uid=header.sop_instance_uid,
                error=type(exc).__name__,
            )
            return
        folder = self.folder(study, header.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{header.sop_instance_uid}.dcm"
        tmp = folder / f".{header.sop_instance_uid}.tmp"
        tmp.write_bytes(data)
        tmp.replace(target)  # the same UID twice (a job run twice): the same object again
        self.counts.files += 1

    def _outcome(self, outcome: OutcomeMessage) -> None:
        self.counts.outcomes += 1
        job = self.queue.held_job(outcome.job_id, outcome.attempt, BROKER_OWNER)
        if job is None:  # already recorded (a job run twice), or given up by the site
            self.counts.duplicates += 1
            metrics.pool_answer("duplicate")
            log.info("job_outcome_duplicate", job_id=outcome.job_id, worker=outcome.worker)
            return
        if outcome.outcome == "failed":
            self._record_deliveries(job, outcome)
            self.queue.fail(job, outcome.reason or "failed in the worker pool", retryable=False)
            metrics.pool_answer("failed")
            log.warning(
                "job_failed", job_id=job.job_id, reason=outcome.reason, worker=outcome.worker
            )
            return
        folder = self.folder(outcome.study_instance_uid, outcome.job_id)
        results = [
            ResultFile(
                f.kind,
                f.sop_class_uid,
                f.series_instance_uid,
                f.sop_instance_uid,
                folder / f"{f.sop_instance_uid}.dcm",
            )
            for f in outcome.files
        ]
        missing = [r.sop_instance_uid for r in results if not r.path.is_file()]
        if missing:  # a file lost or corrupt on the way: the job is published again later
            log.error(
                "job_outcome_incomplete",
                job_id=outcome.job_id,
                missing=len(missing),
                hint="the job is published again after queue.dispatch_seconds",
            )
            return
        self._record_deliveries(job, outcome)
        self.queue.complete(job, results, self.destinations if results else (), note=outcome.note)
        metrics.pool_answer("results")
        log.info(
            "job_results_written", job_id=job.job_id, results=len(results), worker=outcome.worker
        )

    def _record_deliveries(self, job: StudyJob, outcome: OutcomeMessage) -> None:
        """Record with the job how often the broker delivered it before this answer."""
        deliveries = outcome.deliveries if isinstance(outcome.deliveries, int) else 1
        self.queue.record_broker_deliveries(job, max(1, deliveries))
        if deliveries > 1:
            self.counts.redelivered += 1
            metrics.pool_redelivered()

    def _dead(self, properties: BasicProperties, body: bytes) -> None:
        try:
            message = decode_job(body)
        except MessageError as exc:
            log.error("broker_message_malformed", error=str(exc))
            return
        self.counts.dead += 1
        metrics.pool_answer("dead_lettered")
        job = self.queue.held_job(message.job_id, message.attempt, BROKER_OWNER)
        if job is not None:
            self.queue.fail(job, death_reason(properties), retryable=False)
            log.warning("job_dead_lettered", job_id=message.job_id, reason=death_reason(properties))


# -- worker side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processed:
    """What analysing one job wrote (files under a folder) and what it left out."""

    results: tuple[ResultFile, ...]
    note: str | None


class FinalFailure(Exception):
    """A job that can never succeed (its reason goes to the site as a failed outcome)."""


@dataclass
class BrokerWorker:
    """Takes jobs from the broker one at a time (see the module docstring)."""

    broker: Broker
    name: str
    token: str
    process: Callable[[StudyJob, Path], Processed]
    ca_certificates: Path | None = None
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    idle_seconds: float = 0.2

    def run_once(self) -> bool:
        """Take and handle one job; False when none was waiting."""
        try:
            received = self.broker.get_job()
        except MessageError as exc:
            log.error("broker_message_malformed", error=str(exc))
            return True
        if received is None:
            return False
        self.handle(received)
        return True

    def handle(self, received: ReceivedJob) -> None:
        message = received.message
        bound = log.bind(
            job=message.key,
            study_instance_uid=message.study_instance_uid,
            deliveries=received.deliveries,
        )
        bound.info("job_taken", level=received.level)
        metrics.pool_job_taken(received.deliveries)
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.scratch))
        try:
            outcome = self._run(message, folder)
            if outcome is None:  # retryable: back to the broker (the delivery count grows)
                self.broker.give_back(received.delivery_tag)
                return
            for header, path in outcome[1]:
                self.broker.publish_result_file(header, path.read_bytes())
            self.broker.publish_outcome(replace(outcome[0], deliveries=received.deliveries))
            self.broker.ack(received.delivery_tag)
            bound.info("job_answered", outcome=outcome[0].outcome, files=len(outcome[1]))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(
        self, message: JobMessage, folder: Path
    ) -> tuple[OutcomeMessage, list[tuple[ResultFileMessage, Path]]] | None:
        worker = self.name
        result: dict[str, object] = {}

        def work() -> None:
            try:
                result["done"] = self._analyse(message, folder)
            except BaseException as exc:  # handed to the connection thread below
                result["error"] = exc

        thread = threading.Thread(target=work, name=f"job-{message.key}", daemon=True)
        thread.start()
        try:
            while thread.is_alive():  # heartbeats while the job runs
                self.broker.keep_alive(0.5)
                thread.join(0.01)
        except AMQPError:  # the broker went away: the job is redelivered; never run two at once
            thread.join()
            raise
        error = result.get("error")
        if isinstance(error, FinalFailure):
            return OutcomeMessage(
                message.site,
                message.job_id,
                message.attempt,
                message.study_instance_uid,
                message.version,
                "failed",
                reason=str(error),
                worker=worker,
            ), []
        if isinstance(error, BaseException):
            log.warning(
                "job_given_back",
                job=message.key,
                error=f"{type(error).__name__}: {error}"
                if isinstance(error, TransferError)
                else type(error).__name__,
            )
            return None
        processed = result["done"]
        assert isinstance(processed, Processed)
        files = []
        for r in processed.results:
            data = r.path.read_bytes()
            files.append(
                (
                    ResultFileMessage(
                        message.site,
                        message.job_id,
                        r.kind,
                        r.sop_class_uid,
                        r.series_instance_uid,
                        r.sop_instance_uid,
                        hashlib.sha256(data).hexdigest(),
                    ),
                    r.path,
                )
            )
        outcome = OutcomeMessage(
            message.site,
            message.job_id,
            message.attempt,
            message.study_instance_uid,
            message.version,
            "results",
            tuple(h for h, _ in files),
            note=processed.note,
            worker=worker,
        )
        return outcome, files

    def _analyse(self, message: JobMessage, folder: Path) -> Processed:
        instances = fetch_instances(
            message.instances,
            message.study_instance_uid,
            folder / "instances",
            self.token,
            ca_certificates=self.ca_certificates,
        )
        job = StudyJob(
            job_id=message.job_id,
            study_instance_uid=message.study_instance_uid,
            version=message.version,
            attempt=message.attempt,
            lease_owner=self.name,
            lease_expires_at=time.time() + 86400,
            instances=instances,
            predecessors=tuple(
                ResultFile(
                    p.kind,
                    p.sop_class_uid,
                    p.series_instance_uid,
                    p.sop_instance_uid,
                    folder / "absent" / f"{p.sop_instance_uid}.dcm",
                )
                for p in message.predecessors
            ),
        )
        return self.process(job, folder / "results")
