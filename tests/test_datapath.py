"""The listener's receive data path (dicomnode.datapath), its waiting loops (dicomnode.reactor)
and the cheap copy of the presentation contexts (dicomnode.receivers.SupportedContexts).

The fault suite (tests/faults/) sends malformed PDUs and oversized data sets through the same
path; here: the parsing, the spool file's hash, that a real sender's instances take the path,
and that idle associations wait instead of polling.
"""

from __future__ import annotations

import copy
import os
import queue
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, dimse_messages, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode import reactor, storage
from dicomnode.datapath import (
    REUSED_REQUEST_BYTES,
    DataPath,
    SpoolFile,
    count_dataset_bytes,
    decoded_request,
    parse_pdvs,
    spool_files,
)
from dicomnode.reactor import AssociationWaiter, DulWaiter, PollingClock
from dicomnode.receivers import SupportedContexts
from tests.faults.fuzz_pdus import Request
from tests.test_scp import NODE_AE, instance_rows, listening, make_config, storescu

pytestmark = pytest.mark.timeout(120)


def pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    """One presentation data value item (PS3.8 9.3.5.1)."""
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


# -- parsing and counting ------------------------------------------------------------------


def test_parse_pdvs_returns_views_of_each_item() -> None:
    body = pdv(1, 0x03, b"command") + pdv(1, 0x00, b"data") + pdv(3, 0x02, b"last")
    values = parse_pdvs(memoryview(body))
    assert values is not None
    assert [(cid, bytes(value)) for cid, value in values] == [
        (1, b"\x03command"),
        (1, b"\x00data"),
        (3, b"\x02last"),
    ]
    assert all(isinstance(value, memoryview) for _, value in values)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no item
        b"\x00\x00\x00",  # a length field cut short
        struct.pack(">IB", 1, 1),  # an item with no message control header
        pdv(1, 0, b"data")[:-1],  # an item longer than the PDU
        pdv(1, 0, b"data") + b"\x00",  # trailing bytes that are no item
    ],
)
def test_parse_pdvs_refuses_items_that_do_not_tile_the_pdu(body: bytes) -> None:
    assert parse_pdvs(memoryview(body)) is None


def test_count_dataset_bytes_counts_data_fragments_of_the_unfinished_message() -> None:
    values = parse_pdvs(memoryview(pdv(1, 0x03, b"c" * 50) + pdv(1, 0x00, b"d" * 40)))
    assert values is not None
    assert count_dataset_bytes(values, 0, 100) == (40, False)
    assert count_dataset_bytes(values, 70, 100) == (110, True)
    last = parse_pdvs(memoryview(pdv(1, 0x02, b"d" * 500)))
    assert last is not None
    assert count_dataset_bytes(last, 70, 100) == (0, False)  # complete: the handler decides


# -- the spool file --------------------------------------------------------------------------


def test_spool_file_writes_everything_and_starts_write_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    chunks = [rng.bytes(size) for size in (132, 3 * 1024 * 1024, 2 * 1024 * 1024 + 17, 1)]
    with spool_files():
        assert dimse_messages.NamedTemporaryFile is SpoolFile
        spool = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm", dir=None)
    try:
        for chunk in chunks:
            assert spool.write(memoryview(chunk)) == len(chunk)
            spool.file.flush()
        # write-back starts once 4 MiB are pending: after the third chunk, not the fourth
        assert spool._written_back == 3 * 1024 * 1024 + 132 + 2 * 1024 * 1024 + 17
        assert spool.size == sum(map(len, chunks))
    finally:
        spool.close()
        spool.close()  # twice: harmless, as for a file object
    assert dimse_messages.NamedTemporaryFile is not SpoolFile  # restored
    assert Path(spool.name).read_bytes() == b"".join(chunks)
    assert spool.name.endswith(".dcm") and Path(spool.name).stat().st_mode & 0o077 == 0
    os.unlink(spool.name)


def test_move_durably_keeps_the_file_without_hashing_it(tmp_path: Path) -> None:
    src, dst = tmp_path / "spooled.dcm", tmp_path / "kept.dcm"
    src.write_bytes(b"content")
    inode = src.stat().st_ino
    assert storage.move_durably(src, dst) == (7, "")
    assert dst.read_bytes() == b"content" and not src.exists() and dst.stat().st_ino == inode


def test_same_bytes_compares_content(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"x" * 5000)
    b.write_bytes(b"x" * 5000)
    c.write_bytes(b"x" * 4999 + b"y")
    assert storage.same_bytes(a, b) and not storage.same_bytes(a, c)
    c.write_bytes(b"x" * 4999)
    assert not storage.same_bytes(a, c)  # another size


# -- reading PDUs from the socket -------------------------------------------------------------


def p_data(*values: bytes) -> bytes:
    """A P-DATA-TF PDU of the presentation data value items ``values``."""
    body = b"".join(values)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


class _Dimse:
    """The DIMSE provider as the data path sees it: a C-STORE in progress (its spool file),
    and what reached ``receive_primitive`` (copied: the values are views of the buffer)."""

    def __init__(self, spool: SpoolFile | None) -> None:
        self.message = type("Message", (), {"_data_set_file": spool})()
        self.received: list[list[tuple[int, bytes]]] = []

    def receive_primitive(self, primitive: Any) -> None:
        self.received.append([(c, bytes(v)) for c, v in primitive.presentation_data_value_list])


class _Association:
    """What :class:`DataPath` uses of pynetdicom's Association and DUL, on a real socket."""

    def __init__(self, sock: Any, spool: SpoolFile | None) -> None:
        self.dimse = _Dimse(spool)
        self.requestor = type("Requestor", (), {"address": "127.0.0.1", "ae_title": "PEER"})()
        self.is_aborted = False
        self.dul = type("Dul", (), {})()
        self.dul.socket = type("Transport", (), {"socket": sock, "_is_connected": True})()
        self.dul.state_machine = type("Machine", (), {"current_state": "Sta6"})()
        self.dul.event_queue, self.dul.to_provider_queue = queue.Queue(), queue.Queue()


def read_until(path: DataPath, done: Any, timeout: float = 10.0) -> None:
    """Run the DUL loop's part of the data path until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the data path did not finish"
        if not path.transport_event():
            time.sleep(0.001)


def test_data_path_writes_the_fragments_of_many_pdus_with_one_writev(tmp_path: Path) -> None:
    """Seven P-DATA-TF PDUs waiting on the socket: one read takes them all; the fragments of the
    unfinished data set (runs of one-fragment PDUs, and a PDU of two fragments, parsed on its
    own) go to the spool file in one ``writev``; the PDU with the last fragment goes to the
    DIMSE provider, which completes the message (pynetdicom writes that one)."""
    import socket

    rng = np.random.default_rng(3)
    fragments = [rng.bytes(5000 + 7 * i) for i in range(7)]
    last = rng.bytes(99)
    ours, theirs = socket.socketpair()
    ours.settimeout(5)  # as the listener's accepted sockets: non-blocking underneath
    spool = SpoolFile(dir=str(tmp_path))
    writes: list[int] = []
    write_views = spool.write_views

    def counted(views: Any) -> int:
        writes.append(len(views))
        return write_views(views)

    spool.write_views = counted  # type: ignore[method-assign]
    assoc = _Association(ours, spool)
    path = DataPath(assoc, max_instance_bytes=0, max_pdu=16384)
    try:
        theirs.sendall(b"".join(p_data(pdv(1, 0x00, f)) for f in fragments[:3]))
        theirs.sendall(p_data(pdv(1, 0x00, fragments[3]), pdv(1, 0x00, fragments[4])))
        theirs.sendall(b"".join(p_data(pdv(1, 0x00, f)) for f in fragments[5:]))
        theirs.sendall(p_data(pdv(1, 0x02, last)))
        read_until(path, lambda: assoc.dimse.received)
    finally:
        spool.close()
        ours.close()
        theirs.close()
    assert writes == [7]  # one writev for the seven fragments of six PDUs
    assert Path(spool.name).read_bytes() == b"".join(fragments)
    assert assoc.dimse.received == [[(1, b"\x02" + last)]]
    assert assoc.dul.event_queue.empty()


def test_data_path_reads_pdus_split_anyhow_grows_for_a_long_one_and_sees_a_close(
    tmp_path: Path,
) -> None:
    """PDUs arriving in 7001-byte pieces, one of them 3 MiB (longer than the receive buffer):
    every fragment is spooled in order; a command PDU goes to the DIMSE provider as it came;
    the peer closing half-way through a PDU is a closed connection (event 17), after what
    arrived whole was handled."""
    import socket

    rng = np.random.default_rng(4)
    fragments = [rng.bytes(n) for n in (70_000, 3 * 1024 * 1024, 1, 130_000)]
    stream = p_data(pdv(3, 0x03, b"command")) + b"".join(
        p_data(pdv(1, 0x00, f)) for f in fragments
    )
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    spool = SpoolFile(dir=str(tmp_path))
    assoc = _Association(ours, spool)
    path = DataPath(assoc, max_instance_bytes=0, max_pdu=0)

    def send() -> None:
        for start in range(0, len(stream), 7001):
            theirs.sendall(stream[start : start + 7001])
        theirs.sendall(p_data(pdv(1, 0x02, b"cut short"))[:-3])
        theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        read_until(path, lambda: not assoc.dul.event_queue.empty())
        sender.join()
    finally:
        spool.close()
        ours.close()
    assert assoc.dul.event_queue.get_nowait() == "Evt17"
    assert Path(spool.name).read_bytes() == b"".join(fragments)
    assert assoc.dimse.received == [[(3, b"\x03command")]]
    assert len(path._buffer) > 3 * 1024 * 1024  # grown to hold the long PDU


# -- a real sender through the listener ------------------------------------------------------


def large_dx(path: Path, rows: int = 2048, cols: int = 2048) -> Path:
    """A DX instance of ``rows`` x ``cols`` 16-bit pixels: many PDUs, several write-backs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "DX", "DATAPATH"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    pixels = np.random.default_rng(1).integers(0, 4096, (rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.dicom_peers
def test_storescu_instance_takes_the_data_path_into_a_spool_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 8 MiB instance from DCMTK storescu (64 PDUs of 128 KiB) takes the data path PDU by
    PDU (not pynetdicom's event queue): the bulk as runs of fragments, the first and last PDU
    through the DIMSE provider; it is spooled into a SpoolFile and stored as sent, without a
    hash."""
    handed: list[bool] = []
    runs: list[int] = []
    spools: list[SpoolFile] = []
    data, take, init = DataPath._data, DataPath._take_fragments, SpoolFile.__init__

    def counted_data(self: DataPath, body: memoryview) -> bool:
        handed.append(data(self, body))
        return handed[-1]

    def counted_take(self: DataPath) -> int:
        runs.append(take(self))
        return runs[-1]

    def counted_init(self: SpoolFile, **kwargs: Any) -> None:
        init(self, **kwargs)
        spools.append(self)

    monkeypatch.setattr(DataPath, "_data", counted_data)
    monkeypatch.setattr(DataPath, "_take_fragments", counted_take)
    monkeypatch.setattr(SpoolFile, "__init__", counted_init)
    sent = large_dx(tmp_path / "large.dcm")
    with listening(make_config(tmp_path, max_pdu=131072)) as listener:
        done = storescu(listener.port, sent)
        assert done.returncode == 0, done.stderr
        rows = instance_rows(listener)
    assert all(handed) and len(handed) + sum(runs) >= 64  # every P-DATA-TF PDU: the data path
    assert sum(runs) >= 60  # the bulk as runs of fragments
    assert len(spools) == 1 and spools[0].size > 8 * 1024 * 1024
    (row,) = rows.values()
    stored = pydicom.dcmread(Path(row["path"]))
    assert stored.PixelData == pydicom.dcmread(sent).PixelData
    assert row["size"] == Path(row["path"]).stat().st_size == spools[0].size
    assert row["sha256"] == ""


# -- waiting loops ---------------------------------------------------------------------------


def test_polling_clock_waits_only_for_pynetdicoms_poll_delay_on_threads_with_a_waiter() -> None:
    clock = PollingClock()
    assert clock.monotonic is time.monotonic  # everything else is the time module's
    waiter = AssociationWaiter()
    woken: list[float] = []

    def loop() -> None:
        start = time.monotonic()
        clock.sleep(reactor.POLL_DELAY)  # waits for the wake, not 1 ms
        woken.append(time.monotonic() - start)

    thread = threading.Thread(target=loop)
    setattr(thread, reactor.WAITER, waiter)
    thread.start()
    time.sleep(0.02)
    assert not woken  # still waiting after 20 ms, where it slept 1 ms before
    waiter.wake()
    thread.join(1)
    assert woken and woken[0] < reactor.MAX_WAIT + 0.5
    start = time.monotonic()
    clock.sleep(reactor.POLL_DELAY)  # this thread has no waiter: a plain 1 ms sleep
    assert time.monotonic() - start < reactor.MAX_WAIT


class _FakeDul:
    def __init__(self, sock: Any) -> None:
        self.socket = type("Transport", (), {"socket": sock, "_is_connected": True})()
        self.artim_timer = type("Timer", (), {"remaining": 10.0})()


def test_dul_waiter_returns_on_data_or_a_wake_and_drains_the_wakes() -> None:
    import socket

    ours, theirs = socket.socketpair()
    buffered = [False]
    waiter = DulWaiter(_FakeDul(ours), buffered=lambda: buffered[0])
    try:
        start = time.monotonic()
        waiter.wait()  # nothing: bounded by MAX_WAIT
        assert reactor.MAX_WAIT * 0.8 <= time.monotonic() - start < reactor.MAX_WAIT + 0.5
        buffered[0] = True
        start = time.monotonic()
        waiter.wait()  # a PDU already read waits to be handled: no wait at all
        assert time.monotonic() - start < reactor.MAX_WAIT * 0.5
        buffered[0] = False
        start = time.monotonic()
        waiter.wait()
        assert reactor.MAX_WAIT * 0.8 <= time.monotonic() - start < reactor.MAX_WAIT + 0.5
        for _ in range(3):
            waiter.wake()
        start = time.monotonic()
        waiter.wait()  # woken at once, all three wakes drained
        assert time.monotonic() - start < reactor.MAX_WAIT
        theirs.send(b"PDU")
        start = time.monotonic()
        waiter.wait()  # data on the socket
        assert time.monotonic() - start < reactor.MAX_WAIT
    finally:
        waiter.close()
        waiter.wake()  # after close: ignored, never a stray write to a reused descriptor
        ours.close()
        theirs.close()


def test_idle_associations_wait_instead_of_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four associations held open and idle for 0.5 s: their loops passed at most a few
    dozen times (pynetdicom's polling passed about 500 times per thread), and C-ECHO and the
    release still answer at once."""
    passes = {"dul": 0, "association": 0}

    def counting(kind: str, wait: Any) -> Any:
        def counted(self: Any) -> None:
            passes[kind] += 1
            wait(self)

        return counted

    monkeypatch.setattr(DulWaiter, "wait", counting("dul", DulWaiter.wait))
    monkeypatch.setattr(AssociationWaiter, "wait", counting("association", AssociationWaiter.wait))
    config = make_config(tmp_path)
    with listening(config) as listener:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assocs = [ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE) for _ in range(4)]
        assert all(a.is_established for a in assocs)
        time.sleep(0.2)
        before = dict(passes)
        time.sleep(0.5)
        idle = {kind: passes[kind] - before[kind] for kind in passes}
        start = time.monotonic()
        assert all(int(a.send_c_echo().Status) == 0 for a in assocs)
        for a in assocs:
            a.release()
        answered = time.monotonic() - start
    # 4 associations x 0.5 s / MAX_WAIT (0.05 s) = 40 passes per kind; polling would be 2,000
    # (none at all would mean pynetdicom's own sleeps ran: the clock was not in place)
    assert all(4 <= count <= 80 for count in idle.values()), idle
    assert answered < 2.0


# -- presentation contexts -------------------------------------------------------------------


def context_state(context: Any) -> tuple[Any, ...]:
    return (
        context.context_id,
        context.abstract_syntax,
        tuple(context.transfer_syntax),
        context.scu_role,
        context.scp_role,
        context.result,
        context._as_scu,
        context._as_scp,
    )


def test_associations_share_the_contexts_and_negotiation_leaves_them_as_they_were(
    tmp_path: Path,
) -> None:
    """Each association's copy of the server's contexts is a new list of the same objects;
    two storescu associations (each proposing 128 contexts, some accepted, some not) and a
    pynetdicom one with role selection leave every context as it was."""
    with listening(make_config(tmp_path)) as listener:
        contexts = listener._server.contexts  # type: ignore[union-attr]
        assert isinstance(contexts, SupportedContexts)
        shared = copy.deepcopy(contexts)
        assert shared is not contexts
        assert all(a is b for a, b in zip(shared, contexts, strict=True))
        before = [context_state(c) for c in contexts]
        for name in ("one.dcm", "two.dcm"):
            done = storescu(listener.port, large_dx(tmp_path / name, rows=64, cols=64))
            assert done.returncode == 0, done.stderr
        ae = AE(ae_title="ROLES")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        role = build_role(DigitalXRayImageStorageForPresentation, scu_role=True, scp_role=True)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE, ext_neg=[role])
        assert assoc.is_established
        assoc.release()
        assert [context_state(c) for c in contexts] == before
        assert len(instance_rows(listener)) == 2


def test_an_association_request_sent_again_is_decoded_once(tmp_path: Path) -> None:
    """Three storescu associations with the same request: pynetdicom decodes it once, all three
    are served; a request with other bytes (another calling AE title) is decoded anew."""
    decoded_request.cache_clear()
    with listening(make_config(tmp_path)) as listener:
        for index in range(3):
            done = storescu(listener.port, large_dx(tmp_path / f"{index}.dcm", rows=64, cols=64))
            assert done.returncode == 0, done.stderr
        info = decoded_request.cache_info()
        assert (info.misses, info.hits) == (1, 2)
        done = storescu(listener.port, tmp_path / "0.dcm", calling="OTHER_AE")
        assert done.returncode == 0, done.stderr
        assert decoded_request.cache_info().misses == 2
        assert len(instance_rows(listener)) == 3
    data = bytes(Request().encode())
    first, problem = decoded_request(data)
    assert decoded_request(data)[0] is first and problem is None
    assert first.calling_ae_title == "FUZZ_SCU"
    # the primitive pynetdicom makes of it is new each time: nothing shared is changed later
    one, two = first.to_primitive(), first.to_primitive()
    assert one.presentation_context_definition_list[0] is not (
        two.presentation_context_definition_list[0]
    )


class _Handlers:
    def __init__(self, bound: Any) -> None:
        self.bound = bound

    def get_handlers(self, event: Any) -> list[Any]:
        return [(print, None)] if event is self.bound else []


@pytest.mark.parametrize(
    ("pdu", "bound", "reused"),
    [
        (b"\x01" + bytes(100), None, True),
        (b"\x01" + bytes(REUSED_REQUEST_BYTES), None, False),  # too long to keep
        (b"\x01" + bytes(100), evt.EVT_PDU_RECV, False),  # a handler sees every PDU
        (b"\x01" + bytes(100), evt.EVT_DATA_RECV, False),  # ... or its bytes
        (b"\x05" + bytes(100), None, False),  # only association requests
    ],
)
def test_which_requests_may_be_reused(pdu: bytes, bound: Any, reused: bool) -> None:
    path = SimpleNamespace(assoc=_Handlers(bound))
    assert DataPath._may_reuse_request(path, bytearray(pdu)) is reused  # type: ignore[arg-type]


# -- UID parsing -----------------------------------------------------------------------------


def test_cached_set_uid_gives_pynetdicoms_answers_and_still_refuses(tmp_path: Path) -> None:
    from pynetdicom import pdu_items, utils

    from dicomnode.uidcache import cached_set_uid

    for value in ("1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.1\x00", ""):
        assert cached_set_uid(value, "Transfer Syntax Name") == utils.set_uid(
            value, "Transfer Syntax Name"
        )
    first = cached_set_uid("1.2.840.10008.5.1.4.1.1.1.1", "Abstract Syntax Name")
    assert cached_set_uid("1.2.840.10008.5.1.4.1.1.1.1", "Abstract Syntax Name") is first
    for _ in range(2):  # a UID that is too long raises every time: errors are not remembered
        with pytest.raises(ValueError, match="must not exceed 64"):
            cached_set_uid("1." * 40, "Abstract Syntax Name")
    with pytest.raises(ValueError):
        cached_set_uid("", "Abstract Syntax Name", allow_empty=False)
    assert pdu_items.set_uid is utils.set_uid
    with listening(make_config(tmp_path)):
        assert pdu_items.set_uid is cached_set_uid  # in place while a listener runs
    assert pdu_items.set_uid is utils.set_uid


def test_transfer_syntaxes_taken_before_skip_validation_and_the_rest_still_warn_or_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pynetdicom.presentation import PresentationContext

    from dicomnode.uidcache import cached_uids, plain_transfer_syntax

    values: list[str | bytes] = ["1.2.840.10008.1.2.1", b"1.2.840.10008.1.2", "1.2.3.4"]
    plain = PresentationContext()
    for value in values:
        plain.add_transfer_syntax(value)
    with cached_uids():
        cached = PresentationContext()
        for value in [*values, "1.2.840.10008.1.2.1"]:
            cached.add_transfer_syntax(value)
        assert cached.transfer_syntax == plain.transfer_syntax  # same UIDs, no repeat
        first = plain_transfer_syntax("1.2.840.10008.1.2.1")
        assert first is not None and plain_transfer_syntax("1.2.840.10008.1.2.1") is first
        assert plain_transfer_syntax("1.2.3.4") == "1.2.3.4"  # private: taken without a word
        storage_class = "1.2.840.10008.5.1.4.1.1.1"  # a SOP class, not a transfer syntax
        assert plain_transfer_syntax(storage_class) is None
        caplog.clear()
        cached.add_transfer_syntax(storage_class)
        assert "not a transfer syntax" in caplog.text  # pynetdicom's own warning, each time
        assert storage_class in cached.transfer_syntax
        for bad in ("", b"\xff\xfe", "1." * 40):
            with pytest.raises((ValueError, UnicodeDecodeError)):
                cached.add_transfer_syntax(bad)
    assert PresentationContext.add_transfer_syntax.__module__ == "pynetdicom.presentation"


def test_an_association_request_pynetdicom_cannot_negotiate_is_refused(tmp_path: Path) -> None:
    """Fuzz case 7:186: a presentation context whose transfer syntax is empty. Checked on the
    request as pynetdicom decoded it (one decode): A-ABORT, source 2 (service provider), reason
    6 (invalid PDU parameter value), where pynetdicom alone failed in its acceptor thread and
    left the connection open."""
    import socket

    from tests.faults.fuzz_pdus import Request, apply_rq_op

    request = Request()
    apply_rq_op(request, {"op": "syntax", "r": 947853512, "f": 0.6950149441666224})
    with (
        listening(make_config(tmp_path)) as listener,
        socket.create_connection(("127.0.0.1", listener.port), timeout=10) as peer,
    ):
        peer.sendall(request.encode())
        answer = peer.recv(10)
    assert answer == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
