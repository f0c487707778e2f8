"""Mutated PDUs for the fuzzer (issue 13), sent with raw sockets to the running listener.

A :class:`PduCase` is an A-ASSOCIATE-RQ built from parts (protocol version, AE titles,
application context, presentation contexts, user information sub-items), a list of mutations of
it (truncated, wrong PDU or item lengths, wrong PDU type, bad presentation context IDs, odd AE
titles and UIDs, unknown items, flipped bytes, tiny or huge maximum PDU lengths) and, when the
node accepts the association, what follows it: a C-ECHO, P-DATA-TF PDUs with wrong lengths,
control headers, presentation context IDs or command sets, C-STORE requests whose data set is
garbage, cut short or on another context, A-RELEASE-RQ and A-ABORT with wrong lengths, a second
A-ASSOCIATE-RQ, unknown PDU types and random bytes. :func:`exchange` sends it and reads every
PDU the node answers until it closes the connection.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

NODE_AE = "FRACTURE_AI"
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PDU_NAMES = {1: "RQ", 2: "AC", 3: "RJ", 4: "P-DATA", 5: "RELEASE-RQ", 6: "RELEASE-RP", 7: "ABORT"}

Op = dict[str, Any]


@dataclass(frozen=True)
class PduCase:
    """An association request with ``rq_ops`` applied, then ``then`` (after an A-ASSOCIATE-AC)."""

    name: str
    rq_ops: tuple[Op, ...] = field(default=())
    then: tuple[Op, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rq_ops": list(self.rq_ops), "then": list(self.then)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PduCase:
        return cls(raw["name"], tuple(raw["rq_ops"]), tuple(raw["then"]))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(op["op"] for op in (*self.rq_ops, *self.then)) or ("clean",)


# -- encoding ------------------------------------------------------------------------------------


def item(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body) if length is None else length & 0xFFFF) + body


def ae(title: str | bytes) -> bytes:
    raw = title.encode("latin-1") if isinstance(title, str) else title
    return raw[:16].ljust(16, b" ")


@dataclass
class Request:
    """The parts of an A-ASSOCIATE-RQ, mutated in place by the ``rq_ops``."""

    pdu_type: int = 1
    version: int = 1
    called: bytes = ae(NODE_AE)
    calling: bytes = ae("FUZZ_SCU")
    app_context: bytes = APPLICATION_CONTEXT.encode()
    contexts: list[tuple[int, bytes, list[bytes]]] = field(default_factory=list)
    max_pdu: int | None = 16384
    user_extra: bytes = b""
    extra_items: bytes = b""
    item_lengths: dict[int, int] = field(default_factory=dict)  # top-level item index → length
    sub_lengths: dict[int, int] = field(default_factory=dict)  # context index → abstract length
    pdu_length: int | None = None

    def __post_init__(self) -> None:
        if not self.contexts:
            self.contexts = [
                (1, VERIFICATION.encode(), [ImplicitVRLittleEndian.encode()]),
                (3, DigitalXRayImageStorageForPresentation.encode(),
                 [ExplicitVRLittleEndian.encode()]),
            ]

    def items(self) -> list[bytes]:
        out = [item(0x10, self.app_context)]
        for index, (cid, abstract, syntaxes) in enumerate(self.contexts):
            body = struct.pack(">BBBB", cid & 0xFF, 0, 0, 0)
            body += item(0x30, abstract, self.sub_lengths.get(index))
            body += b"".join(item(0x40, s) for s in syntaxes)
            out.append(item(0x20, body))
        user = b"" if self.max_pdu is None else item(0x51, struct.pack(">I", self.max_pdu))
        user += item(0x52, b"1.2.826.0.1.3680043.9.3811.3.0.4") + item(0x55, b"FUZZ")
        out.append(item(0x50, user + self.user_extra))
        out = [
            item(raw[0], raw[4:], self.item_lengths[i]) if i in self.item_lengths else raw
            for i, raw in enumerate(out)
        ]
        return out

    def encode(self) -> bytes:
        body = struct.pack(">HH", self.version & 0xFFFF, 0) + self.called + self.calling
        body += b"\x00" * 32 + b"".join(self.items()) + self.extra_items
        length = len(body) if self.pdu_length is None else self.pdu_length & 0xFFFFFFFF
        return struct.pack(">BBI", self.pdu_type & 0xFF, 0, length) + body


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body) if length is None else length) + body


def pdv(context_id: int, control: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) + 2 if length is None else length
    return struct.pack(">IBB", size & 0xFFFFFFFF, context_id & 0xFF, control & 0xFF) + payload


def element(group: int, elem: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element (command sets are always encoded so)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", group, elem, len(value)) + value


def command_set(fields: dict[int, bytes]) -> bytes:
    body = b"".join(element(0, tag, value) for tag, value in sorted(fields.items()))
    return element(0, 0x0000, struct.pack("<I", len(body))) + body


def echo_command(message_id: int = 1) -> dict[int, bytes]:
    return {
        0x0002: VERIFICATION.encode(),
        0x0100: struct.pack("<H", 0x0030),
        0x0110: struct.pack("<H", message_id),
        0x0800: struct.pack("<H", 0x0101),
    }


def store_command(sop_instance: bytes, message_id: int = 1) -> dict[int, bytes]:
    return {
        0x0002: DigitalXRayImageStorageForPresentation.encode(),
        0x0100: struct.pack("<H", 0x0001),
        0x0110: struct.pack("<H", message_id),
        0x0700: struct.pack("<H", 2),
        0x0800: struct.pack("<H", 0x0000),
        0x1000: sop_instance,
    }


# -- drawing a case -------------------------------------------------------------------------------

RQ_OPS = ("truncate", "pdu_length", "item_length", "sub_length", "pdu_type", "version", "called",
          "calling", "app_context", "context_id", "no_contexts", "abstract", "syntax", "max_pdu",
          "user_items", "garbage_items", "flip", "many_contexts")
THEN_OPS = ("echo", "echo_bad_context", "pdv_length", "pdv_control", "command_garbage",
            "command_fields", "store_garbage", "store_truncated", "store_wrong_context",
            "store_then_abort", "release_bad", "abort_garbage", "second_rq", "unknown_pdu",
            "random", "pdata_empty", "pdata_huge", "release", "pdv_many")


def draw_rq_op(rng: random.Random) -> Op:
    kind = rng.choice(RQ_OPS)
    return {"op": kind, "r": rng.randrange(1 << 32), "f": rng.random()}


def draw_then_op(rng: random.Random) -> Op:
    kind = rng.choice(THEN_OPS)
    return {"op": kind, "r": rng.randrange(1 << 32), "f": rng.random()}


def draw_pdu_case(rng: random.Random, name: str) -> PduCase:
    """About half mutate the request; the others associate and then misbehave (or both)."""
    rq_ops: list[Op] = []
    then: list[Op] = []
    choice = rng.random()
    if choice < 0.45:
        rq_ops = [draw_rq_op(rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        if rng.random() < 0.4:  # accepted anyway? then it must still work
            then = [{"op": "echo", "r": 0, "f": 0.0}, {"op": "release", "r": 0, "f": 0.0}]
    else:
        if choice < 0.55:
            rq_ops = [draw_rq_op(rng)]
        then = [draw_then_op(rng) for _ in range(rng.choice((1, 1, 2, 3)))]
    return PduCase(name, tuple(rq_ops), tuple(then))


# -- applying a case ---------------------------------------------------------------------------


def apply_rq_op(rq: Request, op: Op) -> bytes | None:
    """Mutate ``rq`` by ``op``; a byte-level op returns a function of the encoded bytes instead
    (handled by :func:`request_bytes`)."""
    r = op["r"]
    rng = random.Random(r)
    kind = op["op"]
    if not rq.contexts and kind in ("context_id", "abstract", "syntax", "sub_length"):
        return None
    if kind == "pdu_length":
        rq.pdu_length = rng.choice((0, 1, 6, 68, -1, +1, 100, 0xFFFFFFFF, (1 << 20) + 1, r))
        if rq.pdu_length in (-1, 1, 100):
            rq.pdu_length = len(rq.encode()) - 6 + rq.pdu_length
    elif kind == "item_length":
        rq.item_lengths[r % 3] = rng.choice((0, 1, 2, 3, 0xFFFF, r & 0xFFFF, 4, 60))
    elif kind == "sub_length":
        rq.sub_lengths[r % len(rq.contexts or [0])] = rng.choice((0, 1, 0xFFFF, 200, r & 0xFFFF))
    elif kind == "pdu_type":
        rq.pdu_type = rng.choice((0, 2, 3, 4, 5, 6, 7, 8, 0x41, 0xFF))
    elif kind == "version":
        rq.version = rng.choice((0, 2, 0x8000, 0xFFFF))
    elif kind in ("called", "calling"):
        value = ae(rng.choice((b"", b" " * 16, b"\x00" * 16, "FRACTURE_Aİ".encode(), b"fracture_ai",
                               b"WRONG_AE", b"\xff" * 16, b"FRACTURE_AI\x00\x00", b"\\\\")))
        setattr(rq, kind, value)
    elif kind == "app_context":
        rq.app_context = rng.choice((b"", b"1.2.3", b"1.2.840.10008.3.1.1.2", b"x" * 200,
                                     b"1.2.840.10008.3.1.1.1\x00\x00\x00"))
    elif kind == "context_id":
        cid = rng.choice((0, 2, 4, 255, 254, 1))
        index = r % len(rq.contexts)
        _, abstract, syntaxes = rq.contexts[index]
        rq.contexts[index] = (cid, abstract, syntaxes)
        if rng.random() < 0.3:  # a duplicate id
            rq.contexts.append((cid, abstract, syntaxes))
    elif kind == "no_contexts":
        rq.contexts = [(1, b"", [])][: r % 2]
    elif kind == "abstract":
        index = r % len(rq.contexts)
        cid, _, syntaxes = rq.contexts[index]
        rq.contexts[index] = (cid, rng.choice((b"", b"1.2.3.4", b"\xff" * 8, b"9" * 300)), syntaxes)
    elif kind == "syntax":
        index = r % len(rq.contexts)
        cid, abstract, _ = rq.contexts[index]
        syntaxes = rng.choice(([], [b""], [b"1.2.3"], [b"1.2.840.10008.1.2.4.50"] * 100,
                               [b"\x00" * 64], [ExplicitVRLittleEndian.encode()] * 3))
        rq.contexts[index] = (cid, abstract, syntaxes)
    elif kind == "max_pdu":
        rq.max_pdu = rng.choice((None, 0, 1, 6, 7, 12, 0xFFFFFFFF, 17))
    elif kind == "user_items":
        rq.user_extra += rng.choice((
            item(0x54, struct.pack(">H", 200) + b"1.2.3" + b"\x01\x01"),  # role, bad length
            item(0x53, struct.pack(">HH", 0, 0xFFFF)),  # async window
            item(0x56, struct.pack(">H", 0xFFFF) + b"1.2"),  # extended negotiation
            item(0x58, b"\x01\x00" + struct.pack(">H", 0xFFFF) + b"user"),  # user identity
            item(0x58, b"\x02\x01" + struct.pack(">H", 3000) + b"u" * 3000 + b"\x00\x00"),
            item(0x57, b"\x00\x00"),  # common extended negotiation, truncated
            item(0x99, rng.randbytes(rng.randint(0, 40))),
            item(0x51, b"\x00"),  # maximum length of 1 byte
        ))
    elif kind == "garbage_items":
        rq.extra_items += item(rng.choice((0x00, 0x11, 0x21, 0x60, 0xFF)),
                               rng.randbytes(rng.randint(0, 40)))
    elif kind == "many_contexts":
        rq.contexts = [
            (2 * i + 1, DigitalXRayImageStorageForPresentation.encode(),
             [ExplicitVRLittleEndian.encode()])
            for i in range(rng.choice((127, 128, 200)))
        ]
    return None


def request_bytes(case: PduCase) -> bytes:
    rq = Request()
    for op in case.rq_ops:
        apply_rq_op(rq, op)
    data = bytearray(rq.encode())
    for op in case.rq_ops:
        rng = random.Random(op["r"])
        if op["op"] == "truncate":
            del data[max(1, int(op["f"] * len(data))) :]
        elif op["op"] == "flip":
            for _ in range(rng.choice((1, 2, 4, 8))):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def then_bytes(op: Op) -> bytes:
    """The bytes one follow-up operation sends on an established association."""
    r, kind = op["r"], op["op"]
    rng = random.Random(r)
    echo = command_set(echo_command(1 + r % 1000))
    sop = b"1.2.826.0.1.3680043.8.498.1"
    if kind == "echo":
        return pdu(4, pdv(1, 0x03, echo))
    if kind == "echo_bad_context":
        return pdu(4, pdv(rng.choice((0, 2, 5, 99, 255)), 0x03, echo))
    if kind == "pdv_length":
        body = pdv(1, 0x03, echo, rng.choice((0, 1, 2, len(echo) + 100, 0xFFFFFFFF)))
        return pdu(4, body)
    if kind == "pdv_control":
        return pdu(4, pdv(1, rng.choice((0x00, 0x01, 0x02, 0xFF, 0x04, 0x83)), echo))
    if kind == "command_garbage":
        return pdu(4, pdv(1, 0x03, rng.randbytes(rng.randint(0, 200))))
    if kind == "command_fields":
        fields = echo_command()
        tag = rng.choice((0x0002, 0x0100, 0x0110, 0x0800, 0x0000, 0x1000, 0x0900))
        fields[tag] = rng.choice((b"", b"\xff\xff", rng.randbytes(rng.randint(1, 70)), b"\x01"))
        if rng.random() < 0.3:
            fields.pop(rng.choice(sorted(fields)))
        return pdu(4, pdv(1, 0x03, command_set(fields)))
    store = command_set(store_command(sop))
    if kind == "store_garbage":
        data = rng.randbytes(rng.randint(0, 3000))
        return pdu(4, pdv(3, 0x03, store)) + pdu(4, pdv(3, 0x02, data))
    if kind == "store_truncated":
        return pdu(4, pdv(3, 0x03, store)) + pdu(4, pdv(3, 0x00, rng.randbytes(100)))
    if kind == "store_wrong_context":
        return pdu(4, pdv(3, 0x03, store)) + pdu(4, pdv(1, 0x02, rng.randbytes(100)))
    if kind == "store_then_abort":
        return pdu(4, pdv(3, 0x03, store)) + pdu(4, pdv(3, 0x00, b"\x08\x00")) + pdu(
            7, b"\x00\x00\x00\x00")
    if kind == "release_bad":
        return pdu(5, b"\x00" * rng.choice((0, 1, 10)), rng.choice((0, 4, 10, 0xFFFF)))
    if kind == "abort_garbage":
        return pdu(7, rng.randbytes(rng.choice((0, 1, 4, 40))), rng.choice((0, 4, 100)))
    if kind == "second_rq":
        return Request().encode()
    if kind == "unknown_pdu":
        return pdu(rng.choice((0, 8, 9, 0x41, 0xFF)), rng.randbytes(rng.randint(0, 40)))
    if kind == "random":
        return rng.randbytes(rng.randint(1, 300))
    if kind == "pdata_empty":
        return pdu(4, b"")
    if kind == "pdata_huge":
        return pdu(4, pdv(1, 0x03, echo), rng.choice((1 << 24, 0xFFFFFFFF, 16385)))
    if kind == "pdv_many":
        pieces = [echo[i : i + 3] for i in range(0, len(echo), 3)]
        body = b"".join(pdv(1, 0x01, p) for p in pieces[:-1]) + pdv(1, 0x03, pieces[-1])
        return pdu(4, body)
    return pdu(5, b"\x00\x00\x00\x00")  # release


# -- the exchange ------------------------------------------------------------------------------


@dataclass
class Reply:
    """What the node sent back: PDU names (P-DATA with the status it carries) and how the
    connection ended: ``closed`` by the node, ``reset``, or ``hung`` (still open at the
    deadline)."""

    pdus: list[str] = field(default_factory=list)
    ended: str = "closed"
    command: bytearray = field(default_factory=bytearray)
    seconds: float = 0.0  # from our last byte sent to the end of the connection

    def note(self, name: str | None) -> None:
        if name is not None:
            self.pdus.append(name)

    @property
    def answer(self) -> str:
        """The node's last word: its last PDU (a DIMSE status for P-DATA), else ``closed``."""
        if self.ended == "hung":
            return "hung"
        meaningful = [p for p in self.pdus if p != "AC"] or self.pdus
        return meaningful[-1] if meaningful else "closed-without-pdu"


def read_pdu(sock: socket.socket) -> bytes | None:
    header = recv_exactly(sock, 6)
    if header is None:
        return None
    length = struct.unpack(">I", header[2:6])[0]
    body = recv_exactly(sock, length) if length else b""
    return None if body is None else header + body


def recv_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def describe(raw: bytes, command: bytearray) -> str | None:
    """A PDU's name: for P-DATA-TF the DIMSE status once the command set it completes is known
    (the node fragments its responses when the peer asked for small PDUs), else None."""
    name = PDU_NAMES.get(raw[0], f"0x{raw[0]:02X}")
    if raw[0] == 4:
        return dimse_status(raw, command)
    if raw[0] == 3 and len(raw) >= 10:
        return f"{name}({raw[7]},{raw[8]},{raw[9]})"
    if raw[0] == 7 and len(raw) >= 10:
        return f"{name}({raw[8]},{raw[9]})"
    return name


def dimse_status(raw: bytes, command: bytearray) -> str | None:
    pos, status = 6, None
    while pos + 6 <= len(raw):
        length = struct.unpack_from(">I", raw, pos)[0]
        control = raw[pos + 5]
        payload = raw[pos + 6 : pos + 4 + length]
        pos += 4 + length
        if control & 0x01:
            command += payload
            if control & 0x02:
                status = status_of(bytes(command))
                command.clear()
    return status


def status_of(command: bytes) -> str:
    at = command.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")
    if at < 0 or at + 10 > len(command):
        return "P-DATA without status"
    return f"status 0x{struct.unpack_from('<H', command, at + 8)[0]:04X}"


def exchange(port: int, case: PduCase, deadline_seconds: float) -> Reply:
    """Send the case's request, then (if accepted) its follow-ups; read until the node closes."""
    reply = Reply()
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_seconds) as sock:
        deadline = time.monotonic() + deadline_seconds
        sent = time.monotonic()
        try:
            sock.sendall(request_bytes(case))
            sent = time.monotonic()
            if case.then:
                first = read_pdu(sock)
                if first is None:
                    reply.ended = "closed"
                    reply.seconds = time.monotonic() - sent
                    return reply
                reply.note(describe(first, reply.command))
                if first[0] == 2:
                    for op in case.then:
                        sock.sendall(then_bytes(op))
                    sent = time.monotonic()
            read_until_closed(sock, reply, deadline)
        except (ConnectionResetError, BrokenPipeError):
            reply.ended = "reset"
        except TimeoutError:
            reply.ended = "hung"
        reply.seconds = time.monotonic() - sent
    return reply


def read_until_closed(sock: socket.socket, reply: Reply, deadline: float) -> None:
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        raw = read_pdu(sock)
        if raw is None:
            reply.ended = "closed"
            return
        reply.note(describe(raw, reply.command))
