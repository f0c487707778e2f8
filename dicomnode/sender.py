"""The sender role: deliver written results to every configured destination, durably.

Each (job, destination) delivery lives in the state database (``dicomnode.state``). The loop
claims due deliveries, sends each one's files in one association (``dicomnode.scu``) and
records the outcome: delivered; a transient failure (destination down, timeout, busy, failure
status), which the state module schedules again with exponential back-off and gives up on after
``delivery.give_up_after_seconds``; or a permanent one (e.g. our AE title not recognised, SOP
class refused), which is marked failed with its reason at once instead of being retried blindly.
``dicomnode status`` shows attempts, the next attempt and the last error; ``dicomnode retry``
re-queues failed ones. Result UIDs are deterministic, so a re-send never duplicates anything.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from dicomnode import metrics, scu, tls
from dicomnode.config import Config, DeliveryConfig, TlsConfig
from dicomnode.logging import get_logger
from dicomnode.queue.protocol import JobQueue
from dicomnode.queue.sqlite import open_queue
from dicomnode.records import (
    IDLE_POLL_SECONDS,
    Delivery,
    DeliveryOutcome,
    DeliveryState,
    EventLike,
)
from dicomnode.storage import StateLayout

log = get_logger(__name__)

#: How long a claim hides a delivery from other senders without being renewed. The sender renews
#: its claims every third of this while it works through them, so a send may take any time, and
#: a sender that dies (SIGKILL, power loss) leaves its deliveries due again this long after.
#: ``serve`` and ``work`` use ``queue.lease_seconds``, the same bound as for a job's lease.
CLAIM_SECONDS = 60.0


def batch_outcome(batch: scu.BatchOutcome) -> tuple[DeliveryOutcome, str | None]:
    """One outcome for a delivery from its files' outcomes, with an admin-readable reason.

    Delivered only if every file was stored. Otherwise permanent if any file failed
    permanently (retrying cannot help that file), else transient. The reason is the first
    failure's, prefixed with how many files failed when the files fared differently (no
    patient data: the sender's reasons hold statuses, AE titles and addresses).
    """
    if batch.all_succeeded:
        return DeliveryOutcome.DELIVERED, None
    permanent = batch.with_status(scu.FileStatus.PERMANENT)
    failed = permanent or batch.with_status(scu.FileStatus.TRANSIENT)
    first = failed[0]
    reason = first.reason
    if len({o.reason for o in batch.outcomes}) > 1:  # not one association-wide failure
        reason = f"{len(failed)} of {len(batch.outcomes)} files not stored: {reason}"
    if permanent:
        return DeliveryOutcome.PERMANENT_FAILURE, reason
    return DeliveryOutcome.TRANSIENT_FAILURE, reason


def scu_destination(
    delivery: Delivery, calling_ae: str, tls_config: TlsConfig | None = None
) -> scu.Peer:
    """The SCU's view of a delivery's destination: where to connect, called and calling AE,
    and the TLS settings to connect with (None: plain TCP)."""
    dest = delivery.destination
    return scu.Peer(
        host=dest.host,
        port=dest.port,
        called_ae=dest.ae_title,
        calling_ae=calling_ae,
        tls=tls_config,
    )


def tls_by_destination(config: Config) -> dict[str, TlsConfig]:
    """The ``[tls]`` settings for each destination with ``tls = true``, by ``Destination.key``.

    Deliveries read back from the state database carry no TLS flag (the database keeps where,
    not how), so the sender looks each one up here: the configuration in force decides (a
    destination no longer configured is not sent to at all, see :meth:`DeliveryLoop.attempt`).
    """
    if config.tls is None:
        return {}
    return {d.key: config.tls for d in config.destinations if d.tls}


def send_timeouts(delivery: DeliveryConfig) -> scu.Timeouts:
    """The sender's timeouts from ``delivery.timeout_seconds``: one bound for every step of a
    send (TCP connect, association, each C-STORE reply, network idle)."""
    seconds = delivery.timeout_seconds
    return scu.Timeouts(connect=seconds, acse=seconds, dimse=seconds, network=seconds)


@contextmanager
def claims_kept(
    queue: JobQueue, claimed: Sequence[Delivery], claim_seconds: float
) -> Iterator[None]:
    """Renew the claims on ``claimed`` every third of ``claim_seconds`` in a background thread
    while the block runs (a claim whose attempt was recorded meanwhile is left alone)."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(claim_seconds / 3):
            for delivery in claimed:
                try:
                    queue.extend_claim(delivery, claim_seconds)
                except sqlite3.Error as exc:  # busy database: try again at the next interval
                    log.warning(
                        "claim_renew_failed",
                        delivery_id=delivery.delivery_id,
                        error=type(exc).__name__,
                    )

    thread = threading.Thread(target=renew, name="delivery-claims", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class DeliveryLoop:
    """Sends due deliveries from ``queue`` as ``calling_ae`` and records every attempt."""

    def __init__(
        self,
        queue: JobQueue,
        calling_ae: str,
        timeouts: scu.Timeouts | None = None,
        claim_seconds: float = CLAIM_SECONDS,
        tls_configs: Mapping[str, TlsConfig] | None = None,
        configured: frozenset[str] | None = None,
    ) -> None:
        self.queue = queue
        self.calling_ae = calling_ae
        self.timeouts = timeouts or scu.Timeouts()
        self.claim_seconds = claim_seconds
        self.tls_configs = dict(tls_configs or {})
        """TLS settings by destination key (:func:`tls_by_destination`); others: plain TCP."""
        self.configured = configured
        """Keys of the destinations in the configuration in force (None: send anywhere)."""

    def attempt(self, delivery: Delivery) -> tuple[DeliveryOutcome, str | None]:
        """Send one delivery's files once (nothing recorded) and classify the outcome.

        A delivery whose destination is no longer configured (removed, or its AE title, host
        or port changed) fails permanently without a connection: results go only where the
        configuration in force says, and never in the clear to a peer that was TLS."""
        if not delivery.files:
            return DeliveryOutcome.PERMANENT_FAILURE, "the job recorded no result files"
        key = delivery.destination.key
        if self.configured is not None and key not in self.configured:
            return DeliveryOutcome.PERMANENT_FAILURE, f"destination {key} is no longer configured"
        tls_config = self.tls_configs.get(delivery.destination.key)
        destination = scu_destination(delivery, self.calling_ae, tls_config)
        batch = scu.send_files(destination, delivery.files, self.timeouts)
        return batch_outcome(batch)

    def deliver(self, delivery: Delivery) -> Delivery:
        """Send one claimed delivery, record the attempt and log it; returns the new state."""
        outcome, reason = self.attempt(delivery)
        recorded = self.queue.record_delivery_attempt(delivery.delivery_id, outcome, reason)
        metrics.delivery_attempted(recorded.destination.key, str(outcome), str(recorded.state))
        fields = {
            "delivery_id": recorded.delivery_id,
            "job_id": recorded.job_id,
            "study_instance_uid": recorded.study_instance_uid,
            "destination": recorded.destination.key,
            "attempts": recorded.attempts,
            "files": len(recorded.files),
        }
        if recorded.state is DeliveryState.DELIVERED:
            log.info("delivery_delivered", **fields)
        elif recorded.state is DeliveryState.PENDING:
            log.warning(
                "delivery_retry_scheduled",
                **fields,
                outcome=str(outcome),
                next_attempt_at=recorded.next_attempt_at,
                reason=recorded.last_error,
            )
        else:
            log.error("delivery_failed", **fields, outcome=str(outcome), reason=recorded.last_error)
        return recorded

    def run_once(self) -> int:
        """Claim and send every due delivery; returns how many were attempted."""
        claimed = self.queue.claim_deliveries(self.claim_seconds)
        with claims_kept(self.queue, claimed, self.claim_seconds):
            for delivery in claimed:
                self.deliver(delivery)
        return len(claimed)

    def run(
        self, stop: EventLike, poll: float = 1.0, heartbeat: Callable[[], None] | None = None
    ) -> None:
        """Deliver until ``stop`` is set (a send in progress is finished first)."""
        while not stop.is_set():
            if heartbeat is not None:
                heartbeat()
            try:
                busy = self.run_once()
            except sqlite3.Error as exc:
                log.error("delivery_queue_error", error=f"{type(exc).__name__}: {exc}")
                busy = 0
            if not busy:
                stop.wait(poll)


def delivery_loop(queue: JobQueue, config: Config) -> DeliveryLoop:
    """The sender role's loop over ``queue`` as configured: our AE title, the send timeouts,
    TLS for the destinations that ask for it. A ``[tls]`` table whose files cannot be used
    raises :class:`dicomnode.tls.TlsError` here, at start, not at the first delivery."""
    tls_configs = tls_by_destination(config)
    for tls_config in set(tls_configs.values()):
        tls.client_context(tls_config)
    return DeliveryLoop(
        queue,
        config.node.ae_title,
        send_timeouts(config.delivery),
        claim_seconds=config.queue.lease_seconds,
        tls_configs=tls_configs,
        configured=frozenset(d.key for d in config.destinations),
    )


def run_delivery(
    config: Config, stop: EventLike, heartbeat: Callable[[], None] | None = None
) -> None:
    """The sender role: deliver results to ``config.destinations`` until ``stop`` is set.

    Calls with our own AE title (``node.ae_title``) and the timeouts of
    ``delivery.timeout_seconds``. Looks for due deliveries every
    :data:`~dicomnode.records.IDLE_POLL_SECONDS` when idle (more often when
    ``delivery.retry_initial_seconds`` is shorter than four times that).
    """
    with StateLayout(config.node.state_dir).open_db() as db:
        loop = delivery_loop(open_queue(db, config), config)
        log.info(
            "sender_started",
            destinations=[d.key for d in config.destinations],
            tls_destinations=sorted(loop.tls_configs),
        )
        poll = min(IDLE_POLL_SECONDS, config.delivery.retry_initial_seconds / 4)
        loop.run(stop, poll=poll, heartbeat=heartbeat)
        log.info("sender_stopped")
