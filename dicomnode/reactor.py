"""pynetdicom's two polling loops per association, made to wait for what they serve.

pynetdicom (3.0) runs two threads per association and both poll: the DUL thread sleeps 1 ms
whenever a pass found nothing to do, the association thread sleeps 1 ms before every look at
its queues. Each open association thus woke the process about 2,000 times a second (16 idle
associations took 76 % of one of this project's two cores), and every message waited for the
next poll.

On an association the listener accepted (:func:`install`, at EVT_CONN_OPEN, before either
thread runs) those 1 ms sleeps become waits for the thread's next event, at most
:data:`MAX_WAIT` seconds (the loops then run their timer and stop checks as before):

- the DUL thread waits in ``select`` for its socket (or TLS data already decrypted) and for a
  wake-up socket pair, written when a primitive is queued for it to send (``to_provider_queue``)
  or it is asked to stop; the ARTIM timer bounds the wait;
- the association thread waits on an event set when a DIMSE message is complete
  (``msg_queue``), when the DUL queues a primitive for it (``to_user_queue``: a release or
  abort from the peer), and when the DUL thread ends.

pynetdicom's own loops keep running unchanged: while a listener runs, the ``time`` module that
``pynetdicom.dul`` and ``pynetdicom.association`` see is :class:`PollingClock`, whose ``sleep``
of exactly pynetdicom's poll delay, on a thread with a waiter, waits; every other sleep (and
every thread of any other pynetdicom user in the process) sleeps as before.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from pynetdicom import association as pynetdicom_association
from pynetdicom import dul as pynetdicom_dul

POLL_DELAY = 0.001
"""pynetdicom 3.0's poll delay: ``DULServiceProvider._run_loop_delay`` and the sleep at the top
of ``Association._run_reactor``."""
MAX_WAIT = 0.05
"""Longest wait of a loop between its own checks (timers, a stop request)."""
WAITER = "_dicomnode_waiter"
"""The attribute of a pynetdicom thread (the DUL or the Association object) holding its
waiter."""


class AssociationWaiter:
    """What the association thread waits for: :meth:`wake` from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self) -> None:
        if self._event.wait(MAX_WAIT):
            self._event.clear()  # before the loop's checks: a later wake is not lost


class DulWaiter:
    """What the DUL thread waits for: its socket, or :meth:`wake` from any thread; not at all
    while ``buffered()`` says a PDU already received waits to be handled."""

    def __init__(self, dul: Any, buffered: Callable[[], bool] = lambda: False) -> None:
        self._dul = dul
        self._buffered = buffered
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._write.send(b"\0")

    def wait(self) -> None:
        if self._buffered():
            return
        readers: list[Any] = [self._read]
        transport = self._dul.socket
        raw = getattr(transport, "socket", None)
        if raw is not None and getattr(transport, "_is_connected", False):
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted data select cannot see
            readers.append(raw)
        timeout = min(MAX_WAIT, max(0.0, self._dul.artim_timer.remaining))
        try:
            ready, _, _ = select.select(readers, [], [], timeout)
        except (OSError, ValueError):  # the socket closed meanwhile: the loop sees it next
            return
        if self._read in ready:
            with contextlib.suppress(OSError):
                self._read.recv(4096)

    def close(self) -> None:
        self._read.close()
        self._write.close()


def _after(function: Callable[..., Any], then: Callable[[], None]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            then()

    return wrapped


def install(assoc: Any, buffered: Callable[[], bool] = lambda: False) -> None:
    """Give an accepted association's two threads their waiters and the wake-ups that end
    them (instance attributes; before either thread runs). ``buffered``: whether the DUL's
    reader holds a PDU it has not handled yet (its thread then does not wait)."""
    dul = assoc.dul
    association_waiter, dul_waiter = AssociationWaiter(), DulWaiter(dul, buffered)
    setattr(assoc, WAITER, association_waiter)
    setattr(dul, WAITER, dul_waiter)
    for queue_ in (assoc.dimse.msg_queue, dul.to_user_queue):
        queue_.put = _after(queue_.put, association_waiter.wake)
    dul.to_provider_queue.put = _after(dul.to_provider_queue.put, dul_waiter.wake)
    # stop_dul sets the stop flag and then polls for the thread's end: wake the DUL first
    stop_dul, kill_dul = dul.stop_dul, dul.kill_dul

    def stop_and_wake() -> bool:
        if dul.state_machine.current_state == "Sta1":
            dul._kill_thread = True
            dul_waiter.wake()
        return bool(stop_dul())

    setattr(dul, "stop_dul", stop_and_wake)  # noqa: B010
    setattr(dul, "kill_dul", _after(kill_dul, dul_waiter.wake))  # noqa: B010

    def ended() -> None:
        dul_waiter.close()
        association_waiter.wake()

    dul._target = _after(dul._target, ended)  # Thread's target, bound when it was made


class PollingClock:
    """Stands in for the ``time`` module inside pynetdicom's ``dul`` and ``association``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        waiter = getattr(threading.current_thread(), WAITER, None)
        if waiter is None or seconds != POLL_DELAY:
            time.sleep(seconds)
        else:
            waiter.wait()


_MODULES: tuple[ModuleType, ...] = (pynetdicom_dul, pynetdicom_association)


@contextlib.contextmanager
def waiting_loops() -> Iterator[None]:
    """While inside, pynetdicom's loops on threads given waiters by :func:`install` wait."""
    before = [module.time for module in _MODULES]
    for module in _MODULES:
        module.time = PollingClock()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, clock in zip(_MODULES, before, strict=True):
            module.time = clock  # type: ignore[attr-defined]
