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
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from inference.export import add_member, empty_manifest
from inference.models import DRN, build_model
from inference.precision import cpu_has_native_bf16
from inference.training.augment import AugmentSettings, augment
from inference.training.config import EnsembleConfig, MemberConfig, TrainSettings
from inference.training.dataset import Record, load_dataset
from inference.training.loss import joint_loss
from inference.training.prepare import PreparedData, prepare
from inference.training.sampler import epoch_indices, sampling_strata
from inference.training.split import Split, load_split, save_split, split_dataset

CHANNELS = {"raw": (0,), "lcn": (1,), "both": (0, 1)}


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of autocast contexts: bf16 where asked for (or, for auto, where the hardware
    does bf16 natively: any CUDA device, CPUs with AMX / AVX-512 BF16), else full fp32."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and (device.type == "cuda" or cpu_has_native_bf16())
    )
    if not use_bf16:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class Samples(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The images of one epoch in draw order, augmented with a per-sample seeded generator."""

    def __init__(
        self,
        data: PreparedData,
        order: np.ndarray,
        channels: tuple[int, ...],
        settings: AugmentSettings | None,
        seed: Sequence[int],
    ) -> None:
        self.data, self.order, self.channels = data, order, channels
        self.settings, self.seed = settings, tuple(seed)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = int(self.order[k])
        image = np.asarray(self.data.images[i, list(self.channels)], dtype=np.float32)
        mask = np.asarray(self.data.masks[i])
        if self.settings is not None:
            rng = np.random.default_rng([*self.seed, k])
            raw = self.channels.index(0) if 0 in self.channels else None  # gamma/contrast: raw only
            image, mask = augment(image, mask, rng, self.settings, raw_channel=raw)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
            torch.tensor(float(self.data.labels[i])),
        )


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float
    image_loss: float
    map_loss: float
    tuning_auc: float
    seconds: float
    balanced: bool


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


def _workers(settings: TrainSettings, device: torch.device) -> int:
    if settings.workers >= 0:
        return settings.workers
    return (
        min(8, max(0, (torch.multiprocessing.cpu_count() or 1) - 2)) if device.type == "cuda" else 0
    )


def _loader(dataset: Samples, batch: int, workers: int, shuffle: bool = False) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=False,
        drop_last=False,
    )


@torch.inference_mode()
def predict_scores(
    model: DRN,
    data: PreparedData,
    indices: np.ndarray,
    channels: tuple[int, ...],
    *,
    device: torch.device,
    batch: int,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> np.ndarray:
    """Sigmoid image scores of ``model`` for the given images (no augmentation)."""
    model.eval()
    scores: list[np.ndarray] = []
    for start in range(0, len(indices), batch):
        rows = indices[start : start + batch]
        x = torch.from_numpy(np.asarray(data.images[rows][:, list(channels)], dtype=np.float32))
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


def _write_best(model: DRN, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def train_member(
    member: MemberConfig,
    data: PreparedData,
    records: Sequence[Record],
    split: Split,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> tuple[DRN, MemberResult]:
    """Train one member; returns the model with its best weights loaded, and a summary."""
    settings, draft = member.training, member.draft
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    options = draft.model_options()
    model = build_model(draft.arch, **options.to_mapping()).to(device)
    if device.type == "cuda":  # channels-last convolutions are faster on tensor cores
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    autocast = autocast_for(settings.precision, device)
    precision = "bf16" if autocast is not nullcontext else "fp32"
    channels = CHANNELS[draft.input]
    map_weight = settings.loss_map_weight(options.attention)
    train_idx = data.index_of(split.train)
    tune_idx = data.index_of(split.tuning)
    by_id = {r.image_id: r for r in records}
    strata = [sampling_strata(by_id[i]) for i in split.train]

    start_epoch, best_auc, best_epoch, stale, elapsed = 0, -1.0, -1, 0, 0.0
    checkpoint = run_dir / "last.pt"
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_auc = int(state["epoch"]) + 1, float(state["best_auc"])
        best_epoch, stale = int(state["best_epoch"]), int(state["stale"])
        elapsed = float(state["elapsed"])
        log(
            f"{draft.name}: resuming at epoch {start_epoch + 1} (best tuning AUC "
            f"{best_auc:.4f} at epoch {best_epoch + 1})"
        )
    elif not resume:
        (run_dir / "history.jsonl").unlink(missing_ok=True)

    stopped = "max_epochs"
    epochs_run = start_epoch  # completed epochs (a stop at the start of an epoch runs none)
    for epoch in range(start_epoch, settings.epochs):
        if stale >= settings.patience:
            stopped = "early_stopping"
            break
        if settings.max_minutes and elapsed >= settings.max_minutes * 60:
            stopped = "time_budget"
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([settings.seed, epoch])
        balanced = epoch < settings.balanced_epochs
        order = train_idx[
            epoch_indices(epoch, strata, rng, balanced_epochs=settings.balanced_epochs)
        ]
        samples = Samples(data, order, channels, member.augment, (settings.seed, epoch))
        loader = _loader(samples, settings.batch_size, _workers(settings, device))
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * _lr_factor(settings, epoch, elapsed)
        model.train()
        totals = np.zeros(3)
        seen = 0
        bar = tqdm(
            loader,
            desc=f"{draft.name} epoch {epoch + 1}/{settings.epochs}",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        )
        for x, mask, label in bar:
            x, mask, label = x.to(device), mask.to(device), label.to(device)
            with autocast():
                out = model(x)
            parts = joint_loss(
                out.score_logit.float(),
                None if out.map_logit is None else out.map_logit.float(),
                label,
                mask,
                map_weight=map_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            n = len(label)
            seen += n
            totals += n * np.array(
                [
                    float(parts.total.detach()),
                    float(parts.image.detach()),
                    float(parts.map.detach()),
                ]
            )
            bar.set_postfix(loss=f"{totals[0] / seen:.4f}")
        scores = predict_scores(
            model,
            data,
            tune_idx,
            channels,
            device=device,
            batch=settings.eval_batch_size,
            autocast=autocast,
        )
        auc = tuning_auc(data.labels[tune_idx], scores)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        epochs_run = epoch + 1
        if best_epoch < 0 or auc > best_auc:  # NaN AUC (one-class tuning set): keep the first
            best_auc, best_epoch, stale = auc, epoch, 0
            _write_best(model, run_dir / "best.safetensors")
        else:
            stale += 1
        mean = totals / max(seen, 1)
        record = EpochRecord(epoch + 1, mean[0], mean[1], mean[2], auc, seconds, balanced)
        with (run_dir / "history.jsonl").open("a") as handle:
            handle.write(json.dumps(record.__dict__) + "\n")
        log(
            f"{draft.name} epoch {epoch + 1}/{settings.epochs}: loss {mean[0]:.4f} "
            f"(image {mean[1]:.4f}, map {mean[2]:.4f}) tuning AUC {auc:.4f} "
            f"best {best_auc:.4f}@{best_epoch + 1} {seconds:.0f}s "
            f"{'balanced' if balanced else 'natural'} sampling"
        )
        _save_checkpoint(
            checkpoint,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "stale": stale,
                "elapsed": elapsed,
            },
        )
    else:
        if stale >= settings.patience:
            stopped = "early_stopping"
    model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
    result = MemberResult(
        name=draft.name,
        best_epoch=best_epoch + 1,
        best_tuning_auc=best_auc,
        epochs_run=epochs_run,
        seconds=round(elapsed, 1),
        stopped=stopped,
        device=str(device),
        precision=precision,
    )
    (run_dir / "done.json").write_text(json.dumps(result.__dict__, indent=2) + "\n")
    return model.eval(), result


def load_or_make_split(records: Sequence[Record], path: Path, seed: int) -> Split:
    """The split saved at ``path`` (if its ids match the data), else a new one saved there."""
    if path.is_file():
        split = load_split(path)
        if set(split.train) | set(split.tuning) | set(split.validation) == {
            r.image_id for r in records
        }:
            return split
    split = split_dataset(records, seed=seed)
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
) -> list[MemberResult]:
    """Train the config's members in turn (or only one), exporting each into ``out`` as soon as it
    is done, so that every member can be trained, calibrated and committed on its own."""
    records = load_dataset(data_root)
    split = load_or_make_split(records, out / "split.json", config.split_seed)
    template = empty_manifest(
        out,
        name=config.name,
        version=config.version,
        trained=True,
        description=config.description,
        preprocessing=config.preprocessing,
    )
    members = [config.member(only)] if only else list(config.members)
    if overrides:
        members = [m.with_training(overrides) for m in members]
    prepared: dict[int, PreparedData] = {}
    results: list[MemberResult] = []
    if prepare_only:  # fill the cache (and the split) once, before members train in parallel
        for size in sorted({m.draft.size for m in members}):
            prepare(
                records,
                size=size,
                settings=config.preprocessing,
                cache_dir=runs / "cache",
                workers=workers,
            )
        return results
    for member in members:
        run_dir = runs / member.draft.name
        done = run_dir / "done.json"
        if resume and done.is_file() and (out / f"{member.draft.name}.safetensors").is_file():
            results.append(MemberResult(**json.loads(done.read_text())))
            continue
        size = member.draft.size
        if size not in prepared:
            prepared[size] = prepare(
                records,
                size=size,
                settings=config.preprocessing,
                cache_dir=runs / "cache",
                workers=workers,
            )
        model, result = train_member(
            member,
            prepared[size],
            records,
            split,
            run_dir,
            device=device,
            resume=resume,
            progress=progress,
        )
        with _locked(out):  # members may train in parallel processes into one folder
            add_member(out, member.draft, model.cpu(), template=template)
            _append_training_log(out, result)
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
