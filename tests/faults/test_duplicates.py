"""Duplicates: one SOP instance sent twice in one association and in two, and a whole study sent
again after it was processed, give one stored copy and exactly one current result at a real
Orthanc (the result UIDs are deterministic, so nothing new ever appears there)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

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
    scu,
    small_dx,
    store_file,
)
from tests.test_node_e2e import by_class, node, send, settled, study_jobs, wait_for

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(240)]


def send_in_one_association(port: int, *files: Path) -> list[int]:
    """C-STORE every file in order over one association; their statuses."""
    ae = scu()
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()
        ae.shutdown()


def test_duplicates_are_stored_once_and_give_one_current_result(
    fault_weights: Path, fault_orthanc: OrthancPacs, tmp_path: Path
) -> None:
    config = node_config(tmp_path / "node", fault_weights, fault_orthanc)
    cfg = load_config(config)
    port = cfg.node.port
    study_uid, series_uid = generate_uid(), generate_uid()
    a, b = (
        save(small_dx(i, study_uid=study_uid, series_uid=series_uid), tmp_path / f"{k}.dcm")
        for i, k in enumerate("ab")
    )
    sentinel = save(small_dx(2), tmp_path / "sentinel.dcm")
    sentinel_study = str(small_dx_study(sentinel))
    with node("serve", config, tmp_path / "node.log") as running:
        # A twice in one association, then A again in a second association, re-encoded by
        # the sender (Implicit VR: other bytes, the same dataset).
        statuses = send_in_one_association(port, a, a, b)
        second = store_file(port, a, scu(syntaxes=[ImplicitVRLittleEndian]))
        assert second.status is not None
        statuses.append(second.status)
        assert statuses == [0, 0, 0, 0]
        assert wait_for("the study", lambda: settled(config, study_uid)) == (
            JobState.DELIVERED,
            None,
        )
        first = {o.sop_instance_uid: o.sop_class_uid for o in fault_orthanc.received(study_uid)}
        # The whole study again, after it was processed (DCMTK storescu), then an unrelated
        # study: once that one is delivered, the listener has assembled studies after the
        # re-send became stable, so a re-run of the re-sent study would have been queued.
        send(port, a, b)
        send(port, sentinel)
        wait_for("the sentinel study", lambda: settled(config, sentinel_study))
        outcomes = [
            e["outcome"]
            for e in running.events()
            if e["event"] == "instance_received" and e.get("study_instance_uid") == study_uid
        ]
    again = {o.sop_instance_uid: o.sop_class_uid for o in fault_orthanc.received(study_uid)}
    with StateDB(cfg.node.state_dir / "state.sqlite") as db:
        rows = db.query("SELECT path, sha256 FROM instances WHERE study_uid = ?", (study_uid,))
    files_on_disk = sorted((cfg.node.state_dir / "instances" / study_uid).iterdir())
    jobs = study_jobs(config, study_uid)
    reports = [uid for uid, cls in again.items() if cls == Comprehensive3DSRStorage]
    counts = record_counts(
        "duplicates",
        {
            "sends": len(statuses) + 2,
            "success_statuses": statuses.count(0) + 2,
            "received_outcomes": {k: outcomes.count(k) for k in sorted(set(outcomes))},
            "stored_rows": len(rows),
            "stored_files": len(files_on_disk),
            "jobs": len(jobs),
            "pacs_objects_first": len(first),
            "pacs_objects_after_resend": len(again),
            "pacs_reports": len(reports),
            "pacs_new_uids_after_resend": len(set(again) - set(first)),
        },
    )
    assert counts["received_outcomes"] == {"new": 2, "duplicate": 4}
    assert counts["stored_rows"] == counts["stored_files"] == 2
    assert {Path(r[0]) for r in rows} == set(files_on_disk)
    assert {r[1] for r in rows} == {""}  # stored without hashing; the contents are checked next
    assert {dataset_sha256(p) for p in files_on_disk} == {dataset_sha256(a), dataset_sha256(b)}
    assert [(version, state) for _, version, state, _, _ in jobs] == [(1, JobState.DELIVERED)]
    assert counts["pacs_reports"] == 1
    assert len([c for c in again.values() if c == SecondaryCaptureImageStorage]) == 2
    assert again == first and counts["pacs_new_uids_after_resend"] == 0


def small_dx_study(path: Path) -> str:
    """The Study Instance UID of a DICOM file."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_duplicate_results_use_the_same_uids_when_sent_again(
    fault_weights: Path, fault_orthanc: OrthancPacs, tmp_path: Path
) -> None:
    """The node's own re-send of a study's results (as after a crash during delivery) stores
    the same SOP Instance UIDs at Orthanc again: its instance count does not grow."""
    config = node_config(tmp_path / "node", fault_weights, fault_orthanc)
    cfg = load_config(config)
    study = save(small_dx(0), tmp_path / "one.dcm")
    study_uid = small_dx_study(study)
    with node("serve", config, tmp_path / "node.log") as running:
        send(cfg.node.port, study)
        wait_for("delivery", lambda: settled(config, study_uid))
        before = sorted(o.sop_instance_uid for o in fault_orthanc.received(study_uid))
        with StateDB(cfg.node.state_dir / "state.sqlite") as db, db.transaction() as conn:
            # What a crash between the PACS's success and our commit leaves: a pending delivery.
            conn.execute("UPDATE deliveries SET state = 'pending', next_attempt_at = 0")
            conn.execute(
                "UPDATE jobs SET state = 'results_written' WHERE study_uid = ?", (study_uid,)
            )
        wait_for("the second delivery", lambda: settled(config, study_uid))
        attempts = [e for e in running.events() if e["event"] == "delivery_delivered"]
    after = sorted(o.sop_instance_uid for o in fault_orthanc.received(study_uid))
    counts = record_counts(
        "duplicate_redelivery",
        {
            "deliveries": len(attempts),
            "pacs_objects_before": len(before),
            "pacs_objects_after": len(after),
        },
    )
    assert counts["deliveries"] == 2
    assert before == after and len(after) == 2  # one SR, one Secondary Capture
    assert len(by_class(fault_orthanc.received(study_uid), Comprehensive3DSRStorage)) == 1
