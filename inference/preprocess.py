"""Pre-processing of a radiograph for the ensemble (Jones et al. 2020, "Pre-processing stage").

Input: a 2-D array of any integer or float dtype (uint8, uint16, int16, float32, ...), bright
bone (MONOCHROME2). The DICOM edge has already applied MONOCHROME1 inversion, rescale and VOI.

Steps, each a small pure function:

1. :func:`crop_padding` finds the uniform near-black padding around the edges.
2. :meth:`Transform.fit` plans an aspect-preserving resize of the crop to a ``size x size``
   square; the content is centred and the remainder is padding.
3. :func:`to_unit_range` maps the resized content to [-1, 1] (the *raw* channel, padding = -1).
4. :func:`local_contrast_normalize` computes the *LCN* channel on the content only
   (padding = 0, the neutral value).
5. :class:`Transform` maps points and boxes between model space and the original pixels.

:func:`preprocess` chains them and returns a :class:`Preprocessed` record. Coordinates follow
``inference.records``: continuous pixel-edge coordinates, ``x`` along columns, ``y`` along rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from inference.tables import checked_keys

#: Smallest accepted side, in pixels, of an input image and of the content left after cropping.
MIN_SIDE = 32
#: Model input side of the paper.
DEFAULT_SIZE = 1024
#: Gaussian sigma of the LCN window as a fraction of the model size: 8 px at 1024.
DEFAULT_LCN_SIGMA = 1.0 / 128.0
#: LCN output: values in units of local standard deviation are divided by this, then clipped.
DEFAULT_LCN_CLIP = 3.0
#: Bumped whenever the pixels this module produces change; weights record the version they saw.
PREPROCESS_VERSION = 1
#: Percentiles of the resized content mapped to -1 and +1 in the raw channel.
RAW_PERCENTILES = (0.5, 99.5)
#: A border row/column is padding if, after line suppression, no pixel is brighter than the
#: black level plus this fraction of the image's dynamic range.
PAD_THRESHOLD = 0.08
#: Padding is detected on a grid whose short side is about this many pixels (for speed).
_DETECTION_SIDE = 512
#: Median window that removes noise and bright lines up to ``_LINE_FILTER // 2`` (3) grid px wide.
_LINE_FILTER = 7
#: Largest number of samples used to estimate robust percentiles.
_PERCENTILE_SAMPLES = 250_000

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CropBox:
    """Integer pixel rectangle ``x0 <= x < x1``, ``y0 <= y < y1`` (pixel-edge coordinates)."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if not (0 <= self.x0 < self.x1 and 0 <= self.y0 < self.y1):
            raise ValueError(f"invalid crop box {self}: need 0 <= x0 < x1 and 0 <= y0 < y1")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def fits_in(self, rows: int, cols: int) -> bool:
        """True when the box lies inside an image of ``rows x cols`` pixels."""
        return self.x1 <= cols and self.y1 <= rows

    def slices(self) -> tuple[slice, slice]:
        """Index expression ``(rows, cols)`` selecting the box from an array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class Transform:
    """Geometry of crop + resize + pad: original pixels <-> model pixels (``size x size``).

    ``crop`` is the kept rectangle of the original image; ``content_box`` is where that crop
    lands in model space after the resize (the rest of the square is padding). The scales use
    the actual rounded content size, so both directions are exact inverses up to float rounding:
    ``x_model = content_box.x0 + (x_orig - crop.x0) * scale_x``, likewise for ``y``.
    """

    original_shape: tuple[int, int]
    crop: CropBox
    model_size: int
    content_box: CropBox

    def __post_init__(self) -> None:
        rows, cols = self.original_shape
        if not self.crop.fits_in(rows, cols):
            raise ValueError(f"crop {self.crop} exceeds the original image {rows}x{cols}")
        if not self.content_box.fits_in(self.model_size, self.model_size):
            raise ValueError(
                f"content box {self.content_box} exceeds the model square {self.model_size}"
            )

    @classmethod
    def fit(cls, original_shape: tuple[int, int], crop: CropBox, size: int) -> Transform:
        """Plan the aspect-preserving resize of ``crop`` into a centred ``size x size`` square.

        The long side becomes exactly ``size``; the short side is rounded to whole pixels (at
        least one) and centred, the odd leftover pixel of padding going to the right/bottom.
        """
        scale = size / max(crop.width, crop.height)
        new_w = min(size, max(1, round(crop.width * scale)))
        new_h = min(size, max(1, round(crop.height * scale)))
        pad_x = (size - new_w) // 2
        pad_y = (size - new_h) // 2
        content = CropBox(pad_x, pad_y, pad_x + new_w, pad_y + new_h)
        rows, cols = original_shape
        return cls((int(rows), int(cols)), crop, size, content)

    @property
    def scale_x(self) -> float:
        """Model pixels per original pixel along x."""
        return self.content_box.width / self.crop.width

    @property
    def scale_y(self) -> float:
        """Model pixels per original pixel along y."""
        return self.content_box.height / self.crop.height

    def to_model_points(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map ``(..., 2)`` points ``(x, y)`` from original pixels to model pixels."""
        p = _as_points(points)
        out = np.empty_like(p)
        out[..., 0] = self.content_box.x0 + (p[..., 0] - self.crop.x0) * self.scale_x
        out[..., 1] = self.content_box.y0 + (p[..., 1] - self.crop.y0) * self.scale_y
        return out

    def to_original_points(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map ``(..., 2)`` points ``(x, y)`` from model pixels to original pixels."""
        p = _as_points(points)
        out = np.empty_like(p)
        out[..., 0] = self.crop.x0 + (p[..., 0] - self.content_box.x0) / self.scale_x
        out[..., 1] = self.crop.y0 + (p[..., 1] - self.content_box.y0) / self.scale_y
        return out

    def box_to_original(
        self, x0: float, y0: float, x1: float, y1: float
    ) -> tuple[float, float, float, float]:
        """Map a model-space box to original pixels, clipped to the original image."""
        rows, cols = self.original_shape
        return _map_box(self.to_original_points, (x0, y0, x1, y1), cols, rows)

    def box_to_model(
        self, x0: float, y0: float, x1: float, y1: float
    ) -> tuple[float, float, float, float]:
        """Map an original-pixel box (e.g. a ground-truth label) to model space, clipped to it."""
        return _map_box(self.to_model_points, (x0, y0, x1, y1), self.model_size, self.model_size)


def _as_points(points: npt.ArrayLike) -> npt.NDArray[np.float64]:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) holding (x, y); got {p.shape}")
    return p


def _map_box(
    mapper: Callable[[npt.ArrayLike], npt.NDArray[np.float64]],
    box: tuple[float, float, float, float],
    width: float,
    height: float,
) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {box} has x1 < x0 or y1 < y0")
    (a, b), (c, d) = mapper(np.array([[x0, y0], [x1, y1]]))
    return (
        float(np.clip(a, 0.0, width)),
        float(np.clip(b, 0.0, height)),
        float(np.clip(c, 0.0, width)),
        float(np.clip(d, 0.0, height)),
    )


@dataclass(frozen=True)
class PreprocessSettings:
    """The pre-processing parameters a set of weights was trained with (a manifest TOML table).

    ``size``: model side in pixels. ``lcn_sigma``: LCN Gaussian sigma as a fraction of ``size``.
    ``lcn_clip``: LCN values in local-std units are divided by it and clipped to [-1, 1].
    ``version``: :data:`PREPROCESS_VERSION` of the code that made the training inputs; a
    mismatch is refused, because the pixels the weights expect would no longer be produced.
    """

    size: int = DEFAULT_SIZE
    lcn_sigma: float = DEFAULT_LCN_SIGMA
    lcn_clip: float = DEFAULT_LCN_CLIP
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise ValueError(f"size must be an integer, got {self.size!r}")
        if self.size < MIN_SIDE:
            raise ValueError(f"size {self.size} is below the minimum {MIN_SIDE}")
        for name, upper in (("lcn_sigma", 0.25), ("lcn_clip", float("inf"))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not (np.isfinite(value) and 0.0 < value <= upper):
                raise ValueError(f"{name}={value} must be finite, > 0 and <= {upper}")
        if self.version != PREPROCESS_VERSION:
            raise ValueError(
                f"pre-processing version {self.version!r} is not the version this code "
                f"implements ({PREPROCESS_VERSION}); the weights expect different inputs"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> PreprocessSettings:
        """Build from a manifest table; missing keys take the defaults, unknown keys are refused."""
        return cls(**checked_keys(cls, mapping, "pre-processing settings"))

    def to_mapping(self) -> dict[str, int | float]:
        """Plain TOML-ready table of every field."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def apply(self, image: np.ndarray, *, want_lcn: bool = True) -> Preprocessed:
        """Run :func:`preprocess` with these settings."""
        return preprocess(
            image,
            size=self.size,
            lcn_sigma=self.lcn_sigma,
            lcn_clip=self.lcn_clip,
            want_lcn=want_lcn,
        )


@dataclass(frozen=True)
class Preprocessed:
    """Model inputs of one image: read-only float32 ``size x size`` arrays in [-1, 1].

    ``raw``: padding is -1 (black). ``lcn``: padding is 0 (neutral); ``None`` when it was not
    asked for. ``transform`` maps model coordinates back to the original pixels.
    """

    raw: FloatArray
    lcn: FloatArray | None
    transform: Transform

    def __post_init__(self) -> None:
        expected = (self.transform.model_size, self.transform.model_size)
        for name in ("raw", "lcn"):
            array = getattr(self, name)
            if array is None:
                continue
            if array.shape != expected or array.dtype != np.float32:
                raise ValueError(
                    f"{name} must be float32 {expected}, got {array.dtype} {array.shape}"
                )
            array.setflags(write=False)


def check_image(image: object) -> np.ndarray:
    """Return ``image`` as an array if it is a usable 2-D grayscale radiograph, else raise.

    Refused: non-arrays, colour or other non-2-D arrays, empty arrays, sides under
    :data:`MIN_SIDE`, bool/complex/non-numeric dtypes, NaN or infinite values.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        raise ValueError(
            f"image has shape {image.shape}: colour (RGB/RGBA) images must be converted to "
            "grayscale first"
        )
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (rows, cols), got {image.ndim}-D shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.dtype.kind not in "uif":
        raise ValueError(
            f"image dtype {image.dtype} is not supported: use an integer or float type"
        )
    if min(image.shape) < MIN_SIDE:
        raise ValueError(f"image {image.shape} is smaller than {MIN_SIDE} px on a side")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    return image


def crop_padding(image: np.ndarray, *, threshold: float = PAD_THRESHOLD) -> CropBox:
    """Find the uniform near-black padding at the image borders; return the rectangle to keep.

    Rule, on a *detection grid* (the image block-averaged by an integer factor so that its
    short side is about :data:`_DETECTION_SIDE` px; factor 1 for images up to twice that):

    1. scale to 8 bits between the 0.1th and 99.9th percentiles, then apply a 7x7 median and a
       7x7 opening with black outside the image. This removes noise and any bright line up to
       3 grid px wide (the white frame at a CR detector or padding edge, its corners, even at
       the very image edge) and any bright speck smaller than 7x7 grid px.
    2. The black level and the dynamic range come from the 0.5th and 99.5th percentiles of the
       filtered grid. A grid pixel is *content* if brighter than ``black + threshold * range``.
    3. The crop is the bounding box of all content, mapped back to full resolution and grown
       by ``factor - 1`` px (clipped to the image), so that a grid block only partly filled
       with content never costs any anatomy. At factor 1 the crop is tight, which keeps a
       strip of padding (and the false edge it would make) out of the model input.

    Only border rows/columns holding no content at all are removed: whatever lies between two
    content pixels (a dark region inside the image) is kept, and so is dark air that is not
    uniformly near-black. Border air as black as the padding is indistinguishable from it and
    is removed. An image without padding keeps its full extent. The default threshold (8 %)
    tolerates Gaussian noise up to about 5 % of the range in the padding. Raises
    ``ValueError`` when the image is constant or no content is found.
    """
    pixels = check_image(image)
    if pixels.min() == pixels.max():
        raise ValueError(f"image is constant (every pixel is {pixels.flat[0]}): no contrast")
    factor = max(1, min(pixels.shape) // _DETECTION_SIDE)
    grid = _suppress_lines(_to_uint8(_block_average(pixels, factor)))
    black, white = (float(v) for v in np.percentile(_sample(grid), (0.5, 99.5)))
    if white <= black:
        white = float(grid.max())
    if white <= black:
        raise ValueError("image has no content: only uniform near-black padding was found")
    content = grid > black + threshold * (white - black)
    rows = np.flatnonzero(content.any(axis=1))
    cols = np.flatnonzero(content.any(axis=0))
    height, width = pixels.shape
    margin = factor - 1
    return CropBox(
        max(0, int(cols[0]) * factor - margin),
        max(0, int(rows[0]) * factor - margin),
        min(width, (int(cols[-1]) + 1) * factor + margin),
        min(height, (int(rows[-1]) + 1) * factor + margin),
    )


def _sample(pixels: np.ndarray) -> np.ndarray:
    """A regular subsample of at most about :data:`_PERCENTILE_SAMPLES` pixels."""
    step = max(1, int(np.sqrt(pixels.size / _PERCENTILE_SAMPLES)))
    return pixels[::step, ::step]


def _block_average(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks (the last partial blocks are dropped)."""
    if factor == 1:
        return pixels
    native = pixels.dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64)
    source = pixels if native else pixels.astype(np.float32)
    shape = (pixels.shape[1] // factor, pixels.shape[0] // factor)
    return np.asarray(cv2.resize(source, shape, interpolation=cv2.INTER_AREA))


def _to_uint8(pixels: np.ndarray) -> npt.NDArray[np.uint8]:
    """Linear map of the 0.1th..99.9th percentiles (min..max if they coincide) to 0..255."""
    lo, hi = (float(v) for v in np.percentile(_sample(pixels), (0.1, 99.9)))
    if hi <= lo:
        lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        raise ValueError("image has no contrast at the padding-detection scale")
    scaled = (pixels.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)


def _suppress_lines(image8: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Remove noise and thin bright lines: 7x7 median, then a 7x7 morphological opening.

    The median removes noise and straight lines up to 3 px wide; the opening removes the small
    blobs the median leaves where two lines cross (frame corners). Outside the image counts as
    black for both, so a line along the very edge goes too, while content reaching the edge
    is kept whole.
    """
    r = _LINE_FILTER // 2
    padded = cv2.copyMakeBorder(image8, r, r, r, r, cv2.BORDER_CONSTANT, value=0)
    median = cv2.medianBlur(padded, _LINE_FILTER)[r:-r, r:-r]
    kernel = np.ones((_LINE_FILTER, _LINE_FILTER), np.uint8)
    opened = cv2.morphologyEx(
        median, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0
    )
    return np.asarray(opened, dtype=np.uint8)


def resize_content(image: np.ndarray, transform: Transform) -> FloatArray:
    """Crop and resize ``image`` to the content rectangle of ``transform`` (float32).

    INTER_AREA when shrinking (anti-aliased), INTER_LINEAR when enlarging (no overshoot).
    """
    crop = np.ascontiguousarray(image[transform.crop.slices()], dtype=np.float32)
    box = transform.content_box
    shrinking = box.width * box.height < crop.shape[0] * crop.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(crop, (box.width, box.height), interpolation=interpolation)
    return np.asarray(resized, dtype=np.float32).reshape(box.height, box.width)


def to_unit_range(content: FloatArray) -> FloatArray:
    """Linear map of content taking its :data:`RAW_PERCENTILES` to -1 and +1 (not clipped).

    Percentiles rather than min/max so that a few hot pixels or burned-in labels do not
    squash the anatomy into a narrow band. Raises when the content has no contrast.
    """
    lo, hi = (float(v) for v in np.percentile(_sample(content), RAW_PERCENTILES))
    if hi <= lo:
        lo, hi = float(content.min()), float(content.max())
    if hi <= lo:
        raise ValueError("the cropped content is constant: no contrast to normalise")
    half = (hi - lo) / 2.0
    return ((content - np.float32(lo + half)) / np.float32(half)).astype(np.float32)


def local_contrast_normalize(content: FloatArray, sigma: float, clip: float) -> FloatArray:
    """Subtractive then divisive LCN (Jarrett et al. 2009) with a Gaussian window, in [-1, 1].

    ``v = x - G*x``; ``s = sqrt(G*v^2)``; ``y = v / max(s, mean(s))``, the floor ``mean(s)``
    keeping flat regions from amplifying noise. ``y`` is in units of local standard deviation;
    ``y / clip`` is clipped to [-1, 1] (with clip 3 the mean is about 0, the standard deviation
    about 0.2 and well under 0.1 % of pixels clip on a FracAtlas radiograph). Computed on the
    content rectangle only, with mirrored borders, so the edge against the padding adds no
    false edge.
    """
    centred = content - _blur(content, sigma)
    local_sd = np.sqrt(np.maximum(_blur(centred * centred, sigma), 0.0))
    floor = float(local_sd.mean())
    if floor <= 0.0:
        return np.zeros_like(content)
    normalised = centred / np.maximum(local_sd, np.float32(floor))
    return np.clip(normalised / np.float32(clip), -1.0, 1.0).astype(np.float32)


def _blur(a: FloatArray, sigma: float) -> FloatArray:
    """Gaussian blur with mirrored borders (the image edge is not an edge)."""
    out = cv2.GaussianBlur(a, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)
    return np.asarray(out, dtype=np.float32).reshape(a.shape)


def place_on_canvas(content: FloatArray, transform: Transform, fill: float) -> FloatArray:
    """Put ``content`` at ``transform.content_box`` in a square filled with ``fill``."""
    canvas = np.full((transform.model_size, transform.model_size), fill, dtype=np.float32)
    canvas[transform.content_box.slices()] = content
    return canvas


def preprocess(
    image: np.ndarray,
    *,
    size: int = DEFAULT_SIZE,
    lcn_sigma: float = DEFAULT_LCN_SIGMA,
    lcn_clip: float = DEFAULT_LCN_CLIP,
    want_lcn: bool = True,
) -> Preprocessed:
    """Crop padding, resize into a ``size`` square, and build the raw and (optional) LCN inputs.

    Raw channel: content percentiles 0.5/99.5 mapped to -1/+1 and clipped; padding -1.
    LCN channel (only when ``want_lcn``; raw-only models skip its cost): see
    :func:`local_contrast_normalize`; padding 0.

    ``lcn_sigma`` is a fraction of ``size`` so the window covers the same anatomy at any
    model size. The default 1/128 is sigma = 8 px at 1024, about 2 mm at the 0.2-0.3 mm/px
    of a 1024 px radiograph, a window of about 1-1.5 cm (6 sigma). That is wider than cortex
    (2-5 mm), trabecular texture and fracture lines, which therefore keep their contrast,
    and narrower than a bone shaft or a soft-tissue thickness or exposure gradient, which are
    flattened. Raises ``ValueError`` on bad input or settings.
    """
    settings = PreprocessSettings(size=size, lcn_sigma=lcn_sigma, lcn_clip=lcn_clip)
    pixels = check_image(image)
    crop = crop_padding(pixels)
    if min(crop.width, crop.height) < MIN_SIDE:
        raise ValueError(
            f"after cropping the padding only {crop.width}x{crop.height} px of content remain, "
            f"fewer than {MIN_SIDE} on a side"
        )
    rows, cols = pixels.shape
    transform = Transform.fit((rows, cols), crop, settings.size)
    scaled = to_unit_range(resize_content(pixels, transform))
    raw = place_on_canvas(np.clip(scaled, -1.0, 1.0), transform, -1.0)
    lcn = None
    if want_lcn:
        sigma_px = settings.lcn_sigma * settings.size
        normalised = local_contrast_normalize(scaled, sigma_px, settings.lcn_clip)
        lcn = place_on_canvas(normalised, transform, 0.0)
    return Preprocessed(raw=raw, lcn=lcn, transform=transform)
