"""Bad input: mutated DICOM files (header bytes, element lengths, VRs, pixel data, transfer
syntax mismatches), absurd dimensions, non-image SOP classes, a missing Study UID, raw PDUs
(random bytes, an A-ASSOCIATE-RQ with a garbage length), truncated streams and aborts mid-transfer.
Every case gets a status or a clean end of the association; after every batch the node still
answers C-ECHO and stores a valid instance, its worker never dies, no spooled file is left
behind, and a valid study sent last is delivered."""

from __future__ import annotations

import random
import socket
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRBigEndian,
    RLELossless,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from dicomnode.config import load_config
from dicomnode.demo import OrthancPacs
from dicomnode.records import JobState
from dicomnode.storage import StateLayout
from tests.conftest import DICOM_SAMPLES
from tests.faults.conftest import (
    NODE_AE,
    StoreAnswer,
    echo_ok,
    node_config,
    record_counts,
    save,
    scu,
    small_dx,
    store_file,
)
from tests.test_node_e2e import NodeProcess, node, settled, wait_for

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(240)]

SEED = 20261127
FUZZ_EXAMPLES = 60
BATCH = 10
#: Statuses a bad case may get: success is allowed only for a parseable header (the instance is
#: then kept as sent, and a worker that cannot decode it fails the job with the reason).
EXPECTED = {0x0000, 0x0122, 0xA700, 0xA900, 0xC000}
BASES = ("DX_highdicom_small.dcm", "CR_cspine_16x16_dicomdir6154.dcm")


@dataclass
class FuzzNode:
    node: NodeProcess
    port: int
    config: Path
    spool: Path
    tmp: Path
    answers: Counter[str] = field(default_factory=Counter)
    cases: int = 0
    batches_checked: int = 0

    def check_alive(self) -> None:
        """The node answers C-ECHO and stores a fresh valid instance."""
        assert self.node.process.poll() is None, "the node died"
        assert echo_ok(self.port), "the node no longer answers C-ECHO"
        path = save(small_dx(self.batches_checked), self.tmp / f"valid-{self.batches_checked}.dcm")
        assert store_file(self.port, path).success
        self.batches_checked += 1

    def tally(self, kind: str, answer: StoreAnswer | str) -> None:
        self.cases += 1
        key = (
            answer
            if isinstance(answer, str)
            else (f"0x{answer.status:04X}" if answer.status is not None else answer.ended)
        )
        self.answers[key] += 1
        assert isinstance(answer, str) or answer.status is None or answer.status in EXPECTED, (
            kind,
            answer,
        )
        if self.cases % BATCH == 0:
            self.check_alive()


@pytest.fixture(scope="module")
def fuzz_node(
    fault_weights: Path, fault_orthanc: OrthancPacs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzNode]:
    """``dicomnode serve``; its receiving processes spool into ``state_dir/spool/<index>``,
    checked for leftovers."""
    tmp = tmp_path_factory.mktemp("fuzz")
    config = node_config(tmp / "node", fault_weights, fault_orthanc)
    settings = load_config(config)
    spool = settings.node.state_dir / "spool"
    with node("serve", config, tmp / "node.log") as running:
        yield FuzzNode(running, settings.node.port, config, spool, tmp)


# -- file mutations ----------------------------------------------------------------------------


def body_offset(path: Path) -> int:
    return split_dataset(path)[1]


def _rewritten(base: str) -> bytes:
    """Sample ``base`` written again by pydicom, with a complete File Meta (some samples lack
    the Media Storage UIDs a sender reads)."""
    buffer = DicomBytesIO()
    pydicom.dcmread(DICOM_SAMPLES / base).save_as(buffer, enforce_file_format=True)
    return bytes(buffer.getvalue())


BASE_FILES = {base: _rewritten(base) for base in BASES}


def _dataset_offset(data: bytes) -> int:
    """Where the dataset starts after the File Meta of the DICOM file ``data``."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(data)
        handle.flush()
        return split_dataset(Path(handle.name))[1]


BASE_OFFSETS = {base: _dataset_offset(data) for base, data in BASE_FILES.items()}


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(base sample, mutation kind, mutated file bytes): the File Meta is kept, so the file can
    be sent, and the dataset after it is damaged."""
    base = draw(st.sampled_from(BASES))
    data = bytearray(BASE_FILES[base])
    start = BASE_OFFSETS[base]
    kind = draw(st.sampled_from(["flip", "length", "vr", "truncate", "insert", "pixels"]))
    if kind == "flip":  # random bytes anywhere in the dataset header
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(start, min(len(data) - 1, start + 600)))] = draw(
                st.integers(0, 255)
            )
    elif kind == "length":  # an element's 16-bit length replaced (explicit VR short form)
        pos = draw(st.integers(start, min(len(data) - 8, start + 600)))
        data[pos + 6 : pos + 8] = struct.pack("<H", draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFF])))
    elif kind == "vr":  # a VR replaced by another or by garbage
        pos = draw(st.integers(start, min(len(data) - 8, start + 600)))
        data[pos + 4 : pos + 6] = draw(st.sampled_from([b"SQ", b"UN", b"OB", b"ZZ", b"\x00\x00"]))
    elif kind == "truncate":
        del data[draw(st.integers(start, len(data) - 1)) :]
    elif kind == "insert":
        pos = draw(st.integers(start, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    else:  # pixel data: the end of the file (where Pixel Data lives) overwritten
        tail = draw(st.binary(min_size=1, max_size=256))
        data[len(data) - len(tail) :] = tail
    return base, kind, bytes(data)


def with_header(base: str, tmp: Path, name: str, **changes: object) -> Path:
    """A copy of sample ``base`` with fresh UIDs and the given attributes changed (None:
    deleted); ``TransferSyntaxUID`` changes the File Meta only (a mismatch with the data)."""
    ds = pydicom.dcmread(DICOM_SAMPLES / base)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    syntax = changes.pop("TransferSyntaxUID", None)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    if syntax is not None:
        meta, _ = split_dataset(path)
        old = str(meta.TransferSyntaxUID).encode()
        new = str(syntax).encode()
        new += b"\x00" * (len(new) % 2)
        data = path.read_bytes()
        # Same-length UIDs only: the File Meta group length stays right.
        assert len(new) == len(old + b"\x00" * (len(old) % 2)), (old, new)
        path.write_bytes(data.replace(old + b"\x00" * (len(old) % 2), new, 1))
    return path


# -- raw PDUs ----------------------------------------------------------------------------------


def association_request(port: int) -> bytes:
    """The A-ASSOCIATE-RQ pynetdicom sends to ``NODE_AE`` (recorded from a fake peer)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        ae = scu()
        ae.acse_timeout = ae.network_timeout = 1
        caught: list[bytes] = []

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                header = conn.recv(6, socket.MSG_WAITALL)
                length = struct.unpack(">I", header[2:6])[0]
                caught.append(header + conn.recv(length, socket.MSG_WAITALL))

        thread = threading.Thread(target=accept)
        thread.start()
        assoc = ae.associate("127.0.0.1", server.getsockname()[1], ae_title=NODE_AE)
        thread.join()
        assoc.abort()
        ae.shutdown()
    return caught[0]


def raw_exchange(port: int, chunks: list[bytes], read_reply: bool = True) -> str:
    """Send raw bytes to the node and close; what came back ("closed", or the reply's PDU type)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                return "reset"
            if read_reply and chunk is chunks[0] and len(chunks) > 1:
                reply = sock.recv(1)
                if reply != b"\x02":  # not an A-ASSOCIATE-AC
                    return f"pdu-0x{reply.hex()}"
        try:
            reply = sock.recv(1)
        except (TimeoutError, OSError):
            return "no-reply"
    return "closed" if not reply else f"pdu-0x{reply.hex()}"


def p_data(context_id: int, payload: bytes, control: int, declared: int | None = None) -> bytes:
    """One P-DATA-TF PDU holding one PDV (``declared`` overrides the PDU length)."""
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    length = len(pdv) if declared is None else declared
    return struct.pack(">BBI", 0x04, 0, length) + pdv


# -- tests -------------------------------------------------------------------------------------


@seed(SEED)
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutations())
def test_mutated_files_get_a_status_and_the_node_keeps_serving(
    fuzz_node: FuzzNode, case: tuple[str, str, bytes]
) -> None:
    _, kind, data = case
    path = fuzz_node.tmp / "mutated.dcm"
    path.write_bytes(data)
    fuzz_node.tally(f"file:{kind}", store_file(fuzz_node.port, path))


def test_crafted_cases_raw_pdus_and_aborts(fuzz_node: FuzzNode, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    small = "DX_highdicom_small.dcm"
    crafted = {
        "absurd_dimensions": with_header(small, tmp_path, "huge", Rows=60000, Columns=60000),
        "missing_study_uid": with_header(small, tmp_path, "nostudy", StudyInstanceUID=None),
        "empty_sop_instance": with_header(small, tmp_path, "nosop", SOPInstanceUID=""),
        "syntax_says_big_endian": with_header(
            small, tmp_path, "bigendian", TransferSyntaxUID=ExplicitVRBigEndian
        ),
        "syntax_says_rle": with_header(small, tmp_path, "rle", TransferSyntaxUID=RLELossless),
    }
    for kind, path in crafted.items():
        fuzz_node.tally(kind, store_file(fuzz_node.port, path))
    pdf = with_header(small, tmp_path, "pdf", SOPClassUID=EncapsulatedPDFStorage)
    meta_pdf = pydicom.dcmread(pdf)
    meta_pdf.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta_pdf.save_as(pdf, enforce_file_format=True)
    fuzz_node.tally("non_image_sop_class", store_file(fuzz_node.port, pdf))

    request = association_request(fuzz_node.port)
    command = bytes(rng.getrandbits(8) for _ in range(40))
    raw_cases = {
        "random_bytes": [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512)))],
        "associate_rq_garbage_length": [request[:2] + b"\xff\xff\xff\xff" + request[6:]],
        "associate_rq_short_length": [request[:2] + struct.pack(">I", 10) + request[6:]],
        "associate_rq_truncated": [request[: len(request) // 2]],
        "pdata_declared_longer": [request, p_data(1, command, 0x03, declared=1 << 20)],
        "pdata_garbage_command": [request, p_data(1, command, 0x03)],
        "pdata_dataset_without_command": [request, p_data(1, command, 0x02)],
        "unknown_pdu_type": [request, b"\x09\x00\x00\x00\x00\x04abcd"],
    }
    for _ in range(12):
        raw_cases[f"random_after_associate_{_}"] = [
            request,
            bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 256))),
        ]
    for kind, chunks in raw_cases.items():
        fuzz_node.tally(f"raw:{kind}", raw_exchange(fuzz_node.port, chunks))

    # Aborts mid-transfer: a C-STORE whose dataset stops after the first fragments.
    valid = save(small_dx(0), tmp_path / "valid.dcm")
    for cut in (0.1, 0.5, 0.9):
        fuzz_node.tally("abort_mid_transfer", abort_mid_transfer(fuzz_node.port, valid, cut))

    fuzz_node.check_alive()
    last = save(small_dx(1), tmp_path / "last.dcm")
    assert store_file(fuzz_node.port, last).success
    study = str(pydicom.dcmread(last, stop_before_pixels=True).StudyInstanceUID)
    assert wait_for("the last valid study", lambda: settled(fuzz_node.config, study))[0] is (
        JobState.DELIVERED
    )
    died = [e for e in fuzz_node.node.events() if e["event"] == "worker_process_died"]
    internal = [
        e
        for e in fuzz_node.node.events()
        if e["event"]
        in ("instance_failed", "role_crashed", "worker_crashed", "receiver_process_died")
    ]
    # every receiving process spools into its own folder, spool/<index>
    leftovers = [str(p) for p in StateLayout(fuzz_node.spool.parent).spooled_files()]
    counts = record_counts(
        "bad_input",
        {
            "seed": SEED,
            "cases_tried": fuzz_node.cases,
            "answers": dict(sorted(fuzz_node.answers.items())),
            "crashes": len(died) + len(internal) + (fuzz_node.node.process.poll() is not None),
            "alive_checks_passed": fuzz_node.batches_checked,
            "spool_files_left": len(leftovers),
        },
    )
    assert counts["cases_tried"] >= FUZZ_EXAMPLES + 25
    assert counts["crashes"] == 0, (died, internal)
    assert counts["spool_files_left"] == 0, leftovers


def abort_mid_transfer(port: int, path: Path, fraction: float) -> str:
    """Associate, send the C-STORE command and part of the dataset, then close the socket."""
    ae = scu()
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    ds = pydicom.dcmread(path)
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID)
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    message.command_set.CommandDataSetType = 0x0001  # a data set follows (that never ends)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, message.command_set)
    body = path.read_bytes()[body_offset(path) :]
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert sock is not None
    assert context.context_id is not None
    sock.sendall(p_data(context.context_id, buffer.getvalue(), 0x03))
    sock.sendall(p_data(context.context_id, body[: int(len(body) * fraction)], 0x00))
    sock.shutdown(socket.SHUT_RDWR)
    assoc.abort()
    ae.shutdown()
    return "aborted"
