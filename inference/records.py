"""Small frozen records that cross module boundaries inside ``inference`` and out to ``dicomnode``.

Coordinates are continuous pixel coordinates: pixel ``(i, j)`` (row ``i``, column ``j``) covers
``[j, j + 1) x [i, i + 1)``; ``x`` runs along columns, ``y`` along rows. A box ``(x0, y0, x1, y1)``
therefore covers whole pixels ``x0 <= x < x1``, ``y0 <= y < y1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Decision(StrEnum):
    """Image-level decision from the two operating points of a calibration group."""

    FRACTURE = "fracture"
    POSSIBLE_FRACTURE = "possible_fracture"
    NO_FRACTURE = "no_fracture"


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in some pixel space, with the peak map probability inside it."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


@dataclass(frozen=True)
class Thresholds:
    """Operating points of one calibration group (all on the ensemble's [0, 1] score scale).

    ``sensitivity``: the paper's threshold, tuned to 92.5 % sensitivity (score >= it: at least
    ``possible_fracture``). ``high_specificity``: score >= it: ``fracture``.
    ``binarize``: threshold applied to the averaged probability map to draw boxes.
    ``calibrated`` is False where the values are a fallback (pooled or untrained defaults).
    """

    sensitivity: float
    high_specificity: float
    binarize: float
    calibrated: bool = True

    def __post_init__(self) -> None:
        for name in ("sensitivity", "high_specificity", "binarize"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold {name}={value} is outside [0, 1]")
        if self.high_specificity < self.sensitivity:
            raise ValueError(
                f"high_specificity threshold {self.high_specificity} is below the sensitivity "
                f"threshold {self.sensitivity}"
            )


@dataclass(frozen=True)
class ImageResult:
    """The ensemble's finding for one image (one view), boxes in original pixel coordinates."""

    score: float
    decision: Decision
    boxes: tuple[Box, ...]
    region: str | None
    group: str
    group_fallback: bool
    thresholds: Thresholds


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced a result: written into every DICOM result object (algorithm identification).

    ``version`` changes whenever the weights or thresholds change (it is part of the manifest), so
    result UIDs derived from it change too.
    """

    name: str
    version: str
    operating_point: str
