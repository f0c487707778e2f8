"""Training one ensemble member, and an ensemble member by member (Jones et al. 2020, "Model
training"): Adam, random initialisation, region x label balanced sampling for the first epochs,
the joint loss, early stopping on the tuning AUC, the best checkpoint kept.

A run folder per member holds ``last.pt`` (model, optimizer and loop state after every epoch, read
back with ``torch.load(weights_only=True)``), ``best.safetensors`` (the best weights so far),
``history.jsonl`` (one line per epoch) and, once finished, ``done.json``. ``--resume`` continues
from ``last.pt``; the per-epoch random streams derive from (seed, epoch), so a resumed run draws
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from inference.export import add_member, empty_manifest
from inference.models import DRN, build_model
from inference.precision import resolve_speed
from inference.training.augment import AugmentSettings, augment
from inference.training.config import EnsembleConfig, MemberConfig, TrainSettings
from inference.training.dataset import Record, load_dataset
from inference.training.distributed import (
    SINGLE,
    World,
    all_max,
    all_mean,
    barrier,
    gather_scores,
    per_rank_batch,
    shard,
)
from inference.training.loss import joint_loss
from inference.training.prepare import StreamingData, TrainingData, prepare
from inference.training.sampler import epoch_indices, sampling_strata
from inference.training.split import Split, load_split, save_split, split_dataset, with_folds

CHANNELS = {"raw": (0,), "lcn": (1,), "both": (0, 1)}


class Samples(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The images of one epoch in draw order, augmented with a per-sample seeded generator.

    ``order`` may be one rank's shard of the epoch (every ``stride``-th image from ``first``):
    the generator is seeded with the image's position in the whole epoch, so an image is
    augmented the same way whatever the number of processes."""

    def __init__(
        self,
        data: TrainingData,
        order: np.ndarray,
        channels: tuple[int, ...],
        settings: AugmentSettings | None,
        seed: Sequence[int],
        *,
        first: int = 0,
        stride: int = 1,
    ) -> None:
        self.data, self.order, self.channels = data, order, channels
        self.settings, self.seed = settings, tuple(seed)
        self.first, self.stride = first, stride

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = int(self.order[k])
        planes, mask = self.data.item(i)
        image = np.asarray(planes[list(self.channels)], dtype=np.float32)
        if self.settings is not None:
            rng = np.random.default_rng([*self.seed, self.first + k * self.stride])
            raw = self.channels.index(0) if 0 in self.channels else None  # gamma/contrast: raw only
            image, mask = augment(image, mask, rng, self.settings, raw_channel=raw)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
            torch.tensor(float(self.data.labels[i])),
        )


@dataclass(frozen=True)
class EpochRecord:
    """One line of ``history.jsonl``. ``tuning_auc`` is the AUC of the weights that are kept
    (the moving average where ``ema_decay`` is set); ``tuning_auc_raw`` that of the trained
    weights themselves (only with EMA, to show what the average adds)."""

    epoch: int
    loss: float
    image_loss: float
    map_loss: float
    tuning_auc: float
    seconds: float
    balanced: bool
    size: int
    tuning_auc_raw: float | None = None


@dataclass(frozen=True)
class MemberResult:
    name: str
    best_epoch: int
    best_tuning_auc: float
    epochs_run: int
    seconds: float
    stopped: str
    device: str
    precision: str
    processes: int = 1
    fold: int | None = None
    final_tuning_auc: float | None = None  # of the last epoch's kept weights


@dataclass
class LoopState:
    """Where a member's training stands; saved in ``last.pt`` after every epoch."""

    epoch: int = 0  # the next epoch to run (0-based) = epochs completed
    best_auc: float = -1.0
    best_epoch: int = -1  # 0-based; -1: none yet
    stale: int = 0  # epochs since the best
    elapsed: float = 0.0  # seconds of training so far

    def to_checkpoint(self) -> dict[str, float | int]:
        # "epoch" is the last completed epoch, as in checkpoints written before this record
        return {
            "epoch": self.epoch - 1,
            "best_auc": self.best_auc,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
            "elapsed": self.elapsed,
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> LoopState:
        return cls(
            epoch=int(state["epoch"]) + 1,
            best_auc=float(state["best_auc"]),
            best_epoch=int(state["best_epoch"]),
            stale=int(state["stale"]),
            elapsed=float(state["elapsed"]),
        )

    def stop_reason(self, settings: TrainSettings) -> str | None:
        """Why no further epoch runs (None: go on)."""
        if self.epoch >= settings.epochs:
            return "max_epochs"
        if settings.select == "best" and self.stale >= settings.patience:
            return "early_stopping"
        if settings.max_minutes and self.elapsed >= settings.max_minutes * 60:
            return "time_budget"
        return None

    def record(self, auc: float) -> bool:
        """Count a finished epoch's tuning AUC; True if it is the best so far."""
        better = self.best_epoch < 0 or auc > self.best_auc  # NaN AUC: keep the first
        if better:
            self.best_auc, self.best_epoch, self.stale = auc, self.epoch, 0
        else:
            self.stale += 1
        self.epoch += 1
        return better


def member_ids(member: MemberConfig, split: Split) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training ids, tuning ids): the split's train and tuning sets, or for a cross-fitted
    member the development images outside its fold and the fold."""
    if member.fold is None:
        return split.train, split.tuning
    return split.fold_parts(member.fold)


def _workers(settings: TrainSettings, device: torch.device) -> int:
    if settings.workers >= 0:
        return settings.workers
    return (
        min(8, max(0, (torch.multiprocessing.cpu_count() or 1) - 2)) if device.type == "cuda" else 0
    )


def _quiet_worker(_worker_id: int) -> None:
    """One thread per data loader worker: the workers are the parallelism, and OpenCV's or
    torch's own pools in each of them would oversubscribe the cores (members train side by side)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _loader(dataset: Samples, batch: int, workers: int, *, pin: bool = False) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin,
        drop_last=False,
        worker_init_fn=_quiet_worker if workers else None,
    )


class Unaugmented(Dataset[torch.Tensor]):
    """The model inputs of some images as they are (for scoring)."""

    def __init__(self, data: TrainingData, indices: np.ndarray, channels: tuple[int, ...]):
        self.data, self.indices, self.channels = data, indices, channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> torch.Tensor:
        planes, _ = self.data.item(int(self.indices[k]))
        return torch.from_numpy(np.asarray(planes[list(self.channels)], dtype=np.float32))


@torch.inference_mode()
def predict_scores(
    model: torch.nn.Module,
    data: TrainingData,
    indices: np.ndarray,
    channels: tuple[int, ...],
    *,
    device: torch.device,
    batch: int,
    autocast: Callable[[], AbstractContextManager[Any]],
    workers: int = 0,
) -> np.ndarray:
    """Sigmoid image scores of ``model`` for the given images (no augmentation)."""
    model.eval()
    scores: list[np.ndarray] = []
    loader = DataLoader(Unaugmented(data, indices, channels), batch_size=batch, num_workers=workers)
    for x in loader:
        with autocast():
            out = model(x.to(device))
        scores.append(torch.sigmoid(out.score_logit.float()).cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def tuning_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _lr_factor(settings: TrainSettings, epoch: int, elapsed: float = 0.0) -> float:
    """Cosine decay over the budget: the share of the epochs done, or of ``max_minutes`` used
    (``elapsed`` seconds) when that is larger, so a run cut short by its time budget still
    anneals its learning rate instead of stopping at the top of the schedule."""
    if settings.lr_schedule == "constant":
        return 1.0
    progress = epoch / settings.epochs
    if settings.max_minutes:
        progress = max(progress, elapsed / (settings.max_minutes * 60))
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _write_best(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def input_size(settings: TrainSettings, size: int, epoch: int) -> int:
    """The side the network trains on in ``epoch``: ``small_size`` during the first
    ``small_epochs`` (progressive resizing), else the member's size."""
    return settings.small_size if epoch < settings.small_epochs else size


def resized(x: torch.Tensor, mask: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch and its maps shrunk to ``side`` (area averaging; the maps become soft)."""
    if x.shape[-1] == side:
        return x, mask
    return (
        F.interpolate(x, size=(side, side), mode="area"),
        F.interpolate(mask, size=(side, side), mode="area"),
    )


class MemberTraining:
    """The moving parts of one member's training: network (DDP-wrapped across processes),
    optimizer, optional weight average, precision, and which images it learns and is tuned on."""

    def __init__(
        self,
        member: MemberConfig,
        data: TrainingData,
        records: Sequence[Record],
        split: Split,
        *,
        device: torch.device,
        world: World = SINGLE,
    ) -> None:
        self.member, self.data, self.device, self.world = member, data, device, world
        self.settings = settings = member.training
        options = member.draft.model_options()
        torch.manual_seed(settings.seed)
        model = build_model(member.draft.arch, **options.to_mapping())
        # the inference rule for bf16; channels-last on CUDA only (on the CPU, oneDNN's bf16
        # backward in NHWC corrupted the heap at width 0.25, 256 px: torch 2.13.0)
        self.speed = resolve_speed(settings.precision, device.type == "cuda", device)
        if world.distributed and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = self.speed.apply_layout(model.to(device))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.net: nn.Module = self.model
        if world.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate)
        self.ema = (
            AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True
            )
            if settings.ema_decay
            else None
        )
        self.autocast = self.speed.autocast(device)
        self.channels = CHANNELS[member.draft.input]
        self.map_weight = settings.loss_map_weight(options.attention)
        train_ids, tune_ids = member_ids(member, split)
        self.train_idx = data.index_of(train_ids)
        self.tune_idx = data.index_of(tune_ids)
        by_id = {r.image_id: r for r in records}
        self.strata = [sampling_strata(by_id[i]) for i in train_ids]
        self.batch = per_rank_batch(settings.batch_size, world)

    @property
    def kept(self) -> nn.Module:
        """The weights that are evaluated, kept and exported (the average where there is one)."""
        return self.model if self.ema is None else self.ema.module

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's images of ``epoch`` in draw order (the same for every rank count)."""
        rng = np.random.default_rng([self.settings.seed, epoch])
        order = self.train_idx[
            epoch_indices(epoch, self.strata, rng, balanced_epochs=self.settings.balanced_epochs)
        ]
        return shard(order, self.world)

    def train_epoch(self, epoch: int, lr: float, progress: bool) -> tuple[np.ndarray, int]:
        """One pass over the epoch's images; returns the mean (total, image, map) losses over
        all ranks and the side trained on."""
        settings = self.settings
        samples = Samples(
            self.data,
            self.epoch_order(epoch),
            self.channels,
            self.member.augment,
            (settings.seed, epoch),
            first=self.world.rank,
            stride=self.world.size,
        )
        loader = _loader(samples, self.batch, _workers(settings, self.device))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        side = input_size(settings, self.member.draft.size, epoch)
        self.net.train()
        totals, seen = torch.zeros(3, dtype=torch.float64, device=self.device), 0
        bar = tqdm(
            loader,
            desc=f"{self.member.draft.name} epoch {epoch + 1}/{settings.epochs}",
            disable=not (progress and self.world.main),
            leave=False,
            file=sys.stderr,
        )
        for step, (x, mask, label) in enumerate(bar):
            x, mask = resized(x.to(self.device, non_blocking=True), mask.to(self.device), side)
            x = x.contiguous(memory_format=self.speed.memory_format)
            label = label.to(self.device, non_blocking=True)
            with self.autocast():
                out = self.net(x)
            parts = joint_loss(
                out.score_logit.float(),
                None if out.map_logit is None else out.map_logit.float(),
                label,
                mask,
                map_weight=self.map_weight,
                smoothing=settings.label_smoothing,
            )
            self.optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            n = len(label)
            seen += n
            # summed on the device: reading a loss back every step would make the CPU wait
            # for the GPU before it queues the next step
            totals += n * torch.stack([p.detach().double() for p in parts])
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(loss=f"{float(totals[0]) / seen:.4f}")
        return all_mean(totals.cpu().numpy() / max(seen, 1), self.world), side

    def tuning_auc(self, model: nn.Module) -> float:
        """AUC of ``model`` on the tuning images (each rank scores its share)."""
        mine = shard(self.tune_idx, self.world)
        scores = predict_scores(
            model,
            self.data,
            mine,
            self.channels,
            device=self.device,
            batch=self.settings.eval_batch_size,
            autocast=self.autocast,
        )
        scores = gather_scores(scores, len(self.tune_idx), self.world)
        return tuning_auc(self.data.labels[self.tune_idx], scores)

    def checkpoint(self, loop: LoopState) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **loop.to_checkpoint(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def restore(self, path: Path) -> LoopState:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"{path}: written without ema_decay; cannot resume with it")
            self.ema.load_state_dict(state["ema"])
        return LoopState.from_checkpoint(state)


def train_member(
    member: MemberConfig,
    data: TrainingData,
    records: Sequence[Record],
    split: Split,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    world: World = SINGLE,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> tuple[DRN, MemberResult]:
    """Train one member; returns the model with its kept weights loaded, and a summary.

    Kept weights: the epoch with the best tuning AUC (``select = "best"``, with early stopping)
    or the final ones (``select = "last"``); the weight average where ``ema_decay`` is set."""
    settings, name = member.training, member.draft.name
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(world)
    job = MemberTraining(member, data, records, split, device=device, world=world)
    checkpoint, best = run_dir / "last.pt", run_dir / "best.safetensors"
    loop, auc = LoopState(), float("nan")
    if resume and checkpoint.is_file():
        loop = job.restore(checkpoint)
        if world.main:
            log(
                f"{name}: resuming at epoch {loop.epoch + 1} (best tuning AUC "
                f"{loop.best_auc:.4f} at epoch {loop.best_epoch + 1})"
            )
    elif world.main:
        (run_dir / "history.jsonl").unlink(missing_ok=True)
    while (stopped := loop.stop_reason(settings)) is None:
        t0 = time.perf_counter()
        epoch = loop.epoch
        lr = settings.learning_rate * _lr_factor(settings, epoch, loop.elapsed)
        losses, side = job.train_epoch(epoch, lr, progress)
        auc = job.tuning_auc(job.kept)
        raw = job.tuning_auc(job.model) if job.ema is not None else None
        seconds = all_max(time.perf_counter() - t0, world)
        loop.elapsed += seconds
        if loop.record(auc) and world.main:
            _write_best(job.kept, best)
        balanced = epoch < settings.balanced_epochs
        total, image, map_ = (float(v) for v in losses)
        record = EpochRecord(epoch + 1, total, image, map_, auc, seconds, balanced, side, raw)
        if world.main:
            with (run_dir / "history.jsonl").open("a") as handle:
                handle.write(json.dumps(record.__dict__) + "\n")
            log(
                f"{name} epoch {epoch + 1}/{settings.epochs}: loss {losses[0]:.4f} "
                f"(image {losses[1]:.4f}, map {losses[2]:.4f}) tuning AUC {auc:.4f}"
                f"{'' if raw is None else f' (without EMA {raw:.4f})'} "
                f"best {loop.best_auc:.4f}@{loop.best_epoch + 1} {seconds:.0f}s {side} px "
                f"{'balanced' if balanced else 'natural'} sampling"
            )
            _save_checkpoint(checkpoint, job.checkpoint(loop))
        barrier(world)
    if settings.select == "best":
        job.kept.load_state_dict(load_file(str(best), device=str(device)))
    result = MemberResult(
        name=name,
        best_epoch=loop.best_epoch + 1,
        best_tuning_auc=loop.best_auc,
        epochs_run=loop.epoch,
        seconds=round(loop.elapsed, 1),
        stopped=stopped,
        device=str(device),
        precision=job.speed.precision,
        processes=world.size,
        fold=member.fold,
        final_tuning_auc=auc if loop.epoch else None,
    )
    if world.main:
        (run_dir / "done.json").write_text(json.dumps(result.__dict__, indent=2) + "\n")
    kept = job.kept
    assert isinstance(kept, DRN)
    return kept.eval(), result


def load_or_make_split(records: Sequence[Record], path: Path, seed: int, folds: int = 0) -> Split:
    """The split saved at ``path`` (if its ids match the data), else a new one saved there;
    with ``folds``, cross-fitting folds are added (and saved) where the file has other or none,
    leaving its train, tuning and validation sets as they are."""
    split: Split | None = None
    if path.is_file():
        split = load_split(path)
        if set(split.train) | set(split.tuning) | set(split.validation) != {
            r.image_id for r in records
        }:
            split = None
    changed = split is None
    if split is None:
        split = split_dataset(records, seed=seed)
    if folds and len(split.folds) != folds:
        split, changed = with_folds(split, records, folds, seed), True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_split(split, path)
    return split


def train_ensemble(
    config: EnsembleConfig,
    *,
    data_root: Path,
    out: Path,
    runs: Path,
    device: torch.device,
    resume: bool = False,
    only: str | None = None,
    progress: bool = True,
    workers: int | None = None,
    prepare_only: bool = False,
    overrides: Mapping[str, Any] | None = None,
    world: World = SINGLE,
    stream: bool = False,
) -> list[MemberResult]:
    """Train the config's members in turn (or only one), exporting each into ``out`` as soon as it
    is done, so that every member can be trained, calibrated and committed on its own.

    Inputs come from the pre-processing cache in ``runs/cache`` (written once), or with
    ``stream`` are decoded and pre-processed in every epoch by the data loader's workers.

    Across processes (``world``), rank 0 writes the split, the pre-processing cache and the
    exports; the others wait for it and then read them."""
    records = load_dataset(data_root)
    template = empty_manifest(
        out,
        name=config.name,
        version=config.version,
        trained=True,
        description=config.description,
        preprocessing=config.preprocessing,
        tta=config.tta,
    )
    members = [config.member(only)] if only else list(config.members)
    if overrides:
        members = [m.with_training(overrides) for m in members]
    sizes = sorted({m.draft.size for m in members})

    def prepared(size: int) -> TrainingData:
        if stream:
            return StreamingData(tuple(records), size, config.preprocessing)
        return prepare(
            records,
            size=size,
            settings=config.preprocessing,
            cache_dir=runs / "cache",
            workers=workers,
        )

    if world.main:  # the split and the cache once, before other processes read them
        split = load_or_make_split(records, out / "split.json", config.split_seed, config.folds)
        for size in sizes:
            prepared(size)
    barrier(world)
    if prepare_only:  # members may then train in parallel processes
        return []
    split = load_split(out / "split.json")
    data = {size: prepared(size) for size in sizes}
    results: list[MemberResult] = []
    for member in members:
        run_dir = runs / member.draft.name
        done = run_dir / "done.json"
        if resume and done.is_file() and (out / f"{member.draft.name}.safetensors").is_file():
            results.append(MemberResult(**json.loads(done.read_text())))
            continue
        model, result = train_member(
            member,
            data[member.draft.size],
            records,
            split,
            run_dir,
            device=device,
            resume=resume,
            progress=progress,
            world=world,
        )
        if world.main:
            with _locked(out):  # members may train in parallel processes into one folder
                add_member(out, member.draft, model.cpu(), template=template)
                _append_training_log(out, result)
        barrier(world)
        results.append(result)
    return results


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _append_training_log(out: Path, result: MemberResult) -> None:
    path = out / "training.json"
    log = json.loads(path.read_text()) if path.is_file() else {}
    log[result.name] = result.__dict__
    path.write_text(json.dumps(log, indent=2, sort_keys=True) + "\n")
