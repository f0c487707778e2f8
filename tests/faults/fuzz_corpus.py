"""The base files the fuzzer mutates (issue 13): real radiographs in the encodings a PACS sends.

Every base is a complete DICOM file (File Meta + data set) built deterministically at the start
of a run from real data:

- three FracAtlas radiographs wrapped as small DX instances by :func:`dicomnode.demo.dx_from_image`
  (8-bit MONOCHROME2 with a window), also as 16-bit MONOCHROME1 with a rescale and a VOI LUT
  sequence, signed 12-bit with two windows and a padding value, and in every encoding the node
  accepts that pydicom or DCMTK can write: RLE, JPEG baseline, JPEG extended 12-bit, JPEG
  lossless SV1, JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy, Implicit VR,
  Explicit VR Big Endian and Deflated;
- the small real samples of ``../shared/dicom-samples`` (a highdicom DX, a 16x16 CR) as they are,
  and crops of the real NEMA CR images (their own headers, their own kind of codestream);
- two full-size real CR codestreams (JPEG 2000 lossy, JPEG extended) and the known-broken JPEG
  one, drawn less often (they take longer to decode).

Images are kept small (FracAtlas views 128 px, crops 160-192 px) so that thousands of cases go
through the worker in minutes.
"""

from __future__ import annotations

import copy
import io
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tests.conftest import DICOM_SAMPLES
from tests.faults.conftest import small_dx

DCMCJPEG, DCMCONV = "/usr/bin/dcmcjpeg", "/usr/bin/dcmconv"


@dataclass(frozen=True)
class Base:
    """One base file: its bytes, parsed data set (never mutated: cases deep-copy it) and how
    often cases start from it (relative weight)."""

    name: str
    data: bytes
    dataset: Dataset
    weight: float

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.dataset.file_meta.TransferSyntaxUID)


def encode(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (File Meta + data set) in its File Meta's transfer syntax."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def parse(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


# -- FracAtlas DX instances ----------------------------------------------------------------------


def fracatlas_8bit(view: int) -> Dataset:
    """View ``view`` (hand, leg, shoulder) as an 8-bit MONOCHROME2 DX with a window."""
    return small_dx(view)


def fracatlas_16bit_mono1(view: int) -> Dataset:
    """12 of 16 bits, MONOCHROME1, rescale slope/intercept and a VOI LUT sequence (no window)."""
    ds = small_dx(view)
    pixels = ds.pixel_array.astype(np.uint16)
    stored = (4095 - pixels * 16).astype(np.uint16)  # MONOCHROME1: bone dark in stored values
    ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME1", "INVERSE"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-100"
    del ds.WindowCenter, ds.WindowWidth
    lut = Dataset()
    lut.LUTDescriptor = [2048, 0, 12]
    lut.LUTData = list(np.linspace(0, 4095, 2048).astype(np.uint16))
    lut["LUTData"].VR = "US"
    lut.LUTExplanation = "FUZZ BASE"
    ds.VOILUTSequence = DicomSequence([lut])
    ds.PixelData = stored.tobytes()
    return ds


def fracatlas_signed(view: int) -> Dataset:
    """Signed 12-bit MONOCHROME2 with two windows, a padding value and imager pixel spacing."""
    ds = small_dx(view)
    pixels = ds.pixel_array.astype(np.int16) * 8 - 1024
    pixels[:4, :] = -2048  # a padded border
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.WindowCenter, ds.WindowWidth = ["0", "-200"], ["2048", "1000"]
    ds.PixelPaddingValue = -2048
    ds["PixelPaddingValue"].VR = "SS"
    ds.ImagerPixelSpacing = ["0.143", "0.143"]
    ds.PatientOrientation = ["A", "F"]
    ds.Laterality = "R"
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def compressed(ds: Dataset, syntax: UID, **options: object) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.compress(syntax, **options)
    return ds


def reencoded(ds: Dataset, *, implicit: bool = False) -> Dataset:
    """``ds`` re-read after writing it as Implicit VR Little Endian (``implicit``)."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return parse(encode(ds))


def dcmtk(ds: Dataset, tool: str, option: str, folder: Path, name: str) -> Dataset:
    """``ds`` converted by a DCMTK tool (``dcmcjpeg +eb``, ``dcmconv +tb``...)."""
    source, target = folder / f"{name}-in.dcm", folder / f"{name}.dcm"
    source.write_bytes(encode(ds))
    subprocess.run([tool, option, str(source), str(target)], check=True, capture_output=True)
    return pydicom.dcmread(target)


# -- real samples --------------------------------------------------------------------------------


def sample(name: str) -> Dataset:
    """A sample written again by pydicom with a complete File Meta (some lack the Media Storage
    UIDs a sender reads)."""
    return parse(encode(pydicom.dcmread(DICOM_SAMPLES / name)))


def crop(name: str, rows: int, columns: int) -> Dataset:
    """The centre of a real sample, uncompressed, with the sample's own header."""
    ds = pydicom.dcmread(DICOM_SAMPLES / name)
    pixels = ds.pixel_array
    top, left = (pixels.shape[0] - rows) // 2, (pixels.shape[1] - columns) // 2
    part = np.ascontiguousarray(pixels[top : top + rows, left : left + columns])
    ds.decompress()
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = part.tobytes()
    return parse(encode(ds))


Builder = Callable[[Path], Dataset]


def _builders() -> dict[str, tuple[Builder, float]]:
    """Base name → (builder, weight)."""
    views = {"hand": 0, "leg": 1, "shoulder": 2}
    table: dict[str, tuple[Builder, float]] = {}
    for view, i in views.items():
        table[f"fa-{view}-8bit"] = (lambda _, i=i: fracatlas_8bit(i), 3.0)
        table[f"fa-{view}-mono1-voilut"] = (lambda _, i=i: fracatlas_16bit_mono1(i), 1.5)
        table[f"fa-{view}-signed"] = (lambda _, i=i: fracatlas_signed(i), 1.0)
    table.update(
        {
            "fa-hand-rle": (lambda _: compressed(fracatlas_16bit_mono1(0), RLELossless), 1.5),
            "fa-leg-jls": (lambda _: compressed(fracatlas_8bit(1), JPEGLSLossless), 1.5),
            "fa-shoulder-jlsnl": (
                lambda _: compressed(fracatlas_16bit_mono1(2), JPEGLSNearLossless, jls_error=2),
                1.0,
            ),
            "fa-hand-j2k": (lambda _: compressed(fracatlas_signed(0), JPEG2000Lossless), 1.5),
            "fa-leg-j2k-lossy": (
                lambda _: compressed(fracatlas_8bit(1), JPEG2000, j2k_cr=[20]),
                1.0,
            ),
            "fa-shoulder-jpeg-baseline": (
                lambda f: dcmtk(fracatlas_8bit(2), DCMCJPEG, "+eb", f, "baseline"),
                1.5,
            ),
            "fa-hand-jpeg-extended": (
                lambda f: dcmtk(fracatlas_16bit_mono1(0), DCMCJPEG, "+ee", f, "extended"),
                1.0,
            ),
            "fa-leg-jpeg-lossless": (
                lambda f: dcmtk(fracatlas_16bit_mono1(1), DCMCJPEG, "+e1", f, "lossless"),
                1.5,
            ),
            "fa-shoulder-implicit": (lambda _: reencoded(fracatlas_8bit(2), implicit=True), 1.0),
            "fa-hand-big-endian": (
                lambda f: dcmtk(fracatlas_signed(0), DCMCONV, "+tb", f, "big-endian"),
                0.7,
            ),
            "fa-leg-deflated": (
                lambda f: dcmtk(fracatlas_8bit(1), DCMCONV, "+td", f, "deflated"),
                0.7,
            ),
            "dx-highdicom-small": (lambda _: sample("DX_highdicom_small.dcm"), 1.5),
            "cr-cspine-16x16": (lambda _: sample("CR_cspine_16x16_dicomdir6154.dcm"), 0.7),
            "rg2-hip-crop-jpeg-lossless": (
                lambda f: dcmtk(crop("RG2_JPLL.dcm", 192, 160), DCMCJPEG, "+e1", f, "rg2"),
                1.0,
            ),
            "rg3-tibia-crop-j2k": (
                lambda _: compressed(crop("RG3_J2KR.dcm", 176, 176), JPEG2000Lossless),
                1.0,
            ),
            "rg1-chest-crop-jls-near": (
                lambda _: compressed(
                    crop("RG1_JLSN.dcm", 160, 184), JPEGLSNearLossless, jls_error=3
                ),
                0.7,
            ),
            "rg2-hip-crop-rle": (
                lambda _: compressed(crop("RG2_JPLL.dcm", 160, 192), RLELossless),
                0.7,
            ),
            "rg3-j2k-lossy-full": (lambda _: sample("RG3_J2KI.dcm"), 0.25),
            "rg2-jpeg-extended-full": (lambda _: sample("RG2_JPLY_fixed.dcm"), 0.15),
            "rg2-jpeg-broken-full": (lambda _: sample("RG2_JPLY_BROKEN.dcm"), 0.1),
        }
    )
    return table


def build_bases(folder: Path) -> dict[str, Base]:
    """Every base, built in ``folder`` (DCMTK works on files there)."""
    folder.mkdir(parents=True, exist_ok=True)
    bases = {}
    for name, (builder, weight) in _builders().items():
        data = encode(builder(folder))
        bases[name] = Base(name, data, parse(data), weight)
    return bases


SUPPORTED_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
"""Uncompressed transfer syntaxes (the others are named by the bases' codestreams)."""
