"""The ensemble committed in ensemble_weights/: trained, calibrated, hash-checked, and it runs."""

from __future__ import annotations

import json

from inference.ensemble import Ensemble
from inference.imageio import read_grayscale
from inference.manifest import read_manifest
from inference.training.dataset import load_dataset
from inference.training.split import load_split

from .conftest import FRACATLAS, REPO

WEIGHTS = REPO / "ensemble_weights"


def test_manifest_says_trained_and_calibrated() -> None:
    manifest = read_manifest(WEIGHTS)
    assert manifest.trained
    assert manifest.thresholds["global"].calibrated
    # cross-fitted: one member per fold of the development split, every fold covered, so the
    # operating points come from out-of-fold scores of every development image
    split = load_split(WEIGHTS / "split.json")
    folds = sorted(m.fold for m in manifest.members)
    assert folds == list(range(len(split.folds))) == [0, 1, 2, 3, 4]
    assert all(m.input == "both" and m.options.map_head for m in manifest.members)
    assert manifest.tta == ()  # mirror TTA measured and dropped (model card)
    total = sum((WEIGHTS / m.weights).stat().st_size for m in manifest.members)
    assert total <= 60_000_000
    assert (WEIGHTS / "MODEL_CARD.md").is_file()


def test_split_covers_the_dataset_and_the_log_names_every_member() -> None:
    split = load_split(WEIGHTS / "split.json")
    ids = {r.image_id for r in load_dataset(FRACATLAS)}
    assert set(split.train) | set(split.tuning) | set(split.validation) == ids
    folds = [set(fold) for fold in split.folds]
    assert set().union(*folds) == set(split.development)
    assert sum(len(f) for f in folds) == len(split.development)  # disjoint
    assert not set(split.validation) & set(split.development)
    log = json.loads((WEIGHTS / "training.json").read_text())
    assert set(log) == {m.name for m in read_manifest(WEIGHTS).members}


def test_shipped_ensemble_runs_on_a_committed_sample() -> None:
    ensemble = Ensemble.load(WEIGHTS, device="cpu")
    sample = sorted((REPO / "samples" / "fracatlas").glob("*.jpg"))[0]
    results, _ = ensemble.analyse([read_grayscale(sample)], ["wrist"])
    assert 0.0 <= results[0].score <= 1.0
    assert results[0].group == "hand" and not results[0].group_fallback
