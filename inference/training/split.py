"""The paper's train / tuning / validation split (80/10/10), stratified and group-aware.

Stratum of an image: its sorted region string plus its label (``hand;shoulder|1``). Images
of one near-duplicate group (``Record.dup_group``) always land in the same set, so a model is
never tuned or validated on a copy of a training image.

Method: scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold` cuts the images
into ``n`` folds of equal size (``n`` = the common denominator of the fractions, 10 for
80/10/10), each fold holding whole groups and as close to every stratum's overall share as
its greedy assignment gets; the folds are then dealt out in order (8 to train, 1 to tuning,
1 to validation). Strata smaller than ``n`` images cannot be spread over every fold; such
images still go to exactly one set each. The seed drives the fold assignment's shuffling and
the order in which folds are dealt out; it is the only source of randomness, so the same seed
and records reproduce the split exactly.

Cross-fitting (:func:`with_folds`): the development images (train + tuning) are cut once more
into ``k`` folds by the same method (strata and near-duplicate groups kept), so that member ``k``
of a cross-fitted ensemble trains on the other folds and is tuned on fold ``k``: every
development image is then trained on by ``k - 1`` members and scored out-of-fold by one. The
validation set stays where it is and is never part of a fold.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from inference.training.dataset import Record

PartName = Literal["train", "tuning", "validation"]
PARTS: tuple[PartName, ...] = ("train", "tuning", "validation")

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
MAX_FOLDS = 100
"""Largest common denominator of the fractions (fractions are realised as whole folds)."""

SPLIT_FORMAT = 1


@dataclass(frozen=True)
class Split:
    """Image ids of the three sets (disjoint; each tuple sorted), and optionally the
    cross-fitting folds of the development images (train + tuning; each fold sorted)."""

    train: tuple[str, ...]
    tuning: tuple[str, ...]
    validation: tuple[str, ...]
    folds: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for name in PARTS:
            ids = getattr(self, name)
            if len(set(ids)) != len(ids):
                raise ValueError(f"split: {name} lists an image id twice")
            shared = seen.intersection(ids)
            if shared:
                raise ValueError(f"split: {name} shares ids with another set, e.g. {min(shared)}")
            seen.update(ids)
        if self.folds:
            _check_folds(self.folds, set(self.development))

    @property
    def development(self) -> tuple[str, ...]:
        """The images models may learn from: train + tuning (sorted)."""
        return tuple(sorted(self.train + self.tuning))

    def fold_parts(self, fold: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(training ids, tuning ids) of cross-fitted member ``fold``: all development images
        outside the fold, and the fold itself."""
        if not 0 <= fold < len(self.folds):
            raise ValueError(f"split has {len(self.folds)} folds; fold {fold} does not exist")
        held_out = set(self.folds[fold])
        return tuple(i for i in self.development if i not in held_out), self.folds[fold]

    def fold_of(self) -> dict[str, int]:
        """Development image id -> its fold (empty without folds)."""
        return {image_id: k for k, ids in enumerate(self.folds) for image_id in ids}

    def part(self, name: PartName) -> tuple[str, ...]:
        """The ids of set ``name`` (``train``, ``tuning`` or ``validation``)."""
        if name not in PARTS:
            raise ValueError(f"unknown split part {name!r}; known: {PARTS}")
        ids: tuple[str, ...] = getattr(self, name)
        return ids

    def select(self, records: Sequence[Record], name: PartName) -> list[Record]:
        """The records of set ``name``, in the order of ``records``; every id must be present."""
        wanted = set(self.part(name))
        chosen = [record for record in records if record.image_id in wanted]
        if len(chosen) != len(wanted):
            found = {record.image_id for record in chosen}
            raise ValueError(
                f"split {name}: {len(wanted - found)} id(s) not among the records, "
                f"e.g. {min(wanted - found)}"
            )
        return chosen


def stratum(record: Record) -> str:
    """Stratification key: sorted regions joined by ``;``, ``|``, and the 0/1 label."""
    return f"{';'.join(sorted(record.regions))}|{int(record.fractured)}"


def group_key(record: Record) -> str:
    """The unit kept whole by the split: the near-duplicate group, else the image itself."""
    return f"group:{record.dup_group}" if record.dup_group else f"image:{record.image_id}"


def split_dataset(
    records: Sequence[Record],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Split:
    """Split ``records`` into train / tuning / validation with the given fractions.

    Deterministic for a given ``seed`` and record list. ``fractions`` must be positive, sum to
    1 and be multiples of ``1/n`` for some ``n <= 100`` (they are realised as ``n`` folds).
    """
    counts = _fold_counts(fractions)
    n_folds = sum(counts)
    ids = [record.image_id for record in records]
    if len(set(ids)) != len(ids):
        raise ValueError("split_dataset: image ids are not unique")
    try:
        fold_of = fold_assignment(records, n_folds, seed)
    except ValueError as error:
        raise ValueError(f"split_dataset: {error}") from None
    # Deal folds out in a seeded order, so which fold becomes tuning is not fixed by sklearn.
    order = np.random.default_rng(seed).permutation(n_folds)
    bounds = np.cumsum((0, *counts))
    parts = []
    for start, stop in itertools.pairwise(bounds):
        chosen = np.isin(fold_of, order[start:stop])
        parts.append(tuple(sorted(np.asarray(ids, dtype=object)[chosen].tolist())))
    return Split(train=parts[0], tuning=parts[1], validation=parts[2])


def _check_folds(folds: Sequence[Sequence[str]], development: set[str]) -> None:
    if len(folds) < 2:
        raise ValueError(f"split: cross-fitting needs at least 2 folds, got {len(folds)}")
    seen: set[str] = set()
    for k, ids in enumerate(folds):
        if not ids:
            raise ValueError(f"split: fold {k} is empty")
        if seen.intersection(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"split: fold {k} repeats an image of another fold")
        seen.update(ids)
    if seen != development:
        stray = sorted(seen ^ development)
        raise ValueError(
            f"split: the folds must cover exactly the train + tuning images, e.g. {stray[0]}"
        )


def fold_assignment(records: Sequence[Record], n_folds: int, seed: int) -> npt.NDArray[np.int64]:
    """The fold (0..n_folds-1) of each record: StratifiedGroupKFold by stratum and group."""
    groups = np.array([group_key(record) for record in records])
    if len(set(groups.tolist())) < n_folds:
        raise ValueError(f"{len(set(groups.tolist()))} groups cannot fill {n_folds} folds")
    strata = np.array([stratum(record) for record in records])
    folder = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(records), dtype=np.int64)
    with warnings.catch_warnings():
        # Strata rarer than the fold count are expected (e.g. one hand;leg;hip;shoulder image).
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, members) in enumerate(folder.split(np.zeros(len(records)), strata, groups)):
            fold_of[members] = fold
    return fold_of


def with_folds(split: Split, records: Sequence[Record], n_folds: int, seed: int = 0) -> Split:
    """``split`` with ``n_folds`` cross-fitting folds over its development images (train +
    tuning), stratified and group-aware like the split itself; the three sets are unchanged."""
    if n_folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {n_folds}")
    wanted = set(split.development)
    chosen = [record for record in records if record.image_id in wanted]
    if len(chosen) != len(wanted):
        raise ValueError("with_folds: the records do not hold every train and tuning image")
    fold_of = fold_assignment(chosen, n_folds, seed)
    ids = np.asarray([record.image_id for record in chosen], dtype=object)
    folds = tuple(tuple(sorted(ids[fold_of == k].tolist())) for k in range(n_folds))
    return replace(split, folds=folds)


def save_split(split: Split, path: Path | str) -> None:
    """Write ``split`` as JSON (``{"format": 1, "train": [...], ...}``, plus ``"folds"``: a
    list of id lists where cross-fitting folds exist) so a run records it."""
    document: dict[str, object] = {
        "format": SPLIT_FORMAT,
        **{name: list(split.part(name)) for name in PARTS},
    }
    if split.folds:
        document["folds"] = [list(ids) for ids in split.folds]
    Path(path).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def load_split(path: Path | str) -> Split:
    """Read a split written by :func:`save_split`; ValueError names what is malformed."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != SPLIT_FORMAT:
        raise ValueError(f"{path}: not a split file of format {SPLIT_FORMAT}")
    parts: dict[str, tuple[str, ...]] = {}
    for name in PARTS:
        ids = document.get(name)
        if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
            raise ValueError(f"{path}: {name!r} must be a list of image id strings")
        parts[name] = tuple(ids)
    folds = document.get("folds", [])
    if not isinstance(folds, list) or not all(
        isinstance(ids, list) and all(isinstance(item, str) for item in ids) for ids in folds
    ):
        raise ValueError(f"{path}: 'folds' must be a list of lists of image id strings")
    try:
        return Split(**parts, folds=tuple(tuple(ids) for ids in folds))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _fold_counts(fractions: Sequence[float]) -> tuple[int, ...]:
    """Whole folds per set: (0.8, 0.1, 0.1) -> (8, 1, 1)."""
    if len(fractions) != len(PARTS):
        raise ValueError(f"fractions must give {len(PARTS)} values, got {fractions!r}")
    if any(not (isinstance(f, int | float) and 0.0 < f < 1.0) for f in fractions):
        raise ValueError(f"fractions must each lie in (0, 1), got {fractions!r}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions)})")
    exact = [Fraction(f).limit_denominator(MAX_FOLDS) for f in fractions]
    if any(abs(float(e) - f) > 1e-9 for e, f in zip(exact, fractions, strict=True)):
        raise ValueError(
            f"fractions {fractions!r} are not multiples of 1/n for an n <= {MAX_FOLDS}"
        )
    n_folds = math.lcm(*(e.denominator for e in exact))
    if n_folds > MAX_FOLDS:
        raise ValueError(f"fractions {fractions!r} need {n_folds} folds (at most {MAX_FOLDS})")
    return tuple(int(e * n_folds) for e in exact)
