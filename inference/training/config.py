"""Training configuration files (TOML) read into typed frozen records.

A *member* config describes one network and how to train it::

    [member]
    name = "d22-raw-map"
    arch = "drn_d_22"
    input = "raw"             # raw | lcn | both
    size = 256
    [member.options]          # builder keyword options (inference.models.ModelOptions)
    width = 0.5
    map_head = true
    [training]                # TrainSettings; every key optional
    batch_size = 48
    [augment]                 # AugmentSettings; every key optional

An *ensemble* config lists member configs (paths relative to the ensemble file) and the fields the
weights' manifest needs::

    [ensemble]
    name = "cpu-reference"
    version = "2026.11.27"
    description = "..."
    members = ["members/cpu-d22-raw-map.toml", ...]
    split_seed = 0
    folds = 5                 # optional: cross-fit every member over 5 folds (see below)
    tta = ["hflip"]           # optional: test-time augmentation written into the manifest
    [preprocessing]           # PreprocessSettings shared by all members

Cross-fitting (``folds = k``, k >= 2): every listed member is trained k times, as
``<name>-f0`` .. ``<name>-f<k-1>``; member ``-f<j>`` learns from the development images (train +
tuning) outside fold ``j`` and is tuned on fold ``j`` (folds: :func:`inference.training.split.
with_folds`). The validation split is never used. ``calibrate`` then sets the operating points on
the out-of-fold scores of all development images.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from inference.export import MemberDraft
from inference.manifest import INPUT_KINDS, TTA_KINDS
from inference.models import list_models
from inference.preprocess import PreprocessSettings
from inference.tables import checked_keys
from inference.training.augment import AugmentSettings


class ConfigError(ValueError):
    """A training config is missing, malformed or inconsistent; the message names the key."""


@dataclass(frozen=True)
class TrainSettings:
    """How one member is trained (defaults follow the paper where it says, see docs/training.md)."""

    epochs: int = 30  # at most 30 epochs
    patience: int = 10  # early stopping on tuning AUC
    balanced_epochs: int = 10  # region x label balanced sampling for the first 10 epochs
    batch_size: int = 48  # 48 (32 for members with attention)
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant
    map_weight: float | None = None  # localization:classification; None = 3, or 10 w/ attention
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    workers: int = -1  # data-loader workers; -1 = automatic
    max_minutes: float = 0.0  # wall-clock budget for this member (0 = none)
    eval_batch_size: int = 64
    ema_decay: float = 0.0  # exponential moving average of the weights per step (0 = off)
    label_smoothing: float = 0.0  # image targets become eps/2 and 1 - eps/2
    select: str = "best"  # best: the epoch with the best tuning AUC; last: the final weights
    small_size: int = 0  # progressive resizing: the first small_epochs train at this size
    small_epochs: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ConfigError("training: epochs, patience and batch_size must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"training.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"training.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.select not in ("best", "last"):
            raise ConfigError(f"training.select must be best or last, got {self.select!r}")
        if self.small_epochs < 0 or (self.small_epochs and (self.small_size < 32)):
            raise ConfigError(
                "training.small_epochs needs small_size >= 32 (pixels of the smaller input)"
            )
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(
                f"training.lr_schedule must be cosine or constant, got {self.lr_schedule!r}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(
                f"training.precision must be auto, fp32 or bf16, got {self.precision!r}"
            )
        if self.learning_rate <= 0:
            raise ConfigError("training.learning_rate must be > 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TrainSettings:
        try:
            return cls(**checked_keys(cls, data, "training settings"))
        except TypeError as exc:
            raise ConfigError(f"training: {exc}") from exc

    def loss_map_weight(self, attention: bool) -> float:
        if self.map_weight is not None:
            return self.map_weight
        return 10.0 if attention else 3.0


@dataclass(frozen=True)
class MemberConfig:
    draft: MemberDraft
    training: TrainSettings
    augment: AugmentSettings
    source: Path

    @property
    def fold(self) -> int | None:
        """The cross-fitting fold this member is tuned on (None: trained on the train split)."""
        return self.draft.fold

    def for_fold(self, fold: int) -> MemberConfig:
        """This member as the cross-fitted copy tuned on ``fold`` (named ``<name>-f<fold>``)."""
        draft = replace(self.draft, name=f"{self.draft.name}-f{fold}", fold=fold)
        return replace(self, draft=draft)

    def with_training(self, overrides: Mapping[str, Any]) -> MemberConfig:
        """This member with some training settings replaced (e.g. from the command line)."""
        merged = {**asdict(self.training), **overrides}
        return replace(self, training=TrainSettings.from_mapping(merged))


@dataclass(frozen=True)
class EnsembleConfig:
    name: str
    version: str
    description: str
    members: tuple[MemberConfig, ...]
    preprocessing: PreprocessSettings
    split_seed: int
    source: Path
    folds: int = 0
    tta: tuple[str, ...] = ()

    def member(self, name: str) -> MemberConfig:
        for member in self.members:
            if member.draft.name == name:
                return member
        raise ConfigError(
            f"{self.source}: no member named {name!r}; "
            f"members: {[m.draft.name for m in self.members]}"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _member_from(data: Mapping[str, Any], path: Path) -> MemberConfig:
    member = data.get("member")
    if not isinstance(member, Mapping):
        raise ConfigError(f"{path}: missing [member] table")
    for key in ("name", "arch", "input", "size"):
        if key not in member:
            raise ConfigError(f"{path}: member.{key} is required")
    if member["arch"] not in list_models():
        raise ConfigError(f"{path}: member.arch {member['arch']!r} is not one of {list_models()}")
    if member["input"] not in INPUT_KINDS:
        raise ConfigError(f"{path}: member.input must be one of {INPUT_KINDS}")
    draft = MemberDraft(
        name=str(member["name"]),
        arch=str(member["arch"]),
        input=str(member["input"]),
        size=int(member["size"]),
        options=dict(member.get("options", {})),
    )
    try:
        draft.model_options()
        training = TrainSettings.from_mapping(data.get("training", {}))
        augment = AugmentSettings.from_mapping(data.get("augment", {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return MemberConfig(draft=draft, training=training, augment=augment, source=path)


def load_config(path: Path | str) -> EnsembleConfig:
    """Read an ensemble config, or a member config as an ensemble of one."""
    path = Path(path).resolve()
    data = _read_toml(path)
    if "member" in data:
        member = _member_from(data, path)
        return EnsembleConfig(
            name=member.draft.name,
            version="0",
            description=f"single member {member.draft.name}",
            members=(member,),
            preprocessing=PreprocessSettings.from_mapping(dict(data.get("preprocessing", {}))),
            split_seed=int(data.get("split_seed", 0)),
            source=path,
        )
    ensemble = data.get("ensemble")
    if not isinstance(ensemble, Mapping):
        raise ConfigError(f"{path}: needs an [ensemble] or a [member] table")
    paths = ensemble.get("members")
    if not isinstance(paths, list) or not paths:
        raise ConfigError(f"{path}: ensemble.members must list member config files")
    members = tuple(_member_from(_read_toml(path.parent / p), path.parent / p) for p in paths)
    folds = ensemble.get("folds", 0)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds == 1 or folds < 0:
        raise ConfigError(f"{path}: ensemble.folds must be 0 (no cross-fitting) or >= 2")
    if folds:
        members = tuple(m.for_fold(k) for m in members for k in range(folds))
    tta = ensemble.get("tta", [])
    if not isinstance(tta, list) or any(t not in TTA_KINDS for t in tta):
        raise ConfigError(f"{path}: ensemble.tta must list some of {list(TTA_KINDS)}")
    names = [m.draft.name for m in members]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: member names must be unique, got {names}")
    for key in ("name", "version"):
        if key not in ensemble:
            raise ConfigError(f"{path}: ensemble.{key} is required")
    try:
        preprocessing = PreprocessSettings.from_mapping(dict(data.get("preprocessing", {})))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: [preprocessing]: {exc}") from exc
    return EnsembleConfig(
        name=str(ensemble["name"]),
        version=str(ensemble["version"]),
        description=str(ensemble.get("description", "")),
        members=members,
        preprocessing=preprocessing,
        split_seed=int(ensemble.get("split_seed", 0)),
        source=path,
        folds=folds,
        tta=tuple(tta),
    )
