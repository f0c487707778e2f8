"""The intended use: which images get a fracture decision (``[scope]`` in the config).

An image is analysed when its Modality is one of ``scope.modalities`` and its region (from the
header rules of :func:`dicomnode.worker.resolve_view_region`) is one of the regions in scope:
by default the regions whose calibration group the loaded model calibrated (FracAtlas' hand,
leg, hip and shoulder groups for the shipped weights). An image whose region no rule names is
analysed with the pooled thresholds and flagged as a fallback (``unknown_region = "analyse"``),
unless the header names anatomy outside musculoskeletal fracture imaging (chest, abdomen, head,
breast), which is out of scope; or it is not analysed at all (``unknown_region = "skip"``).

Everything else gets no fracture decision. The reason is in words a radiologist understands:
"outside the intended use (chest)", "outside the intended use (elbow)", "outside the intended
use (CT images)", "the body part could not be determined".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicomnode.config import CALIBRATED, OutOfScope, ScopeConfig, UnknownRegion
from inference.records import Thresholds
from inference.regions import GLOBAL_GROUP, REGIONS, RegionMatch

OUTSIDE = "outside the intended use"
UNKNOWN_PART = "the body part could not be determined"


@dataclass(frozen=True)
class Scope:
    """The resolved scope: modalities and region keys analysed, and the two policies."""

    modalities: frozenset[str]
    regions: frozenset[str]
    unknown_region: UnknownRegion
    out_of_scope: OutOfScope

    @classmethod
    def resolve(cls, config: ScopeConfig, thresholds: Mapping[str, Thresholds]) -> Scope:
        """``config`` with ``"calibrated"`` replaced by the regions whose group has calibrated
        thresholds of its own in the model's manifest."""
        return cls(
            modalities=frozenset(config.modalities),
            regions=frozenset(calibrated_regions(thresholds))
            if config.regions == (CALIBRATED,)
            else frozenset(config.regions),
            unknown_region=config.unknown_region,
            out_of_scope=config.out_of_scope,
        )

    def reason(self, header: Dataset, match: RegionMatch, other: str | None) -> str | None:
        """Why an image gets no decision (None: it is analysed). ``match`` is its region,
        ``other`` the non-musculoskeletal anatomy its header names, if any."""
        modality = str(header.get("Modality", "") or "").strip().upper()
        if modality not in self.modalities:
            return f"{OUTSIDE} ({modality or 'no modality'} images)"
        if match.region is not None:
            if match.region.key in self.regions:
                return None
            return f"{OUTSIDE} ({match.region.display.lower()})"
        if other is not None:
            return f"{OUTSIDE} ({other})"
        if self.unknown_region is UnknownRegion.SKIP:
            return UNKNOWN_PART
        return None

    def describe(self) -> str:
        """One line for logs and ``check-config``."""
        return (
            f"modalities {', '.join(sorted(self.modalities))}; regions "
            f"{', '.join(sorted(self.regions)) or 'none'}; unknown region: "
            f"{self.unknown_region}; out of scope: {self.out_of_scope}"
        )


def calibrated_regions(thresholds: Mapping[str, Thresholds]) -> Collection[str]:
    """Region keys whose calibration group has calibrated thresholds of its own. An ensemble
    without region-specific calibration (only pooled thresholds, or none: random test weights,
    a model not yet calibrated; results say so through their fallback flag) has no regions to
    restrict to: every region."""
    groups = {group for group, t in thresholds.items() if t.calibrated and group != GLOBAL_GROUP}
    if not groups:
        return sorted(REGIONS)
    return sorted(key for key, region in REGIONS.items() if region.group in groups)
