"""Decoding real CR/DX samples (every encoding) and the grayscale pipeline on controlled data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydicom.dataset import Dataset

from dicomnode.pixels import (
    PixelDataError,
    decode_stored_values,
    load_view,
    region_hints,
    to_display,
)

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "dicom-samples"
CATALOGUE = list(csv.DictReader((SAMPLES / "samples.csv").open()))
DECODABLE = [row["file"] for row in CATALOGUE if row["decodes_pydicom_pylibjpeg"] == "yes"]
BROKEN = [row["file"] for row in CATALOGUE if row["decodes_pydicom_pylibjpeg"] == "no"]
DERIVED = [(row["file"], row["derived_from"]) for row in CATALOGUE if row["derived_from"]]


def _sample(name: str) -> Path:
    return SAMPLES / name


def _small_mono2(tmp_path: Path, values: np.ndarray, **attributes: object) -> Path:
    """A copy of the small uncompressed DX sample with controlled 16-bit pixel values."""
    ds = pydicom.dcmread(_sample("DX_highdicom_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.Rows, ds.Columns = values.shape
    ds.PixelData = values.astype("<u2").tobytes()
    for keyword in (
        "WindowCenter",
        "WindowWidth",
        "RescaleSlope",
        "RescaleIntercept",
        "PresentationLUTShape",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in attributes.items():
        if keyword.startswith("PixelPadding"):  # ambiguous US/SS VR: unsigned pixels here
            ds.add_new(keyword, "US", value)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / "synthetic.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_catalogue_covers_broken_and_decodable_files() -> None:
    assert len(DECODABLE) >= 10 and len(BROKEN) == 2 and len(DERIVED) == 4


@pytest.mark.parametrize("name", DECODABLE)
def test_every_decodable_sample_gives_a_unit_range_float_image(name: str) -> None:
    view = load_view(_sample(name))
    header = pydicom.dcmread(_sample(name), stop_before_pixels=True)
    assert view.pixels.dtype == np.float32
    assert view.pixels.shape == (header.Rows, header.Columns)
    assert 0.0 <= float(view.pixels.min()) < float(view.pixels.max()) <= 1.0
    assert "PixelData" not in view.header
    assert view.sop_instance_uid == header.SOPInstanceUID


@pytest.mark.parametrize("name", BROKEN)
def test_broken_codestreams_raise_pixel_data_error_with_reason(name: str) -> None:
    syntax = pydicom.dcmread(_sample(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    with pytest.raises(PixelDataError, match="cannot decode pixel data") as info:
        load_view(_sample(name))
    assert syntax.name in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("derived", "source"), DERIVED)
def test_lossless_reencodings_decode_pixel_identical(derived: str, source: str) -> None:
    a, b = pydicom.dcmread(_sample(derived)), pydicom.dcmread(_sample(source))
    assert a.file_meta.TransferSyntaxUID != b.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(decode_stored_values(a), decode_stored_values(b))
    np.testing.assert_array_equal(
        load_view(_sample(derived)).pixels, load_view(_sample(source)).pixels
    )


def test_jpeg_ls_lossless_matches_jpeg_lossless() -> None:
    np.testing.assert_array_equal(
        load_view(_sample("RG2_JLSL.dcm")).pixels, load_view(_sample("RG2_JPLL.dcm")).pixels
    )


@pytest.mark.parametrize(
    ("lossy", "lossless"),
    [("RG3_J2KI.dcm", "RG3_J2KR.dcm"), ("RG2_JPLY_fixed.dcm", "RG2_JPLL.dcm")],
)
def test_lossy_encodings_stay_close_to_their_lossless_twin(lossy: str, lossless: str) -> None:
    a, b = load_view(_sample(lossy)).pixels, load_view(_sample(lossless)).pixels
    assert a.shape == b.shape
    assert float(np.mean(np.abs(a - b))) < 0.02


@pytest.mark.parametrize(
    "name",
    ["RG3_J2KR_derived_EVRLE.dcm", "CR_cspine_16x16_dicomdir6154.dcm", "DX_highdicom_small.dcm"],
)
def test_monochrome1_is_inverted_to_bone_bright(name: str, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_sample(name))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    as_mono1 = load_view(_sample(name)).pixels
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "mono2.dcm")
    as_mono2 = load_view(tmp_path / "mono2.dcm").pixels
    np.testing.assert_allclose(as_mono1 + as_mono2, 1.0, atol=1e-6)
    raw = decode_stored_values(ds)
    # the highest stored value (least attenuation in MONOCHROME1) is the darkest output
    assert as_mono1[np.unravel_index(np.argmax(raw), raw.shape)] == as_mono1.min()


def test_no_voi_scales_min_to_black_and_max_to_white(tmp_path: Path) -> None:
    values = np.arange(100, 100 + 12 * 10, dtype=np.uint16).reshape(12, 10)
    pixels = load_view(_small_mono2(tmp_path, values)).pixels
    assert pixels[0, 0] == 0.0 and pixels[-1, -1] == 1.0
    assert np.all(np.diff(pixels.ravel()) > 0)


def test_modality_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    values = np.arange(0, 4000, 25, dtype=np.uint16).reshape(16, 10)
    plain = load_view(_small_mono2(tmp_path, values, WindowCenter=1500, WindowWidth=1000)).pixels
    # the same window expressed in rescaled units must give the same picture
    rescaled = load_view(
        _small_mono2(
            tmp_path,
            values,
            RescaleSlope=2,
            RescaleIntercept=-100,
            WindowCenter=2 * 1500 - 100,
            WindowWidth=2 * 1000,
        )
    ).pixels
    np.testing.assert_allclose(plain, rescaled, atol=2e-3)
    assert plain[values < 1000].max() == 0.0 and plain[values > 2000].min() == 1.0


def test_first_window_is_used_when_several_are_given(tmp_path: Path) -> None:
    values = np.arange(0, 4000, 25, dtype=np.uint16).reshape(16, 10)
    first = load_view(_small_mono2(tmp_path, values, WindowCenter=1500, WindowWidth=1000)).pixels
    several = load_view(
        _small_mono2(tmp_path, values, WindowCenter=[1500, 300], WindowWidth=[1000, 200])
    ).pixels
    np.testing.assert_array_equal(first, several)


def test_voi_lut_sequence_is_applied_and_scaled_by_its_range(tmp_path: Path) -> None:
    values = np.arange(0, 160, dtype=np.uint16).reshape(16, 10)
    item = Dataset()
    item.LUTDescriptor = [160, 0, 16]
    # a decreasing LUT (output reversed), stored as US so pydicom writes it as a list
    item.add_new("LUTData", "US", [4095 - 20 * v for v in range(160)])
    path = _small_mono2(tmp_path, values, VOILUTSequence=[item])
    pixels = load_view(path).pixels
    assert pixels[0, 0] == 1.0 and pixels[-1, -1] == 0.0
    assert np.all(np.diff(pixels.ravel()) < 0)


def test_pixel_padding_value_and_range_become_black(tmp_path: Path) -> None:
    values = np.arange(0, 160, dtype=np.uint16).reshape(16, 10) + 1000
    values[:2, :] = 7
    single = load_view(_small_mono2(tmp_path, values, PixelPaddingValue=7)).pixels
    assert np.all(single[:2] == 0.0) and single[2:].min() == 0.0 and single[2:].max() == 1.0
    ranged = load_view(
        _small_mono2(tmp_path, values, PixelPaddingValue=1010, PixelPaddingRangeLimit=1000)
    ).pixels
    padded = (values >= 1000) & (values <= 1010)
    assert np.all(ranged[padded] == 0.0) and np.all(ranged[~padded & (values > 1010)] > 0.0)


def test_padding_is_black_in_monochrome1_too(tmp_path: Path) -> None:
    values = np.arange(0, 160, dtype=np.uint16).reshape(16, 10) + 1000
    values[:, :2] = 4000  # padding at the "black" end of MONOCHROME1 would invert to white
    path = _small_mono2(
        tmp_path, values, PhotometricInterpretation="MONOCHROME1", PixelPaddingValue=4000
    )
    pixels = load_view(path).pixels
    assert np.all(pixels[:, :2] == 0.0) and pixels[:, 2:].max() == 1.0


def test_colour_and_multiframe_images_are_refused(tmp_path: Path) -> None:
    values = np.zeros((4, 4), dtype=np.uint16)
    with pytest.raises(PixelDataError, match="colour"):
        load_view(
            _small_mono2(tmp_path, values, PhotometricInterpretation="RGB", SamplesPerPixel=3)
        )
    with pytest.raises(PixelDataError, match="multi-frame"):
        load_view(_small_mono2(tmp_path, np.zeros((4, 4), np.uint16), NumberOfFrames=2))


def test_non_dicom_and_imageless_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    with pytest.raises(PixelDataError, match="not a readable DICOM file"):
        load_view(junk)
    ds = pydicom.dcmread(_sample("DX_highdicom_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "noimage.dcm")
    with pytest.raises(PixelDataError, match="no Pixel Data"):
        load_view(tmp_path / "noimage.dcm")


@settings(max_examples=40, deadline=None)
@given(
    values=arrays(np.uint16, (6, 5), elements=st.integers(0, 4095)),
    center=st.floats(-100, 5000),
    width=st.floats(1, 6000),
    mono1=st.booleans(),
)
def test_display_is_always_unit_range_float32(
    values: np.ndarray, center: float, width: float, mono1: bool
) -> None:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = 12, 0
    ds.WindowCenter, ds.WindowWidth = center, width
    out = to_display(values, ds)
    assert out.dtype == np.float32 and out.shape == values.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    order = np.argsort(values.ravel(), kind="stable")
    steps = np.diff(out.ravel()[order].astype(np.float64))
    assert np.all(steps <= 1e-7) if mono1 else np.all(steps >= -1e-7)


def test_region_hints_read_body_part_and_descriptions() -> None:
    ds = pydicom.dcmread(_sample("RG2_JPLL.dcm"), stop_before_pixels=True)
    hints = region_hints(ds)
    assert hints.body_part == ds.BodyPartExamined.strip()
    assert hints.descriptions[0] == ds.StudyDescription.strip()
    empty = region_hints(Dataset())
    assert empty.body_part == "" and empty.descriptions == ("", "", "")
