"""The long-running commands: ``listen``, ``work`` and ``serve``, with signals, readiness and
the systemd watchdog.

- ``listen``: the listener (C-ECHO, C-STORE, durable storage) and study assembly with retention
  (:mod:`dicomnode.assembly`: it queues a job for each study quiet for
  ``study.stable_seconds``), two roles in two threads. Study assembly runs where the listener
  runs, in ``listen`` or ``serve``, and nowhere else: it needs the listener's state directory.
- ``work``: the worker (inference, result objects) and the sender (C-STORE to the
  destinations), each in a thread.
- ``serve``: all of them for a single machine. The listener, study assembly and the sender run
  as threads of the main process; the worker runs in a child process (``multiprocessing``
  spawn), so that a crash in inference (a segfault, the out-of-memory killer) never takes the
  listener down. The child is restarted when it dies or stops giving signs of life for a whole
  lease period, with a delay that doubles from 1 s to 60 s. A worker that dies before it ever
  loaded its weights (a bad weights folder) stops the service instead: restarting cannot help.

Every role calls a heartbeat from its loop. The main thread pings the systemd watchdog only while
every role's heartbeat is fresh, sends ``READY=1`` once the port is bound and the weights are
loaded, and ``STOPPING=1`` on SIGTERM or SIGINT, after which the roles finish what they are
doing (the current C-STORE, job or delivery) and stop. Work in flight is never lost: queued and
leased jobs and pending deliveries live in the state database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from dicomnode import health, metrics, sdnotify
from dicomnode.assembly import run_assembler
from dicomnode.children import ChildContext, ChildSupervisor, Heartbeat, signal_setter
from dicomnode.config import Config, ConfigError, QueueBackend
from dicomnode.httpd import HttpEndpoint, NodeEndpoints, url
from dicomnode.logging import configure_logging, get_logger
from dicomnode.records import EventLike
from dicomnode.scp import Listener, run_listener
from dicomnode.sender import run_delivery

log = get_logger(__name__)

#: The main loop's interval when no watchdog asks for faster pings.
TICK_SECONDS = 1.0
#: How long a stopping service waits for each role to finish its current work.
STOP_GRACE_SECONDS = 60.0

ExitCode = int
Role = Callable[[EventLike, Callable[[], None]], None]


class RoleThread:
    """One role run in a daemon thread; an exception that ends it is logged and kept."""

    def __init__(self, name: str, role: Role, stop: threading.Event) -> None:
        self.name = name
        self.heartbeat = Heartbeat()
        self.error: BaseException | None = None
        self._role = role
        self._stop = stop
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._role(self._stop, self.heartbeat.beat)
        except BaseException as exc:
            self.error = exc
            log.error(
                "role_crashed",
                role=self.name,
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_tb(exc.__traceback__)),
            )

    def start(self) -> None:
        self.heartbeat.beat()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("role_not_stopped", role=self.name, waited_seconds=timeout)


def worker_child(config: Config, context: ChildContext) -> None:
    """Entry point of the worker child process of ``serve`` (runs in a fresh interpreter).

    The parent stops it with SIGTERM (the current job is finished first). Readiness and
    heartbeat go to the parent through lock-free shared values: the child may be killed at any
    moment, and a lock or condition it held would then stay held forever. Exit status 3 when
    the worker cannot run at all.
    """
    configure_logging(config.node.log_level)
    metrics.process_started("worker", [health.WORKER])
    from dicomnode.worker import run_worker  # torch is imported in the child only

    try:
        run_worker(config, context.stop, ready=context.mark_ready, heartbeat=context.alive)
    except Exception as exc:
        log.error(
            "worker_crashed",
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_tb(exc.__traceback__)),
        )
        sys.exit(3)


def worker_supervisor(config: Config) -> ChildSupervisor:
    """The worker of ``serve`` in a child process, restarted when it dies or is silent for a
    whole lease period."""
    return ChildSupervisor("worker", worker_child, (config,), config.queue.lease_seconds)


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stop``; returns a function restoring the previous handlers."""
    handler = signal_setter(stop)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def supervise(
    stop: threading.Event,
    roles: Sequence[RoleThread],
    supervisor: ChildSupervisor | None,
    is_ready: Callable[[], bool],
    describe: Callable[[], str],
    on_tick: Callable[[], None] | None = None,
) -> ExitCode:
    """The main loop: watch the roles, announce readiness, ping the watchdog, call ``on_tick``;
    until ``stop``.

    Returns 1 when a role thread ended by itself (e.g. the port could not be bound) or the
    worker failed at start-up, 0 after a requested stop.
    """
    watchdog = sdnotify.watchdog_interval()
    tick = TICK_SECONDS if watchdog is None else min(TICK_SECONDS, watchdog / 2)
    announced = False
    while not stop.is_set():
        ended = [role for role in roles if not role.alive]
        if ended:
            log.error("service_failed", roles=[role.name for role in ended])
            return 1
        if supervisor is not None and not supervisor.check():
            log.error("service_failed", roles=["worker"], reason="worker failed at start-up")
            return 1
        if not announced and is_ready():
            status = describe()
            sdnotify.ready(status)
            log.info("service_ready", status=status)
            announced = True
        if watchdog is None or all(role.heartbeat.age() < watchdog for role in roles):
            sdnotify.watchdog_ping()
        if on_tick is not None:
            on_tick()
        stop.wait(tick)
    return 0


class Reporting:
    """What a role tells operators: its facts file every tick (for ``dicomnode status``) and,
    with ``http.enabled``, its HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``).

    ``facts`` gives the role's :class:`~dicomnode.health.RoleFacts` now (its ``http_port`` is
    filled in here). An HTTP port that cannot be bound is logged (``http_failed``) and the node
    runs without the endpoint: receiving images matters more than being watched, and
    Prometheus shows the target down."""

    def __init__(self, config: Config, role: str, facts: Callable[[], health.RoleFacts]) -> None:
        self.config = config
        self.role = role
        self._facts = facts
        self.http: HttpEndpoint | None = None
        self.endpoints: NodeEndpoints | None = None
        self._write_failed = False

    def facts(self) -> health.RoleFacts:
        port = None if self.http is None else self.http.port
        return dataclasses.replace(self._facts(), http_port=port)

    def start(self) -> None:
        components = health.role_components(self.config, self.role)
        metrics.process_started(self.role, components)
        if health.SENDER in components:
            metrics.destinations_known(d.key for d in self.config.destinations)
        http = self.config.http
        if http.enabled:
            self.endpoints = NodeEndpoints(self.config, self.role, self.facts)
            endpoint = HttpEndpoint(http, http.port_of(self.role), self.endpoints)
            try:
                self.http = endpoint.start()
            except (OSError, ConfigError) as exc:  # a port in use; HTTPS files changed since start
                log.error(
                    "http_failed",
                    bind=http.bind,
                    port=http.port_of(self.role),
                    error=f"{type(exc).__name__}: {exc}",
                )
            else:
                log.info(
                    "http_started",
                    bind=http.bind,
                    port=endpoint.port,
                    tls=endpoint.scheme == "https",
                    url=url(endpoint),
                    paths=["/metrics", "/healthz", "/readyz"],
                )
        self.tick()

    def tick(self) -> None:
        """Write the facts file (a failure is logged once, not every second)."""
        try:
            health.write_facts(self.config.node.state_dir, self.facts())
            self._write_failed = False
        except OSError as exc:
            if not self._write_failed:
                log.warning("health_facts_not_written", error=f"{type(exc).__name__}: {exc}")
            self._write_failed = True

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.endpoints is not None:
            self.endpoints.close()
        with contextlib.suppress(OSError):
            health.remove_facts(self.config.node.state_dir, self.role)


def run_roles(
    name: str,
    roles: Sequence[RoleThread],
    stop: threading.Event,
    is_ready: Callable[[], bool],
    describe: Callable[[], str],
    supervisor: ChildSupervisor | None = None,
    reporting: Reporting | None = None,
) -> ExitCode:
    """Start the roles, supervise them until SIGTERM/SIGINT or a failure, then stop them.
    ``reporting`` starts first (``/healthz`` answers while the roles start) and stops last."""
    restore = install_signal_handlers(stop)
    log.info("service_starting", service=name, roles=[r.name for r in roles])
    code = 1
    try:
        if reporting is not None:
            reporting.start()
        for role in roles:
            role.start()
        if supervisor is not None:
            supervisor.start()
        on_tick = None if reporting is None else reporting.tick
        code = supervise(stop, roles, supervisor, is_ready, describe, on_tick)
    finally:
        sdnotify.stopping()
        log.info("service_stopping", service=name)
        stop.set()
        if supervisor is not None:
            supervisor.shutdown(STOP_GRACE_SECONDS)
        for role in roles:
            role.join(STOP_GRACE_SECONDS)
        if reporting is not None:
            reporting.stop()
        restore()
        log.info("service_stopped", service=name, exit_code=code)
    return code


class _Bound:
    """Remembers the listener once its port is bound (its ``ready`` callback)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.port: int | None = None

    def __call__(self, listener: Listener) -> None:
        self.port = listener.port
        self.event.set()


def _listener_role(config: Config, bound: _Bound) -> Role:
    def role(stop: EventLike, heartbeat: Callable[[], None]) -> None:
        assert isinstance(stop, threading.Event)
        run_listener(config, stop, ready=bound, heartbeat=heartbeat)

    return role


def _assembler_role(config: Config) -> Role:
    def role(stop: EventLike, heartbeat: Callable[[], None]) -> None:
        run_assembler(config, stop, heartbeat)

    return role


def _listening_roles(config: Config, bound: _Bound, stop: threading.Event) -> list[RoleThread]:
    """The listener and the study assembly beside it (the listener first)."""
    return [
        RoleThread("listener", _listener_role(config, bound), stop),
        RoleThread("assembler", _assembler_role(config), stop),
    ]


def _sender_role(config: Config) -> Role:
    def role(stop: EventLike, heartbeat: Callable[[], None]) -> None:
        run_delivery(config, stop, heartbeat)

    return role


def _listening(config: Config, bound: _Bound) -> str:
    return f"listening as {config.node.ae_title} on {config.node.bind}:{bound.port}"


def _facts(
    role: str,
    listener: tuple[_Bound, RoleThread] | None = None,
    worker_ready: bool = False,
    worker_age: float | None = None,
) -> health.RoleFacts:
    """A role's facts now: the listener's port once it serves and its last beat (when the role
    has a ``listener``), and the worker's state (when it has one: ``worker_age`` is set)."""
    port, age = None, None
    if listener is not None:
        bound, thread = listener
        port = bound.port if bound.event.is_set() and thread.alive else None
        age = thread.heartbeat.age()
    return health.RoleFacts(
        role=role,
        pid=os.getpid(),
        reported_at=time.time(),
        dicom_port=port,
        listener_age=age,
        worker_ready=worker_ready,
        worker_age=worker_age,
    )


def run_listen(config: Config) -> ExitCode:
    """``dicomnode listen``: the listener and study assembly."""
    stop, bound = threading.Event(), _Bound()
    roles = _listening_roles(config, bound, stop)
    reporting = Reporting(config, "listen", lambda: _facts("listen", (bound, roles[0])))
    return run_roles(
        "listen",
        roles,
        stop,
        bound.event.is_set,
        lambda: _listening(config, bound),
        reporting=reporting,
    )


def run_work(config: Config) -> ExitCode:
    """``dicomnode work``: the worker and the sender; with ``queue.backend = "rabbitmq"`` the
    worker of the pool alone (results go back to the site through the broker, and the site's
    sender delivers them)."""
    stop, loaded = threading.Event(), threading.Event()
    pool = config.queue.backend is QueueBackend.RABBITMQ

    def worker(stop: EventLike, heartbeat: Callable[[], None]) -> None:
        if pool:
            from dicomnode.queue.roles import run_broker_worker

            run_broker_worker(config, stop, ready=loaded.set, heartbeat=heartbeat)
        else:
            from dicomnode.worker import run_worker  # torch only where inference runs

            run_worker(config, stop, ready=loaded.set, heartbeat=heartbeat)

    roles = [RoleThread("worker", worker, stop)]
    if not pool:
        roles.append(RoleThread("sender", _sender_role(config), stop))

    def facts() -> health.RoleFacts:
        alive = roles[0].alive
        return _facts(
            "work", worker_ready=loaded.is_set() and alive, worker_age=roles[0].heartbeat.age()
        )

    return run_roles(
        "work",
        roles,
        stop,
        loaded.is_set,
        lambda: "worker ready",
        reporting=Reporting(config, "work", facts),
    )


def _site_broker_role(config: Config) -> Role:
    def role(stop: EventLike, heartbeat: Callable[[], None]) -> None:
        from dicomnode.queue.roles import run_site_broker

        run_site_broker(config, stop, heartbeat)

    return role


def run_site(config: Config) -> ExitCode:
    """``dicomnode serve`` with ``queue.backend = "rabbitmq"``: a site of a multi-host
    deployment. Listener, sender and the site's link to the worker pool (instance server,
    dispatcher, result intake), each a thread of this process; no inference here."""
    from dicomnode.queue.roles import site_checks

    site_checks(config)
    stop, bound = threading.Event(), _Bound()
    roles = [
        *_listening_roles(config, bound, stop),
        RoleThread("sender", _sender_role(config), stop),
        RoleThread("broker", _site_broker_role(config), stop),
    ]
    return run_roles(
        "serve",
        roles,
        stop,
        bound.event.is_set,
        lambda: _listening(config, bound) + ", worker pool via the broker",
        reporting=Reporting(config, "serve", lambda: _facts("serve", (bound, roles[0]))),
    )


def run_serve(config: Config) -> ExitCode:
    """``dicomnode serve``: listener and sender in this process, the worker in a child (with
    ``queue.backend = "rabbitmq"``: :func:`run_site`)."""
    if config.queue.backend is QueueBackend.RABBITMQ:
        return run_site(config)
    stop, bound = threading.Event(), _Bound()
    roles = [
        *_listening_roles(config, bound, stop),
        RoleThread("sender", _sender_role(config), stop),
    ]
    supervisor = worker_supervisor(config)

    def facts() -> health.RoleFacts:
        return _facts(
            "serve",
            (bound, roles[0]),
            worker_ready=supervisor.child_ready,
            worker_age=supervisor.heartbeat.age(),
        )

    return run_roles(
        "serve",
        roles,
        stop,
        lambda: bound.event.is_set() and supervisor.ready,
        lambda: _listening(config, bound) + ", worker ready",
        supervisor,
        Reporting(config, "serve", facts),
    )
