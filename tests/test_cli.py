"""``python -m inference`` as a user runs it: a real FracAtlas image, a subprocess, JSON out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from inference.models import list_models

from .conftest import FRACATLAS, REPO


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inference", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_models_lists_the_registry() -> None:
    done = run_cli("models")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == list_models()
    assert {"drn_c_26", "drn_c_42", "drn_d_22", "drn_d_38", "drn_d_54"} <= set(list_models())


def test_predict_json_on_real_images(random_weights: Path, tmp_path: Path) -> None:
    jpeg = FRACATLAS / "images" / "IMG0000019.jpg"
    # the same radiograph as a 16-bit PNG and an 8-bit TIFF: other formats, other depths
    gray = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    png16 = tmp_path / "wide.png"
    cv2.imwrite(str(png16), gray.astype(np.uint16) * 257)
    tiff = tmp_path / "x.tif"
    cv2.imwrite(str(tiff), gray)
    done = run_cli("predict", str(jpeg), str(png16), str(tiff), "--region", "wrist",
                   "--weights", str(random_weights), "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "NOT trained" in done.stderr
    results = json.loads(done.stdout)
    assert [r["image"] for r in results] == [str(jpeg), str(png16), str(tiff)]
    rows, cols = gray.shape
    for result in results:
        assert set(result) >= {"image", "region", "group", "score", "decision", "boxes",
                               "timings"}
        assert result["region"] == "wrist" and result["group"] == "global"
        assert 0.0 <= result["score"] <= 1.0
        assert result["decision"] in ("fracture", "possible_fracture", "no_fracture")
        for box in result["boxes"]:
            assert 0 <= box["x0"] < box["x1"] <= cols and 0 <= box["y0"] < box["y1"] <= rows
        assert result["timings"]["inference_s"] >= 0
    # 8-bit and 16-bit encodings of the same pixels give the same answer
    assert results[0]["score"] == results[2]["score"]
    assert abs(results[0]["score"] - results[1]["score"]) < 1e-4


def test_predict_plain_text(random_weights: Path) -> None:
    done = run_cli("predict", str(FRACATLAS / "images" / "IMG0000007.jpg"),
                   "--weights", str(random_weights))
    assert done.returncode == 0, done.stderr
    assert "IMG0000007.jpg:" in done.stdout and "score=" in done.stdout


def test_predict_reports_bad_input_clearly(random_weights: Path, tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    done = run_cli("predict", str(not_an_image), "--weights", str(random_weights))
    assert done.returncode == 2
    assert "not a readable image" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("predict", str(FRACATLAS / "images" / "IMG0000007.jpg"), "--region",
                   "nose", "--weights", str(random_weights))
    assert done.returncode == 2 and "nose" in done.stderr
    done = run_cli("predict", str(FRACATLAS / "images" / "IMG0000007.jpg"),
                   "--weights", str(tmp_path))
    assert done.returncode == 2 and "no manifest.toml" in done.stderr
