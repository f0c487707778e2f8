"""The manifest, weights loading (hash checks) and ensemble prediction on random small members."""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.ensemble import Ensemble, member_input, select_device
from inference.export import MemberDraft, write_random_ensemble
from inference.imageio import read_grayscale
from inference.manifest import ManifestError, read_manifest, sha256_file, write_manifest
from inference.records import Decision, Thresholds

from .conftest import FRACATLAS, SMALL_MEMBERS


def test_manifest_round_trip(random_weights: Path) -> None:
    manifest = read_manifest(random_weights)
    assert [m.name for m in manifest.members] == [d.name for d in SMALL_MEMBERS]
    assert manifest.trained is False
    assert manifest.thresholds["global"].calibrated is False
    assert manifest.members[1].in_chans == 2 and manifest.members[0].in_chans == 1
    write_manifest(manifest)
    assert read_manifest(random_weights) == manifest
    for member in manifest.members:
        assert sha256_file(random_weights / member.weights) == member.sha256
        # readable by the service user whoever exported them (safetensors writes 0600)
        assert (random_weights / member.weights).stat().st_mode & 0o777 == 0o644


def test_load_refuses_a_changed_weights_file(random_weights: Path) -> None:
    path = random_weights / "raw-map.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"raw-map.*sha256"):
        Ensemble.load(random_weights, device="cpu")


def test_load_refuses_a_missing_weights_file(random_weights: Path) -> None:
    (random_weights / "lcn-att.safetensors").unlink()
    with pytest.raises(ManifestError, match=r"lcn-att.*missing"):
        Ensemble.load(random_weights, device="cpu")


def accept_hash_of(folder: Path, member: str) -> None:
    """Write the current hash of ``member``'s weights file into the manifest (as an attacker
    who can change both would)."""
    manifest = read_manifest(folder)
    members = tuple(
        replace(m, sha256=sha256_file(folder / m.weights)) if m.name == member else m
        for m in manifest.members
    )
    write_manifest(replace(manifest, members=members))


def test_load_refuses_a_malformed_weights_file_with_a_matching_hash(random_weights: Path) -> None:
    path = random_weights / "raw-map.safetensors"
    path.write_bytes(b"this is not safetensors")
    accept_hash_of(random_weights, "raw-map")
    with pytest.raises(ManifestError, match="not a valid safetensors"):
        Ensemble.load(random_weights, device="cpu")


class _Payload:
    """Unpickling this writes a file: what a malicious pickled "weights" file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path, str]]:
        return (Path.write_text, (self.marker, "pwned"))


def test_load_never_unpickles_a_pickled_weights_file(random_weights: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = random_weights / "raw-map.safetensors"
    with path.open("wb") as handle:
        pickle.dump({"weight": _Payload(marker)}, handle)
    accept_hash_of(random_weights, "raw-map")
    with pytest.raises(ManifestError, match="not a valid safetensors"):
        Ensemble.load(random_weights, device="cpu")
    assert not marker.exists()


def test_load_refuses_weights_of_another_architecture(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    write_random_ensemble(folder, [SMALL_MEMBERS[0]])
    other = tmp_path / "other"
    write_random_ensemble(
        other, [replace(SMALL_MEMBERS[0], options={"width": 0.5, "map_head": True})]
    )
    shutil.copy(other / "raw-map.safetensors", folder / "raw-map.safetensors")
    manifest = read_manifest(folder)
    member = replace(manifest.members[0], sha256=sha256_file(folder / "raw-map.safetensors"))
    write_manifest(replace(manifest, members=(member,)))
    with pytest.raises(ManifestError, match="shape"):
        Ensemble.load(folder, device="cpu")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("[ensemble]\nname='x'\nversion='1'\ntrained=false\n", "members"),
    ],
)
def test_malformed_manifest_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "manifest.toml").write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_manifest_without_global_thresholds_is_refused(random_weights: Path) -> None:
    path = random_weights / "manifest.toml"
    path.write_text(path.read_text().replace("[thresholds.global]", "[thresholds.hand]"))
    with pytest.raises(ManifestError, match="global"):
        read_manifest(random_weights)


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest\.toml"):
        Ensemble.load(tmp_path, device="cpu")


def test_member_inputs_follow_the_input_kind(random_weights: Path) -> None:
    ensemble = Ensemble.load(random_weights, device="cpu")
    image = read_grayscale(FRACATLAS / "images" / "IMG0000019.jpg")
    prepared = ensemble.preprocess_all([image])
    assert set(prepared) == {64, 48}
    for spec in ensemble.manifest.members:
        batch = member_input(spec, prepared[spec.size])
        assert batch.shape == (1, spec.in_chans, spec.size, spec.size)
        view = prepared[spec.size][0]
        expected = {"raw": [view.raw], "lcn": [view.lcn], "both": [view.raw, view.lcn]}
        np.testing.assert_array_equal(batch[0].numpy(), np.stack(expected[spec.input]))


def test_scores_and_maps_are_unweighted_means(random_weights: Path) -> None:
    ensemble = Ensemble.load(random_weights, device="cpu")
    images = [
        read_grayscale(FRACATLAS / "images" / name)
        for name in ("IMG0000019.jpg", "IMG0000007.jpg", "IMG0000003.jpg")
    ]
    outputs = ensemble.predict(images)
    prepared = ensemble.preprocess_all(images)
    for index, spec in enumerate(ensemble.manifest.members):
        with torch.inference_mode():
            out = ensemble.models[index](member_input(spec, prepared[spec.size]))
        member = torch.sigmoid(out.score_logit).numpy()
        for i, o in enumerate(outputs):
            assert o.member_scores[index] == pytest.approx(float(member[i]), abs=1e-6)
    for o in outputs:
        assert o.score == pytest.approx(float(np.mean(o.member_scores)), abs=1e-12)
        assert o.prob_map is not None and o.prob_map.shape == (64, 64)
        assert 0.0 <= o.prob_map.min() <= o.prob_map.max() <= 1.0
    # the map is the mean of the two map members only (both at 64 px: no resizing)
    map_members = [i for i, m in enumerate(ensemble.manifest.members) if m.options.map_head]
    with torch.inference_mode():
        maps = [
            torch.sigmoid(
                ensemble.models[i](
                    member_input(ensemble.manifest.members[i], prepared[64])
                ).map_logit
            )[:, 0].numpy()
            for i in map_members
        ]
    np.testing.assert_allclose(outputs[0].prob_map, (maps[0][0] + maps[1][0]) / 2, atol=1e-6)


def test_a_batch_of_views_gives_the_same_results_as_one_at_a_time(random_weights: Path) -> None:
    ensemble = Ensemble.load(random_weights, device="cpu")
    images = [
        read_grayscale(FRACATLAS / "images" / n) for n in ("IMG0000019.jpg", "IMG0000025.jpg")
    ]
    together = ensemble.predict(images)
    alone = [ensemble.predict([image])[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_analyse_uses_the_region_group_and_maps_boxes_to_original_pixels(tmp_path: Path) -> None:
    thresholds = {
        "global": Thresholds(0.0, 1.0, 0.0, calibrated=True),  # everything "possible"
        "hand": Thresholds(0.0, 0.0, 0.0, calibrated=True),  # everything "fracture"
    }
    folder = tmp_path / "w"
    write_random_ensemble(folder, SMALL_MEMBERS, thresholds=thresholds)
    ensemble = Ensemble.load(folder, device="cpu")
    image = read_grayscale(FRACATLAS / "images" / "IMG0000019.jpg")
    results, timings = ensemble.analyse([image, image], ["wrist", "elbow"])
    wrist, elbow = results
    assert (wrist.group, wrist.group_fallback, wrist.decision) == ("hand", False, Decision.FRACTURE)
    assert (elbow.group, elbow.group_fallback, elbow.decision) == (
        "global",
        True,
        Decision.POSSIBLE_FRACTURE,
    )
    rows, cols = image.shape
    for result in results:
        assert result.boxes, "a positive image always gets a box"
        for box in result.boxes:
            assert 0 <= box.x0 < box.x1 <= cols and 0 <= box.y0 < box.y1 <= rows
    assert timings.inference > 0


def test_analyse_checks_its_arguments(random_weights: Path) -> None:
    ensemble = Ensemble.load(random_weights, device="cpu")
    with pytest.raises(ValueError, match="1 images but 2 regions"):
        ensemble.analyse([np.zeros((64, 64))], [None, None])
    assert ensemble.analyse([], []) == ([], ensemble.analyse([], [])[1])


def test_bad_images_raise_value_errors(random_weights: Path) -> None:
    ensemble = Ensemble.load(random_weights, device="cpu")
    with pytest.raises(ValueError, match="constant"):
        ensemble.predict([np.full((100, 100), 7, dtype=np.uint16)])


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            select_device("cuda")


def test_random_folder_is_marked_untrained_and_uncalibrated(tmp_path: Path) -> None:
    manifest = write_random_ensemble(
        tmp_path / "w", [MemberDraft("m", "drn_d_22", "raw", 32, {"width": 0.25})]
    )
    assert not manifest.trained
    assert "not trained" in manifest.description
    assert all(not t.calibrated for t in manifest.thresholds.values())
