"""Child processes of the service: started with ``multiprocessing`` spawn, watched, restarted.

``serve`` runs its worker in a child so that a crash in inference never takes the listener down;
the listener runs ``node.receive_processes - 1`` receiver children that accept associations on
the same socket. Both are a :class:`ChildSupervisor`: it starts the child, learns through
lock-free shared values when it is ready and when it last showed signs of life, restarts it when
it dies or hangs (with a delay that doubles from 1 s to 60 s), and reports a child that died
before it was ever ready (a start-up error restarting cannot mend).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from types import FrameType
from typing import Any

from dicomnode import metrics
from dicomnode.logging import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: Delay before restarting a dead child: doubles from the first to the last value.
RESTART_DELAY_SECONDS = (1.0, 60.0)


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


class ChildContext:
    """What a child's entry point gets: its stop event (set by SIGTERM, or when the parent is
    gone), and how to say it is ready and alive. Call :meth:`install` first in the child."""

    def __init__(self, ready: Synchronized[float], beat: Synchronized[float]) -> None:
        self._ready = ready
        self.heartbeat = Heartbeat(beat)
        self.stop = threading.Event()
        self.parent = os.getppid()

    def install(self, die_with_parent: bool) -> None:
        """SIGTERM stops the child (after its current work); SIGINT is ignored: a Ctrl-C in a
        terminal reaches the whole process group, and the parent handles it.

        ``die_with_parent``: the kernel kills this child the moment the parent's thread that
        started it ends (Linux ``PR_SET_PDEATHSIG``), for children that hold something a
        restarted parent needs at once (a receiver holds the listening port)."""
        signal.signal(signal.SIGTERM, signal_setter(self.stop))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if die_with_parent and sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("die_with_parent_unavailable", errno=ctypes.get_errno())
            if os.getppid() != self.parent:  # the parent died before the call
                os._exit(1)

    def mark_ready(self) -> None:
        self._ready.value = time.monotonic()

    def alive(self) -> None:
        """Beat, and stop if the parent is gone (killed without a chance to stop us)."""
        self.heartbeat.beat()
        if os.getppid() != self.parent:
            log.warning("child_orphaned", parent_pid=self.parent)
            self.stop.set()


ChildTarget = Callable[..., None]
"""A child's entry point: called with the supervisor's ``args`` and then a
:class:`ChildContext`; it must be a module-level function (it is pickled for spawn)."""


class ChildSupervisor:
    """Runs ``target(*args, context)`` in a child process and restarts it when it dies or stops
    beating for ``hang_seconds`` once ready.

    Log events are named after ``name``: ``<name>_process_started``, ``<name>_hung``,
    ``<name>_process_died``, ``<name>_killed`` (``fields`` are added to each).
    ``before_restart`` runs after a child died and before its successor starts;
    ``die_with_parent``: see :meth:`ChildContext.install` (else the child notices within its
    next beat and stops after its current work).
    """

    def __init__(
        self,
        name: str,
        target: ChildTarget,
        args: tuple[Any, ...],
        hang_seconds: float,
        *,
        fields: dict[str, object] | None = None,
        before_restart: Callable[[], None] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.die_with_parent = die_with_parent
        self.hang_seconds = hang_seconds
        self._target = target
        self._args = args
        self._fields = fields or {}
        self._before_restart = before_restart
        self._ctx = multiprocessing.get_context("spawn")
        self._ready_at = self._ctx.Value("d", 0.0, lock=False)
        self.heartbeat = Heartbeat(self._ctx.Value("d", time.monotonic(), lock=False))
        self.process: BaseProcess | None = None
        self.ever_ready = False
        self.restarts = 0
        self._delay = RESTART_DELAY_SECONDS[0]
        self._restart_at: float | None = None
        self._started_at = time.monotonic()
        metrics.child_supervised(name)

    def start(self) -> None:
        """Start a fresh child."""
        self._started_at = time.monotonic()
        self.heartbeat.beat()
        assert self.heartbeat.shared is not None
        process = self._ctx.Process(
            target=_child_main,
            args=(
                self._target,
                self._args,
                self._ready_at,
                self.heartbeat.shared,
                self.die_with_parent,
            ),
            name=f"dicomnode-{self.name}",
        )
        process.start()
        self.process = process
        log.info(
            f"{self.name}_process_started", pid=process.pid, restarts=self.restarts, **self._fields
        )

    @property
    def child_ready(self) -> bool:
        """The current child said it is ready."""
        return bool(self._ready_at.value >= self._started_at)

    @property
    def ready(self) -> bool:
        """A child was ready at least once (it may be restarting now)."""
        self.ever_ready = self.ever_ready or self.child_ready
        return self.ever_ready

    def check(self) -> bool:
        """Restart a dead or hung child when its delay is up.

        The delay doubles with each restart and falls back to its minimum once a child has run
        for longer than the current delay. Returns False when the child died before it was
        ever ready (a start-up error such as a bad weights folder).
        """
        ready = self.ready
        process = self.process
        now = time.monotonic()
        if process is not None and process.is_alive():
            if self.child_ready and self.heartbeat.age() > self.hang_seconds:
                log.error(
                    f"{self.name}_hung",
                    pid=process.pid,
                    silent_seconds=self.heartbeat.age(),
                    **self._fields,
                )
                process.kill()
            else:
                if self.child_ready and now - self._started_at > self._delay:
                    self._delay = RESTART_DELAY_SECONDS[0]  # it worked for a while: reset
                return True
        if process is not None:
            process.join()
            if process.pid is not None:
                metrics.process_died(process.pid)
            log.error(
                f"{self.name}_process_died",
                pid=process.pid,
                exit_code=process.exitcode,
                restart_in_seconds=self._delay if ready else None,
                **self._fields,
            )
            self.process = None
            if self._before_restart is not None:
                self._before_restart()
            if not ready:
                return False
            self._restart_at = now + self._delay
            self._delay = min(self._delay * 2, RESTART_DELAY_SECONDS[1])
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            metrics.child_restarted(self.name)
            self.start()
        return True

    def shutdown(self, grace: float) -> None:
        """SIGTERM the child (it finishes its current work); SIGKILL it after ``grace`` s."""
        process = self.process
        if process is None:
            return
        process.terminate()
        process.join(grace)
        if process.is_alive():
            log.warning(
                f"{self.name}_killed", pid=process.pid, waited_seconds=grace, **self._fields
            )
            process.kill()
            process.join()
        if process.pid is not None:
            metrics.process_died(process.pid)
        self.process = None


def _child_main(
    target: ChildTarget,
    args: tuple[Any, ...],
    ready: Synchronized[float],
    beat: Synchronized[float],
    die_with_parent: bool,
) -> None:
    context = ChildContext(ready, beat)
    context.install(die_with_parent)
    target(*args, context)
