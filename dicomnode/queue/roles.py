"""The roles of a multi-host deployment (``queue.backend = "rabbitmq"``), as ``dicomnode serve``
and ``dicomnode work`` run them.

- At a site, ``serve`` runs the listener (C-STORE, study assembly into the site's SQLite
  queue), the sender, and :func:`run_site_broker`: the :class:`InstanceServer` the workers pull
  pixels from, the :class:`JobDispatcher` publishing ready jobs and the :class:`ResultIntake`
  recording the pool's answers (which create the deliveries the sender makes).
- On a GPU host, ``work`` runs :func:`run_broker_worker`: the ensemble and the local worker's
  study processing (:class:`dicomnode.worker.StudyProcessor`) behind a :class:`BrokerWorker`.

Both loops survive the broker going away: they log, wait with a back-off and connect again;
what was in flight is safe in the broker (unacknowledged jobs and results come back) and in the
site's state database.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

from pika.exceptions import AMQPError

from dicomnode.config import BrokerConfig, Config, ConfigError, QueueBackend
from dicomnode.logging import get_logger
from dicomnode.queue.messages import MessageError
from dicomnode.queue.rabbitmq import (
    Broker,
    BrokerError,
    BrokerSettings,
    QueueStats,
    connected,
    read_credentials,
)
from dicomnode.queue.remote import (
    BrokerWorker,
    FinalFailure,
    JobDispatcher,
    PriorityRule,
    Processed,
    ResultIntake,
)
from dicomnode.queue.sqlite import open_queue
from dicomnode.queue.transfer import InstanceServer, ServerTls, read_token
from dicomnode.records import EventLike, StudyJob
from dicomnode.storage import StateLayout

log = get_logger(__name__)

#: Longest wait between two attempts to reach the broker.
RECONNECT_MAX_SECONDS = 30.0
#: How often the site looks for ready jobs and answers when there was nothing to do.
SITE_POLL_SECONDS = 0.2


def broker_config(config: Config) -> BrokerConfig:
    """The ``[queue]`` broker keys, or ConfigError when the backend is not RabbitMQ."""
    broker = config.queue.broker
    if config.queue.backend is not QueueBackend.RABBITMQ or broker is None:
        raise ConfigError('queue.backend: this role needs backend = "rabbitmq"')
    return broker


def broker_settings(broker: BrokerConfig) -> BrokerSettings:
    """How :class:`Broker` reaches RabbitMQ, from ``[queue]``."""
    return BrokerSettings(
        url=broker.url,
        credentials=None
        if broker.credentials_file is None
        else read_credentials(broker.credentials_file),
        ca_certificates=broker.ca_certificates,
        certificate=broker.certificate,
        private_key=broker.private_key,
        prefix=broker.prefix,
        levels=broker.levels,
        delivery_limit=broker.delivery_limit,
        heartbeat_seconds=broker.heartbeat_seconds,
    )


def priority_rules(broker: BrokerConfig) -> tuple[PriorityRule, ...]:
    return tuple(PriorityRule(r.level, r.calling_ae, r.station_name) for r in broker.priority)


def reconnect_wait(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failed connections (1, 2, 4 ... 30)."""
    return min(2.0 ** max(failures - 1, 0), RECONNECT_MAX_SECONDS)


def site_checks(config: Config) -> BrokerConfig:
    """The broker keys a site (``serve``) needs, or ConfigError naming the missing one."""
    broker = broker_config(config)
    if broker.site is None:
        raise ConfigError("queue.site: required for serve with the rabbitmq backend")
    if broker.instances is None or not broker.instances.url:
        raise ConfigError(
            "queue.instances.url: required for serve with the rabbitmq backend (where workers "
            "fetch the instances)"
        )
    return broker


def start_instance_server(config: Config) -> InstanceServer:
    """The site's instance server on its own connection to the state database."""
    broker = site_checks(config)
    instances = broker.instances
    assert instances is not None
    db = StateLayout(config.node.state_dir).open_db()
    tls = (
        ServerTls(instances.certificate, instances.private_key)
        if instances.certificate is not None and instances.private_key is not None
        else None
    )
    server = InstanceServer(
        instances.bind, instances.port, db.instance, read_token(instances.token_file), tls
    )
    log.info(
        "instance_server_started", bind=instances.bind, port=server.port, tls=tls is not None
    )
    return server.start()


def keep_connected(
    settings: BrokerSettings,
    role: str,
    stop: EventLike,
    declare: Callable[[Broker], None],
    begin: Callable[[Broker], Callable[[], bool]],
    idle_seconds: float,
    heartbeat: Callable[[], None] | None = None,
    errors: tuple[type[Exception], ...] = (BrokerError, AMQPError),
) -> None:
    """A broker role's loop until ``stop`` is set: connect, ``declare`` what the role needs,
    ``begin`` its work on the connection (a step: True when it did something), and run the step
    again and again, keeping the connection alive for ``idle_seconds`` after an idle one.
    Whenever the broker goes away (``errors``), connect again after a back-off that grows with
    each failure in a row (:func:`reconnect_wait`)."""
    failures = 0
    while not stop.is_set():
        if heartbeat is not None:
            heartbeat()
        try:
            with connected(settings) as broker:
                declare(broker)
                if failures:
                    log.info("broker_connected", after_failures=failures)
                failures = 0
                step = begin(broker)
                while not stop.is_set():
                    if heartbeat is not None:
                        heartbeat()
                    if not step():
                        broker.keep_alive(idle_seconds)
        except errors as exc:
            failures += 1
            wait = reconnect_wait(failures)
            log.warning(
                "broker_unavailable",
                role=role,
                error=f"{type(exc).__name__}: {exc}",
                retry_in_seconds=wait,
            )
            stop.wait(wait)


def run_site_broker(
    config: Config, stop: EventLike, heartbeat: Callable[[], None] | None = None
) -> None:
    """The site's link to the worker pool: instance server, dispatcher and result intake, until
    ``stop`` is set."""
    broker_cfg = site_checks(config)
    site = broker_cfg.site
    instances = broker_cfg.instances
    assert site is not None and instances is not None
    layout = StateLayout(config.node.state_dir)
    server = start_instance_server(config)
    try:
        with layout.open_db() as db:
            queue = open_queue(db, config)

            def begin(broker: Broker) -> Callable[[], bool]:
                dispatcher = JobDispatcher(
                    site,
                    queue,
                    broker,
                    instances.url,
                    priority_rules(broker_cfg),
                    broker_cfg.default_priority,
                )
                intake = ResultIntake(site, queue, broker, layout.results_dir, config.destinations)
                return lambda: bool(intake.drain() + dispatcher.dispatch_ready())

            keep_connected(
                broker_settings(broker_cfg),
                "site",
                stop,
                lambda broker: broker.declare_site(site),
                begin,
                SITE_POLL_SECONDS,
                heartbeat,
                errors=(BrokerError, AMQPError, MessageError, sqlite3.Error),
            )
    finally:
        server.stop()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_broker_worker(
    config: Config,
    stop: EventLike,
    ready: Callable[[], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> None:
    """``dicomnode work`` with the rabbitmq backend: load the ensemble, then take jobs from the
    broker one at a time until ``stop`` is set (the current job is finished first)."""
    broker_config(config)
    from dicomnode.worker import (  # torch only where inference runs
        NoDecodableViewsError,
        StudyProcessor,
        failure_reason,
        load_ensemble,
        node_identity,
        skipped_note,
        warm_up_writers,
    )

    ensemble = load_ensemble(config)
    warm_up_writers(node_identity(config), ensemble.algorithm)
    processor = StudyProcessor(config, ensemble, heartbeat=heartbeat)

    def process(job: StudyJob, folder: Path) -> Processed:
        try:
            outcome = processor.process(job, folder)
        except NoDecodableViewsError as exc:
            raise FinalFailure(failure_reason(exc)) from exc
        return Processed(outcome.results, skipped_note(outcome.skipped, outcome.analysed))

    run_pool_worker(config, stop, process, ready, heartbeat, device=str(ensemble.device))


def run_pool_worker(
    config: Config,
    stop: EventLike,
    process: Callable[[StudyJob, Path], Processed],
    ready: Callable[[], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
    device: str = "",
) -> None:
    """Take jobs from the broker one at a time and answer them with ``process`` until
    ``stop`` is set, connecting again whenever the broker goes away."""
    broker_cfg = broker_config(config)
    if broker_cfg.token_file is None:
        raise ConfigError("queue.instances.token_file: required for work with rabbitmq")
    token = read_token(broker_cfg.token_file)
    settings = broker_settings(broker_cfg)
    scratch = Path(config.node.state_dir) / "jobs"
    scratch.mkdir(parents=True, exist_ok=True)
    name = worker_name()
    log.info("worker_started", owner=name, backend="rabbitmq", device=device)
    if ready is not None:
        ready()

    def begin(broker: Broker) -> Callable[[], bool]:
        worker = BrokerWorker(
            broker,
            name,
            token,
            process,
            ca_certificates=broker_cfg.ca_certificates,
            scratch=scratch,
        )
        return worker.run_once

    idle = BrokerWorker.idle_seconds
    keep_connected(settings, "worker", stop, Broker.declare_pool, begin, idle, heartbeat)
    log.info("worker_stopped", owner=name)


def pool_stats(config: Config) -> tuple[QueueStats, ...]:
    """Depth and consumers of the pool's job queues and this site's queues (for ``status``)."""
    broker_cfg = broker_config(config)
    settings = broker_settings(broker_cfg)
    names = [settings.jobs_queue(level) for level in range(settings.levels)]
    if broker_cfg.site is not None:
        names += [settings.results_queue(broker_cfg.site), settings.dead_queue(broker_cfg.site)]
    with connected(settings) as broker:
        return broker.stats(names)

