"""The broker for several hosts: RabbitMQ over AMQP 0-9-1 (pika), as MONAI Deploy's Informatics
Gateway uses it.

Topology (all queues durable quorum queues, all messages persistent, every publish confirmed):

- ``<prefix>.jobs.<level>`` (level 0 = most urgent, 1, ...): study jobs from every site for the
  worker pool. RabbitMQ 3.10's quorum queues have no message priorities, so each priority level
  is its own queue and a worker takes from the most urgent non-empty one (``basic.get`` in level
  order): strict priority. Each has ``x-delivery-limit``: a job returned that many times
  without being acknowledged (its workers died, or gave it back after retryable errors) is
  dead-lettered at its next return (``delivery_limit + 1`` deliveries in all, RabbitMQ 3.10;
  ``at-least-once`` dead-lettering) to
- the headers exchange ``<prefix>.dead``, which routes by the message's ``site`` header into
  ``<prefix>.dead.<site>``: the site marks those jobs failed, with the reason RabbitMQ records
  in the ``x-death`` header (``delivery_limit``) and the count;
- ``<prefix>.results.<site>``: result files and outcomes from the workers to the site that sent
  the job, which records them in its state database and delivers them to its PACS.

A worker takes one job at a time and acknowledges it only after its results are confirmed by
the broker in the site's results queue; a worker that dies leaves its job unacknowledged, and the
broker gives it to another worker when the dead worker's connection closes.

The delivery acknowledgement timeout (``consumer_timeout``, 30 minutes by default) applies to
unacknowledged deliveries on a channel: the broker closes the channel of a worker whose job runs
longer, and the job goes to another worker (the first one finishes, cannot publish on the closed
channel, reconnects and takes the next job); a job that always runs longer ends dead-lettered at
the delivery limit. Set ``consumer_timeout`` in ``rabbitmq.conf`` above the longest job you
expect (``docs/multi-host.md``); RabbitMQ 3.10 has no per-queue setting and no way for a client
to read the value.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError
from pika.spec import BasicProperties

from dicomnode.queue.messages import (
    JobMessage,
    OutcomeMessage,
    ResultFileMessage,
    decode_job,
    encode,
)

QUORUM = {"x-queue-type": "quorum"}
PERSISTENT = 2


class BrokerError(RuntimeError):
    """The broker could not be reached or refused an operation (the message says which)."""


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the broker and which topology to use (``[queue]`` with ``backend =
    "rabbitmq"``). ``credentials`` is ``(user, password)`` read from the credentials file."""

    url: str
    credentials: tuple[str, str] | None = None
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    prefix: str = "dicomnode"
    levels: int = 2
    delivery_limit: int = 5
    heartbeat_seconds: int = 30

    def jobs_queue(self, level: int) -> str:
        return f"{self.prefix}.jobs.{level}"

    def results_queue(self, site: str) -> str:
        return f"{self.prefix}.results.{site}"

    def dead_queue(self, site: str) -> str:
        return f"{self.prefix}.dead.{site}"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"


def read_credentials(path: Path) -> tuple[str, str]:
    """``user:password`` from the first line of a file (readable by the service only)."""
    line = path.read_text(encoding="utf-8").strip().splitlines()[0] if path.is_file() else ""
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise BrokerError(f"{path}: expected one line 'user:password'")
    return user, password


def connection_parameters(settings: BrokerSettings) -> pika.URLParameters:
    """pika's parameters for the URL, with the credentials and TLS settings applied."""
    parameters = pika.URLParameters(settings.url)
    parameters.heartbeat = settings.heartbeat_seconds
    parameters.blocked_connection_timeout = 300
    parameters.connection_attempts = 1
    if settings.credentials is not None:
        parameters.credentials = pika.PlainCredentials(*settings.credentials)
    if settings.url.startswith("amqps://"):
        context = ssl.create_default_context(
            cafile=str(settings.ca_certificates) if settings.ca_certificates else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.certificate is not None:
            context.load_cert_chain(
                str(settings.certificate),
                str(settings.private_key) if settings.private_key else None,
            )
        parameters.ssl_options = pika.SSLOptions(context, parameters.host)
    return parameters


@dataclass(frozen=True)
class ReceivedJob:
    """A job taken from the broker, not yet acknowledged."""

    message: JobMessage
    delivery_tag: int
    level: int
    deliveries: int
    """How often the broker has delivered it (1: first time; quorum queues count)."""


@dataclass(frozen=True)
class QueueStats:
    """Depth and consumers of one queue, as the broker reports them."""

    name: str
    messages: int
    consumers: int


class Broker:
    """One connection and channel to RabbitMQ (not thread-safe: one per thread)."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        try:
            self.connection = pika.BlockingConnection(connection_parameters(settings))
            self.channel: BlockingChannel = self.connection.channel()
            self.channel.confirm_delivery()
        except (AMQPError, OSError) as exc:  # OSError: TLS (certificate refused), DNS, socket
            raise BrokerError(f"cannot connect to the broker: {type(exc).__name__} {exc}") from exc

    def close(self) -> None:
        try:
            if self.connection.is_open:
                self.connection.close()
        except AMQPError:
            pass

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- topology ----------------------------------------------------------------------------

    def declare_pool(self) -> None:
        """The job queues and the dead-letter exchange (idempotent)."""
        s = self.settings
        self.channel.exchange_declare(s.dead_exchange, exchange_type="headers", durable=True)
        for level in range(s.levels):
            self.channel.queue_declare(
                s.jobs_queue(level),
                durable=True,
                arguments={
                    **QUORUM,
                    "x-delivery-limit": s.delivery_limit,
                    "x-dead-letter-exchange": s.dead_exchange,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )

    def declare_site(self, site: str) -> None:
        """A site's results and dead-letter queues (idempotent)."""
        s = self.settings
        self.declare_pool()
        self.channel.queue_declare(s.results_queue(site), durable=True, arguments=QUORUM)
        self.channel.queue_declare(s.dead_queue(site), durable=True, arguments=QUORUM)
        self.channel.queue_bind(
            s.dead_queue(site),
            s.dead_exchange,
            arguments={"x-match": "all", "site": site},
        )

    # -- publishing (confirmed) ----------------------------------------------------------------

    def publish(
        self, queue: str, body: bytes, headers: Mapping[str, Any], content_type: str
    ) -> None:
        """Publish persistently to ``queue``; returns once the broker confirmed it."""
        properties = BasicProperties(
            delivery_mode=PERSISTENT, content_type=content_type, headers=dict(headers)
        )
        try:
            self.channel.basic_publish("", queue, body, properties=properties, mandatory=True)
        except AMQPError as exc:
            raise BrokerError(f"publish to {queue} not confirmed: {type(exc).__name__}") from exc

    def publish_job(self, job: JobMessage) -> None:
        level = min(max(job.priority, 0), self.settings.levels - 1)
        self.publish(
            self.settings.jobs_queue(level),
            encode(job),
            {"site": job.site, "job_id": job.job_id, "kind": "job"},
            "application/json",
        )

    def publish_result_file(self, header: ResultFileMessage, data: bytes) -> None:
        self.publish(
            self.settings.results_queue(header.site),
            data,
            {"kind": "file", "header": encode(header).decode()},
            "application/dicom",
        )

    def publish_outcome(self, outcome: OutcomeMessage) -> None:
        self.publish(
            self.settings.results_queue(outcome.site),
            encode(outcome),
            {"kind": "outcome", "site": outcome.site, "job_id": outcome.job_id},
            "application/json",
        )

    # -- taking jobs -------------------------------------------------------------------------

    def get_job(self) -> ReceivedJob | None:
        """The next job from the most urgent non-empty level, or None (nothing waiting)."""
        for level in range(self.settings.levels):
            method, properties, body = self.channel.basic_get(
                self.settings.jobs_queue(level), auto_ack=False
            )
            if method is None:
                continue
            headers = (properties.headers or {}) if properties else {}
            count = int(headers.get("x-delivery-count", 0)) + 1
            return ReceivedJob(decode_job(body), method.delivery_tag, level, count)
        return None

    def ack(self, delivery_tag: int) -> None:
        self.channel.basic_ack(delivery_tag)

    def give_back(self, delivery_tag: int) -> None:
        """Return a job for another attempt (its delivery count grows toward the limit)."""
        self.channel.basic_nack(delivery_tag, requeue=True)

    def reject(self, delivery_tag: int) -> None:
        """Dead-letter a message that cannot be a job (malformed)."""
        self.channel.basic_reject(delivery_tag, requeue=False)

    def keep_alive(self, seconds: float) -> None:
        """Serve heartbeats and the channel for ``seconds`` (while a job runs elsewhere)."""
        self.connection.process_data_events(time_limit=seconds)

    # -- consuming a site's queues -------------------------------------------------------------

    def drain(
        self,
        queue: str,
        handle: Callable[[BasicProperties, bytes], None],
        *,
        limit: int = 100,
    ) -> int:
        """Handle up to ``limit`` waiting messages of ``queue`` one by one, acknowledging each
        after ``handle`` returned (an exception leaves it unacknowledged: it comes back)."""
        handled = 0
        while handled < limit:
            method, properties, body = self.channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            try:
                handle(properties, body)
            except Exception:
                self.channel.basic_nack(method.delivery_tag, requeue=True)
                raise
            self.channel.basic_ack(method.delivery_tag)
            handled += 1
        return handled

    def stats(self, queues: Sequence[str]) -> tuple[QueueStats, ...]:
        """Messages ready and consumers of each queue (passive declares)."""
        out = []
        for name in queues:
            frame = self.channel.queue_declare(name, passive=True)
            out.append(QueueStats(name, frame.method.message_count, frame.method.consumer_count))
        return tuple(out)


@contextmanager
def connected(settings: BrokerSettings, retry_seconds: float = 0.0) -> Iterator[Broker]:
    """A broker connection, retried for ``retry_seconds`` (the broker may be restarting)."""
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            broker = Broker(settings)
            break
        except BrokerError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)
    try:
        yield broker
    finally:
        broker.close()


def death_reason(properties: BasicProperties) -> str:
    """Why RabbitMQ dead-lettered a message, from its ``x-death`` header, in words."""
    deaths = ((properties.headers or {}).get("x-death") or []) if properties else []
    if not deaths:
        return "dead-lettered by the broker"
    first = deaths[0]
    reason = first.get("reason", b"")
    reason = reason.decode() if isinstance(reason, bytes) else str(reason)
    queue = first.get("queue", b"")
    queue = queue.decode() if isinstance(queue, bytes) else str(queue)
    if reason == "delivery_limit":
        return (
            f"the worker pool gave up: delivered the maximum number of times without an "
            f"answer (queue {queue})"
        )
    return f"dead-lettered by the broker ({reason}, queue {queue})"
