"""Limits on what a peer may make the listener hold: PDU length (memory), data set size and free
space (disk), a stalled transfer (an association slot); and guards for the malformed requests
on which pynetdicom (3.0) fails with an exception instead of an answer (a command set it cannot
decode, a local event in the state that closes the association; an association request it
cannot negotiate is refused where PDUs are read, :mod:`dicomnode.datapath`). Used by
:mod:`dicomnode.scp`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pynetdicom import evt
from pynetdicom.events import EventHandlerType
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ

from dicomnode import reactor
from dicomnode.commands import META_HEAD, fast_store_responses, spooled_data_set_offset
from dicomnode.config import NodeConfig
from dicomnode.datapath import SOURCE_PROVIDER, DataPath
from dicomnode.logging import get_logger
from dicomnode.storage import mapped

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
    abort.source, abort.reason_diagnostic = SOURCE_PROVIDER, 0x00
    with contextlib.suppress(Exception):
        assoc.dul.socket.send(abort.encode())
    assoc.is_aborted, assoc.is_established = True, False
    setattr(assoc, "_kill", True)  # noqa: B010 (pynetdicom's own hard stop of both reactors)
    assoc.dul.kill_dul()


class InboundLimits:
    """Bounds on what a peer sends on an accepted association, enforced while it arrives.

    - PDU length (memory): a PDU longer than ``max_pdu`` (P-DATA-TF) or
      :data:`~dicomnode.datapath.MAX_OTHER_PDU` is refused from its header, before its body
      is read (:class:`~dicomnode.datapath.DataPath`).
    - A stalled transfer: the data path never blocks in ``recv`` (a PDU that stops half-way
      waits in its buffer), so pynetdicom's timers end it: the ARTIM timer
      (``acse_timeout``) before a whole A-ASSOCIATE-RQ arrived, the idle timer
      (``network_timeout``) after. The accepted socket gets ``network_timeout`` as its timeout
      for sends and TLS reads (pynetdicom leaves accepted sockets blocking).
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
        """Install the receive timeout, :func:`guard_association`, the C-STORE responses of
        :mod:`dicomnode.commands`, the data path (which reads the PDUs and checks their
        length) and the waiting loops (:mod:`dicomnode.reactor`), before the association's
        threads run."""
        try:
            sock = event.assoc.dul.socket
            if sock is None or sock.socket is None:
                return
            sock.socket.settimeout(self.timeout)
            guard_association(event.assoc)
            fast_store_responses(event.assoc)
            data_path = DataPath(event.assoc, self.max_instance_bytes, self.max_pdu)
            data_path.install()
            reactor.install(event.assoc, buffered=data_path.has_pdu)
        except Exception:
            log.exception("connection_setup_failed")


def spooled_dataset_size(path: Path) -> int:
    """Bytes of the data set in the spooled file ``path`` (after its File Meta): what
    pynetdicom's ``split_dataset`` finds. The File Meta's group length gives where the data set
    starts; a file that does not begin as the listener writes it is parsed instead."""
    with path.open("rb") as handle:
        offset = spooled_data_set_offset(handle.read(META_HEAD))
        size = os.fstat(handle.fileno()).st_size
    if offset is not None:
        return size - offset
    with mapped(path) as handle:
        read_preamble(handle, False)
        read_dataset(handle, is_implicit_VR=False, is_little_endian=True, stop_when=_not_meta)
        return size - handle.tell()


def _not_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag.group != 2)
