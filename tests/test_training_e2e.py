"""A tiny end-to-end run of the project's own commands on real FracAtlas images: train (with an
interruption and --resume), calibrate, evaluate, predict."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.evaluation import PREDICTION_COLUMNS
from inference.manifest import read_manifest
from inference.training.config import ConfigError, load_config
from inference.training.split import load_split

from .conftest import REPO

MEMBER = """
[member]
name = "{name}"
arch = "{arch}"
input = "{input}"
size = {size}
[member.options]
width = 0.25
{options}
[training]
epochs = {epochs}
batch_size = 8
balanced_epochs = 1
"""


def write_config(folder: Path, epochs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.toml").write_text(MEMBER.format(
        name="a", arch="drn_d_22", input="both", size=64, epochs=epochs,
        options="map_head = true\nattention = true"))
    (folder / "b.toml").write_text(MEMBER.format(
        name="b", arch="drn_c_26", input="raw", size=48, epochs=1, options='pool = "spp"'))
    ensemble = folder / "tiny.toml"
    ensemble.write_text('[ensemble]\nname = "tiny"\nversion = "t1"\n'
                        'members = ["a.toml", "b.toml"]\n')
    return ensemble


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "inference", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_train_resume_calibrate_evaluate_predict(tiny_fracatlas: Path, tmp_path: Path) -> None:
    weights, runs = tmp_path / "weights", tmp_path / "runs"
    common = ("--data", str(tiny_fracatlas), "--out", str(weights), "--runs", str(runs),
              "--device", "cpu", "--no-progress")
    # one epoch of member a, as if the run had been stopped there ...
    cli("train", "--config", str(write_config(tmp_path / "cfg", epochs=1)), "--member", "a",
        *common)
    assert len((runs / "a" / "history.jsonl").read_text().splitlines()) == 1
    # ... then the whole ensemble with two epochs for a: a resumes at its second epoch
    config = write_config(tmp_path / "cfg", epochs=2)
    (runs / "a" / "done.json").unlink()
    done = cli("train", "--config", str(config), "--resume", *common)
    assert "a: resuming at epoch 2" in done.stderr
    history = [json.loads(line) for line in
               (runs / "a" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["balanced"] and not history[1]["balanced"]
    assert all(h["loss"] > 0 for h in history)
    manifest = read_manifest(weights)
    assert [m.name for m in manifest.members] == ["a", "b"]
    assert manifest.trained and manifest.name == "tiny"
    split = load_split(weights / "split.json")
    assert len(split.train) + len(split.tuning) + len(split.validation) == 75
    log = json.loads((weights / "training.json").read_text())
    assert set(log) == {"a", "b"} and log["a"]["epochs_run"] == 2

    # a time budget spent after the first epoch: one epoch run, and training.json says so
    budget = ("--out", str(tmp_path / "w-budget"), "--runs", str(tmp_path / "r-budget"))
    cli("train", "--config", str(config), "--member", "b", "--data", str(tiny_fracatlas),
        *budget, "--device", "cpu", "--no-progress", "--set", "epochs=3",
        "--set", "max_minutes=0.0001")
    summary = json.loads((tmp_path / "w-budget" / "training.json").read_text())["b"]
    assert (summary["stopped"], summary["epochs_run"]) == ("time_budget", 1)
    assert len((tmp_path / "r-budget" / "b" / "history.jsonl").read_text().splitlines()) == 1

    at_once = tmp_path / "eval-at-calibration"
    done = cli("calibrate", "--weights", str(weights), "--data", str(tiny_fracatlas),
               "--device", "cpu", "--version", "t2", "--evaluate-out", str(at_once))
    calibrated = read_manifest(weights)
    assert calibrated.version == "t2"
    assert "global" in calibrated.thresholds
    for t in calibrated.thresholds.values():
        assert 0 <= t.sensitivity <= t.high_specificity <= 1
    assert calibrated.calibration["images"] == len(split.tuning) + len(split.validation)

    out = tmp_path / "eval"
    cli("evaluate", "--weights", str(weights), "--data", str(tiny_fracatlas), "--out",
        str(out), "--device", "cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("n", "n_positive", "auc", "auc_ci", "sensitivity", "sensitivity_ci",
                "specificity", "specificity_ci", "ppv", "ppv_ci", "npv", "npv_ci",
                "per_region", "subgroups", "unambiguous", "localization"):
        assert key in metrics, key
    assert metrics["n"] == 75
    assert set(metrics["per_region"]) == {"hand", "leg", "hip", "shoulder"}
    assert {"frontal", "lateral"} <= set(metrics["subgroups"])
    assert (out / "report.md").read_text().startswith("# ")
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 75 and list(rows[0]) == list(PREDICTION_COLUMNS)
    for row in rows:
        boxes = json.loads(row["boxes"])
        assert (row["decision"] == "no_fracture") == (not boxes)
        positive = float(row["score"]) >= float(row["threshold"])
        assert positive == (row["decision"] != "no_fracture")
        assert row["group"] in calibrated.thresholds

    # calibrate --evaluate-out: the same as evaluate --subset validation, from one prediction run
    validation = tmp_path / "eval-validation"
    cli("evaluate", "--weights", str(weights), "--data", str(tiny_fracatlas), "--out",
        str(validation), "--device", "cpu", "--subset", "validation")
    separate = json.loads((validation / "metrics.json").read_text())
    assert separate["n"] == len(split.validation)
    assert json.loads((at_once / "metrics.json").read_text()) == separate

    image = next((tiny_fracatlas / "images").iterdir())
    result = json.loads(cli("predict", str(image), "--weights", str(weights), "--json").stdout)
    assert result[0]["decision"] in ("fracture", "possible_fracture", "no_fracture")


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    config = write_config(tmp_path, epochs=1)
    (tmp_path / "a.toml").write_text((tmp_path / "a.toml").read_text().replace(
        "drn_d_22", "resnet50"))
    with pytest.raises(ConfigError, match="resnet50"):
        load_config(config)
    (tmp_path / "a.toml").write_text("[member]\nname='a'\n")
    with pytest.raises(ConfigError, match=r"member\.arch is required"):
        load_config(config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["cpu-reference", "paper", "gpu-reference"])
def test_shipped_ensemble_configs_load(name: str) -> None:
    config = load_config(REPO / "configs" / f"{name}.toml")
    inputs = {m.draft.input for m in config.members}
    options = [m.draft.model_options() for m in config.members]
    assert inputs == {"raw", "lcn", "both"}
    assert any(o.map_head for o in options) and any(o.attention for o in options)
    assert any(o.pool == "spp" for o in options) and any(o.pool == "avg" for o in options)
    for member in config.members:
        attention = member.draft.model_options().attention
        assert member.training.loss_map_weight(attention) == (10.0 if attention else 3.0)
    if name == "paper":
        assert len(config.members) == 10
        assert {m.draft.size for m in config.members} == {1024}
        assert {m.draft.options["width"] for m in config.members} == {1.0}


CROSSFIT_MEMBER = """
[member]
name = "cf"
arch = "drn_d_22"
input = "both"
size = 64
[member.options]
width = 0.25
map_head = true
[training]
epochs = 2
batch_size = 8
balanced_epochs = 1
ema_decay = 0.9
select = "last"
small_size = 48
small_epochs = 1
label_smoothing = 0.1
"""


@pytest.mark.slow
def test_cross_fitted_ensemble_trains_calibrates_out_of_fold_and_evaluates(
    tiny_fracatlas: Path, tmp_path: Path
) -> None:
    (tmp_path / "cf.toml").write_text(CROSSFIT_MEMBER)
    config = tmp_path / "crossfit.toml"
    config.write_text('[ensemble]\nname = "cf"\nversion = "1"\nfolds = 3\ntta = ["hflip"]\n'
                      'members = ["cf.toml"]\n')
    weights, runs = tmp_path / "weights", tmp_path / "runs"
    common = ("--data", str(tiny_fracatlas), "--out", str(weights), "--runs", str(runs),
              "--device", "cpu", "--no-progress")
    cli("train", "--config", str(config), *common)
    manifest = read_manifest(weights)
    assert [(m.name, m.fold) for m in manifest.members] == [(f"cf-f{k}", k) for k in range(3)]
    assert manifest.tta == ("hflip",)
    split = load_split(weights / "split.json")
    assert len(split.folds) == 3
    for k in range(3):
        history = [json.loads(line) for line in
                   (runs / f"cf-f{k}" / "history.jsonl").read_text().splitlines()]
        assert [h["size"] for h in history] == [48, 64]  # progressive resizing
        assert all(h["tuning_auc_raw"] is not None for h in history)  # EMA: both recorded
        done = json.loads((runs / f"cf-f{k}" / "done.json").read_text())
        assert (done["stopped"], done["fold"]) == ("max_epochs", k)

    done = cli("calibrate", "--weights", str(weights), "--data", str(tiny_fracatlas),
               "--device", "cpu", "--evaluate-out", str(tmp_path / "eval"))
    calibrated = read_manifest(weights)
    # operating points from the out-of-fold scores of every development image
    assert calibrated.calibration["images"] == len(split.development)
    assert "out-of-fold" in str(calibrated.calibration["scores"])
    assert "out-of-fold" in done.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == len(split.validation)
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert {r["image"] for r in rows} == set(split.validation)


@pytest.mark.slow
def test_two_process_gloo_training_matches_the_batches_and_resumes(
    tiny_fracatlas: Path, tmp_path: Path
) -> None:
    """torchrun with 2 CPU processes (gloo), images streamed: one member trains, is stopped
    after its first epoch and resumed across both processes; rank 0 alone writes the history
    and the export."""
    config = write_config(tmp_path / "cfg", epochs=1)
    weights, runs = tmp_path / "weights", tmp_path / "runs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "inference", "train", "--config", str(config),
                "--member", "a", "--data", str(tiny_fracatlas), "--out", str(weights),
                "--runs", str(runs), "--device", "cpu", "--no-progress", "--stream"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*torchrun, *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=600, check=False, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    first = run()
    assert first.stdout.count("a: best tuning AUC") == 1  # printed by rank 0 only
    assert "on 2 x cpu" in first.stdout
    (runs / "a" / "done.json").unlink()
    resumed = run("--resume", "--set", "epochs=2")
    assert "a: resuming at epoch 2" in resumed.stderr
    history = [json.loads(line) for line in (runs / "a" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]  # one line per epoch, not one per process
    log = json.loads((weights / "training.json").read_text())
    assert (log["a"]["processes"], log["a"]["epochs_run"]) == (2, 2)
    assert [m.name for m in read_manifest(weights).members] == ["a"]
