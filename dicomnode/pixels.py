"""Decode a stored radiograph into the grey-level array that ``inference`` expects.

The chain follows the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2): stored values →
Modality LUT (rescale or LUT) → VOI LUT or window (the first one where several are given) →
polarity (MONOCHROME1 is inverted so bone is bright) → a float32 array in ``[0, 1]``,
0 the darkest display value. Pixels marked by Pixel Padding Value (and Range Limit) are set to 0
so the black-border crop in ``inference`` removes them. Everything that cannot be turned into one
grey-level plane (colour, multi-frame, an undecodable codestream, grayscale pipeline attributes
that cannot be applied) raises :class:`PixelDataError`, a ``ValueError`` whose message says why,
without a traceback from the decoder plugins. Header elements whose value cannot be parsed at
all (a length that does not fit the VR, an unknown VR, a corrupt sequence) are left out of the
view's header, so nothing downstream trips over them (:func:`drop_unreadable`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.processing import apply_voi

from dicomnode.uids import SourceIdentity

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


class PixelDataError(ValueError):
    """A stored instance whose pixels cannot become one grey-level image (reason in the message)."""


@dataclass(frozen=True, eq=False)
class View:
    """One decoded radiograph: display-ready pixels plus the source header without pixel data.

    ``pixels``: 2-D float32 in ``[0, 1]``, MONOCHROME2 polarity (bone bright), padding at 0, as
    decoded for the analysis; once analysed, the worker keeps only its 8-bit display copy
    (:meth:`compact`, uint8, what the result writers draw), a quarter of the memory.
    ``header``: the source data set with the pixel data removed (patient, study, series and
    image attributes, used by the result writers as evidence and reference).
    ``sha256``: the SHA-256 (hex) of the file the view was decoded from, i.e. of the stored
    instance as received: with the SOP Instance UID it identifies the content the results
    describe (their UIDs follow it, see :mod:`dicomnode.uids`).
    """

    pixels: np.ndarray
    header: Dataset
    sha256: str

    @property
    def source(self) -> SourceIdentity:
        """The identity of the decoded instance (SOP Instance UID and bytes) for result UIDs."""
        return SourceIdentity(self.sop_instance_uid, self.sha256)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.header.SOPClassUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.header.StudyInstanceUID)

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])

    def compact(self) -> View:
        """The view with its pixels as the 8-bit display copy (:func:`to_uint8`)."""
        return replace(self, pixels=to_uint8(self.pixels))


@dataclass(frozen=True)
class RegionHints:
    """Header text that helps choose the anatomical region of an image (may all be empty)."""

    body_part: str
    descriptions: tuple[str, ...]


def load_view(path: str | Path) -> View:
    """Read the instance at ``path`` and return its display-ready pixels, header and hash.

    The hash is taken from the same open file that is decoded, so it always describes the bytes
    analysed, even if the stored instance is replaced by a corrected re-send meanwhile.
    """
    try:
        with Path(path).open("rb") as handle:
            sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
            handle.seek(0)
            ds = pydicom.dcmread(handle)
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise PixelDataError(f"{Path(path).name}: not a readable DICOM file ({exc})") from None
    except Exception as exc:  # a corrupt data set: struct, value or recursion errors of the reader
        name = type(exc).__name__
        raise PixelDataError(f"{Path(path).name}: not a readable DICOM file ({name})") from None
    drop_unreadable(ds)
    check_single_grey_frame(ds)
    raw = decode_stored_values(ds)
    pixels = display_pixels(raw, ds)
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    return View(pixels=pixels, header=ds, sha256=sha256)


def drop_unreadable(ds: Dataset) -> tuple[str, ...]:
    """Remove the top-level elements of ``ds`` whose value cannot be parsed (a length that is
    no multiple of the VR's size, an unknown VR, a corrupt sequence), and return their names.

    pydicom parses values when they are first used, so such an element would raise wherever the
    worker or a writer touches it; without it the image is judged on what is readable."""
    dropped = []
    for tag in list(ds.keys()):
        try:
            ds[tag]
        except Exception:
            dropped.append(keyword_for_tag(tag) or str(tag))
            del ds[tag]
    return tuple(dropped)


def check_single_grey_frame(ds: Dataset) -> None:
    """Raise :class:`PixelDataError` unless ``ds`` holds exactly one grey-level frame."""
    if "PixelData" not in ds:
        raise PixelDataError("the instance has no Pixel Data (not an image)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PixelDataError(
            f"invalid Samples per Pixel or Number of Frames ({type(exc).__name__})"
        ) from None
    if samples != 1 or photometric not in _GREYSCALE:
        raise PixelDataError(
            f"colour or unsupported image (Photometric Interpretation {photometric or 'missing'}, "
            f"{samples} samples per pixel); only MONOCHROME1/MONOCHROME2 radiographs are analysed"
        )
    if frames != 1:
        raise PixelDataError(
            f"multi-frame image ({frames} frames); only single-frame radiographs are analysed"
        )


def decode_stored_values(ds: Dataset) -> np.ndarray:
    """Decode the stored pixel values of a single-frame image (any supported transfer syntax)."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    syntax_name = getattr(syntax, "name", str(syntax))
    try:
        raw = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        # Decoder plugins raise RuntimeError, ValueError, NotImplementedError, MemoryError; the
        # Rust one (pylibjpeg-rle) panics on corrupt RLE segments with pyo3's PanicException,
        # a BaseException: uncaught, it ended the worker process, and its restarts, on the study
        reason = " ".join(str(exc).split())
        raise PixelDataError(f"cannot decode pixel data ({syntax_name}): {reason}") from None
    if raw.ndim != 2:
        raise PixelDataError(f"decoded pixel data has shape {raw.shape}, expected one 2-D frame")
    return np.asarray(raw)


def padding_mask(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Pixels marked as padding by Pixel Padding Value (and Range Limit), in stored values."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return np.zeros(raw.shape, dtype=bool)
    limit = ds.get("PixelPaddingRangeLimit")
    low, high = (value, value) if limit is None else (min(value, limit), max(value, limit))
    return np.asarray((raw >= low) & (raw <= high))


def display_pixels(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """:func:`to_display`, with a :class:`PixelDataError` when the grayscale pipeline attributes
    cannot be applied (a malformed Modality LUT, VOI LUT, window or padding value: pydicom
    raises TypeError, KeyError, IndexError, NotImplementedError...) or give no finite values
    (a rescale slope of NaN or 1e308)."""
    try:
        pixels = to_display(raw, ds)
    except PixelDataError:
        raise
    except Exception as exc:
        raise PixelDataError(
            "the grayscale pipeline attributes (Modality LUT or rescale, VOI LUT or window, "
            f"pixel padding) cannot be applied ({type(exc).__name__})"
        ) from None
    if not np.isfinite(pixels).all():
        raise PixelDataError(
            "the grayscale pipeline attributes (Modality LUT or rescale, VOI LUT or window) "
            "give values that are not finite numbers"
        )
    return pixels


def to_display(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values → float32 ``[0, 1]`` MONOCHROME2 image (Modality LUT, VOI, polarity, padding).

    The VOI output is scaled by its own output range (a window's ``[y_min, y_max]``, a VOI LUT's
    entry range), so the result does not depend on bit depth. Without any VOI the modality values
    are scaled by their minimum and maximum over the non-padding pixels.
    """
    padding = padding_mask(raw, ds)
    modality = np.asarray(apply_modality_lut(raw, ds))
    scaled = _scaled_voi(modality, ds, padding)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        scaled = 1.0 - scaled
    scaled[padding] = 0.0
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _scaled_voi(modality: np.ndarray, ds: Dataset, padding: np.ndarray) -> np.ndarray:
    """Apply the first VOI LUT or window to modality values and scale its output to [0, 1]."""
    if ds.get("VOILUTSequence"):
        lut_item = ds.VOILUTSequence[0]
        entries = int(lut_item.LUTDescriptor[0]) or 65536
        first_mapped = int(lut_item.LUTDescriptor[1])
        domain = np.arange(first_mapped, first_mapped + entries)
        table = apply_voi(domain, ds).astype(np.float64)
        out = apply_voi(np.rint(modality).astype(np.int64), ds).astype(np.float64)
        return _unit_scale(out, float(table.min()), float(table.max()))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            out = np.asarray(apply_voi_lut(modality, ds), dtype=np.float64)
            low, high = np.asarray(apply_voi_lut(np.array([-np.inf, np.inf]), ds))
        except ValueError as exc:
            raise PixelDataError(f"invalid window in the VOI LUT module: {exc}") from None
        return _unit_scale(out, float(low), float(high))
    values = modality[~padding] if (~padding).any() else modality
    return _unit_scale(modality.astype(np.float64), float(values.min()), float(values.max()))


def _unit_scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly to ``[0, 1]`` (a constant image maps to 0)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A ``[0, 1]`` float image as 8-bit grey levels (for Secondary Capture and PNG); an 8-bit
    image (a compacted view's) as it is."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def region_hints(ds: Dataset) -> RegionHints:
    """Body Part Examined and the study/series/protocol descriptions, stripped, '' if absent."""

    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip()

    return RegionHints(
        body_part=text("BodyPartExamined"),
        descriptions=(text("StudyDescription"), text("SeriesDescription"), text("ProtocolName")),
    )
