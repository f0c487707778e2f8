"""Shared fixtures and helpers of the fault-injection suite (issue 5).

Every test here runs the real node (``python -m dicomnode serve``) as a separate process with a
tiny random ensemble, against real peers on 127.0.0.1 and free ports (Orthanc or DCMTK storescp
as the receiving PACS, pynetdicom or DCMTK as the modality), injects one class of fault, and
writes what it counted to ``tests/faults/results/<category>.json`` (git-ignored) before it
asserts on the counts. The node-process helpers are those of ``tests/test_node_e2e.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.demo import OrthancPacs, dx_from_image, free_port
from tests.test_node_e2e import NODE_AE, fracatlas, positive_weights, write_config

RESULTS = Path(__file__).resolve().parent / "results"
MODALITY = "FAULT_MODALITY"
#: Images small enough that inference is quick, large enough to be analysed (>= 32 px).
IMAGE_SIDE = 128
SEND_AS_STORED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
VIEWS = (("IMG0000019.jpg", "HAND"), ("IMG0000466.jpg", "LEG"), ("IMG0002303.jpg", "SHOULDER"))


def node_config(folder: Path, weights: Path, pacs: OrthancPacs | None = None) -> Path:
    """A node config in ``folder`` on a free port, sending results to ``pacs`` (if given)."""
    destinations = [(pacs.ae_title, pacs.dicom_port)] if pacs is not None else []
    return write_config(folder, weights, destinations, port=free_port())


def record_counts(category: str, counts: dict[str, Any]) -> dict[str, Any]:
    """Write ``counts`` to ``results/<category>.json``, print them (``-s``/``-rA``), return them."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{category}.json").write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    print(f"[faults] {category}: {json.dumps(counts, sort_keys=True)}")
    return counts


def small_view(index: int) -> np.ndarray:
    """Sample radiograph ``index`` (mod 3), shrunk to ``IMAGE_SIDE`` px on its long side."""
    name, _ = VIEWS[index % len(VIEWS)]
    image = fracatlas(name)
    scale = IMAGE_SIDE / max(image.shape)
    size = (max(32, round(image.shape[1] * scale)), max(32, round(image.shape[0] * scale)))
    return np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


def small_dx(index: int, **uids: Any) -> Dataset:
    """A small DX instance of view ``index`` (``study_uid``/``series_uid``/... as for
    :func:`dicomnode.demo.dx_from_image`)."""
    _, body_part = VIEWS[index % len(VIEWS)]
    return dx_from_image(small_view(index), body_part=body_part, instance_number=index + 1, **uids)


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_sha256(path: Path) -> str:
    """SHA-256 of a DICOM file's dataset bytes (after the File Meta): what goes over the wire.

    The node stores pynetdicom's File Meta in front of the dataset exactly as received, so the
    dataset bytes of a sent file and of its stored copy are equal when nothing was lost.
    """
    _, offset = split_dataset(path)
    with path.open("rb") as handle:
        handle.seek(offset)
        return hashlib.sha256(handle.read()).hexdigest()


def scu(
    *, storage: bool = True, syntaxes: Sequence[str] = SEND_AS_STORED, timeout: float = 30
) -> AE:
    """A pynetdicom modality AE proposing Verification and (optionally) the storage classes.

    ``syntaxes``: the transfer syntaxes proposed for every storage class, preferred first. The
    default proposes Explicit VR Little Endian first, so files stored so are sent as they are
    (with Implicit VR first, pynetdicom re-encodes them)."""
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    if storage:
        for context in StoragePresentationContexts[:127]:
            if context.abstract_syntax is not None:
                ae.add_requested_context(context.abstract_syntax, list(syntaxes))
    return ae


def echo_ok(port: int, timeout: float = 30) -> bool:
    """True if the node at ``port`` answers C-ECHO with success (within ``timeout`` seconds for
    each step of the exchange)."""
    ae = scu(storage=False, timeout=timeout)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    try:
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@dataclass(frozen=True)
class StoreAnswer:
    """What one C-STORE attempt got: a status, or how the association ended without one."""

    status: int | None
    ended: str  # status, rejected, aborted, refused (no connection), no_context, unsendable

    @property
    def success(self) -> bool:
        return self.status == 0x0000


def store_file(port: int, path: Path, ae: AE | None = None) -> StoreAnswer:
    """Send the DICOM file ``path`` (its dataset bytes as they are) in one association."""
    ae = ae or scu()
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    except OSError:
        return StoreAnswer(None, "refused")
    try:
        if assoc.is_rejected:
            return StoreAnswer(None, "rejected")
        if not assoc.is_established:
            return StoreAnswer(None, "aborted")
        try:
            status = assoc.send_c_store(path)
        except ValueError:  # no accepted presentation context for its class / syntax
            return StoreAnswer(None, "no_context")
        except (AttributeError, UnboundLocalError):  # pynetdicom cannot read the File Meta
            return StoreAnswer(None, "unsendable")
        if status and "Status" in status:
            return StoreAnswer(int(status.Status), "status")
        return StoreAnswer(None, "aborted")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@pytest.fixture(scope="package")
def fault_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random ensemble that calls every image a fracture (every image has boxes)."""
    return positive_weights(tmp_path_factory.mktemp("fault-weights") / "ensemble")


@pytest.fixture(scope="package")
def fault_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPacs]:
    """A real Orthanc accepting stores from the node's AE title on loopback only."""
    with OrthancPacs(
        tmp_path_factory.mktemp("fault-orthanc"),
        ae_title="ORTHANC",
        allowed=[(NODE_AE, "127.0.0.1")],
    ) as pacs:
        yield pacs
