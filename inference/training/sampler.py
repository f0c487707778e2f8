"""Which training images an epoch visits: region x label balanced first, natural afterwards.

The paper balances "during the first 10 epochs ... so that, on expectation, each possible
combination of anatomical region and fracture present/absent label was sampled with equal
probability", then iterates through the training set as it is.

Balanced draw (with replacement): pick one of the ``K`` non-empty strata uniformly, then one of
its members uniformly. An image may belong to several strata (a FracAtlas image can show
several regions; :func:`sampling_strata` puts it in ``(region, label)`` for *each* of its
regions); it is then reachable through each of them, so its probability is
``p_i = sum over its strata s of 1 / (K * n_s)`` with ``n_s`` the members of ``s``. The claim
"each combination is drawn with probability ``1/K``" holds exactly for the first stage,
whatever the overlaps; with disjoint strata it is also the share of draws per stratum.
Combinations with no image in the training set simply do not take part.

Natural epoch: a permutation of all images, each once.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterator, Sequence

import numpy as np
import torch.utils.data

from inference.training.dataset import Record

BALANCED_EPOCHS = 10
"""Epochs (counted from 0) drawn balanced before natural sampling, as in the paper."""


def sampling_strata(record: Record) -> frozenset[tuple[str, bool]]:
    """The ``(region, fractured)`` combinations ``record`` counts for: one per region."""
    return frozenset((region, record.fractured) for region in record.regions)


def balanced_probabilities(strata: Sequence[Collection[Hashable]]) -> np.ndarray:
    """Per-image probability (float64, sums to 1) of the two-stage balanced draw.

    ``strata[i]`` is the non-empty collection of strata image ``i`` belongs to (pass
    ``(s,)`` for a single stratum ``s``; a bare string is refused, since it would be read as
    a collection of characters).
    """
    if not strata:
        raise ValueError("balanced sampling needs at least one image")
    members: dict[Hashable, list[int]] = {}
    for index, memberships in enumerate(strata):
        if isinstance(memberships, str | bytes):
            raise ValueError(
                f"image {index}: strata must be a collection of strata, got the string "
                f"{memberships!r} (wrap a single stratum as a 1-tuple)"
            )
        if not memberships:
            raise ValueError(f"image {index} belongs to no stratum and could never be drawn")
        for key in set(memberships):
            members.setdefault(key, []).append(index)
    probabilities = np.zeros(len(strata), dtype=np.float64)
    for indices in members.values():
        probabilities[indices] += 1.0 / (len(members) * len(indices))
    return probabilities / probabilities.sum()


def balanced_indices(
    strata: Sequence[Collection[Hashable]], n_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_samples`` image indices (int64) drawn with replacement, balanced over the strata.

    Same distribution as "stratum uniformly, then member uniformly" (see the module doc),
    drawn in one vectorised call from the per-image probabilities.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    probabilities = balanced_probabilities(strata)
    return rng.choice(len(strata), size=n_samples, replace=True, p=probabilities).astype(np.int64)


def natural_indices(n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Every index once, in random order (int64)."""
    if n_images < 1:
        raise ValueError(f"an epoch needs at least one image, got {n_images}")
    return rng.permutation(n_images).astype(np.int64)


def epoch_indices(
    epoch: int,
    strata: Sequence[Collection[Hashable]],
    rng: np.random.Generator,
    *,
    balanced_epochs: int = BALANCED_EPOCHS,
    n_samples: int | None = None,
) -> np.ndarray:
    """The image indices epoch ``epoch`` (0-based) visits.

    Epochs ``0 .. balanced_epochs - 1`` are balanced draws of ``n_samples`` indices (default:
    as many as there are images, so every epoch has the same length); later epochs are a
    natural permutation of all images (``n_samples`` does not apply).
    """
    if epoch < 0 or balanced_epochs < 0:
        raise ValueError(f"epoch ({epoch}) and balanced_epochs ({balanced_epochs}) must be >= 0")
    if epoch < balanced_epochs:
        return balanced_indices(strata, len(strata) if n_samples is None else n_samples, rng)
    return natural_indices(len(strata), rng)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A DataLoader sampler yielding :func:`epoch_indices` for the current epoch.

    Call :meth:`set_epoch` before each epoch. The generator is seeded with ``(seed, epoch)``,
    so an epoch's order does not depend on how many epochs ran before (a resumed run repeats
    it exactly).
    """

    def __init__(
        self,
        strata: Sequence[Collection[Hashable]],
        *,
        seed: int = 0,
        balanced_epochs: int = BALANCED_EPOCHS,
        n_samples: int | None = None,
    ) -> None:
        balanced_probabilities(strata)  # validate now rather than at the first epoch
        self._strata = list(strata)
        self._seed = seed
        self._balanced_epochs = balanced_epochs
        self._n_samples = n_samples
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (0-based) the next iteration produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = epoch

    def indices(self) -> np.ndarray:
        """This epoch's indices as an array."""
        rng = np.random.default_rng((self._seed, self._epoch))
        return epoch_indices(
            self._epoch,
            self._strata,
            rng,
            balanced_epochs=self._balanced_epochs,
            n_samples=self._n_samples,
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        if self._n_samples is not None and self._epoch < self._balanced_epochs:
            return self._n_samples
        return len(self._strata)
