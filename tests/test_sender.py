"""The delivery loop: outcome classification (property-tested) and real sends with the real queue
to DCMTK storescp and to a port where nothing listens."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from dicomnode import scu
from dicomnode.config import Config, parse_config
from dicomnode.demo import StoreScpPacs, dx_from_image, free_port
from dicomnode.pixels import load_view
from dicomnode.queue.sqlite import SqliteJobQueue
from dicomnode.records import (
    DeliveryOutcome,
    DeliveryState,
    Destination,
    JobState,
    ResultFile,
)
from dicomnode.scp import read_header
from dicomnode.sender import DeliveryLoop, batch_outcome, delivery_loop
from dicomnode.storage import InstanceStore, StateLayout
from dicomnode.worker import result_files
from dicomnode.writers import ImageFinding, NodeIdentity, write_results
from inference.imageio import read_grayscale
from inference.records import AlgorithmInfo, Box, Decision, ImageResult, Thresholds
from tests.conftest import REPO

STATUSES = st.sampled_from(list(scu.FileStatus))
REASONS = st.sampled_from(["stored", "refused (0x0124)", "out of resources (0xA700)"])


@given(st.lists(st.tuples(STATUSES, REASONS), min_size=1, max_size=6))
def test_one_outcome_per_delivery_from_its_files(files: list[tuple[str, str]]) -> None:
    batch = scu.BatchOutcome(
        tuple(
            scu.FileOutcome(Path(f"{i}.dcm"), scu.FileStatus(status), reason)
            for i, (status, reason) in enumerate(files)
        )
    )
    outcome, reason = batch_outcome(batch)
    statuses = [scu.FileStatus(s) for s, _ in files]
    if all(s is scu.FileStatus.SUCCESS for s in statuses):
        assert (outcome, reason) == (DeliveryOutcome.DELIVERED, None)
        return
    permanent = scu.FileStatus.PERMANENT in statuses
    expected = DeliveryOutcome.PERMANENT_FAILURE if permanent else DeliveryOutcome.TRANSIENT_FAILURE
    assert outcome is expected
    wanted = scu.FileStatus.PERMANENT if permanent else scu.FileStatus.TRANSIENT
    first = next(r for s, r in files if scu.FileStatus(s) is wanted)
    assert reason is not None and reason.endswith(first)
    failed = sum(s is wanted for s in statuses)
    assert reason.startswith(f"{failed} of {len(files)} files") == (
        len(set(r for _, r in files)) > 1
    )


def make_config(tmp_path: Path, port: int, **delivery: float) -> Config:
    raw = {
        "node": {"state_dir": "state", "ae_title": "FRACTURE_AI"},
        "study": {"stable_seconds": 0.5},
        "delivery": {"retry_initial_seconds": 30, "retry_max_seconds": 60, **delivery},
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port}],
    }
    return parse_config(raw, tmp_path)


def job_with_results(tmp_path: Path, config: Config) -> tuple[SqliteJobQueue, str]:
    """A received study whose job wrote an SR and an SC (fixed result, no ensemble)."""
    layout = StateLayout(config.node.state_dir)
    db = layout.open_db()
    queue = SqliteJobQueue.from_config(db, config)
    image = read_grayscale(REPO / "samples" / "fracatlas" / "IMG0000466.jpg")
    ds = dx_from_image(image, body_part="LEG", study_uid=generate_uid())
    path = tmp_path / "leg.dcm"
    ds.save_as(path, enforce_file_format=True)
    InstanceStore(layout, db).store(path, read_header(path), "MODALITY", now=time.time() - 60)
    queue.enqueue_stable_studies()
    job = queue.lease("worker")
    assert job is not None
    result = ImageResult(
        0.9,
        Decision.FRACTURE,
        (Box(10, 20, 100, 200, 0.9),),
        "tibia_fibula",
        "leg",
        False,
        Thresholds(0.3, 0.6, 0.5),
    )
    objects = write_results(
        [ImageFinding(load_view(path), result)],
        AlgorithmInfo("test", "1", "test"),
        NodeIdentity(),
        tmp_path / "out",
    )
    files: tuple[ResultFile, ...] = result_files(objects)
    queue.complete(job, files, config.destinations)
    return queue, str(ds.StudyInstanceUID)


def test_results_are_delivered_to_storescp(tmp_path: Path) -> None:
    with StoreScpPacs(tmp_path / "pacs", ae_title="PACS") as scp:
        config = make_config(tmp_path, scp.dicom_port)
        queue, study = job_with_results(tmp_path, config)
        loop = DeliveryLoop(queue, config.node.ae_title, scu.Timeouts(3, 5, 10, 10))
        assert loop.run_once() == 1
        received = scp.received(study)
    assert len(received) == 2
    (delivery,) = queue.db.recent_deliveries()
    assert (delivery.state, delivery.attempts, delivery.last_error) == (
        DeliveryState.DELIVERED,
        1,
        None,
    )
    assert queue.db.queue_depth().delivered == 1
    assert loop.run_once() == 0


def test_a_destination_that_is_down_is_retried_later(tmp_path: Path) -> None:
    config = make_config(tmp_path, free_port())
    queue, _ = job_with_results(tmp_path, config)
    loop = DeliveryLoop(queue, config.node.ae_title, scu.Timeouts(3, 5, 10, 10))
    before = time.time()
    assert loop.run_once() == 1
    (delivery,) = queue.db.recent_deliveries()
    assert delivery.state is DeliveryState.PENDING and delivery.attempts == 1
    assert delivery.last_error is not None and "cannot connect" in delivery.last_error
    assert delivery.next_attempt_at >= before + 30  # back-off from the config
    assert delivery.destination == Destination("PACS", "127.0.0.1", config.destinations[0].port)
    assert loop.run_once() == 0  # not due yet
    assert queue.db.queue_depth().results_written == 1


def test_a_delivery_without_files_fails_permanently(tmp_path: Path) -> None:
    config = make_config(tmp_path, free_port())
    queue, _ = job_with_results(tmp_path, config)
    (delivery,) = queue.claim_deliveries(60)
    empty = replace(delivery, files=())
    outcome, reason = DeliveryLoop(queue, "FRACTURE_AI").attempt(empty)
    assert outcome is DeliveryOutcome.PERMANENT_FAILURE and reason is not None
    recorded = queue.record_delivery_attempt(delivery.delivery_id, outcome, reason)
    assert recorded.state is DeliveryState.FAILED
    assert queue.job_state(delivery.job_id)[0] is JobState.FAILED


def test_the_configured_timeout_bounds_every_step_of_a_send(tmp_path: Path) -> None:
    # A peer that accepts the TCP connection but never answers the association request: the
    # attempt ends after the configured 1 s as a transient failure (retried later).
    with socket.create_server(("127.0.0.1", 0)) as silent:
        config = make_config(tmp_path, silent.getsockname()[1], timeout_seconds=1)
        queue, _ = job_with_results(tmp_path, config)
        loop = delivery_loop(queue, config)
        assert loop.timeouts == scu.Timeouts(connect=1, acse=1, dimse=1, network=1)
        assert loop.calling_ae == "FRACTURE_AI"
        assert loop.run_once() == 1
    (delivery,) = queue.db.recent_deliveries()
    assert delivery.state is DeliveryState.PENDING and delivery.attempts == 1
    assert delivery.last_error is not None and "aborted or timed out" in delivery.last_error
    default = delivery_loop(queue, make_config(tmp_path, 4242))
    assert default.timeouts == scu.Timeouts(connect=60, acse=60, dimse=60, network=60)


def test_a_destination_no_longer_configured_is_not_sent_to(tmp_path: Path) -> None:
    with StoreScpPacs(tmp_path / "pacs", ae_title="PACS") as scp:
        config = make_config(tmp_path, scp.dicom_port)
        queue, study = job_with_results(tmp_path, config)
        moved = make_config(tmp_path, free_port())  # the admin changed the PACS's port since
        loop = delivery_loop(queue, moved)
        assert loop.run_once() == 1
        assert scp.received(study) == []
    (delivery,) = queue.db.recent_deliveries()
    assert delivery.state is DeliveryState.FAILED and delivery.attempts == 1
    assert (
        delivery.last_error
        == f"destination PACS@127.0.0.1:{scp.dicom_port} is no longer configured"
    )
