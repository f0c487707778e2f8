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
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
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
    """Image ids of the three sets (disjoint; each tuple sorted)."""

    train: tuple[str, ...]
    tuning: tuple[str, ...]
    validation: tuple[str, ...]

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
    groups = np.array([group_key(record) for record in records])
    if len(set(groups.tolist())) < n_folds:
        raise ValueError(
            f"split_dataset: {len(set(groups.tolist()))} groups cannot fill {n_folds} folds"
        )
    strata = np.array([stratum(record) for record in records])
    folder = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(records), dtype=np.int64)
    with warnings.catch_warnings():
        # Strata rarer than the fold count are expected (e.g. one hand;leg;hip;shoulder image).
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, members) in enumerate(folder.split(np.zeros(len(records)), strata, groups)):
            fold_of[members] = fold
    # Deal folds out in a seeded order, so which fold becomes tuning is not fixed by sklearn.
    order = np.random.default_rng(seed).permutation(n_folds)
    bounds = np.cumsum((0, *counts))
    parts = []
    for start, stop in itertools.pairwise(bounds):
        chosen = np.isin(fold_of, order[start:stop])
        parts.append(tuple(sorted(np.asarray(ids, dtype=object)[chosen].tolist())))
    return Split(train=parts[0], tuning=parts[1], validation=parts[2])


def save_split(split: Split, path: Path | str) -> None:
    """Write ``split`` as JSON (``{"format": 1, "train": [...], ...}``) so a run records it."""
    document: dict[str, object] = {
        "format": SPLIT_FORMAT,
        **{name: list(split.part(name)) for name in PARTS},
    }
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
    try:
        return Split(**parts)
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
