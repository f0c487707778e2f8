"""The README's main job, ``python -m dicomnode.demo`` with the shipped weights, as a user
runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(300)]


def test_demo_sends_a_radiograph_through_the_node_to_orthanc(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dicomnode.demo", "--out", str(tmp_path), "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert re.search(r"arrived at the PACS: SR [0-9.]+\n\s+at Orthanc instance", out)
    assert re.search(r"arrived at the PACS: Secondary Capture [0-9.]+\n\s+at Orthanc", out)
    finding = re.search(
        r"SR: image [0-9.]+: (FRACTURE|POSSIBLE FRACTURE|NO FRACTURE DETECTED), "
        r"score (0\.\d+|1\.0+), finding site Hand",
        out,
    )
    assert finding is not None, out
    png = tmp_path / "hand-secondary-capture.png"
    image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 2 and image.shape[1] == 819
    assert image.shape[0] > 1024  # the banner above the 1024-row radiograph
    pids = [int(p) for p in re.findall(r"\(PID (\d+)", out)]
    assert len(pids) == 2  # the PACS and the node, both stopped by the demo
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    kept = re.search(r"working folder: (\S+)", out)
    assert kept is not None and not Path(kept.group(1)).exists()
