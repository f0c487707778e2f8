"""Disk full: the state directory on a small tmpfs mounted by the test.

Two ways to run out of space, each against the real listener (``python -m dicomnode listen``):

- the low-water mark ``node.min_free_bytes``: once storing an instance would leave less free
  space than that, C-STORE answers Out of Resources (0xA700) before anything is written;
- the disk really full (``min_free_bytes = 0``): writing the copy, the spool file or the database
  fails with ENOSPC; C-STORE answers 0xA700 or the association is aborted, whatever was half
  written is removed, and nothing is recorded.

In both, the node keeps answering C-ECHO, every instance it acknowledged is on disk and intact,
and once space returns (the test deletes a filler file) the refused instances are stored.
Mounting needs root (CI runs as root).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import load_config
from dicomnode.demo import dx_from_image, free_port
from dicomnode.state import StateDB
from dicomnode.storage import StateLayout
from tests.faults.conftest import dataset_sha256, echo_ok, record_counts, save, store_file
from tests.faults.test_limits import wait_until
from tests.test_node_e2e import node, write_config

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(240)]

MIB = 1024 * 1024
SIDE = 1448  # an 8-bit DX of 1448 x 1448 px: about 2 MiB


def big_dx(seed: int) -> Dataset:
    """A DX instance of about 2 MiB (random pixels do not compress, nothing here does)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    return dx_from_image(pixels, body_part="HAND")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs at ``tmp_path/node/state``: the node's state directory."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    state = tmp_path / "node" / "state"
    state.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(state)], check=True
    )
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(state: Path, leave: int) -> Path:
    """Write a filler file so that only about ``leave`` bytes stay free on ``state``."""
    filler = state / "filler.bin"
    free = os.statvfs(state).f_bavail * os.statvfs(state).f_frsize
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def stored(config: Path) -> dict[str, tuple[Path, int]]:
    """SOP Instance UID -> (path, size) of every recorded instance."""
    with StateDB(load_config(config).node.state_dir / "state.sqlite") as db:
        rows = db.query("SELECT sop_instance_uid, path, size FROM instances")
    return {str(uid): (Path(path), int(size)) for uid, path, size in rows}


def leftovers(state: Path) -> list[Path]:
    """Partial copies and spool files left in the state directory."""
    return [*(state / "tmp").iterdir(), *StateLayout(state).spooled_files()]


def check_intact(config: Path, sent: dict[str, Path], acknowledged: list[str]) -> None:
    records = stored(config)
    assert sorted(records) == sorted(acknowledged)
    for uid in acknowledged:
        path, size = records[uid]
        assert path.stat().st_size == size
        assert dataset_sha256(path) == dataset_sha256(sent[uid])


def test_low_water_mark_answers_out_of_resources_and_resumes(
    fault_weights: Path, tmpfs: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "node", fault_weights, [], port=free_port())
    text = config.read_text().replace("[node]\n", f"[node]\nmin_free_bytes = {8 * MIB}\n", 1)
    config.write_text(text)
    filler = tmpfs / "filler.bin"  # other data on the same file system, removed later
    filler.write_bytes(b"\0" * 6 * MIB)
    port = load_config(config).node.port
    files = [save(big_dx(i), tmp_path / "send" / f"{i}.dcm") for i in range(12)]
    sent = {str(_uid(f)): f for f in files}
    with node("listen", config, tmp_path / "node.log", ready="listener_started") as running:
        answers = [store_file(port, f) for f in files]
        statuses = [a.status for a in answers]
        acknowledged = [_uid(f) for f, a in zip(files, answers, strict=True) if a.success]
        refused = [f for f, a in zip(files, answers, strict=True) if a.status == 0xA700]
        assert acknowledged and refused, statuses
        assert all(a.success or a.status == 0xA700 for a in answers), statuses
        # once the low-water mark is reached, every later instance is refused too
        first_refusal = statuses.index(0xA700)
        assert all(s == 0xA700 for s in statuses[first_refusal:]), statuses
        assert echo_ok(port)
        assert running.process.poll() is None
        check_intact(config, sent, acknowledged)
        # an unfinished spool file goes at connection close or, at the latest, at the next
        # spool sweep of its receiving process
        wait_until("nothing half-written left", lambda: leftovers(tmpfs) == [], timeout=10)
        logged = running.event("instance_received", status="0xA700")
        assert logged is not None and "min_free_bytes" in logged["reason"]
        filler.unlink()  # an admin frees space: the refused instances are taken now
        later = [store_file(port, f) for f in refused[:2]]
        assert [a.status for a in later] == [0x0000, 0x0000]
    record_counts(
        "disk_full_low_water",
        {
            "sent": len(files),
            "acknowledged": len(acknowledged),
            "refused_0xA700": len(refused),
            "stored_after_space_returned": sum(a.success for a in later),
        },
    )


def test_disk_really_full_leaves_nothing_half_written(
    fault_weights: Path, tmpfs: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "node", fault_weights, [], port=free_port())
    config.write_text(config.read_text().replace("[node]\n", "[node]\nmin_free_bytes = 0\n", 1))
    port = load_config(config).node.port
    files = [save(big_dx(100 + i), tmp_path / "send" / f"{i}.dcm") for i in range(3)]
    sent = {str(_uid(f)): f for f in files}
    with node("listen", config, tmp_path / "node.log", ready="listener_started") as running:
        first = store_file(port, files[0])
        assert first.success
        # room for the spool file but not for the copy, then room for neither
        cases = {}
        filler = fill(tmpfs, leave=3 * MIB)
        cases["copy_fails"] = store_file(port, files[1])
        filler.unlink()
        filler = fill(tmpfs, leave=MIB)
        cases["spool_fails"] = store_file(port, files[2])
        for name, answer in cases.items():
            assert not answer.success, name
            assert answer.status == 0xA700 or answer.ended == "aborted", (name, answer)
        assert echo_ok(port)
        assert running.process.poll() is None
        check_intact(config, sent, [_uid(files[0])])
        # an unfinished spool file goes at connection close or, at the latest, at the next
        # spool sweep of its receiving process
        wait_until("nothing half-written left", lambda: leftovers(tmpfs) == [], timeout=10)
        filler.unlink()
        again = [store_file(port, f) for f in files[1:]]
        assert all(a.success for a in again), again
        check_intact(config, sent, [_uid(f) for f in files])
    record_counts(
        "disk_full_enospc",
        {
            "cases": len(cases),
            "answers": {
                k: (f"0x{a.status:04X}" if a.status is not None else a.ended)
                for k, a in cases.items()
            },
            "half_written_left": 0,
            "stored_after_space_returned": sum(a.success for a in again),
        },
    )


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
