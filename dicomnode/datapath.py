"""The listener's receive data path: P-DATA-TF PDUs straight into the spool file.

pynetdicom (3.0) handles every PDU the same way: it copies the PDU into ``bytes``, decodes each
presentation data value into new ``bytes``, builds a PDU object and a primitive, passes an event
through its queue and state machine, and writes each data set fragment through a ``tempfile``
wrapper; the C-STORE handler then read the whole spooled file back to hash it. That was four
copies, a read-back and a SHA-256 of every byte, in Python, on the thread that also receives.

On an association the listener accepted, :class:`DataPath` stands in for the DUL's
``_read_pdu_data`` and ``_is_transport_event``. It reads whatever has arrived into one buffer
per association (one ``readv`` per read, up to :data:`RECEIVE_BYTES`), checks the length of
every PDU on its header before reading its body (``node.max_pdu`` for P-DATA-TF,
:data:`MAX_OTHER_PDU` for the others: A-ABORT above it), and:

- counts the data set bytes of every P-DATA-TF PDU against ``node.max_instance_bytes``
  (an unfinished message over the limit aborts the association, as before);
- writes the data set fragments of the C-STORE being received straight into its spool file,
  all those of one read with one ``writev`` (runs of one-fragment PDUs are taken without
  parsing each on its own);
- hands any other P-DATA-TF PDU received while the association is established (state 6,
  nothing else waiting in the DUL's event queue) to the DIMSE provider at once, as one P-DATA
  primitive whose values are views of the buffer: what action DT-2 of the state machine does,
  without the copies and the round trip through the event queue;
- passes every other PDU (and a P-DATA-TF it cannot parse, or one in any other state) to
  pynetdicom's own decoding, so protocol errors are answered exactly as before.

A PDU that stops half-way waits in the buffer while pynetdicom's loop goes on with its timers
(the DUL thread never blocks in ``recv``).

The data set then goes into a :class:`SpoolFile`, which pynetdicom's chunked receive creates
instead of a ``NamedTemporaryFile`` while a listener runs (:func:`spool_files`): unbuffered
writes, and write-back to disk started every :data:`WRITEBACK_BYTES`, so the fsync before the
C-STORE response waits for the tail of the file only. Nothing on this path hashes: the
SHA-256 that identifies a source image in the results is computed by the worker as it decodes
(it reads every byte anyway), and by a site for the jobs it hands to a worker pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import select
import ssl
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pynetdicom import dimse_messages, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import P_DATA

from dicomnode.commands import spool_file_meta, spool_meta
from dicomnode.logging import get_logger

log = get_logger(__name__)

PDU_HEADER = 6
"""PDU type (1 byte), reserved (1), length of the rest (4, big endian): PS3.8 9.3.1."""
_HEADER = struct.Struct(">BBI")
_FRAGMENT = struct.Struct(">BBIIBB")
"""A P-DATA-TF PDU's header and its first presentation data value item's: item length,
presentation context ID and message control header (PS3.8 9.3.5.1, E.2)."""
_FRAGMENT_HEAD = _FRAGMENT.size
P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))
"""The PDU types of PS3.8 9.3; pynetdicom reads no body after any other type."""
ESTABLISHED = "Sta6"
"""PS3.8 Table 9-10: association established, ready for data transfer."""
SOURCE_PROVIDER, _INVALID_PDU_PARAMETER_VALUE = 0x02, 0x06  # A-ABORT fields, PS3.8 9.3.8

BURST_PDUS = 64
"""Most PDUs, or runs of data set fragments, one pass of the DUL's loop handles: pynetdicom's
loop (timer checks, its queues) runs between bursts instead of between PDUs, and the burst
stops as soon as a primitive (a response) waits to be sent."""
RECEIVE_BYTES = 1024 * 1024
"""Size of an association's receive buffer (larger while a longer PDU arrives): one read takes
whatever the socket holds, up to this, whatever the PDU size the peer sends."""
REUSED_REQUESTS = 32
"""Distinct association requests :func:`decoded_request` remembers (the least recently used
goes first)."""
REUSED_REQUEST_BYTES = 64 * 1024
"""Longest association request remembered (storescu's, with 128 presentation contexts, is
about 10 kB): the cache holds at most ``REUSED_REQUESTS`` times this."""
A_ASSOCIATE_RQ_TYPE = 0x01
ASSOCIATE_RQ_EVENT = "Evt6"
"""The state machine's event for a received A-ASSOCIATE-RQ PDU (PS3.8 9.2)."""
MAX_OTHER_PDU = 1024 * 1024
"""Longest PDU other than P-DATA-TF the listener reads (an A-ASSOCIATE-RQ with every storage
SOP class and transfer syntax is some tens of kB)."""
WRITEBACK_BYTES = 4 * 1024 * 1024
"""A spool file starts writing to disk each time this many more bytes were written."""

_SYNC_FILE_RANGE_WRITE = 2  # Linux <fcntl.h>: start write-out of dirty pages, do not wait


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``, or None where
    the C library has none (the final fsync then does all the writing)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a hint: failures change nothing

    return start_writeback


_START_WRITEBACK = _sync_file_range()


_IOV_MAX = 1024  # Linux: most buffers one writev takes


def _after_written(views: list[memoryview], count: int) -> list[memoryview]:
    """What of ``views`` is left to write after ``count`` of their bytes were written."""
    for index, view in enumerate(views):
        if count < len(view):
            return [view[count:], *views[index + 1 :]]
        count -= len(view)
    return []


class SpoolFile:
    """The file one incoming data set is spooled into: what pynetdicom's chunked receive uses
    of ``NamedTemporaryFile(delete=False)`` (``name``, ``write``, ``file.flush``, ``close``).

    Writes go straight to the descriptor (``os.writev``, no buffer to flush). Created with
    ``tempfile.mkstemp`` (mode 0600) in ``tempfile``'s folder, which the listener points at its
    spool.
    """

    def __init__(self, *, suffix: str = "", **_: Any) -> None:
        self._fd, self.name = tempfile.mkstemp(suffix=suffix)
        self.file = self  # pynetdicom flushes ``file`` after each fragment
        self.size = 0
        self._written_back = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data``; start write-back of each further :data:`WRITEBACK_BYTES`."""
        return self.write_views([memoryview(data)])

    def write_views(self, views: Sequence[memoryview]) -> int:
        """Write all of ``views``, in order, with as few ``writev`` calls as the kernel allows;
        start write-back of each further :data:`WRITEBACK_BYTES`."""
        pending = [view for view in views if len(view)]
        done = 0
        while pending:
            count = os.writev(self._fd, pending[:_IOV_MAX])
            done += count
            pending = _after_written(pending, count)
        self.size += done
        if _START_WRITEBACK is not None and self.size - self._written_back >= WRITEBACK_BYTES:
            _START_WRITEBACK(self._fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size
        return done

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def spool_files() -> Iterator[None]:
    """While inside, pynetdicom's chunked receive spools into :class:`SpoolFile` objects and
    writes their File Meta with :mod:`dicomnode.commands` (the same bytes, no dataset)."""
    names = ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info")
    before = [getattr(dimse_messages, name) for name in names]
    for name, stand_in in zip(names, (SpoolFile, spool_meta, spool_file_meta), strict=True):
        setattr(dimse_messages, name, stand_in)
    try:
        yield
    finally:
        for name, original in zip(names, before, strict=True):
            setattr(dimse_messages, name, original)


def parse_pdvs(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """The presentation data values of a P-DATA-TF PDU's variable field ``body`` (PS3.8
    9.3.5.1: each item is a 4-byte length, the presentation context ID, then the message
    control header and the fragment), as (context ID, view of header + fragment); None if the
    items do not tile ``body`` exactly or one has no control header."""
    items: list[tuple[int, memoryview]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 4:
            return None
        (length,) = struct.unpack_from(">I", body, offset)
        start, stop = offset + 4, offset + 4 + length
        if length < 2 or stop > end:
            return None
        items.append((body[start], body[start + 1 : stop]))
        offset = stop
    return items or None


def count_dataset_bytes(
    values: Sequence[tuple[int, memoryview | bytes]], pending: int, limit: int
) -> tuple[int, bool]:
    """Add the data set fragments among ``values`` (context ID, control header + fragment) to
    the ``pending`` bytes of the message being received; return the pending bytes after them
    and whether that unfinished message is already over ``limit``.

    PS3.8 E.2: bit 0 of a PDV's message control header marks a command fragment, bit 1 the
    last fragment of the command or data set; a message ends with its last data set fragment.
    A message that ends within these values starts the count again: if it is over the limit,
    the C-STORE handler refuses it with a status (aborting then would race with that response).
    """
    for _, value in values:
        if not value or value[0] & 0x01:
            continue
        pending = 0 if value[0] & 0x02 else pending + len(value) - 1
    return pending, pending > limit


@functools.lru_cache(maxsize=REUSED_REQUESTS)
def decoded_request(data: bytes) -> tuple[A_ASSOCIATE_RQ, str | None]:
    """The A-ASSOCIATE-RQ PDU ``data`` decoded by pynetdicom, and what makes it one pynetdicom
    cannot negotiate (:func:`association_request_problem`), remembered by its bytes.

    A modality or PACS sends the same request on every association (the same AE titles and
    presentation contexts): decoding storescu's 128 contexts item by item took about 1.4 ms of
    the interpreter per association. pynetdicom only reads the decoded PDU (state machine
    action AE-6 makes a new primitive of it), so associations whose requests have the same
    bytes share one. A request that fails to decode raises each time (nothing is remembered)."""
    request = A_ASSOCIATE_RQ()
    request.decode(data)
    return request, association_request_problem(request)


def association_request_problem(pdu: A_ASSOCIATE_RQ) -> str | None:
    """What makes the decoded A-ASSOCIATE-RQ ``pdu`` one pynetdicom cannot negotiate, or None.

    PS3.8 9.3.2: every presentation context has an odd ID from 1 to 255, one abstract syntax
    and at least one transfer syntax, and the request has a User Information item. pynetdicom
    (3.0) fails on a context without a transfer syntax in its acceptor thread (IndexError), so
    the connection stayed open with nobody serving it, for ever; on an even ID or a missing User
    Information item it closed the connection without a word. Such a request gets an A-ABORT
    (as any invalid PDU, PS3.8 9.2 action AA-1)."""
    for context in pdu.presentation_context:
        cid = context.context_id
        if cid is None or not (1 <= cid <= 255 and cid % 2 == 1):
            return f"presentation context ID {cid} is not an odd number from 1 to 255"
        if not context.abstract_syntax:
            return f"presentation context {cid} has no abstract syntax"
        if not context.transfer_syntax or not all(context.transfer_syntax):
            return f"presentation context {cid} has no transfer syntax"
    user_information = pdu.user_information
    if user_information is None or not user_information.implementation_class_uid:
        return "no User Information item with an Implementation Class UID"
    return None


def refuse_pdu(sock: Any, peer: str, pdu_type: int, reason: str, **fields: int) -> None:
    """Log a refused PDU and send an A-ABORT (service provider, invalid PDU parameter value)
    straight to the socket of the association's transport ``sock`` (pynetdicom's send would
    queue a second close event on failure)."""
    log.warning("pdu_refused", peer=peer, pdu_type=f"0x{pdu_type:02X}", reason=reason, **fields)
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = SOURCE_PROVIDER, _INVALID_PDU_PARAMETER_VALUE
    with contextlib.suppress(OSError, AttributeError):
        sock.socket.sendall(abort.encode())


class DataPath:
    """Reads the PDUs of one accepted association (installed as its DUL's ``_read_pdu_data``
    and ``_is_transport_event``; runs in the DUL thread). See the module's description."""

    def __init__(self, assoc: Any, max_instance_bytes: int, max_pdu: int = 0) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.max_instance_bytes = max_instance_bytes
        self.max_pdu = max_pdu
        self.pending = 0  # data set bytes of the unfinished message
        self._buffer = bytearray()
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # the bytes received and not yet handled
        self._closed = False  # the peer closed the connection, or a PDU was refused
        self._writes: list[memoryview] = []  # data set fragments not yet written ...
        self._writes_to: SpoolFile | None = None  # ... to this spool file

    def install(self) -> None:
        dul = self.dul
        setattr(dul, "_read_pdu_data", self.read_pdu)  # noqa: B010 (instance attribute)
        setattr(dul, "_is_transport_event", self.transport_event)  # noqa: B010

    def limit(self, pdu_type: int) -> int:
        """The longest variable field accepted for a PDU of ``pdu_type`` (0: unbounded)."""
        return self.max_pdu if pdu_type == P_DATA_TF else MAX_OTHER_PDU

    # -- what pynetdicom's DUL loop calls ---------------------------------------------------

    def transport_event(self) -> bool:
        """pynetdicom's ``_is_transport_event``: read and handle what arrived; True when
        something did (which restarts the DUL's idle timer). In state 13 (awaiting the close of
        the connection), nothing more to read closes the socket, as in pynetdicom."""
        if self.has_pdu() or self._fill():
            self.read_pdu()
            return True
        if self.dul.state_machine.current_state == "Sta13":
            self.dul.socket.close()
            return True
        return False

    def read_pdu(self) -> None:
        """Handle the buffered PDUs, reading on while P-DATA-TF PDUs can be handed on at once and
        more data is waiting (at most :data:`BURST_PDUS`, and never while the DUL has a
        primitive to send); stop at the first PDU that goes to pynetdicom's state machine, its
        event queued."""
        try:
            for _ in range(BURST_PDUS):
                while not self.has_pdu():
                    if not self._fill():
                        return
                if not (self._take_fragments() or self._handle_next()) or not self._may_go_on():
                    return
        finally:
            self._flush()

    def has_pdu(self) -> bool:
        """Whether a PDU can be handled without reading: a whole one is buffered, or a header
        that is handled on its own (an unknown type, a length over the limit)."""
        if self._end - self._start < PDU_HEADER:
            return False
        pdu_type, _, length = _HEADER.unpack_from(self._buffer, self._start)
        if pdu_type not in PDU_TYPES or 0 < self.limit(pdu_type) < length:
            return True
        return self._end - self._start >= PDU_HEADER + length

    def _may_go_on(self) -> bool:
        dul = self.dul
        return bool(dul.to_provider_queue.empty() and dul.event_queue.empty())

    # -- receiving --------------------------------------------------------------------------

    def _fill(self) -> bool:
        """Read what the socket has now into the buffer: True when bytes came; False when
        none are waiting, or the connection is closed (event 17 queued)."""
        self._flush()  # queued writes are views of the buffer, which is about to move
        if self._closed:
            self.dul.event_queue.put("Evt17")
            return False
        self._make_room()
        count = self._receive(self._view[self._end :])
        if count is None:
            return False
        if count == 0:
            self._closed = True
            self.dul.event_queue.put("Evt17")  # transport connection closed
            return False
        self._end += count
        return True

    def _make_room(self) -> None:
        """Move the unhandled bytes to the buffer's start; grow it to hold the next PDU."""
        start, end = self._start, self._end
        needed = PDU_HEADER
        if end - start >= PDU_HEADER:
            needed += _HEADER.unpack_from(self._buffer, start)[2]
        capacity = max(RECEIVE_BYTES, needed)
        if capacity > len(self._buffer):
            grown = bytearray(capacity)
            grown[: end - start] = self._view[start:end]
            self._buffer, self._view = grown, memoryview(grown)  # the old one goes with its views
        elif start > 0 and (start == end or len(self._buffer) - start < needed):
            self._view[: end - start] = self._view[start:end]
        else:
            return
        self._start, self._end = 0, end - start

    def _receive(self, into: memoryview) -> int | None:
        """Bytes read from the socket into ``into`` (0: closed), or None if none are waiting.
        One ``readv`` on a plain socket in non-blocking mode (what a socket with a timeout is):
        Python's ``recv`` would first ``poll`` it."""
        raw = getattr(self.dul.socket, "socket", None)
        if raw is None:
            return 0
        try:
            if isinstance(raw, ssl.SSLSocket) or raw.gettimeout() is None:
                if not _readable(raw):
                    return None
                return int(raw.recv_into(into))
            return os.readv(raw.fileno(), [into])
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except (OSError, ValueError):
            return 0  # reset, timed out, closed meanwhile: as a connection closed

    # -- handling ---------------------------------------------------------------------------

    def _handle_next(self) -> bool:
        """Handle the PDU at the buffer's start; True when it was handed on without an event
        (read on), False when its event is queued."""
        dul, start = self.dul, self._start
        pdu_type, _, length = _HEADER.unpack_from(self._buffer, start)
        if pdu_type not in PDU_TYPES:
            self._start += PDU_HEADER  # pynetdicom reads no body after an unknown type
            log.warning("pdu_unknown", peer=self.assoc.requestor.address, pdu_type=pdu_type)
            dul.event_queue.put("Evt19")  # unrecognised PDU
            return False
        limit = self.limit(pdu_type)
        if 0 < limit < length:
            self._refuse_length(pdu_type, length, limit)
            return False
        stop = start + PDU_HEADER + length
        self._start = stop
        if pdu_type == P_DATA_TF and self._data(self._view[start + PDU_HEADER : stop]):
            return True
        self._flush()
        self._decode(bytearray(self._view[start:stop]))
        return False

    def _refuse_length(self, pdu_type: int, length: int, limit: int) -> None:
        """A PDU longer than the listener accepts is refused before its body is read: A-ABORT,
        and the association ends as for a closed connection (PS3.8 9.2, event 19, AA-8)."""
        refuse_pdu(
            self.dul.socket,
            self.assoc.requestor.address,
            pdu_type,
            "PDU longer than the maximum length (node.max_pdu for P-DATA-TF)",
            length=length,
            limit=limit,
        )
        self._start = self._end
        self._closed = True
        self.dul.event_queue.put("Evt17")

    def _data(self, body: memoryview) -> bool:
        """Count a P-DATA-TF's data set bytes and, on an established association, hand its
        values on; True when the PDU needs nothing more."""
        values = parse_pdvs(body)
        if values is None:
            return False  # pynetdicom's decoding answers it (event 19)
        if self.max_instance_bytes > 0 and self._over_limit(values):
            return True
        dul = self.dul
        if dul.state_machine.current_state != ESTABLISHED or not dul.event_queue.empty():
            return False
        spool = self._spool_for(values)
        if spool is not None:
            self._queue_writes(spool, values)
            return True
        self._flush()
        primitive = P_DATA()
        # views of the buffer, which the setter (bytes only) would refuse
        primitive._presentation_data_value_list = values  # type: ignore[assignment]
        self.assoc.dimse.receive_primitive(primitive)
        return True

    def _take_fragments(self) -> int:
        """The bulk of a C-STORE, without parsing each PDU on its own: queue the fragments of
        the run of P-DATA-TF PDUs at the buffer's start that carry one data set fragment each,
        not the last, of the message being spooled, within the PDU and instance limits (what
        :meth:`_data` would do with each of them); return how many PDUs were taken (0: the
        next PDU takes the general way)."""
        dul = self.dul
        spool = self._message_spool()
        if (
            spool is None
            or dul.state_machine.current_state != ESTABLISHED
            or not dul.event_queue.empty()
        ):
            return 0
        buffer, view, start, end = self._buffer, self._view, self._start, self._end
        max_pdu, limit, pending = self.max_pdu, self.max_instance_bytes, self.pending
        taken = 0
        while end - start >= _FRAGMENT_HEAD:
            pdu_type, _, length, item_length, _, control = _FRAGMENT.unpack_from(buffer, start)
            stop = start + PDU_HEADER + length
            if (
                pdu_type != P_DATA_TF
                or item_length != length - 4
                or item_length < 2
                or control & 0x03
                or 0 < max_pdu < length
                or stop > end
                or (limit > 0 and pending + stop - start - _FRAGMENT_HEAD > limit)
            ):
                break
            fragment = view[start + _FRAGMENT_HEAD : stop]
            self._writes.append(fragment)
            pending += len(fragment)
            start = stop
            taken += 1
        if taken:
            self._start, self.pending, self._writes_to = start, pending, spool
        return taken

    def _message_spool(self) -> SpoolFile | None:
        """The spool file of the C-STORE request being received, if any."""
        spool = getattr(self.assoc.dimse.message, "_data_set_file", None)
        return spool if isinstance(spool, SpoolFile) else None

    def _spool_for(self, values: Sequence[tuple[int, memoryview]]) -> SpoolFile | None:
        """The spool file of the C-STORE request being received, if every value is a data set
        fragment that does not end it: what pynetdicom's ``decode_msg`` would only write there."""
        if any(value[0] & 0x03 for _, value in values):
            return None
        return self._message_spool()

    def _queue_writes(self, spool: SpoolFile, values: Sequence[tuple[int, memoryview]]) -> None:
        self._writes_to = spool
        self._writes.extend(value[1:] for _, value in values)

    def _flush(self) -> None:
        """Write the queued data set fragments to their spool file (one ``writev``)."""
        if not self._writes or self._writes_to is None:
            return
        writes, self._writes = self._writes, []
        try:
            self._writes_to.write_views(writes)
        except OSError as exc:
            log.warning(
                "spool_write_failed",
                peer=self.assoc.requestor.address,
                error=type(exc).__name__,
                outcome="association_aborted",
            )
            self.dul.event_queue.put("Evt19")

    def _over_limit(self, values: Sequence[tuple[int, memoryview]]) -> bool:
        self.pending, exceeded = count_dataset_bytes(values, self.pending, self.max_instance_bytes)
        if exceeded and not self.assoc.is_aborted:
            log.warning(
                "instance_too_large",
                calling_ae=self.assoc.requestor.ae_title,
                peer=self.assoc.requestor.address,
                received_bytes=self.pending,
                limit=self.max_instance_bytes,
                outcome="association_aborted",
            )
            self.assoc.abort(block=False)  # queues the A-ABORT, which this DUL thread sends next
        return exceeded

    def _may_reuse_request(self, pdu: bytearray) -> bool:
        """Whether ``pdu`` is an association request :func:`decoded_request` may answer from
        its cache: not too long, and no handler bound to see each received PDU or its bytes."""
        assoc = self.assoc
        return (
            pdu[0] == A_ASSOCIATE_RQ_TYPE
            and len(pdu) <= REUSED_REQUEST_BYTES
            and not assoc.get_handlers(evt.EVT_DATA_RECV)
            and not assoc.get_handlers(evt.EVT_PDU_RECV)
        )

    def _decode(self, pdu: bytearray) -> None:
        """As pynetdicom: decode, then queue the PDU's event and the PDU; an association
        request pynetdicom cannot negotiate is refused instead (A-ABORT, connection closed)."""
        dul = self.dul
        peer = self.assoc.requestor.address
        try:
            if self._may_reuse_request(pdu):
                decoded, problem = decoded_request(bytes(pdu))
                event = ASSOCIATE_RQ_EVENT
            else:
                decoded, event = dul._decode_pdu(pdu)
                problem = (
                    association_request_problem(decoded)
                    if isinstance(decoded, A_ASSOCIATE_RQ)
                    else None
                )
        except Exception as exc:
            log.warning("pdu_invalid", peer=peer, error=type(exc).__name__)
            dul.event_queue.put("Evt19")
            return
        if problem is not None:
            refuse_pdu(dul.socket, peer, pdu[0], problem, length=len(pdu) - PDU_HEADER)
            dul.event_queue.put("Evt17")  # as for a connection closed: nothing is negotiated
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)


def _readable(sock: Any) -> bool:
    """Whether a read of ``sock`` returns at once (TLS data already decrypted, or the socket
    is readable)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)
