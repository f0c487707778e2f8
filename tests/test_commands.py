"""The C-STORE exchange's bytes written without pydicom datasets (dicomnode.commands) are
those pynetdicom and pydicom write, and anything unusual falls back to them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

from dicomnode import commands
from dicomnode.commands import (
    META_HEAD,
    PREAMBLE,
    SpoolMeta,
    fast_store_responses,
    file_meta_bytes,
    spool_file_meta,
    spool_meta,
    spooled_data_set_offset,
    store_response_command,
)
from dicomnode.limits import spooled_dataset_size

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # even length once padded
CR = "1.2.840.10008.5.1.4.1.1.1"  # odd length
UIDS = [DX, CR, "1.2.3", "1.23", "9" * 64, generate_uid(), generate_uid(prefix="1.2.826.0.1.")]


def response(message_id: int, sop_class: str, sop_instance: str, status: int) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    return primitive


def pynetdicom_command(primitive: C_STORE, max_pdu: int = 0) -> list[bytes]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [bytes(p.presentation_data_value_list[0][1]) for p in message.encode_msg(1, max_pdu)]


@pytest.mark.parametrize("sop_class", [DX, CR])
@pytest.mark.parametrize("sop_instance", UIDS)
@pytest.mark.parametrize(("message_id", "status"), [(1, 0x0000), (65535, 0xA700), (7, 0xC000)])
def test_store_response_is_pynetdicoms(
    sop_class: str, sop_instance: str, message_id: int, status: int
) -> None:
    primitive = response(message_id, sop_class, sop_instance, status)
    command = store_response_command(message_id, sop_class, sop_instance, status)
    assert command is not None
    assert [b"\x03" + command] == pynetdicom_command(primitive)


@pytest.mark.parametrize("value", ["", "1.2.é", "1." + "2" * 70, None, 5])
def test_store_response_refuses_what_it_cannot_write_plainly(value: object) -> None:
    assert store_response_command(1, value, DX, 0) is None
    assert store_response_command(1, DX, value, 0) is None


class FakeDul:
    def __init__(self) -> None:
        self.sent: list[P_DATA] = []

    def send_pdu(self, primitive: P_DATA) -> None:
        self.sent.append(primitive)


class FakeDimse:
    """pynetdicom's DIMSE provider as ``fast_store_responses`` uses it."""

    def __init__(self, max_pdu: int) -> None:
        self.maximum_pdu_size = max_pdu
        self.dul = FakeDul()
        self.slow: list[Any] = []

    def send_msg(self, primitive: Any, context_id: int) -> None:
        self.slow.append((primitive, context_id))


class FakeAssociation:
    def __init__(self, max_pdu: int = 16384, handlers: list[Any] | None = None) -> None:
        self.dimse = FakeDimse(max_pdu)
        self.handlers = handlers or []

    def get_handlers(self, event: Any) -> list[Any]:
        return self.handlers if event is evt.EVT_DIMSE_SENT else []


def test_fast_response_sends_pynetdicoms_bytes_as_one_pdata() -> None:
    assoc = FakeAssociation()
    fast_store_responses(assoc)
    primitive = response(3, CR, UIDS[5], 0x0000)
    assoc.dimse.send_msg(primitive, 5)
    assert assoc.dimse.slow == []
    [pdata] = assoc.dimse.dul.sent
    [(context_id, value)] = pdata.presentation_data_value_list
    assert context_id == 5
    assert [value] == pynetdicom_command(primitive)


def with_error_comment() -> C_STORE:
    primitive = response(3, CR, DX, 0xA900)
    primitive.ErrorComment = "mismatch"
    return primitive


def request() -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = 3
    primitive.AffectedSOPClassUID = CR
    primitive.AffectedSOPInstanceUID = DX
    primitive.Priority = 2
    return primitive


@pytest.mark.parametrize(
    ("assoc", "primitive"),
    [
        (FakeAssociation(), with_error_comment()),  # an element it does not write
        (FakeAssociation(), request()),  # not a response
        (FakeAssociation(), response(3, CR, "1.2.é", 0)),  # not plain
        (FakeAssociation(), response(3, CR, DX, 0x10000)),  # not a US value
        (FakeAssociation(max_pdu=100), response(3, CR, DX, 0)),  # needs two fragments
        (FakeAssociation(handlers=[(print, None)]), response(3, CR, DX, 0)),  # someone listens
    ],
)
def test_anything_else_goes_through_pynetdicom(assoc: FakeAssociation, primitive: Any) -> None:
    fast_store_responses(assoc)
    assoc.dimse.send_msg(primitive, 1)
    assert assoc.dimse.slow == [(primitive, 1)]
    assert assoc.dimse.dul.sent == []


def pydicom_file_meta(sop_class: Any, sop_instance: Any, transfer_syntax: Any) -> bytes:
    buffer = io.BytesIO()
    write_file_meta_info(
        buffer,
        create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
        ),
    )
    return buffer.getvalue()


@pytest.mark.parametrize("sop_class", [DX, CR])
@pytest.mark.parametrize("sop_instance", UIDS)
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_pydicoms(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    assert file_meta_bytes(sop_class, sop_instance, transfer_syntax) == pydicom_file_meta(
        sop_class, sop_instance, transfer_syntax
    )
    written = io.BytesIO()
    spool_file_meta(
        written,
        spool_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
        ),
    )
    assert written.getvalue() == pydicom_file_meta(sop_class, sop_instance, transfer_syntax)


def test_file_meta_falls_back_to_pydicom_for_what_is_not_plain() -> None:
    long_uid = "1." + "2" * 70
    assert file_meta_bytes(DX, long_uid, ExplicitVRLittleEndian) is None
    written = io.BytesIO()
    spool_file_meta(written, SpoolMeta(DX, long_uid, ExplicitVRLittleEndian))
    assert written.getvalue() == pydicom_file_meta(DX, long_uid, ExplicitVRLittleEndian)
    # any other File Meta dataset is pydicom's to write
    other = create_file_meta(
        sop_class_uid=CR, sop_instance_uid=DX, transfer_syntax=ExplicitVRLittleEndian
    )
    written = io.BytesIO()
    spool_file_meta(written, other)
    assert written.getvalue() == pydicom_file_meta(CR, DX, ExplicitVRLittleEndian)


def spooled(tmp_path: Path, meta: bytes, data_set: bytes) -> Path:
    path = tmp_path / "spooled.dcm"
    path.write_bytes(PREAMBLE + meta + data_set)
    return path


def test_data_set_offset_and_size_from_the_group_length(tmp_path: Path) -> None:
    meta = file_meta_bytes(CR, UIDS[5], ExplicitVRLittleEndian)
    assert meta is not None
    data_set = b"\x08\x00\x18\x00UI\x04\x001.2\x00" * 10
    path = spooled(tmp_path, meta, data_set)
    head = path.read_bytes()[:META_HEAD]
    assert spooled_data_set_offset(head) == len(PREAMBLE) + len(meta)
    assert spooled_dataset_size(path) == len(data_set)
    # pydicom finds the data set where the group length says
    parsed = pydicom.dcmread(path, force=True)
    assert str(parsed.file_meta.MediaStorageSOPInstanceUID) == UIDS[5]


def test_a_file_not_written_by_the_listener_is_parsed(tmp_path: Path) -> None:
    """No group length element first (a File Meta written otherwise): the size comes from
    parsing the File Meta, as before."""
    meta = file_meta_bytes(CR, UIDS[5], ExplicitVRLittleEndian)
    assert meta is not None
    without_group_length = meta[12:]
    data_set = b"\x08\x00\x18\x00UI\x04\x001.2\x00"
    path = spooled(tmp_path, without_group_length, data_set)
    assert spooled_data_set_offset(path.read_bytes()[:META_HEAD]) is None
    assert spooled_data_set_offset(b"short") is None
    assert spooled_dataset_size(path) == len(data_set)


def test_storescu_gets_the_listeners_own_response_and_file_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a real peer (DCMTK storescu): the response to each C-STORE and the stored file's
    File Meta are the ones written here, storescu accepts the responses (exit 0), and pydicom
    reads the stored files back with the File Meta pynetdicom would have written."""
    from tests.test_datapath import large_dx
    from tests.test_scp import instance_rows, listening, make_config, storescu

    responses: list[bytes | None] = []
    metas: list[bytes | None] = []
    respond, meta = commands.store_response_command, commands.file_meta_bytes

    def counted_response(*args: Any) -> bytes | None:
        responses.append(respond(*args))
        return responses[-1]

    def counted_meta(*args: Any) -> bytes | None:
        metas.append(meta(*args))
        return metas[-1]

    monkeypatch.setattr(commands, "store_response_command", counted_response)
    monkeypatch.setattr(commands, "file_meta_bytes", counted_meta)
    sent = [large_dx(tmp_path / f"{index}.dcm", rows=64, cols=64) for index in range(2)]
    with listening(make_config(tmp_path)) as listener:
        done = storescu(listener.port, *sent)
        assert done.returncode == 0, done.stderr
        rows = instance_rows(listener)
    assert len(responses) == 2 and all(responses)
    assert len(metas) == 2 and all(metas)
    for path in sent:
        source = pydicom.dcmread(path)
        stored = Path(rows[source.SOPInstanceUID]["path"])
        assert stored.read_bytes()[len(PREAMBLE) :].startswith(
            pydicom_file_meta(source.SOPClassUID, source.SOPInstanceUID, ExplicitVRLittleEndian)
        )
        assert pydicom.dcmread(stored).PixelData == source.PixelData
