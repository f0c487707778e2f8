"""Training augmentation applied identically to the image channels and the fracture map.

The paper: "radiographs were randomly rotated, vertically or horizontally flipped,
gamma-corrected, contrast-adjusted, vertically or horizontally translated, and zoomed in or
out". Here, per sample:

* Geometry, identical for every image channel and the map: rotation, zoom and translation
  composed into one affine matrix about the image centre and applied with one
  ``cv2.warpAffine`` per channel (image: bilinear, uncovered pixels = the padding value -1;
  map: nearest neighbour, uncovered = 0), then exact flips (``np.flip``).
* Intensity, on the raw channel only (LCN is locally contrast-normalised by design, so
  re-deriving it after a gamma/contrast change would largely undo the change): the value is
  taken from [-1, 1] to ``u`` in [0, 1], then gamma ``u ** g`` and the contrast S-curve
  ``logit(u') = c * logit(u)`` (``u' = u**c / (u**c + (1-u)**c)``), and back. Both curves are
  monotone and keep 0 and 1 fixed, so the padding value -1 and saturated white stay exactly
  where they are and no clipping is needed.

Multiplicative parameters (zoom, gamma, contrast) are drawn log-uniformly, so that e.g. a zoom
in by 1/0.9 is as likely as a zoom out by 0.9 in the symmetric case. Flip probabilities:
horizontal 0.5 (left and right limbs are mirror images); vertical 0.25: the paper flips
vertically too, and extremity views arrive with fingers or toes pointing either way, but an
upside-down hip or shoulder is rare in practice, so it is used less often than the mirror.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

from inference.tables import checked_keys

PAD_VALUE = -1.0
"""Image value of pixels the warp brings in from outside (the pre-processing's padding)."""


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges and probabilities of the random augmentation.

    ``rotation_deg``: angle uniform in ``[-r, r]`` degrees. ``translation``: shift uniform in
    ``[-t, t]`` times the side, independently along x and y. ``zoom``, ``gamma``,
    ``contrast``: ``(low, high)`` drawn log-uniformly (zoom > 1 enlarges; gamma < 1 brightens;
    contrast > 1 steepens). ``hflip``, ``vflip``: probabilities of the flips.
    """

    rotation_deg: float = 15.0
    translation: float = 0.10
    zoom: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.75, 1.3)
    hflip: float = 0.5
    vflip: float = 0.25

    def __post_init__(self) -> None:
        for name, upper in (("rotation_deg", 180.0), ("translation", 1.0)):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= upper:
                raise ValueError(f"{name}={value!r} must be a number in [0, {upper}]")
        for name in ("zoom", "gamma", "contrast"):
            pair = getattr(self, name)
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(_is_real(v) and v > 0 for v in pair)
                or pair[0] > pair[1]
            ):
                raise ValueError(f"{name}={pair!r} must be a (low, high) pair with 0 < low <= high")
        for name in ("hflip", "vflip"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be a probability in [0, 1]")

    @classmethod
    def identity(cls) -> AugmentSettings:
        """Settings that leave every sample unchanged."""
        return cls(0.0, 0.0, (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), 0.0, 0.0)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> AugmentSettings:
        """Build from a config table; missing keys take the defaults, unknown keys are refused.

        Pairs may be given as lists (as TOML and JSON write them).
        """
        values: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in checked_keys(cls, mapping, "augmentation settings").items()
        }
        return cls(**values)

    def to_mapping(self) -> dict[str, float | list[float]]:
        """Plain TOML/JSON-ready table of every field (pairs as lists)."""
        out: dict[str, float | list[float]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class AugmentParams:
    """One drawn augmentation: the concrete values :func:`apply_augment` uses.

    ``shift_x``/``shift_y`` are fractions of the width/height.
    """

    angle_deg: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    zoom: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    hflip: bool = False
    vflip: bool = False

    def affine(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The 2x3 cv2 matrix (index coordinates) for an image of ``shape`` (rows, cols), or
        None where rotation, zoom and shift are all neutral (no warp needed)."""
        if self.angle_deg == 0.0 and self.zoom == 1.0 and self.shift_x == self.shift_y == 0.0:
            return None
        rows, cols = shape
        centre = ((cols - 1) / 2.0, (rows - 1) / 2.0)
        matrix = cv2.getRotationMatrix2D(centre, self.angle_deg, self.zoom)
        matrix[0, 2] += self.shift_x * cols
        matrix[1, 2] += self.shift_y * rows
        return matrix


def sample_params(settings: AugmentSettings, rng: np.random.Generator) -> AugmentParams:
    """Draw one :class:`AugmentParams` from ``settings``."""
    r, t = settings.rotation_deg, settings.translation
    return AugmentParams(
        angle_deg=float(rng.uniform(-r, r)) if r else 0.0,
        shift_x=float(rng.uniform(-t, t)) if t else 0.0,
        shift_y=float(rng.uniform(-t, t)) if t else 0.0,
        zoom=_log_uniform(settings.zoom, rng),
        gamma=_log_uniform(settings.gamma, rng),
        contrast=_log_uniform(settings.contrast, rng),
        hflip=bool(rng.random() < settings.hflip),
        vflip=bool(rng.random() < settings.vflip),
    )


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    settings: AugmentSettings | None = None,
    *,
    raw_channel: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly augment ``image`` (C, H, W) float32 in [-1, 1] and its map ``mask`` (H, W).

    ``raw_channel``: the channel holding the raw radiograph (gamma/contrast go there); None
    where there is none (an LCN-only input). Returns new arrays: image float32 (C, H, W),
    mask of the input's dtype (H, W). Default settings: :class:`AugmentSettings`.
    """
    params = sample_params(settings or AugmentSettings(), rng)
    return apply_augment(image, mask, params, raw_channel=raw_channel)


def apply_augment(
    image: np.ndarray, mask: np.ndarray, params: AugmentParams, *, raw_channel: int | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the drawn ``params`` to ``image`` and ``mask`` (see :func:`augment`)."""
    _check_inputs(image, mask, raw_channel)
    rows, cols = image.shape[1:]
    matrix = params.affine((rows, cols))
    out = np.empty_like(image)
    for index, channel in enumerate(image):
        source = channel
        if index == raw_channel:
            source = _adjust_intensity(channel, params.gamma, params.contrast)
        if matrix is None:
            out[index] = source
        else:
            _warp(source, matrix, cv2.INTER_LINEAR, PAD_VALUE, out=out[index])
    out_mask = mask if matrix is None else _warp_mask(mask, matrix)
    flip_axes = tuple(axis for axis, wanted in ((-1, params.hflip), (-2, params.vflip)) if wanted)
    if flip_axes:
        out = np.ascontiguousarray(np.flip(out, axis=flip_axes))
        out_mask = np.flip(out_mask, axis=flip_axes)
    return out, np.array(out_mask, copy=True, order="C")


def _adjust_intensity(channel: np.ndarray, gamma: float, contrast: float) -> np.ndarray:
    """Gamma then the logit-scaling contrast curve, computed on ``u = (x + 1) / 2``."""
    if gamma == 1.0 and contrast == 1.0:
        return channel
    u = np.clip((channel + 1.0) * 0.5, 0.0, 1.0, dtype=np.float32)
    if gamma != 1.0:
        u = np.power(u, np.float32(gamma), dtype=np.float32)
    if contrast != 1.0:
        # u' = u^c / (u^c + (1-u)^c) = 1 / (1 + ((1-u)/u)^c); u = 0 gives inf -> 0 exactly.
        with np.errstate(divide="ignore"):
            ratio = np.power((1.0 - u) / u, np.float32(contrast), dtype=np.float32)
        u = 1.0 / (1.0 + ratio)
    return (u * 2.0 - 1.0).astype(np.float32, copy=False)


def _warp(
    channel: np.ndarray,
    matrix: np.ndarray,
    interpolation: int,
    fill: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``cv2.warpAffine`` to the same size with a constant border (into ``out`` if given)."""
    rows, cols = channel.shape
    warped = cv2.warpAffine(
        channel,
        matrix,
        (cols, rows),
        dst=out,
        flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill,
    )
    if out is not None and warped is not out:
        out[...] = warped
    return warped


def _warp_mask(mask: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Nearest-neighbour warp of the map (bool handled as uint8), 0 outside."""
    source = mask.view(np.uint8) if mask.dtype == np.bool_ else mask
    warped = _warp(np.ascontiguousarray(source), matrix, cv2.INTER_NEAREST, 0.0)
    return warped.astype(np.bool_) if mask.dtype == np.bool_ else warped


def _check_inputs(image: np.ndarray, mask: np.ndarray, raw_channel: int | None) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or not 1 <= image.shape[0] <= 4:
        raise ValueError(
            f"augment: image must be a (C, H, W) array with 1-4 channels, got "
            f"{getattr(image, 'shape', type(image))}"
        )
    if image.dtype != np.float32:
        raise ValueError(f"augment: image must be float32, got {image.dtype}")
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[1:]:
        raise ValueError(
            f"augment: mask shape {getattr(mask, 'shape', type(mask))} does not match the "
            f"image's (H, W) {image.shape[1:]}"
        )
    if mask.dtype not in (np.bool_, np.uint8, np.float32):
        raise ValueError(f"augment: mask must be bool, uint8 or float32, got {mask.dtype}")
    if raw_channel is not None and not 0 <= raw_channel < image.shape[0]:
        raise ValueError(f"augment: raw_channel {raw_channel} is not among {image.shape[0]}")


def _log_uniform(bounds: tuple[float, float], rng: np.random.Generator) -> float:
    low, high = bounds
    if low == high:
        return float(low)
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
