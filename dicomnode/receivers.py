"""Several processes accepting associations on one listening socket.

pynetdicom handles each association in a thread, and its PDU receive and decode are pure Python:
the threads of one process share one interpreter, so one process receives at the speed of one
core whatever the number of senders. ``node.receive_processes`` processes therefore accept on
the same socket, as DCMTK's ``storescp --fork`` forks one per association: the listener binds
the port, then starts ``receive_processes - 1`` receiver children (spawned, restarted when they
die) that adopt the socket. Every process accepts without blocking, so the kernel hands each
connection to one of those waiting on it (the others' ``accept`` finds nothing and returns).

What must hold across processes lives in the state directory or in shared memory:

- ``node.max_associations`` is one limit for all processes (:class:`AssociationSlots`);
- storing one SOP Instance UID is serialised by ``flock`` locks (``dicomnode.storage.StoreLock``;
  other instances are stored in parallel);
- each process spools into its own folder (``spool/<index>``), so one process clearing what its
  aborted transfers left never touches a transfer of another.

Study assembly and retention run in the listener process only.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
from pathlib import Path
from typing import Any

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.storage import file_lock


class SupportedContexts(list[PresentationContext]):
    """The server's presentation contexts, shared by every association instead of copied.

    pynetdicom gives every accepted association ``deepcopy(server.contexts)``: with every
    storage SOP class and 16 transfer syntaxes that re-created (and re-validated, by regular
    expression) some two thousand UIDs per association, 13 % of the listener's time with 16
    senders of three instances each; copying only the context objects still took 0.4 ms. An
    acceptor's contexts are only read (``presentation.negotiate_as_acceptor`` makes new
    context objects for the result, and the listener never changes its supported contexts
    while it runs), so each association gets a new list of the same context objects.
    ``tests/test_datapath.py`` checks that negotiating leaves them as they were."""

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        return list(self)


class SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, accepting without blocking, on its own socket or on the
    listening socket ``listening`` of another process (adopted, not bound again).

    A plain pynetdicom server gives its listening socket ``network_timeout``: with several
    processes woken by one connection, the ones that lose the race would then wait in
    ``accept()`` up to that long (not watching for shutdown). Without blocking they get
    ``BlockingIOError``, which ``socketserver`` ignores. Accepted sockets are blocking
    (CPython's ``accept`` does not pass the flag on); the listener's own limits set their
    receive timeout.
    """

    def __init__(self, *args: Any, listening: socket.socket | None = None, **kwargs: Any) -> None:
        self._listening = listening
        super().__init__(*args, **kwargs)
        self.contexts = SupportedContexts(self.contexts)

    def server_bind(self) -> None:
        if self._listening is None:
            super().server_bind()
        else:
            if self.socket is not None:
                self.socket.close()
            self.socket = self._listening
            self.server_address = self._listening.getsockname()
        if self.socket is not None:
            self.socket.setblocking(False)

    def server_activate(self) -> None:
        if self._listening is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection with Nagle's algorithm off: DICOM is request-response, and a
        short last segment (a C-STORE response, the end of a data set) must not wait for the
        acknowledgement of the previous one (DCMTK does the same with ``TCP_NODELAY=1``)."""
        request, address = super().get_request()
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return request, address

    def server_close(self) -> None:
        """Close this process's descriptor. pynetdicom also shuts the socket down, which would
        stop it accepting in every process: only the listener, the last to stop, does that."""
        if self._listening is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()


class AssociationSlots:
    """One ``max_associations`` limit for several processes.

    Each process writes only its own slot: how many associations it has admitted that are
    still running. A new association is admitted when the sum is below the limit; the check
    and the update run under a file lock. A process refreshes its slot when it admits one, when
    a connection closes and on every poll, so a count left by a dead child (its slot is reset
    before a successor starts) or a missed close event does not hold a place for long.
    """

    def __init__(self, processes: int, limit: int, lock_path: Path) -> None:
        self.limit = limit
        self.lock_path = lock_path
        self.counts = multiprocessing.get_context("spawn").RawArray("i", processes)

    def admit(self, index: int, running: int) -> bool:
        """With ``running`` associations already admitted by process ``index`` (this one not
        counted), admit one more if all processes together are below the limit."""
        with file_lock(self.lock_path):
            self.counts[index] = running
            if sum(self.counts) >= self.limit:
                return False
            self.counts[index] = running + 1
            return True

    def update(self, index: int, running: int) -> None:
        """Process ``index`` has ``running`` admitted associations now."""
        with file_lock(self.lock_path):
            self.counts[index] = running

    def reset(self, index: int) -> None:
        """Process ``index`` is gone (called by the parent before starting its successor)."""
        self.update(index, 0)
