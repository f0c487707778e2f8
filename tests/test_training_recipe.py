"""The training recipe beyond the paper's: cross-fitting folds, weight averaging, label
smoothing, progressive resizing, mirror test-time augmentation, and the arithmetic that keeps
data-parallel training equal to one process."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.ensemble import Ensemble
from inference.export import MemberDraft, write_random_ensemble
from inference.imageio import read_grayscale
from inference.manifest import ManifestError, read_manifest, write_manifest
from inference.training.config import ConfigError, TrainSettings, load_config
from inference.training.dataset import Record, load_dataset
from inference.training.distributed import (
    SINGLE,
    World,
    gather_scores,
    per_rank_batch,
    shard,
    world_from_env,
)
from inference.training.loss import joint_loss
from inference.training.split import (
    Split,
    group_key,
    load_split,
    save_split,
    split_dataset,
    stratum,
    with_folds,
)
from inference.training.train import LoopState, input_size, member_ids, resized

from .conftest import FRACATLAS, REPO


@pytest.fixture(scope="module")
def atlas() -> list[Record]:
    return load_dataset(FRACATLAS)


@pytest.fixture(scope="module")
def folded(atlas: list[Record]) -> Split:
    return with_folds(load_split(REPO / "ensemble_weights" / "split.json"), atlas, 5, seed=0)


def test_folds_cover_the_development_images_and_leave_validation_alone(
    atlas: list[Record], folded: Split
) -> None:
    shipped = load_split(REPO / "ensemble_weights" / "split.json")
    assert (folded.train, folded.tuning, folded.validation) == (
        shipped.train, shipped.tuning, shipped.validation)
    everything = [i for fold in folded.folds for i in fold]
    assert len(everything) == len(set(everything)) == len(shipped.train) + len(shipped.tuning)
    assert set(everything) == set(folded.development)
    assert not set(everything) & set(folded.validation)
    sizes = [len(f) for f in folded.folds]
    assert max(sizes) - min(sizes) <= 0.05 * max(sizes)


def test_folds_keep_near_duplicates_together_and_spread_the_strata(
    atlas: list[Record], folded: Split
) -> None:
    fold_of = folded.fold_of()
    by_group: dict[str, set[int]] = {}
    for record in atlas:
        if record.image_id in fold_of:
            by_group.setdefault(group_key(record), set()).add(fold_of[record.image_id])
    assert all(len(folds) == 1 for folds in by_group.values())
    strata = Counter(stratum(r) for r in atlas if r.image_id in fold_of)
    for name, total in strata.items():
        if total < 50:
            continue
        per_fold = Counter(fold_of[r.image_id] for r in atlas
                           if r.image_id in fold_of and stratum(r) == name)
        assert all(abs(per_fold[k] - total / 5) <= 0.2 * total / 5 + 2 for k in range(5)), name


def test_a_fold_member_learns_outside_its_fold_and_is_tuned_on_it(folded: Split) -> None:
    config = load_config(REPO / "configs" / "cpu-crossfit.toml")
    assert [m.draft.name for m in config.members] == [f"cf-d22-both-map-f{k}" for k in range(5)]
    assert config.tta == ("hflip",) and config.folds == 5
    for member in config.members:
        train, tune = member_ids(member, folded)
        assert member.fold is not None and tune == folded.folds[member.fold]
        assert set(train) | set(tune) == set(folded.development)
        assert not set(train) & set(tune)
        assert not (set(train) | set(tune)) & set(folded.validation)
    seen = Counter(i for m in config.members for i in member_ids(m, folded)[0])
    assert set(seen.values()) == {4}  # every development image trains four of the five


def test_split_with_folds_round_trips_and_refuses_bad_folds(
    tmp_path: Path, atlas: list[Record], folded: Split
) -> None:
    save_split(folded, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == folded
    plain = split_dataset(atlas, seed=0)
    save_split(plain, tmp_path / "plain.json")
    assert "folds" not in (tmp_path / "plain.json").read_text()
    assert load_split(tmp_path / "plain.json").folds == ()
    with pytest.raises(ValueError, match="cover exactly"):
        Split(plain.train, plain.tuning, plain.validation, folds=(plain.train, plain.tuning[1:]))
    with pytest.raises(ValueError, match="cover exactly"):
        Split(plain.train, plain.tuning, plain.validation,
              folds=(plain.train, plain.tuning + plain.validation[:1]))
    with pytest.raises(ValueError, match="at least 2"):
        Split(plain.train, plain.tuning, plain.validation, folds=(plain.development,))
    with pytest.raises(ValueError, match="fold 5 does not exist"):
        folded.fold_parts(5)


def test_config_refuses_bad_folds_and_tta(tmp_path: Path) -> None:
    member = REPO / "configs" / "members" / "cf-d22-both-map.toml"
    for line, message in (("folds = 1", "folds"), ('tta = ["vflip"]', "tta")):
        path = tmp_path / "e.toml"
        path.write_text(f'[ensemble]\nname = "e"\nversion = "1"\n{line}\n'
                        f'members = ["{member}"]\n')
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainSettings(ema_decay=1.0)
    with pytest.raises(ConfigError, match="select"):
        TrainSettings(select="median")
    with pytest.raises(ConfigError, match="small_size"):
        TrainSettings(small_epochs=3)


DRAFTS = [
    MemberDraft("a-f0", "drn_d_22", "both", 64, {"width": 0.25, "map_head": True}, fold=0),
    MemberDraft("a-f1", "drn_d_22", "both", 64, {"width": 0.25, "map_head": True}, fold=1),
]


def test_manifest_keeps_folds_and_tta(tmp_path: Path) -> None:
    manifest = write_random_ensemble(tmp_path, DRAFTS)
    assert [m.fold for m in manifest.members] == [0, 1] and manifest.folds == (0, 1)
    from dataclasses import replace

    write_manifest(replace(manifest, tta=("hflip",)))
    again = read_manifest(tmp_path)
    assert again.tta == ("hflip",) and again.folds == (0, 1)
    text = (tmp_path / "manifest.toml").read_text()
    assert 'tta = ["hflip"]' in text and "fold = 1" in text
    (tmp_path / "manifest.toml").write_text(text.replace("fold = 1\n", ""))
    with pytest.raises(ManifestError, match="every member names its fold"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.toml").write_text(text.replace('["hflip"]', '["rot90"]'))
    with pytest.raises(ManifestError, match="tta"):
        read_manifest(tmp_path)


def test_mirror_tta_makes_the_score_and_map_mirror_invariant(tmp_path: Path) -> None:
    from dataclasses import replace

    manifest = write_random_ensemble(tmp_path, DRAFTS, seed=3)
    # a square, lopsided image without black borders: pre-processing mirrors exactly with it
    rows, cols = np.mgrid[0:128, 0:128]
    image = (1000 + 8 * cols + 3 * rows + 400 * (np.hypot(rows - 40, cols - 90) < 20)).astype(
        np.uint16)
    mirrored = np.ascontiguousarray(image[:, ::-1])
    plain = Ensemble.load(tmp_path, device="cpu")
    p_image, p_mirror = plain.predict([image, mirrored])
    asymmetry = max(abs(x - y) for x, y in zip(p_image.member_scores, p_mirror.member_scores,
                                                strict=True))
    assert asymmetry > 1e-5  # a random network is not mirror-symmetric ...
    write_manifest(replace(manifest, tta=("hflip",)))
    tta = Ensemble.load(tmp_path, device="cpu")
    a, b = tta.predict([image, mirrored])
    for x, y in zip(a.member_scores, b.member_scores, strict=True):  # ... the averaged one is
        assert abs(x - y) < asymmetry / 100
    assert a.prob_map is not None and b.prob_map is not None
    np.testing.assert_allclose(a.prob_map, b.prob_map[:, ::-1], atol=1e-6)
    # and its score is the mean of the plain scores of the image and of its mirror
    assert a.score == pytest.approx((p_image.score + p_mirror.score) / 2, abs=1e-6)


def test_restricted_ensemble_runs_only_the_named_members(tmp_path: Path) -> None:
    write_random_ensemble(tmp_path, DRAFTS, seed=4)
    ensemble = Ensemble.load(tmp_path, device="cpu")
    image = read_grayscale(FRACATLAS / "images" / "IMG0000019.jpg")
    full = ensemble.predict([image])[0]
    only = ensemble.restricted(["a-f1"]).predict([image])[0]
    assert only.member_scores == (full.member_scores[1],)
    with pytest.raises(ValueError, match="not every member"):
        ensemble.restricted(["a-f7"])


def test_loop_state_stops_and_keeps_the_best() -> None:
    settings = TrainSettings(epochs=5, patience=2)
    loop = LoopState()
    assert [loop.record(auc) for auc in (0.6, 0.7, 0.65)] == [True, True, False]
    assert (loop.best_epoch, loop.stale, loop.epoch) == (1, 1, 3)
    assert loop.stop_reason(settings) is None
    loop.record(0.69)
    assert loop.stop_reason(settings) == "early_stopping"
    # with select = last there is no early stopping: the schedule runs to its end
    assert loop.stop_reason(TrainSettings(epochs=5, patience=2, select="last")) is None
    loop.record(0.5)
    assert loop.stop_reason(TrainSettings(epochs=5, select="last")) == "max_epochs"
    again = LoopState.from_checkpoint(loop.to_checkpoint())
    assert again == loop


def test_progressive_resizing_and_label_smoothing() -> None:
    settings = TrainSettings(small_size=64, small_epochs=2)
    assert [input_size(settings, 96, e) for e in range(4)] == [64, 64, 96, 96]
    x = torch.ones(2, 2, 96, 96)
    mask = torch.zeros(2, 1, 96, 96)
    mask[:, :, :48] = 1
    small_x, small_mask = resized(x, mask, 64)
    assert small_x.shape == (2, 2, 64, 64) and torch.allclose(small_x, torch.ones(1))
    assert float(small_mask.mean()) == pytest.approx(0.5)
    logit = torch.tensor([10.0, -10.0])
    label = torch.tensor([1.0, 0.0])
    sharp = joint_loss(logit, None, label, None).image
    smooth = joint_loss(logit, None, label, None, smoothing=0.1).image
    # targets 0.95 / 0.05: BCE(10, 0.95) = softplus(-10) + 0.05 * 10
    expected = float(torch.nn.functional.softplus(torch.tensor(-10.0))) + 0.5
    assert float(sharp) < 1e-3 and float(smooth) == pytest.approx(expected, rel=1e-4)


def test_ranks_together_take_the_one_process_batches() -> None:
    order = np.random.default_rng(0).permutation(100)
    batch = 8
    for size in (2, 4):
        worlds = [World(rank=r, size=size) for r in range(size)]
        shards = [shard(order, w) for w in worlds]
        assert len({len(s) for s in shards}) == 1  # equal steps on every rank
        local = per_rank_batch(batch, worlds[0])
        for step in range(len(order) // batch):
            together = sorted(int(i) for s in shards for i in s[step * local:(step + 1) * local])
            assert together == sorted(order[step * batch:(step + 1) * batch].tolist())
    with pytest.raises(ValueError, match="multiple"):
        per_rank_batch(30, World(rank=0, size=4))
    padded = shard(np.arange(7), World(rank=2, size=4))
    assert padded.tolist() == [2, 6]
    assert shard(order, SINGLE) is order


def test_torchrun_with_one_process_takes_the_distributed_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() == SINGLE and not SINGLE.distributed
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    one = world_from_env()
    assert one.size == 1 and one.launched and one.distributed and one.main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="outside"):
        world_from_env()


def test_gathered_scores_come_back_in_order_single_process() -> None:
    scores = np.linspace(0, 1, 9)
    assert gather_scores(scores, 9, SINGLE) is scores


def test_streamed_cached_and_in_memory_inputs_are_the_same(
    tiny_fracatlas: Path, tmp_path: Path
) -> None:
    from inference.preprocess import PreprocessSettings
    from inference.training.prepare import StreamingData, prepare

    records = load_dataset(tiny_fracatlas)[:12]
    settings = PreprocessSettings()
    memory = prepare(records, size=64, settings=settings, workers=1)
    cached = prepare(records, size=64, settings=settings, cache_dir=tmp_path, workers=2)
    assert isinstance(cached.images, np.memmap)  # written to and read from disk, not held
    again = prepare(records, size=64, settings=settings, cache_dir=tmp_path, workers=2)
    stream = StreamingData(tuple(records), 64, settings)
    assert memory.ids == cached.ids == again.ids == stream.ids
    assert (memory.labels == stream.labels).all() and (cached.labels == stream.labels).all()
    for i in range(len(records)):
        planes, mask = stream.item(i)
        for other in (memory, cached, again):
            other_planes, other_mask = other.item(i)
            assert np.array_equal(planes, other_planes) and np.array_equal(mask, other_mask)
    assert stream.index_of([records[3].image_id]).tolist() == [3]
