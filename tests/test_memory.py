"""Memory bounded by configuration: chunked analysis gives the results of one batch, and
``max_batch = auto`` sizes the chunks from the free memory (``inference/memory.py``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from inference import ensemble as ensemble_module
from inference.ensemble import Ensemble
from inference.imageio import read_grayscale
from inference.memory import (
    AUTO_CAP,
    MAX_BATCH_LIMIT,
    auto_max_batch,
    cgroup_dirs,
    cgroup_room,
    check_max_batch,
    chunk_bounds,
    largest_activation,
    member_image_bytes,
    meminfo_available,
)
from inference.preprocess import Preprocessed
from tests.conftest import FRACATLAS, REPO, pick_images

MIB = 2**20
GIB = 2**30


def real_images(count: int) -> list[np.ndarray]:
    return [read_grayscale(FRACATLAS / "images" / name) for name in pick_images(1)[:count]]


# -- chunks and the auto rule (pure functions) ---------------------------------------------------


@given(st.integers(0, 200), st.integers(1, 70))
def test_chunks_cover_the_views_in_order_with_balanced_sizes(count: int, max_batch: int) -> None:
    bounds = chunk_bounds(count, max_batch)
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(count))
    sizes = [stop - start for start, stop in bounds]
    assert all(1 <= size <= max_batch for size in sizes)
    assert len(bounds) == -(-count // max_batch)  # as few chunks as max_batch allows
    assert not sizes or max(sizes) - min(sizes) <= 1


def test_chunk_examples() -> None:
    assert chunk_bounds(60, 60) == [(0, 60)]
    assert chunk_bounds(33, 32) == [(0, 17), (17, 33)]
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(0, 4) == []
    with pytest.raises(ValueError, match="max_batch >= 1"):
        chunk_bounds(3, 0)


def test_auto_max_batch_fits_half_the_free_memory_within_its_bounds() -> None:
    per_image = 50 * MIB
    assert auto_max_batch(1 * GIB, per_image, cap=8) == 8  # room for 10: capped
    assert auto_max_batch(1 * GIB, per_image, cap=64) == 10  # half of 1 GiB / 50 MiB
    assert auto_max_batch(300 * MIB, per_image, cap=8) == 3
    assert auto_max_batch(60 * MIB, per_image, cap=8) == 1  # less than one image: still one
    assert auto_max_batch(0, per_image, cap=8) == 1
    assert auto_max_batch(-5, per_image, cap=8) == 1
    assert auto_max_batch(1 * GIB, per_image, cap=64, safety=1.0) == 20
    with pytest.raises(ValueError, match="image_bytes > 0"):
        auto_max_batch(1 * GIB, 0, cap=8)


@given(st.integers(0, 2**40), st.integers(2**20, 2**32), st.integers(1, 64))
def test_auto_max_batch_grows_with_free_memory_and_stays_in_bounds(
    available: int, per_image: int, cap: int
) -> None:
    chosen = auto_max_batch(available, per_image, cap)
    assert 1 <= chosen <= cap
    assert chosen == 1 or chosen * per_image <= available // 2
    assert auto_max_batch(available * 2, per_image, cap) >= chosen


def test_max_batch_setting_is_checked() -> None:
    assert check_max_batch(None) is None and check_max_batch(3) == 3
    for bad in (0, -1, MAX_BATCH_LIMIT + 1, True, 2.0, "auto"):
        with pytest.raises(ValueError, match="max_batch must be None"):
            check_max_batch(bad)


def test_shipped_estimate_gives_sane_chunks_for_a_given_free_memory() -> None:
    """The shipped ensemble (5 members at 384 px, width 0.5): tens of MiB per image, so a
    machine with 8 GiB free gets the CPU cap, one with 256 MiB free a few views, and one with
    almost nothing free still analyses one view at a time."""
    ensemble = Ensemble.load(REPO / "ensemble_weights", device="cpu")
    per_image = ensemble.image_bytes
    assert 20 * MIB < per_image < 200 * MIB
    cap = AUTO_CAP["cpu"]
    assert auto_max_batch(8 * GIB, per_image, cap) == cap
    assert 1 <= auto_max_batch(256 * MIB, per_image, cap) < cap
    assert auto_max_batch(10 * MIB, per_image, cap) == 1


def test_largest_activation_is_probed_small_and_scaled_by_the_area() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 16, 3, stride=2, padding=1)
    ).eval()
    assert largest_activation(model, 2, 48) == 6 * 48 * 48  # 16 x 24 x 24 is smaller
    assert largest_activation(model, 2, 1024) == 6 * 1024 * 1024  # probed at 64 px
    deep = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 64, 3, stride=4, padding=1))
    assert largest_activation(deep.eval(), 1, 512) == 64 * 128 * 128
    assert member_image_bytes(1000, flip=False, factor=2.0) == 8000
    assert member_image_bytes(1000, flip=True, factor=2.0) == 16000


def test_meminfo_and_cgroup_limits_are_read() -> None:
    assert meminfo_available("MemTotal: 100 kB\nMemAvailable:    2048 kB\n") == 2 * MIB
    assert meminfo_available("MemTotal: 100 kB\n") is None
    stat = "anon 1000\ninactive_file 300\n"
    assert cgroup_room("max\n", "5000\n", stat, v1=False) is None
    assert cgroup_room("4000\n", "1500\n", stat, v1=False) == 4000 - 1200
    assert cgroup_room("1000\n", "5000\n", "", v1=False) == 0
    assert cgroup_room("9223372036854771712\n", "5\n", "", v1=True) is None  # v1: no limit
    v1_stat = "total_inactive_file 100\n"
    assert cgroup_room("1000\n", "600\n", v1_stat, v1=True) == 500


def test_cgroup_folders_cover_the_service_and_its_slices(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    own = "0::/system.slice/dicomnode.service\n"
    assert [d for d, _ in cgroup_dirs(own, tmp_path)] == [
        tmp_path / "system.slice" / "dicomnode.service",
        tmp_path / "system.slice",
        tmp_path,
    ]
    v1 = "4:memory:/docker/abc\n1:cpu:/\n"
    assert cgroup_dirs(v1, tmp_path / "v1") == [
        (tmp_path / "v1" / "memory" / "docker" / "abc", True),
        (tmp_path / "v1" / "memory", True),
    ]


# -- the ensemble: chunks give the results of one batch ------------------------------------------


def test_a_study_gives_the_same_results_in_any_chunking() -> None:
    """Real images and the shipped weights (fp32): max_batch 1, 2 and N give the same scores
    (float noise only), decisions and boxes."""
    ensemble = Ensemble.load(REPO / "ensemble_weights", device="cpu")
    images = real_images(3)
    regions: Sequence[str | None] = ["wrist", "ankle", None]
    one_batch, _ = ensemble.analyse(images, regions, max_batch=len(images))
    for max_batch in (1, 2):
        chunked, timings = ensemble.analyse(images, regions, max_batch=max_batch)
        assert timings.inference > 0
        for a, b in zip(chunked, one_batch, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-6)
            assert (a.decision, a.group, a.region) == (b.decision, b.group, b.region)
            assert len(a.boxes) == len(b.boxes)
            for box_a, box_b in zip(a.boxes, b.boxes, strict=True):
                assert (box_a.x0, box_a.y0, box_a.x1, box_a.y1) == pytest.approx(
                    (box_b.x0, box_b.y0, box_b.x1, box_b.y1), abs=1e-6
                )
                assert box_a.score == pytest.approx(box_b.score, abs=1e-6)


def test_maps_and_preprocessing_are_per_image(random_weights: Path) -> None:
    """Members at two sizes (maps resized before averaging): each image's averaged map, score
    and transform are the same whatever else is in its chunk."""
    ensemble = Ensemble.load(random_weights, device="cpu")
    images = real_images(4)
    together = ensemble.predict(images, max_batch=4)
    for max_batch in (1, 3):
        for a, b in zip(ensemble.predict(images, max_batch=max_batch), together, strict=True):
            assert a.transform == b.transform
            assert a.member_scores == pytest.approx(b.member_scores, abs=1e-6)
            assert a.prob_map is not None and b.prob_map is not None
            np.testing.assert_allclose(a.prob_map, b.prob_map, atol=1e-6)


def test_only_one_chunk_of_preprocessed_inputs_is_alive_at_a_time(
    random_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """analyse pre-processes chunk by chunk, and a chunk's inputs are released before the next
    chunk is pre-processed: memory follows max_batch, not the study's size."""
    ensemble = Ensemble.load(random_weights, device="cpu", max_batch=2)
    images = real_images(5)
    seen: list[int] = []
    alive_before: list[int] = []
    earlier: list[weakref.ref[Preprocessed]] = []
    preprocess_all = ensemble.preprocess_all

    def tracked(chunk: Sequence[np.ndarray]) -> dict[int, list[Preprocessed]]:
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in earlier))
        prepared = preprocess_all(chunk)
        seen.append(len(chunk))
        earlier.extend(weakref.ref(v) for views in prepared.values() for v in views)
        return prepared

    monkeypatch.setattr(ensemble, "preprocess_all", tracked)
    results, _ = ensemble.analyse(images, [None] * len(images))
    assert len(results) == 5
    assert seen == [2, 2, 1]
    assert alive_before == [0, 0, 0]


def test_auto_sizes_the_chunks_from_the_free_memory(
    random_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensemble = Ensemble.load(random_weights, device="cpu")
    assert ensemble.max_batch is None
    per_image = ensemble.image_bytes
    monkeypatch.setattr(ensemble_module, "available_bytes", lambda _device: 6 * per_image)
    assert ensemble.batch_size(60) == 3  # half of the free memory: 3 images
    assert ensemble.batch_size(2) == 2  # never more than the study has
    monkeypatch.setattr(ensemble_module, "available_bytes", lambda _device: 0)
    assert ensemble.batch_size(60) == 1
    monkeypatch.setattr(ensemble_module, "available_bytes", lambda _device: 1000 * per_image)
    assert ensemble.batch_size(60) == AUTO_CAP["cpu"]
    assert ensemble.batch_size(60, max_batch=12) == 12  # a per-call setting wins
    fixed = Ensemble.load(random_weights, device="cpu", max_batch=5)
    assert fixed.batch_size(60) == 5 and fixed.restricted(["raw-map"]).max_batch == 5
    with pytest.raises(ValueError, match="max_batch must be"):
        Ensemble.load(random_weights, device="cpu", max_batch=0)


def test_cuda_free_memory_counts_the_allocator_cache() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from inference.memory import cuda_available_bytes

    free, total = torch.cuda.mem_get_info()
    assert free <= cuda_available_bytes(torch.device("cuda")) <= total
