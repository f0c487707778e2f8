"""The bytes of the listener's C-STORE exchange, written without pydicom datasets.

For every instance it receives, pynetdicom (3.0) builds two small pydicom datasets and encodes
them element by element, validating each value on the way: the File Meta Information it writes
at the head of the spool file (``create_file_meta`` and ``write_file_meta_info``) and the
C-STORE response's command set (``C_STORE_RSP.primitive_to_message`` and ``encode_msg``). That
was half a millisecond of the interpreter per instance, a third of the listener's own work on
an instance, on the thread that also receives.

The functions here write the same bytes directly: a few fixed elements, with UID values that
pynetdicom already parsed and validated (from the association's command set or the accepted
presentation context). A value they cannot write plainly (not ASCII, longer than a UID may be)
gives None, and the caller falls back to pynetdicom's own encoding, so nothing changes for an
unusual request but the time it takes. ``tests/test_commands.py`` checks that the bytes are
those of pynetdicom and pydicom, value for value.

- :func:`file_meta_bytes` and :func:`spool_file_meta`: the File Meta group of a spooled data
  set (what ``pydicom.filewriter.write_file_meta_info(fp, create_file_meta(...))`` writes,
  PS3.10 7.1), installed for pynetdicom's chunked receive by :func:`dicomnode.datapath.spool_files`;
- :func:`store_response_command` and :func:`fast_store_responses`: the command set of a C-STORE
  response carrying only a status (PS3.7 9.3.1.2), sent as one P-DATA primitive, as
  pynetdicom's ``DIMSEServiceProvider.send_msg`` would.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

MAX_UID = 64
"""The longest UID value (PS3.5 9.1)."""
C_STORE_RSP_FIELD = 0x8001
"""Command Field of a C-STORE response (PS3.7 E.1)."""
NO_DATA_SET = 0x0101
"""Command Data Set Type: no data set follows (PS3.7 E.1)."""
LAST_COMMAND_FRAGMENT = b"\x03"
"""Message control header: a command, its last fragment (PS3.8 E.2)."""
PREAMBLE = b"\x00" * 128 + b"DICM"
"""What precedes the File Meta group of a DICOM file (PS3.10 7.1)."""

_IMPLICIT = struct.Struct("<HHI")  # group, element, value length (PS3.5 7.1.3)
_EXPLICIT_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length (PS3.5 7.1.2)
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")  # ... OB, UN and the like: 4-byte length


def _padded(value: str, pad: bytes) -> bytes | None:
    """``value`` as ASCII, padded to an even length with ``pad``; None if it is not ASCII or
    longer than a UID may be."""
    if not value.isascii() or len(value) > MAX_UID:
        return None
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


def _uid(value: object) -> bytes | None:
    """A UID value as written (trailing NUL to an even length), None if not plain. An empty
    value is not plain either: pydicom would leave out or write such an element otherwise."""
    return _padded(value, b"\x00") if isinstance(value, str) and value else None


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return _IMPLICIT.pack(group, element, len(value)) + value


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN"):
        return _EXPLICIT_LONG.pack(group, element, vr, len(value)) + value
    return _EXPLICIT_SHORT.pack(group, element, vr, len(value)) + value


def store_response_command(
    message_id: int, sop_class_uid: object, sop_instance_uid: object, status: int
) -> bytes | None:
    """The command set (Implicit VR Little Endian) of a C-STORE response with only a status,
    or None when a UID cannot be written plainly."""
    sop_class, sop_instance = _uid(sop_class_uid), _uid(sop_instance_uid)
    if sop_class is None or sop_instance is None:
        return None
    body = b"".join(
        (
            _implicit(0x0000, 0x0002, sop_class),
            _implicit(0x0000, 0x0100, struct.pack("<H", C_STORE_RSP_FIELD)),
            _implicit(0x0000, 0x0120, struct.pack("<H", message_id)),
            _implicit(0x0000, 0x0800, struct.pack("<H", NO_DATA_SET)),
            _implicit(0x0000, 0x0900, struct.pack("<H", status)),
            _implicit(0x0000, 0x1000, sop_instance),
        )
    )
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


_STATUS_ONLY = ("OffendingElement", "ErrorComment")
"""The elements of a C-STORE response's command set (pynetdicom's ``C_STORE_RSP``) that
:func:`store_response_command` does not write: a response with any of them goes through
pynetdicom."""


def _status_only_response(primitive: Any) -> bytes | None:
    """The command set of ``primitive`` when it is a C-STORE response with only a status."""
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status is None or any(getattr(primitive, n) is not None for n in _STATUS_ONLY):
        return None
    if getattr(primitive, "_dataset_path", None) is not None:
        return None  # pynetdicom would announce a data set
    if not all(_is_us(value) for value in (primitive.MessageIDBeingRespondedTo, primitive.Status)):
        return None  # pynetdicom says what is wrong with it
    return store_response_command(
        primitive.MessageIDBeingRespondedTo,
        primitive.AffectedSOPClassUID,
        primitive.AffectedSOPInstanceUID,
        primitive.Status,
    )


def _is_us(value: object) -> bool:
    """Whether ``value`` fits an element of VR US (an unsigned 16-bit integer)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF


def fast_store_responses(assoc: Any) -> None:
    """On ``assoc`` (accepted by the listener), send C-STORE responses that carry only a status
    as one P-DATA primitive written by :func:`store_response_command`; every other message,
    a command set longer than the peer's largest PDU allows in one fragment, or one with
    ``EVT_DIMSE_SENT`` handlers bound, goes through pynetdicom's ``send_msg`` as before."""
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        command = _status_only_response(primitive)
        limit = dimse.maximum_pdu_size
        fits = command is not None and (limit == 0 or len(command) <= limit - 6)
        if command is None or not fits or assoc.get_handlers(evt.EVT_DIMSE_SENT):
            send(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
        dimse.dul.send_pdu(pdata)

    setattr(dimse, "send_msg", send_msg)  # noqa: B010 (instance attribute)


def _implementation_elements() -> bytes | None:
    """Implementation Class UID and Version Name (pynetdicom's), as written, once."""
    uid = _uid(str(PYNETDICOM_IMPLEMENTATION_UID))
    version = _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")
    if uid is None or version is None:
        return None
    return _explicit(0x0002, 0x0012, b"UI", uid) + _explicit(0x0002, 0x0013, b"SH", version)


_IMPLEMENTATION = _implementation_elements()


def file_meta_bytes(
    sop_class_uid: object, sop_instance_uid: object, transfer_syntax_uid: object
) -> bytes | None:
    """The File Meta group (Explicit VR Little Endian, after the preamble and ``DICM``) that
    pynetdicom's ``create_file_meta`` and pydicom's ``write_file_meta_info`` write for a
    spooled data set, or None when a UID cannot be written plainly."""
    uids = [_uid(value) for value in (sop_class_uid, sop_instance_uid, transfer_syntax_uid)]
    if any(value is None for value in uids) or _IMPLEMENTATION is None:
        return None
    sop_class, sop_instance, transfer_syntax = (value or b"" for value in uids)
    body = b"".join(
        (
            _explicit(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, 0x0002, b"UI", sop_class),
            _explicit(0x0002, 0x0003, b"UI", sop_instance),
            _explicit(0x0002, 0x0010, b"UI", transfer_syntax),
            _IMPLEMENTATION,
        )
    )
    return _explicit(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


@dataclass(frozen=True)
class SpoolMeta:
    """What pynetdicom's chunked receive asks ``create_file_meta`` for (written by
    :func:`spool_file_meta`)."""

    sop_class_uid: object
    sop_instance_uid: object
    transfer_syntax: object


def spool_meta(
    *, sop_class_uid: object, sop_instance_uid: object, transfer_syntax: object
) -> SpoolMeta:
    """Stands in for ``pynetdicom.dsutils.create_file_meta`` in ``dimse_messages``: the values,
    kept for :func:`spool_file_meta` to write."""
    return SpoolMeta(sop_class_uid, sop_instance_uid, transfer_syntax)


def spool_file_meta(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    """Stands in for ``pydicom.filewriter.write_file_meta_info`` in ``dimse_messages``: writes
    :func:`file_meta_bytes`, or what pydicom writes when those cannot be written plainly (or
    for any other File Meta dataset)."""
    if isinstance(file_meta, SpoolMeta):
        values = (file_meta.sop_class_uid, file_meta.sop_instance_uid, file_meta.transfer_syntax)
        data = file_meta_bytes(*values)
        if data is not None:
            fp.write(data)
            return
        file_meta = create_file_meta(
            sop_class_uid=file_meta.sop_class_uid,  # type: ignore[arg-type]
            sop_instance_uid=file_meta.sop_instance_uid,  # type: ignore[arg-type]
            transfer_syntax=file_meta.transfer_syntax,  # type: ignore[arg-type]
        )
    write_file_meta_info(fp, file_meta, enforce_standard=enforce_standard)  # type: ignore[arg-type]


def spooled_data_set_offset(head: bytes) -> int | None:
    """Where the data set starts in a spooled file whose first bytes are ``head`` (at least
    :data:`META_HEAD` of them): after the File Meta group, whose length its first element
    gives; None when the file does not start as :func:`file_meta_bytes` writes it."""
    if len(head) < META_HEAD or not head.startswith(PREAMBLE):
        return None
    group, element, vr, length = _EXPLICIT_SHORT.unpack_from(head, len(PREAMBLE))
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        return None
    (group_length,) = struct.unpack_from("<I", head, len(PREAMBLE) + _EXPLICIT_SHORT.size)
    return META_HEAD + int(group_length)


META_HEAD = len(PREAMBLE) + _EXPLICIT_SHORT.size + 4
"""Bytes of a spooled file that :func:`spooled_data_set_offset` reads: the preamble, ``DICM``
and the File Meta Information Group Length element."""
