"""The listener: a pynetdicom Storage SCP that answers C-ECHO and C-STORE.

Each instance arrives through pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``): the
dataset is streamed to a temporary file as it comes in, so a large radiograph never sits whole in
memory. The C-STORE handler reads only the identifying attributes, copies the file durably into
the state directory (``dicomnode.storage``), records it, and only then answers success. Every
failure maps to one documented status (:class:`StoreStatus`); the handler never raises.

Only CR and DX images are kept. Other storage SOP classes are accepted and discarded, or refused
with 0x0122, as ``node.other_sop_classes`` says (PACS routing rules often send whole studies).

The listener only receives: turning what it stored into jobs, and retention, are the study
assembly role's (:mod:`dicomnode.assembly`), which runs beside it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pydicom
from pydicom import uid as dcm_uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode import metrics, tls
from dicomnode.children import ChildContext, ChildSupervisor
from dicomnode.config import AllowedCaller, Config, OtherSopClasses
from dicomnode.datapath import spool_files
from dicomnode.health import LISTENER
from dicomnode.limits import InboundLimits, space_shortfall, spooled_dataset_size
from dicomnode.logging import configure_logging, get_logger
from dicomnode.reactor import waiting_loops
from dicomnode.receivers import AssociationSlots, SharedSocketServer
from dicomnode.records import InstanceHeader
from dicomnode.state import StateDB
from dicomnode.storage import InstanceStore, StateLayout, check_uid, mapped
from dicomnode.uidcache import cached_uids

CR_DX_SOP_CLASSES = frozenset(
    {
        dcm_uid.ComputedRadiographyImageStorage,
        dcm_uid.DigitalXRayImageStorageForPresentation,
        dcm_uid.DigitalXRayImageStorageForProcessing,
    }
)
"""The SOP classes the node stores and processes."""

TRANSFER_SYNTAXES = (
    dcm_uid.ExplicitVRLittleEndian,
    dcm_uid.DeflatedExplicitVRLittleEndian,
    dcm_uid.ExplicitVRBigEndian,
    dcm_uid.RLELossless,
    dcm_uid.JPEGBaseline8Bit,
    dcm_uid.JPEGExtended12Bit,
    dcm_uid.JPEGLossless,
    dcm_uid.JPEGLosslessSV1,
    dcm_uid.JPEGLSLossless,
    dcm_uid.JPEGLSNearLossless,
    dcm_uid.JPEG2000Lossless,
    dcm_uid.JPEG2000,
    dcm_uid.HTJ2KLossless,
    dcm_uid.HTJ2KLosslessRPCL,
    dcm_uid.HTJ2K,
    dcm_uid.ImplicitVRLittleEndian,
)
"""Accepted for every storage SOP class, so compressed images are kept as they were sent.

In this order of preference (pynetdicom accepts the first one the peer also proposes):
Explicit VR Little Endian before Implicit VR, which is last, so a sender offering both sends
the explicit encoding its file most likely has instead of re-encoding it to Implicit VR (which
loses the VRs of private elements and changes the stored bytes)."""

_HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03
_REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02

log = get_logger(__name__)

SPOOL_SWEEP_AGE = 1.0
"""Seconds a spool file must be old before :meth:`Listener.sweep_spool` removes it."""
TEND_SECONDS = 1.0
"""How often the listener tends its receiving processes (counts, spool, receiver children)."""
ANNOUNCE_POLL_SECONDS = 0.05
"""How often a starting listener looks whether its receiver children serve yet."""
RECEIVER_STOP_SECONDS = 30.0
"""How long a stopping listener waits for each receiver child before killing it."""
RECEIVER_HANG_SECONDS = 120.0
"""A receiver child whose main loop (a 1 s beat) is silent this long is killed and restarted."""


class StoreStatus(IntEnum):
    """The C-STORE response statuses the listener sends (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    """Stored durably and recorded; also an identical re-send, or a discarded other SOP class."""
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    """Not CR/DX and ``node.other_sop_classes = "reject"``."""
    OUT_OF_RESOURCES = 0xA700
    """Free space in the state directory would fall below ``node.min_free_bytes``, or the file
    could not be written or recorded (disk full, permissions, database error)."""
    DATASET_MISMATCH = 0xA900
    """Identifying attributes missing, not valid UIDs, or not matching the request."""
    CANNOT_UNDERSTAND = 0xC000
    """The dataset header could not be parsed, or the request carried no data set."""
    INTERNAL_ERROR = 0xC001
    """An unexpected error in the handler (logged with its traceback)."""


class HeaderError(ValueError):
    """A received dataset's header cannot be parsed."""


def read_header(path: Path) -> InstanceHeader:
    """Read the identifying UIDs of the DICOM file at ``path`` (no pixel data is read).

    The whole header is parsed, not only the four UIDs: a header the worker could not read
    (a corrupt element or sequence anywhere before the pixel data) is refused here rather than
    stored and then left without an answer. Raises :class:`HeaderError` if the file cannot be
    parsed and ValueError if a UID is missing, unusable or not encoded as a UID (VR UI).
    """
    try:
        with mapped(path) as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
        elements = {tag: ds.data_element(tag) if tag in ds else None for tag in _HEADER_TAGS}
        values = {
            tag: str(element.value or "").strip() if element is not None else ""
            for tag, element in elements.items()
        }
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:
        raise HeaderError(f"dataset header cannot be parsed ({type(exc).__name__})") from exc
    for tag, value in values.items():
        if not value:
            raise ValueError(f"{tag} is missing or empty")
        vr = elements[tag].VR  # type: ignore[union-attr]
        if vr != "UI":
            raise ValueError(f"{tag} is not encoded as a UID (VR {vr})")
        check_uid(value, tag)
    return InstanceHeader(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
    )


def check_matches_request(
    header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str
) -> None:
    """Raise ValueError unless the dataset's SOP Class/Instance UIDs are those of the request."""
    if header.sop_class_uid != sop_class_uid:
        raise ValueError(
            f"dataset SOPClassUID {header.sop_class_uid} differs from the request's {sop_class_uid}"
        )
    if header.sop_instance_uid != sop_instance_uid:
        raise ValueError(
            f"dataset SOPInstanceUID {header.sop_instance_uid} differs from the request's "
            f"{sop_instance_uid}"
        )


def normalise_address(address: str) -> str:
    """The canonical text of an IP address (IPv4-mapped IPv6 addresses as plain IPv4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def caller_allowed(allowed: tuple[AllowedCaller, ...], ae_title: str, address: str) -> bool:
    """True if no callers are listed, or ``(ae_title, address)`` is one of them."""
    if not allowed:
        return True
    host = normalise_address(address)
    return any(c.ae_title == ae_title.strip() and c.host == host for c in allowed)


def build_ae(config: Config) -> AE:
    """The pynetdicom AE: our AE title, limits, Verification and every storage SOP class.

    What each timeout bounds on an association the listener accepts (pynetdicom 3.0):

    - ``node.acse_timeout_seconds`` (``AE.acse_timeout``, the PS3.8 ARTIM timer): from TCP
      accept to the A-ASSOCIATE-RQ (a peer that connects and sends nothing is disconnected), and
      from our A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT to the peer closing the connection.
    - ``node.network_timeout_seconds`` (``AE.network_timeout``): the longest time without a
      received PDU on an established association (idle, or a transfer that stalls between two
      PDUs; the association is then aborted), and the receive timeout of the socket, so a PDU
      whose bytes stop arriving half-way ends the association too.
    - ``node.dimse_timeout_seconds`` (``AE.dimse_timeout``): the wait for a DIMSE response to a
      request the association itself sends. The listener only answers requests (C-ECHO,
      C-STORE), so today it bounds nothing here; idle time between requests is the network
      timeout's.
    """
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_pdu_size = config.node.max_pdu
    ae.maximum_associations = config.node.max_associations
    ae.acse_timeout = config.node.acse_timeout_seconds
    ae.dimse_timeout = config.node.dimse_timeout_seconds
    ae.network_timeout = config.node.network_timeout_seconds
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    return ae


def discard_unfinished_spool(assoc: object) -> Path | None:
    """Close and delete the spool file of a half-received C-STORE on ``assoc``, if any.

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom streams an incoming data set into a
    ``NamedTemporaryFile(delete=False)`` held by the DIMSE provider's current message
    (``assoc.dimse.message._data_set_file``) and deletes it after the C-STORE handler ran. A
    message that never completes would leave the file behind, and a hostile peer could fill the
    disk that way. Returns the removed path (None when there was none).
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if handle is None or path is None:
        return None
    handle.close()
    Path(path).unlink(missing_ok=True)
    return Path(path)


def spooled_size(event: evt.Event) -> int | None:
    """Bytes of the data set a C-STORE spooled (None: the request carried none)."""
    path = getattr(event, "dataset_path", None)
    if path is None:
        return None
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


@contextlib.contextmanager
def pynetdicom_setting(name: str, value: object) -> Iterator[None]:
    """While inside, ``pynetdicom._config.<name>`` is ``value``."""
    before = getattr(_config, name)
    setattr(_config, name, value)
    try:
        yield
    finally:
        setattr(_config, name, before)


@dataclass(frozen=True)
class ReceiverSeat:
    """What a receiver child needs from the listener: its index (1 and up; the listener is 0),
    the listening socket to adopt, and the shared association count."""

    index: int
    listening: socket.socket
    slots: AssociationSlots


class Listener:
    """A running Storage SCP on ``config.node.bind``:``port`` plus its state and store.

    Use as a context manager or call :meth:`start` and :meth:`stop`. ``port`` is the bound port
    (useful when ``node.port = 0`` picks a free one). The listener binds the port and starts
    ``node.receive_processes - 1`` receiver children (``dicomnode.receivers``); a receiver child
    is a Listener given its ``seat``: it adopts the socket, and leaves the clean-up at start to
    the listener.
    """

    def __init__(self, config: Config, seat: ReceiverSeat | None = None) -> None:
        self.config = config
        self.seat = seat
        self.index = 0 if seat is None else seat.index
        self.layout = StateLayout(config.node.state_dir)
        self.db: StateDB | None = None
        self.store: InstanceStore | None = None
        self._server: Any = None
        node = config.node
        self.limits = InboundLimits(
            node.max_pdu, node.max_instance_bytes, node.network_timeout_seconds
        )
        self.slots = (
            seat.slots
            if seat is not None
            else AssociationSlots(
                node.receive_processes,
                node.max_associations,
                self.layout.associations_lock_path,
            )
        )
        self.receivers: list[ChildSupervisor] = []
        self._admitted: set[Any] = set()
        self._admitted_lock = threading.Lock()
        self._tempdir_before: str | None = tempfile.tempdir
        self._patches = contextlib.ExitStack()

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to."""
        if self._server is None:
            raise RuntimeError("listener is not running")
        return int(self._server.server_address[1])

    def start(self) -> Listener:
        """Open the state, bind the port (or adopt the listener's socket) and serve associations
        in background threads; the listener then starts its receiver children."""
        self.db = self.layout.open_db()
        if self.seat is None:
            self.layout.clear_tmp()
            self.layout.clear_spool()
        spool = self._spool_folder()
        self.layout.clear_spool(self.index)
        # pynetdicom spools incoming data sets with tempfile: into our own folder, so that what
        # an aborted or broken transfer leaves behind can be found and removed.
        self._tempdir_before = tempfile.tempdir
        tempfile.tempdir = str(spool)
        self.store = InstanceStore(self.layout, self.db)
        self._patches.enter_context(pynetdicom_setting("STORE_RECV_CHUNKED_DATASET", True))
        # pynetdicom's own debug handlers format every PDU and message for a logger that the
        # node's logging keeps at WARNING: they would only cost time
        self._patches.enter_context(pynetdicom_setting("LOG_HANDLER_LEVEL", "none"))
        self._patches.enter_context(spool_files())
        self._patches.enter_context(waiting_loops())
        self._patches.enter_context(cached_uids())
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open_spool),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            *self.limits.handlers(),
        ]
        try:
            ssl_context = tls.listener_context(self.config)  # None: plain TCP
            if ssl_context is not None:  # first: the other handlers need the handshake done
                handlers.insert(0, (evt.EVT_CONN_OPEN, self._on_conn_open))
            self._server = build_ae(self.config).make_server(
                (self.config.node.bind, self.config.node.port),
                evt_handlers=handlers,
                ssl_context=ssl_context,
                server_class=SharedSocketServer,
                listening=None if self.seat is None else self.seat.listening,
            )
            self._server.ae._servers.append(self._server)  # as AE.start_server does
            threading.Thread(
                target=self._server.serve_forever, name="AcceptorServer", daemon=True
            ).start()
            if self.seat is None:
                self._start_receivers()
        except Exception:
            self.stop()
            raise
        log.info(
            "listener_started",
            ae_title=self.config.node.ae_title,
            bind=self.config.node.bind,
            port=self.port,
            state_dir=str(self.layout.root),
            tls=tls.mode(self.config),
            receive_processes=self.config.node.receive_processes,
            receiver=self.index,
        )
        return self

    def _start_receivers(self) -> None:
        for index in range(1, self.config.node.receive_processes):
            seat = ReceiverSeat(index, self._server.socket, self.slots)
            supervisor = ChildSupervisor(
                "receiver",
                receiver_child,
                (self.config, seat),
                RECEIVER_HANG_SECONDS,
                fields={"receiver": index},
                before_restart=functools.partial(self.slots.reset, index),
                die_with_parent=True,  # it holds the port a restarted listener binds again
            )
            supervisor.start()
            self.receivers.append(supervisor)

    def tend(self) -> None:
        """Every poll of a receiving process: refresh its association count, remove what
        failed transfers left in its spool (:meth:`sweep_spool`), and (the listener) restart
        receiver children that died or hung. Raises RuntimeError when one died before it ever
        served (it cannot start)."""
        running = self._running()
        self.slots.update(self.index, running)
        metrics.associations_open(running)
        self.sweep_spool()
        for index, supervisor in enumerate(self.receivers, start=1):
            if not supervisor.check():
                raise RuntimeError(f"receiver process {index} of the listener failed at start")

    def sweep_spool(self, now: float | None = None) -> int:
        """With no association of this process open, delete the files in its spool older than
        :data:`SPOOL_SWEEP_AGE` seconds; returns how many.

        The connection-close handler removes what an unfinished transfer leaves, but a file can
        outlive it (e.g. a write that failed while another association was open). With none
        open nothing is being written or read there; the age spares a file of an association
        accepted after the check (file times come from a coarse clock)."""
        if self._server is None or self._server.active_associations:
            return 0
        cutoff = (time.time() if now is None else now) - SPOOL_SWEEP_AGE
        folder = self._spool_folder()
        removed = 0
        for path in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        if removed:
            log.warning("spool_swept", spool_files_removed=removed, receiver=self.index)
        return removed

    def receivers_ready(self) -> bool:
        """Every receiver child has served at least once."""
        return all(supervisor.ready for supervisor in self.receivers)

    def stop(self) -> None:
        """Stop the receiver children, then stop accepting, close running associations and the
        state database."""
        for supervisor in self.receivers:
            supervisor.shutdown(RECEIVER_STOP_SECONDS)
        self.receivers = []
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("listener_stopped", ae_title=self.config.node.ae_title, receiver=self.index)
        self._patches.close()
        tempfile.tempdir = self._tempdir_before
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- event handlers (run in pynetdicom's association threads) -----------------------------

    def _running(self) -> int:
        """How many associations this process admitted are still running."""
        with self._admitted_lock:
            self._admitted = {assoc for assoc in self._admitted if assoc.is_alive()}
            return len(self._admitted)

    def _on_requested(self, event: evt.Event) -> None:
        """Reject unknown callers (A-ASSOCIATE-RJ, permanent, calling AE not recognised), and
        any caller while all receiving processes together hold ``node.max_associations``
        (transient, local limit exceeded, as pynetdicom answers within one process)."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling_ae = str(primitive.calling_ae_title if primitive else "").strip()
        address = assoc.requestor.address
        if not caller_allowed(self.config.allowed_callers, calling_ae, address):
            log.warning(
                "association_rejected",
                calling_ae=calling_ae,
                peer=address,
                reason="calling AE title and host not in allowed_callers",
            )
            metrics.association_rejected("caller_not_allowed")
            reason = (_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
        elif self.slots.admit(self.index, self._running()):
            with self._admitted_lock:
                self._admitted.add(assoc)
            metrics.associations_open(self._running())
            return
        else:
            log.warning(
                "association_rejected",
                calling_ae=calling_ae,
                peer=address,
                reason=f"node.max_associations = {self.slots.limit} reached",
            )
            metrics.association_rejected("max_associations")
            reason = (_REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED)
        assoc.acse.send_reject(*reason)
        # As pynetdicom's own rejection does: kill() waits until the DUL has sent the
        # A-ASSOCIATE-RJ, so the socket is not closed before the peer reads the reason.
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        metrics.association_accepted()

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (ours are counted where they are made): a called AE
        title other than ours, or its per-process association limit."""
        primitive = event.assoc.acceptor.primitive
        found = (primitive.result_source, primitive.diagnostic) if primitive else (None, None)
        reasons: dict[tuple[int | None, int | None], str] = {
            (1, 7): "called_ae_title",
            (3, 2): "max_associations",
        }
        metrics.association_rejected(reasons.get(found, "other"))

    def _on_conn_open(self, event: evt.Event) -> None:
        """TLS only: complete the handshake in this association's thread (a stalled peer
        blocks no other); a peer that fails it (no or untrusted certificate, TLS below 1.2, no
        BCP 195 cipher, not TLS at all) is logged and disconnected before any DICOM message."""
        address = event.assoc.requestor.address
        try:
            sock = event.assoc.dul.socket
            raw = sock.socket if sock is not None else None
            failure = tls.accept_handshake(raw)
            if failure is None:
                log.debug("tls_established", peer=address, **tls.session_summary(raw))
                return
            log.warning("tls_handshake_failed", peer=address, reason=failure)
            metrics.association_rejected("tls_handshake")
            if sock is not None:
                sock.close()
        except Exception:  # a handler never raises; pynetdicom then drops the connection
            log.exception("tls_handshake_error", peer=address)

    def _spool_folder(self) -> Path:
        """This process's spool folder, created (owner only) if it is missing: at start, or
        after an aging clean-up of the spool (systemd-tmpfiles) removed it while it sat empty."""
        folder = self.layout.receiver_spool(self.index)
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    def _on_conn_open_spool(self, event: evt.Event) -> None:
        """Make sure this process's spool folder exists before anything arrives: an aging
        clean-up of the spool (systemd-tmpfiles) may have removed it while it sat empty."""
        try:
            self._spool_folder()
        except OSError:  # a handler never raises; the transfer then fails with its own status
            log.exception("spool_folder_unavailable", peer=event.assoc.requestor.address)

    def _on_conn_close(self, event: evt.Event) -> None:
        """Remove the spool file of a C-STORE the peer never finished (an abort or a dropped
        connection mid-transfer): pynetdicom deletes it only after a complete message."""
        try:
            with self._admitted_lock:
                self._admitted.discard(event.assoc)
            running = self._running()
            self.slots.update(self.index, running)
            metrics.associations_open(running)
            removed = discard_unfinished_spool(event.assoc)
            others = [
                a
                for a in (self._server.active_associations if self._server else [])
                if a is not event.assoc
            ]
            # with no other association of this process open nothing can be arriving in its
            # spool: what is there is left over from a transfer pynetdicom gave up on
            orphans = 0 if others else self.layout.clear_spool(self.index)
        except Exception:  # a handler never raises; the files then go at the next sweep
            log.exception("spool_cleanup_failed", peer=event.assoc.requestor.address)
            return
        if removed is not None or orphans:
            log.warning(
                "transfer_incomplete",
                peer=event.assoc.requestor.address,
                spool_files_removed=orphans + (removed is not None),
            )

    def _on_echo(self, event: evt.Event) -> int:
        log.info(
            "echo", calling_ae=event.assoc.requestor.ae_title, peer=event.assoc.requestor.address
        )
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        """C-STORE: one log event per instance and a status from :class:`StoreStatus`."""
        request = cast(C_STORE, event.request)
        bound = log.bind(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            calling_ae=event.assoc.requestor.ae_title,
            peer=event.assoc.requestor.address,
            receiver=self.index,
        )
        size = spooled_size(event)
        try:
            status, fields = self._store(event)
        except Exception:
            bound.exception("instance_failed", status=f"0x{StoreStatus.INTERNAL_ERROR:04X}")
            metrics.instance_answered(StoreStatus.INTERNAL_ERROR, "error", size)
            return int(StoreStatus.INTERNAL_ERROR)
        level = "info" if status is StoreStatus.SUCCESS else "warning"
        getattr(bound, level)("instance_received", status=f"0x{status:04X}", **fields)
        metrics.instance_answered(status, str(fields.get("outcome", "")), size)
        return int(status)

    def _store(self, event: evt.Event) -> tuple[StoreStatus, dict[str, object]]:
        if self.store is None:
            raise RuntimeError("listener is not running")
        request = cast(C_STORE, event.request)
        sop_class = str(request.AffectedSOPClassUID)
        if sop_class not in CR_DX_SOP_CLASSES:
            if self.config.node.other_sop_classes is OtherSopClasses.REJECT:
                return StoreStatus.SOP_CLASS_NOT_SUPPORTED, {"outcome": "rejected_sop_class"}
            return StoreStatus.SUCCESS, {"outcome": "discarded_sop_class"}
        if event.dataset_path is None:  # a C-STORE request without a data set
            return StoreStatus.CANNOT_UNDERSTAND, {"outcome": "refused", "reason": "no data set"}
        path = Path(event.dataset_path)
        limit = self.config.node.max_instance_bytes
        if limit and (size := spooled_dataset_size(path)) > limit:
            reason = f"data set of {size} bytes exceeds node.max_instance_bytes = {limit}"
            return StoreStatus.OUT_OF_RESOURCES, {"outcome": "refused", "reason": reason}
        shortfall = space_shortfall(self.layout.root, path.stat().st_size, self.config.node)
        if shortfall:
            return StoreStatus.OUT_OF_RESOURCES, {"outcome": "not_stored", "reason": shortfall}
        try:
            header = read_header(path)
        except HeaderError as exc:
            return StoreStatus.CANNOT_UNDERSTAND, {"outcome": "refused", "reason": str(exc)}
        except ValueError as exc:
            return StoreStatus.DATASET_MISMATCH, {"outcome": "refused", "reason": str(exc)}
        try:
            check_matches_request(header, sop_class, str(request.AffectedSOPInstanceUID))
        except ValueError as exc:
            return StoreStatus.DATASET_MISMATCH, {"outcome": "refused", "reason": str(exc)}
        ids = {
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
        }
        try:
            result = self.store.store(path, header, event.assoc.requestor.ae_title, move=True)
        except (OSError, sqlite3.Error) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            return StoreStatus.OUT_OF_RESOURCES, {**ids, "outcome": "not_stored", "reason": reason}
        fields = {
            **ids,
            "outcome": str(result.outcome),
            "size": result.instance.size,
        }
        return StoreStatus.SUCCESS, fields


def receiver_child(config: Config, seat: ReceiverSeat, context: ChildContext) -> None:
    """Entry point of a receiver child (a fresh interpreter): serve on the listener's socket
    until SIGTERM or until the listener is gone."""
    configure_logging(config.node.log_level)
    metrics.process_started(f"receiver_{seat.index}", [LISTENER])
    with Listener(config, seat) as listener:
        context.mark_ready()
        while not context.stop.wait(1.0):
            context.alive()
            listener.tend()


def run_listener(
    config: Config,
    stop_event: threading.Event,
    ready: Callable[[Listener], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> None:
    """Serve until ``stop_event`` is set, tending the receiving processes every second; then
    shut down.

    ``ready`` is called once the port is bound and the receiver children serve too (e.g. to
    notify systemd or learn the port when ``node.port = 0``). ``heartbeat`` is called every
    poll (the service's watchdog pings only while it is called). Raises RuntimeError when a
    receiver child cannot start.
    """
    announced = False
    with Listener(config) as listener:
        wait = 0.0
        while True:
            try:
                listener.tend()  # RuntimeError (a receiver cannot start) ends the listener
            except OSError as exc:
                log.error("listener_housekeeping_failed", error=f"{type(exc).__name__}: {exc}")
            if not announced and listener.receivers_ready():
                announced = True
                if ready is not None:
                    ready(listener)
            if stop_event.wait(wait):
                break
            if heartbeat is not None:
                heartbeat()
            wait = TEND_SECONDS if announced else ANNOUNCE_POLL_SECONDS
