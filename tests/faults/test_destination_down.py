"""Destination down: the receiving Orthanc is SIGKILLed while studies are being processed and
started again (same ports, same storage) once the node has visibly backed off. Nothing is lost,
every study is delivered after Orthanc returns, and while it is down ``dicomnode status --json``
shows the pending deliveries with their attempts, last error and next attempt time."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicomnode.config import load_config
from dicomnode.demo import OrthancPacs
from dicomnode.records import JobState
from dicomnode.state import StateDB
from tests.faults.conftest import (
    NODE_AE,
    dataset_sha256,
    node_config,
    record_counts,
    save,
    small_dx,
    store_file,
)
from tests.test_node_e2e import by_class, node, settled, status_json, wait_for

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(240)]

STUDIES_BEFORE, STUDIES_WHILE_DOWN = 2, 4


def kill(pacs: OrthancPacs) -> None:
    """SIGKILL the PACS (no clean shutdown) and wait for it to be gone."""
    assert pacs.process is not None
    pacs.process.send_signal(signal.SIGKILL)
    pacs.process.wait()
    pacs.process = None


def backing_off(config: Path, studies: list[str]) -> list[dict[str, Any]] | None:
    """The pending deliveries of ``studies`` once each has failed at least twice (so a back-off
    was scheduled and is being waited out), from ``dicomnode status --json``."""
    deliveries = [
        d for d in status_json(config)["deliveries"] if d["study_instance_uid"] in studies
    ]
    waiting = [
        d
        for d in deliveries
        if d["state"] == "pending"
        and d["attempts"] >= 2
        and d["next_attempt_in_seconds"] is not None
    ]
    return waiting if len(waiting) == len(studies) else None


def delivered(config: Path, study_uid: str) -> bool:
    """Wait until the study's job settles; True if it was delivered."""
    outcome = wait_for("delivery", lambda: settled(config, study_uid))
    return outcome == (JobState.DELIVERED, None)


def test_destination_down_then_back_loses_nothing(fault_weights: Path, tmp_path: Path) -> None:
    pacs = OrthancPacs(tmp_path / "orthanc", ae_title="DOWNPACS", allowed=[(NODE_AE, "127.0.0.1")])
    config = node_config(tmp_path / "node", fault_weights, pacs)
    cfg = load_config(config)
    port = cfg.node.port
    sent: dict[str, tuple[str, str]] = {}  # SOP Instance UID -> (study, dataset hash)

    def send_study(index: int) -> str:
        ds = small_dx(index)
        path = save(ds, tmp_path / f"study-{index}.dcm")
        assert store_file(port, path).success
        sent[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID), dataset_sha256(path))
        return str(ds.StudyInstanceUID)

    try:
        pacs.start()
        with node("serve", config, tmp_path / "node.log"):
            before = [send_study(i) for i in range(STUDIES_BEFORE)]
            for study in before:
                assert delivered(config, study)
            kill(pacs)
            down = [send_study(STUDIES_BEFORE + i) for i in range(STUDIES_WHILE_DOWN)]
            waiting = wait_for("back-off in status", lambda: backing_off(config, down))
            pacs.start()
            outcomes = [delivered(config, study) for study in down]
            after = status_json(config)["deliveries"]
        received = {study: pacs.received(study) for study in before + down}
    finally:
        pacs.stop()
    with StateDB(cfg.node.state_dir / "state.sqlite") as db:
        rows: dict[str, str] = {
            r[0]: r[1] for r in db.query("SELECT sop_instance_uid, path FROM instances")
        }
    lost = [
        uid
        for uid, (_, sha) in sent.items()
        if uid not in rows or dataset_sha256(Path(rows[uid])) != sha
    ]
    complete = [
        study
        for study, objects in received.items()
        if len(by_class(objects, Comprehensive3DSRStorage)) == 1
        and len(by_class(objects, SecondaryCaptureImageStorage)) == 1
    ]
    counts = record_counts(
        "destination_down",
        {
            "studies_before": len(before),
            "studies_while_down": len(down),
            "instances_acknowledged": len(sent),
            "lost": len(lost),
            "delivered_after_return": sum(outcomes),
            "studies_with_complete_results": len(complete),
            "attempts_while_down": sorted(d["attempts"] for d in waiting),
            "attempts_in_total": sorted(
                d["attempts"] for d in after if d["study_instance_uid"] in down
            ),
        },
    )
    assert counts["lost"] == 0
    assert counts["delivered_after_return"] == STUDIES_WHILE_DOWN
    assert counts["studies_with_complete_results"] == STUDIES_BEFORE + STUDIES_WHILE_DOWN
    for delivery in waiting:
        assert delivery["last_error"] and delivery["next_attempt_at"]
    assert all(d["state"] == "delivered" for d in after)
    assert all(n > 2 for n in counts["attempts_in_total"])  # the attempt that got through
