"""Limits on what a peer may make the listener hold: PDU length (memory), data set size and free
space (disk), a stalled transfer (an association slot); and guards for the malformed requests
on which pynetdicom (3.0) fails with an exception instead of an answer (a command set it cannot
decode, a local event in the state that closes the association; an association request it
cannot negotiate is refused where PDUs are read, :mod:`dicomnode.datapath`). Used by
:mod:`dicomnode.scp`.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import EventHandlerType
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ

from dicomnode import reactor
from dicomnode.config import NodeConfig
from dicomnode.datapath import P_DATA_TF, PDU_HEADER, PDU_TYPES, DataPath, refuse_pdu
from dicomnode.logging import get_logger

log = get_logger(__name__)


def space_shortfall(state_dir: Path, incoming: int, node: NodeConfig) -> str | None:
    """Why an instance of ``incoming`` bytes must not be stored now, or None if it may.

    The spooled data set is normally renamed into place, but copied where the spool is on
    another file system, so ``incoming`` more bytes are counted as needed; the free space left
    after that must stay at or above the low-water mark ``node.min_free_bytes`` (the database
    and the results need room too).
    """
    free = shutil.disk_usage(state_dir).free
    if free - incoming < node.min_free_bytes:
        return (
            f"state directory low on space: {free} bytes free, {incoming} needed, "
            f"low-water mark node.min_free_bytes = {node.min_free_bytes}"
        )
    return None


MAX_OTHER_PDU = 1024 * 1024
"""Longest PDU other than P-DATA-TF the listener reads (an A-ASSOCIATE-RQ with every storage
SOP class and transfer syntax is some tens of kB)."""

_SOURCE_PROVIDER = 0x02


def receive_exactly(sock: Any, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from the socket ``sock`` into one buffer; fewer if the peer closes the
    connection first (what pynetdicom's ``AssociationSocket.recv`` returns then too).

    pynetdicom reads in 4096-byte ``recv`` calls, each appended to a growing ``bytearray``: a
    4 MiB PDU took 1024 calls of the interpreter, and that loop was the largest share of the
    listener's time under load. ``recv_into`` fills a buffer of the PDU's size directly, as
    much as the kernel has per call. Timeouts and errors propagate as from ``socket.recv``.
    """
    buffer = bytearray(nr_bytes)
    read = 0
    with memoryview(buffer) as view:
        while read < nr_bytes:
            count = sock.recv_into(view[read:])
            if count == 0:
                break
            read += count
    if read < nr_bytes:
        del buffer[read:]
    return buffer


class PduLengthGuard:
    """Stands in for an accepted association's ``AssociationSocket.recv``: a PDU longer than
    the listener accepts is refused before its body is read, and PDUs are read with
    :func:`receive_exactly`.

    pynetdicom (3.0) reads a PDU's 6-byte header and then as many bytes as its length field
    says into memory, whatever maximum PDU length was negotiated, so one peer could make it
    buffer up to 4 GiB. The Maximum Length Sub-Item (PS3.8 D.1) bounds the variable field of
    the P-DATA-TF PDUs the peer may send to ``node.max_pdu`` (0: no bound); other PDUs are
    bounded by :data:`MAX_OTHER_PDU`. A longer PDU is a protocol error: as for an invalid PDU
    (PS3.8 9.2, event 19, action AA-8) an A-ABORT (source: service provider, reason: invalid
    PDU parameter value) is sent and the connection closed (the short read makes pynetdicom end
    the association as a closed transport connection).

    The guard follows pynetdicom's reads: a 6-byte read after a whole PDU is the next header,
    and the read after a header of a known type is its body. After an unknown PDU type
    pynetdicom reads no body (event 19) but the next header: the guard once took that header
    for the unknown PDU's body, so the PDU after it went unchecked, and a peer sending one
    unknown type and then a header declaring 4 GiB made the listener allocate 4 GiB (found
    by the fuzz harness, ``fuzz_regressions.json``).
    """

    def __init__(self, sock: Any, max_pdu: int, peer: str) -> None:
        self._sock = sock
        self._max_pdu = max_pdu
        self._peer = peer
        self._declared: tuple[int, int] | None = None  # (type, length) of the header just read

    def _recv(self, nr_bytes: int) -> bytearray:
        raw = self._sock.socket
        if raw is None:  # closed meanwhile: as a connection closed by the peer
            return bytearray()
        return receive_exactly(raw, nr_bytes)

    def limit(self, pdu_type: int) -> int:
        """The longest variable field accepted for a PDU of ``pdu_type`` (0: unbounded)."""
        return self._max_pdu if pdu_type == P_DATA_TF else MAX_OTHER_PDU

    def __call__(self, nr_bytes: int) -> bytearray:
        declared, self._declared = self._declared, None
        if declared is not None:
            pdu_type, length = declared
            limit = self.limit(pdu_type)
            if nr_bytes == length and 0 < limit < length:
                self._refuse(
                    pdu_type,
                    "PDU longer than the maximum length (node.max_pdu for P-DATA-TF)",
                    length=length,
                    limit=limit,
                )
                return bytearray()
        data = self._recv(nr_bytes)
        if declared is None and nr_bytes == PDU_HEADER and len(data) == PDU_HEADER:
            pdu_type, _, length = struct.unpack(">BBI", bytes(data))
            if pdu_type in PDU_TYPES:  # pynetdicom reads no body after an unknown type
                self._declared = (pdu_type, length)
        return data

    def _refuse(self, pdu_type: int, reason: str, **fields: int) -> None:
        refuse_pdu(self._sock, self._peer, pdu_type, reason, **fields)


#: Local service primitives (PS3.8 9.2 Table 9-6): requests and responses of our own side.
_LOCAL_EVENTS = frozenset(("Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"))


def guard_association(assoc: Any) -> None:
    """Two guards on one accepted association's pynetdicom objects (instance attributes, so
    nothing global changes):

    - a command set pynetdicom cannot decode (no Command Field, an unknown one, garbage) raised
      inside its state machine, which then closed the connection without a word and ended the
      DUL thread with a traceback; it now is an invalid PDU (event 19): A-ABORT, as PS3.8 and
      PS3.7 ask, and the association ends as usual (its spool file removed at close);
    - a local primitive (our response to a request that arrived before the peer's A-ABORT or
      a PDU that made us abort) in state 13, awaiting the close of the connection, raised
      pynetdicom's InvalidEventError in the DUL thread; it is ignored: the association is over;
    - any other exception of the state machine (an A-ABORT with an undefined source value, an
      event the state table lacks) ended the DUL thread with a traceback, the connection left
      to the peer; the association is now aborted as pynetdicom does for an error in its own
      loop (A-ABORT, service provider, then the connection is closed).
    """
    dimse, dul = assoc.dimse, assoc.dul
    receive, do_action = dimse.receive_primitive, dul.state_machine.do_action

    def receive_primitive(primitive: Any) -> None:
        try:
            receive(primitive)
        except Exception as exc:
            log.warning(
                "dimse_message_invalid",
                peer=assoc.requestor.address,
                error=type(exc).__name__,
                outcome="association_aborted",
            )
            dul.event_queue.put("Evt19")

    def guarded_action(event: str) -> None:
        state = dul.state_machine.current_state
        if state == "Sta13" and event in _LOCAL_EVENTS and (event, state) not in TRANSITION_TABLE:
            log.debug("late_local_event_ignored", event_name=event, peer=assoc.requestor.address)
            return
        try:
            do_action(event)
        except Exception as exc:
            log.warning(
                "association_state_error",
                peer=assoc.requestor.address,
                event_name=event,
                state=state,
                error=type(exc).__name__,
                outcome="association_aborted",
            )
            abort_now(assoc)

    setattr(dimse, "receive_primitive", receive_primitive)  # noqa: B010
    setattr(dul.state_machine, "do_action", guarded_action)  # noqa: B010


def abort_now(assoc: Any) -> None:
    """Send an A-ABORT (service provider) straight to the socket and stop the association, as
    pynetdicom's DUL does when its own loop fails."""
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = _SOURCE_PROVIDER, 0x00
    with contextlib.suppress(Exception):
        assoc.dul.socket.send(abort.encode())
    assoc.is_aborted, assoc.is_established = True, False
    setattr(assoc, "_kill", True)  # noqa: B010 (pynetdicom's own hard stop of both reactors)
    assoc.dul.kill_dul()


class InboundLimits:
    """Bounds on what a peer sends on an accepted association, enforced while it arrives.

    - PDU length (memory): :class:`PduLengthGuard`, installed when the connection opens.
    - A stalled transfer: the accepted socket gets ``network_timeout`` as its receive timeout
      (pynetdicom leaves accepted sockets blocking, so a peer stopping in the middle of a PDU
      would hold its association, and a ``max_associations`` slot, for ever).
    - Data set size (disk): the data set fragments of each incoming message are counted as its
      PDUs arrive (:class:`~dicomnode.datapath.DataPath`, which reads them); once an unfinished
      message exceeds ``max_instance_bytes`` (0: no limit) the association is aborted
      (A-ABORT). The spool file is then removed on connection close
      (:func:`discard_unfinished_spool`); it holds at most the limit plus one PDU. A message
      that completes in the PDU that takes it over the limit is refused by the C-STORE handler
      (0xA700) and its spool file deleted by pynetdicom.

    The counting runs in pynetdicom's DUL thread of the association. There
    ``assoc.abort()`` is pynetdicom's non-blocking abort: it only queues the A-ABORT
    primitive, which the same DUL thread sends on its next loop, so nothing waits on the thread
    that is running the handler (the blocking abort would wait for that thread: a deadlock).
    The handler never raises.
    """

    def __init__(self, max_pdu: int, max_instance_bytes: int, timeout: float | None) -> None:
        self.max_pdu = max_pdu
        self.max_instance_bytes = max_instance_bytes
        self.timeout = timeout

    def handlers(self) -> list[EventHandlerType]:
        """The pynetdicom event handlers that enforce the limits."""
        return [(evt.EVT_CONN_OPEN, self.on_conn_open)]

    def on_conn_open(self, event: evt.Event) -> None:
        """Install the PDU length guard, the receive timeout, :func:`guard_association`, the
        data path and the waiting loops (:mod:`dicomnode.reactor`), before the association's
        threads run."""
        try:
            sock = event.assoc.dul.socket
            if sock is None or sock.socket is None:
                return
            sock.socket.settimeout(self.timeout)
            guard = PduLengthGuard(sock, self.max_pdu, event.assoc.requestor.address)
            setattr(sock, "recv", guard)  # noqa: B010 (an instance attribute over a method)
            guard_association(event.assoc)
            DataPath(event.assoc, self.max_instance_bytes).install()
            reactor.install(event.assoc)
        except Exception:
            log.exception("connection_setup_failed")


def spooled_dataset_size(path: Path) -> int:
    """Bytes of the data set in the spooled file ``path`` (after its File Meta)."""
    return path.stat().st_size - split_dataset(path)[1]
