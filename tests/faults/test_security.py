"""Security: who may talk to the node, what its logs say, and who may read its files.

- ``allowed_callers``: a stranger by calling AE title, and a known AE title from another
  address, get an A-ASSOCIATE-RJ (rejected-permanent, service user, calling AE title not
  recognised), each attempt is logged with the peer, and the allowed caller is served.
- No PHI in logs: a study of a patient with distinctive name, ID, birth date and accession
  number goes through the whole node (valid views, an undecodable view, a non-image object, an
  instance without Study Instance UID), and no log line and no ``status`` output contains
  any of those values.
- File modes: what the node writes into its state directory is private to its user; a state
  directory others could read is tightened; a config readable by everyone is reported.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicomnode.config import load_config
from dicomnode.demo import OrthancPacs, Patient, free_port
from dicomnode.records import JobState
from tests.faults.conftest import (
    MODALITY,
    node_config,
    record_counts,
    save,
    scu,
    small_dx,
    store_file,
)
from tests.test_node_e2e import (
    ECHOSCU,
    NODE_AE,
    leaked_patient_data,
    node,
    settled,
    status_json,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(240)]

#: Distinctive values: any of them in a log line is a leak.
PATIENT = Patient(
    name="Kowalczyk^Zofia^Marianna",
    patient_id="PHIID58213K",
    birth_date="19380722",
    sex="F",
    accession_number="PHIACC44107",
)
STRANGER_ADDRESS = "127.0.0.2"  # loopback too, but not the allowed caller's address


def association_rejection(port: int, calling_ae: str, source: str) -> A_ASSOCIATE_RJ | None:
    """Ask for an association as ``calling_ae`` from ``source``; the A-ASSOCIATE-RJ if any."""
    ae = scu(storage=False)
    ae.ae_title = calling_ae
    seen: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            seen.append(event.pdu)

    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=NODE_AE,
        bind_address=(source, 0),
        evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)],
    )
    try:
        if assoc.is_established:
            assert int(assoc.send_c_echo().Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return seen[0] if seen else None


def test_allowed_callers_reject_strangers_by_ae_title_and_by_address(
    fault_weights: Path, tmp_path: Path
) -> None:
    allowed = f'[[allowed_callers]]\nae_title = "{MODALITY}"\nhost = "127.0.0.1"\n'
    config = write_config(tmp_path / "node", fault_weights, [], port=free_port(), extra=allowed)
    port = load_config(config).node.port
    cases = {
        "allowed": (MODALITY, "127.0.0.1"),
        "stranger_ae": ("INTRUDER", "127.0.0.1"),
        "allowed_ae_other_address": (MODALITY, STRANGER_ADDRESS),
        "stranger_ae_other_address": ("INTRUDER", STRANGER_ADDRESS),
    }
    with node("listen", config, tmp_path / "node.log", ready="listener_started") as running:
        results = {name: association_rejection(port, *case) for name, case in cases.items()}
        dcmtk = subprocess.run(
            [ECHOSCU, "-aec", NODE_AE, "-aet", "INTRUDER", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        rejections = [e for e in running.events() if e["event"] == "association_rejected"]
    assert results["allowed"] is None
    for name in ("stranger_ae", "allowed_ae_other_address", "stranger_ae_other_address"):
        pdu = results[name]
        assert pdu is not None, name
        # rejected-permanent, by the service user, calling AE title not recognised
        assert (pdu.result, pdu.source, pdu.reason_diagnostic) == (0x01, 0x01, 0x03), name
    assert dcmtk.returncode != 0
    assert "Calling AE Title Not Recognized" in dcmtk.stdout + dcmtk.stderr
    logged = {(e["calling_ae"], e["peer"]) for e in rejections}
    assert logged == {
        ("INTRUDER", "127.0.0.1"),
        (MODALITY, STRANGER_ADDRESS),
        ("INTRUDER", STRANGER_ADDRESS),
    }
    record_counts(
        "allowed_callers",
        {
            "attempts": len(cases) + 1,
            "rejected": sum(r is not None for r in results.values()) + (dcmtk.returncode != 0),
            "rejections_logged": len(rejections),
            "allowed_served": int(results["allowed"] is None),
        },
    )


def test_no_patient_data_in_logs_and_state_files_are_private(
    fault_weights: Path, fault_orthanc: OrthancPacs, tmp_path: Path
) -> None:
    config = node_config(tmp_path / "node", fault_weights, fault_orthanc)
    config.chmod(0o644)
    state = load_config(config).node.state_dir
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # made by hand with a permissive umask
    port = load_config(config).node.port
    study_uid, series_uid = generate_uid(), generate_uid()
    uids = {"patient": PATIENT, "study_uid": study_uid, "series_uid": series_uid}
    good = [save(small_dx(i, **uids), tmp_path / f"view{i}.dcm") for i in range(2)]
    broken = small_dx(2, **uids)
    broken.PixelData = broken.PixelData[:100]  # undecodable: fewer bytes than Rows x Columns
    undecodable = save(broken, tmp_path / "broken.dcm")
    other = small_dx(2, **uids)
    other.SOPClassUID = other.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    not_cr_dx = save(other, tmp_path / "sc.dcm")
    orphan = small_dx(1, patient=PATIENT)
    del orphan.StudyInstanceUID  # refused: no study to assemble it into
    no_study = save(orphan, tmp_path / "no-study.dcm")
    log_path = tmp_path / "node.log"
    with node("serve", config, log_path) as running:
        statuses = [store_file(port, f).status for f in (*good, undecodable, not_cr_dx)]
        statuses.append(store_file(port, no_study).status)
        assert statuses == [0, 0, 0, 0, 0xA900]
        assert wait_for("the study", lambda: settled(config, study_uid)) == (
            JobState.DELIVERED,
            None,
        )
        assert running.event("config_readable_by_everyone", path=str(config)) is not None
    status = json.dumps(status_json(config), ensure_ascii=False)
    log_text = log_path.read_text()
    assert study_uid in log_text and study_uid in status  # the logs cover the study
    leaks = leaked_patient_data(log_text, PATIENT) + leaked_patient_data(status, PATIENT)
    assert str(pydicom.dcmread(good[0]).PatientID) == PATIENT.patient_id  # the values were sent
    # what the node wrote is private to its user; the hand-made state folder lost "others"
    paths = [state, *state.rglob("*")]
    loose = [p for p in paths[1:] if p.stat().st_mode & 0o077]
    lines = sum(1 for line in log_text.splitlines() if line.startswith("{"))
    record_counts(
        "no_phi_and_file_modes",
        {
            "log_lines_scanned": lines,
            "phi_values_searched": 5,
            "leaks": len(leaks),
            "state_paths_checked": len(paths),
            "state_paths_readable_by_others": len(loose),
        },
    )
    assert leaks == []
    assert loose == []
    assert state.stat().st_mode & 0o777 == 0o750
