"""The long-running commands: ``listen``, ``work`` and ``serve``, with signals, readiness and
the systemd watchdog.

- ``listen``: the listener (C-ECHO, C-STORE, durable storage) and study assembly: every poll it
  queues a job for each study quiet for ``study.stable_seconds``. Study assembly therefore
  always runs where the listener runs, in ``listen`` or ``serve``, and nowhere else.
- ``work``: the worker (inference, result objects) and the sender (C-STORE to the
  destinations), each in a thread.
- ``serve``: all three for a single machine. The listener and the sender run as threads of the
  main process; the worker runs in a child process (``multiprocessing`` spawn), so that a crash
  in inference (a segfault, the out-of-memory killer) never takes the listener down. The child
  is restarted when it dies or stops giving signs of life for a whole lease period, with a delay
  that doubles from 1 s to 60 s. A worker that dies before it ever loaded its weights (a bad
  weights folder) stops the service instead: restarting cannot help.

Every role calls a heartbeat from its loop. The main thread pings the systemd watchdog only while
every role's heartbeat is fresh, sends ``READY=1`` once the port is bound and the weights are
loaded, and ``STOPPING=1`` on SIGTERM or SIGINT, after which the roles finish what they are
doing (the current C-STORE, job or delivery) and stop. Work in flight is never lost: queued and
leased jobs and pending deliveries live in the state database.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from types import FrameType

from dicomnode import sdnotify
from dicomnode.config import Config
from dicomnode.delivery import run_delivery
from dicomnode.logging import configure_logging, get_logger
from dicomnode.records import EventLike
from dicomnode.scp import Listener, run_listener

log = get_logger(__name__)

#: The main loop's interval when no watchdog asks for faster pings.
TICK_SECONDS = 1.0
#: How long a stopping service waits for each role to finish its current work.
STOP_GRACE_SECONDS = 60.0
#: Delay before restarting a dead worker child: doubles from the first to the last value.
RESTART_DELAY_SECONDS = (1.0, 60.0)

ExitCode = int
Role = Callable[[EventLike, Callable[[], None]], None]


class Heartbeat:
    """When a role last showed it works (``time.monotonic()``, system-wide on Linux).

    Backed by a ``multiprocessing`` shared double when the role runs in a child process.
    """

    def __init__(self, shared: Synchronized[float] | None = None) -> None:
        self.shared = shared
        self._last = time.monotonic()
        self.beat()

    def beat(self) -> None:
        now = time.monotonic()
        if self.shared is not None:
            self.shared.value = now
        self._last = now

    def age(self) -> float:
        """Seconds since the last beat."""
        last = self.shared.value if self.shared is not None else self._last
        return time.monotonic() - last


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


def worker_child(config: Config, ready: Synchronized[float], beat: Synchronized[float]) -> None:
    """Entry point of the worker child process of ``serve`` (runs in a fresh interpreter).

    The parent stops it with SIGTERM (the current job is finished first); SIGINT is ignored (a
    Ctrl-C in a terminal reaches the whole process group, and the parent handles it). Readiness
    and heartbeat go to the parent through lock-free shared values: the child may be killed at
    any moment, and a lock or condition it held would then stay held forever. Exit status 3
    when the worker cannot run at all.
    """
    configure_logging(config.node.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, signal_setter(stop))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from dicomnode.worker import run_worker  # torch is imported in the child only

    heartbeat = Heartbeat(beat)
    parent = os.getppid()

    def mark_ready() -> None:
        ready.value = time.monotonic()

    def alive() -> None:
        """Beat, and stop if the parent is gone (killed without a chance to stop us)."""
        heartbeat.beat()
        if os.getppid() != parent:
            log.warning("worker_orphaned", parent_pid=parent)
            stop.set()

    try:
        run_worker(config, stop, ready=mark_ready, heartbeat=alive)
    except Exception as exc:
        log.error(
            "worker_crashed",
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_tb(exc.__traceback__)),
        )
        sys.exit(3)


class WorkerSupervisor:
    """Runs the worker role in a child process and restarts it when it dies or hangs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")
        self._ready_at = self._ctx.Value("d", 0.0, lock=False)
        self.heartbeat = Heartbeat(self._ctx.Value("d", time.monotonic(), lock=False))
        self.hang_seconds = config.queue.lease_seconds
        self.process: BaseProcess | None = None
        self.ever_ready = False
        self.restarts = 0
        self._delay = RESTART_DELAY_SECONDS[0]
        self._restart_at: float | None = None
        self._started_at = time.monotonic()

    def start(self) -> None:
        """Start a fresh worker child."""
        self._started_at = time.monotonic()
        self.heartbeat.beat()
        assert self.heartbeat.shared is not None
        process = self._ctx.Process(
            target=worker_child,
            args=(self.config, self._ready_at, self.heartbeat.shared),
            name="dicomnode-worker",
        )
        process.start()
        self.process = process
        log.info("worker_process_started", pid=process.pid, restarts=self.restarts)

    @property
    def child_ready(self) -> bool:
        """The current child has loaded its weights."""
        return bool(self._ready_at.value >= self._started_at)

    @property
    def ready(self) -> bool:
        """The worker loaded its weights at least once (it may be restarting now)."""
        self.ever_ready = self.ever_ready or self.child_ready
        return self.ever_ready

    def check(self) -> bool:
        """Restart a dead or hung worker when its delay is up.

        The delay doubles with each restart and falls back to its minimum once a child has run
        for longer than the current delay. Returns False when the worker died before it was
        ever ready (a start-up error such as a bad weights folder).
        """
        ready = self.ready
        process = self.process
        now = time.monotonic()
        if process is not None and process.is_alive():
            if self.child_ready and self.heartbeat.age() > self.hang_seconds:
                log.error("worker_hung", pid=process.pid, silent_seconds=self.heartbeat.age())
                process.kill()
            else:
                if self.child_ready and now - self._started_at > self._delay:
                    self._delay = RESTART_DELAY_SECONDS[0]  # it worked for a while: reset
                return True
        if process is not None:
            process.join()
            log.error(
                "worker_process_died",
                pid=process.pid,
                exit_code=process.exitcode,
                restart_in_seconds=self._delay if ready else None,
            )
            self.process = None
            if not ready:
                return False
            self._restart_at = now + self._delay
            self._delay = min(self._delay * 2, RESTART_DELAY_SECONDS[1])
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.start()
        return True

    def shutdown(self, grace: float) -> None:
        """SIGTERM the child (it finishes its current job); SIGKILL it after ``grace`` s."""
        process = self.process
        if process is None:
            return
        process.terminate()
        process.join(grace)
        if process.is_alive():
            log.warning("worker_killed", pid=process.pid, waited_seconds=grace)
            process.kill()
            process.join()
        self.process = None


def signal_setter(event: threading.Event) -> Callable[[int, FrameType | None], None]:
    """A signal handler that sets ``event`` and logs the signal.

    ``event.set()`` runs in a new thread: a handler runs in the main thread, which may be
    inside ``event.wait()`` holding the event's lock at that moment; from another thread
    ``set()`` simply waits for it.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        threading.Thread(target=event.set, name="signal", daemon=True).start()

    return handler


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
    supervisor: WorkerSupervisor | None,
    is_ready: Callable[[], bool],
    describe: Callable[[], str],
) -> ExitCode:
    """The main loop: watch the roles, announce readiness, ping the watchdog; until ``stop``.

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
        stop.wait(tick)
    return 0


def run_roles(
    name: str,
    roles: Sequence[RoleThread],
    stop: threading.Event,
    is_ready: Callable[[], bool],
    describe: Callable[[], str],
    supervisor: WorkerSupervisor | None = None,
) -> ExitCode:
    """Start the roles, supervise them until SIGTERM/SIGINT or a failure, then stop them."""
    restore = install_signal_handlers(stop)
    log.info("service_starting", service=name, roles=[r.name for r in roles])
    code = 1
    try:
        for role in roles:
            role.start()
        if supervisor is not None:
            supervisor.start()
        code = supervise(stop, roles, supervisor, is_ready, describe)
    finally:
        sdnotify.stopping()
        log.info("service_stopping", service=name)
        stop.set()
        if supervisor is not None:
            supervisor.shutdown(STOP_GRACE_SECONDS)
        for role in roles:
            role.join(STOP_GRACE_SECONDS)
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


def _sender_role(config: Config) -> Role:
    def role(stop: EventLike, heartbeat: Callable[[], None]) -> None:
        run_delivery(config, stop, heartbeat)

    return role


def _listening(config: Config, bound: _Bound) -> str:
    return f"listening as {config.node.ae_title} on {config.node.bind}:{bound.port}"


def run_listen(config: Config) -> ExitCode:
    """``dicomnode listen``: the listener and study assembly."""
    stop, bound = threading.Event(), _Bound()
    roles = [RoleThread("listener", _listener_role(config, bound), stop)]
    return run_roles("listen", roles, stop, bound.event.is_set, lambda: _listening(config, bound))


def run_work(config: Config) -> ExitCode:
    """``dicomnode work``: the worker and the sender."""
    from dicomnode.worker import run_worker  # torch only where inference runs

    stop, loaded = threading.Event(), threading.Event()

    def worker(stop: EventLike, heartbeat: Callable[[], None]) -> None:
        run_worker(config, stop, ready=loaded.set, heartbeat=heartbeat)

    roles = [RoleThread("worker", worker, stop), RoleThread("sender", _sender_role(config), stop)]
    return run_roles("work", roles, stop, loaded.is_set, lambda: "worker ready")


def run_serve(config: Config) -> ExitCode:
    """``dicomnode serve``: listener and sender in this process, the worker in a child."""
    stop, bound = threading.Event(), _Bound()
    roles = [
        RoleThread("listener", _listener_role(config, bound), stop),
        RoleThread("sender", _sender_role(config), stop),
    ]
    supervisor = WorkerSupervisor(config)
    return run_roles(
        "serve",
        roles,
        stop,
        lambda: bound.event.is_set() and supervisor.ready,
        lambda: _listening(config, bound) + ", worker ready",
        supervisor,
    )
