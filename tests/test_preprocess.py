"""Tests of inference.preprocess: padding crop, resize geometry, raw and LCN channels, settings."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.preprocess import (
    DEFAULT_LCN_SIGMA,
    MIN_SIDE,
    PREPROCESS_VERSION,
    CropBox,
    PreprocessSettings,
    Transform,
    check_image,
    crop_padding,
    local_contrast_normalize,
    preprocess,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FRACATLAS_IMAGE = SHARED / "datasets" / "fracatlas" / "images" / "IMG0000001.jpg"

# Every dtype the DICOM edge or a dataset reader can hand over.
DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64]

TISSUE = 0.5  # mid-grey soft tissue, as a fraction of the dtype's working range
BONE = 0.9


def to_dtype(unit: np.ndarray, dtype: type) -> np.ndarray:
    """Map a [0, 1] float image onto a realistic range of ``dtype`` (clipping like a detector)."""
    unit = np.clip(unit, 0.0, 1.0)
    if dtype == np.uint8:
        return np.round(unit * 255).astype(dtype)
    if dtype == np.uint16:
        return np.round(unit * 4095).astype(dtype)  # 12-bit CR
    if np.issubdtype(dtype, np.signedinteger):
        return np.round(unit * 3000 - 1000).astype(dtype)  # signed, negative black level
    return unit.astype(dtype)


def radiograph(
    shape: tuple[int, int],
    content: CropBox,
    *,
    noise: float = 0.0,
    frame: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Synthetic float [0, 1] radiograph: tissue with a bone inside ``content``, black padding.

    Like a real film, the content holds a patch of air as black as the padding (between two
    limbs, say), so that an image without padding still has its black level inside.
    ``noise``: Gaussian sigma (fraction of the range) everywhere, padding included.
    ``frame``: width of a white frame along the image edge (0 for none).
    """
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, dtype=np.float64)
    image[content.slices()] = TISSUE
    air_h, air_w = content.height // 8, content.width // 8
    image[
        content.y0 + air_h : content.y0 + 2 * air_h, content.x0 + air_w : content.x0 + 2 * air_w
    ] = 0
    bone_x0 = content.x0 + content.width // 3
    bone_x1 = content.x0 + 2 * content.width // 3
    image[content.y0 + content.height // 4 : content.y1 - content.height // 4, bone_x0:bone_x1] = (
        BONE
    )
    image += rng.normal(0.0, noise, shape)
    if frame:
        image[:frame, :] = image[-frame:, :] = 1.0
        image[:, :frame] = image[:, -frame:] = 1.0
    return image


def assert_crop_finds(crop: CropBox, content: CropBox, shape: tuple[int, int]) -> None:
    """The crop contains all content and removes most of every padding strip."""
    assert crop.x0 <= content.x0 and crop.y0 <= content.y0
    assert crop.x1 >= content.x1 and crop.y1 >= content.y1
    slack = 0.02 * max(shape)
    assert content.x0 - crop.x0 <= slack and content.y0 - crop.y0 <= slack
    assert crop.x1 - content.x1 <= slack and crop.y1 - content.y1 <= slack


# --------------------------------------------------------------------------- crop_padding


@pytest.mark.parametrize("dtype", DTYPES)
def test_crop_finds_content_with_noise_and_white_frame(dtype: type) -> None:
    shape = (600, 500)
    content = CropBox(70, 90, 440, 530)
    image = radiograph(shape, content, noise=0.03, frame=2)
    # A second thin line inside the padding, as at the edge of a CR plate.
    image[40:43, :] = 1.0
    assert_crop_finds(crop_padding(to_dtype(image, dtype)), content, shape)


def test_crop_of_large_uint16_radiograph_finds_content() -> None:
    shape = (3000, 2500)
    content = CropBox(310, 240, 2210, 2790)
    image = to_dtype(radiograph(shape, content, noise=0.04, frame=3), np.uint16)
    assert_crop_finds(crop_padding(image), content, shape)


def test_crop_keeps_dark_air_at_the_border() -> None:
    # Content reaches the left edge through dark (20 % grey), noisy air: nothing to crop there.
    shape = (400, 300)
    content = CropBox(0, 50, 260, 360)
    image = radiograph(shape, content, noise=0.02)
    image[content.y0 : content.y1, 0:120] = 0.2 + np.random.default_rng(1).normal(
        0, 0.02, (310, 120)
    )
    crop = crop_padding(image)
    assert crop.x0 == 0
    assert_crop_finds(crop, content, shape)


def test_crop_never_cuts_at_a_black_band_inside_the_content() -> None:
    # A padding-black band across the whole image inside the content must not split the crop.
    shape = (400, 300)
    content = CropBox(40, 40, 260, 360)
    image = radiograph(shape, content, noise=0.02)
    image[180:230, :] = 0.0
    assert_crop_finds(crop_padding(image), content, shape)


def test_crop_without_padding_is_the_full_image() -> None:
    shape = (256, 320)
    image = radiograph(shape, CropBox(0, 0, 320, 256), noise=0.02)
    assert crop_padding(image) == CropBox(0, 0, 320, 256)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(120, 400),
    cols=st.integers(120, 400),
    pads=st.tuples(*[st.floats(0.12, 0.3)] * 4),
    noise=st.floats(0.0, 0.04),
    frame=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_crop_property_contains_content_and_drops_padding(
    rows: int,
    cols: int,
    pads: tuple[float, float, float, float],
    noise: float,
    frame: int,
    dtype: type,
    seed: int,
) -> None:
    left, top, right, bottom = pads
    content = CropBox(
        round(left * cols),
        round(top * rows),
        cols - round(right * cols),
        rows - round(bottom * rows),
    )
    image = radiograph((rows, cols), content, noise=noise, frame=frame, seed=seed)
    assert_crop_finds(crop_padding(to_dtype(image, dtype)), content, (rows, cols))


# --------------------------------------------------------------------------- Transform


def test_transform_fit_centres_the_content_and_fills_the_long_side() -> None:
    transform = Transform.fit((300, 200), CropBox(10, 20, 110, 270), 64)
    # crop 100 x 250 -> 26 x 64 (25.6 rounded), centred horizontally.
    assert transform.content_box == CropBox(19, 0, 45, 64)
    assert transform.scale_x == pytest.approx(26 / 100)
    assert transform.scale_y == pytest.approx(64 / 250)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(MIN_SIDE, 3000),
    cols=st.integers(MIN_SIDE, 3000),
    fractions=st.tuples(*[st.floats(0.0, 1.0)] * 4),
    size=st.sampled_from([64, 256, 1024]),
    points=st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=8),
)
def test_transform_round_trips_points_and_boxes(
    rows: int,
    cols: int,
    fractions: tuple[float, float, float, float],
    size: int,
    points: list[tuple[float, float]],
) -> None:
    fx0, fy0, fx1, fy1 = fractions
    x0 = round(fx0 * (cols - 1))
    y0 = round(fy0 * (rows - 1))
    x1 = x0 + 1 + round(fx1 * (cols - x0 - 1))
    y1 = y0 + 1 + round(fy1 * (rows - y0 - 1))
    transform = Transform.fit((rows, cols), CropBox(x0, y0, x1, y1), size)
    scale = max(rows, cols, size)

    original = np.array(points) * [cols, rows]
    back = transform.to_original_points(transform.to_model_points(original))
    np.testing.assert_allclose(back, original, rtol=0, atol=1e-9 * scale)

    model = np.array(points) * size
    again = transform.to_model_points(transform.to_original_points(model))
    np.testing.assert_allclose(again, model, rtol=0, atol=1e-9 * scale)

    # The content rectangle maps exactly onto the crop, and back.
    content = transform.content_box
    to_orig = transform.box_to_original(content.x0, content.y0, content.x1, content.y1)
    np.testing.assert_allclose(to_orig, (x0, y0, x1, y1), rtol=0, atol=1e-9 * scale)
    to_model = transform.box_to_model(x0, y0, x1, y1)
    np.testing.assert_allclose(
        to_model, (content.x0, content.y0, content.x1, content.y1), rtol=0, atol=1e-9 * scale
    )

    # Any model box maps inside the original image.
    bx0, by0, bx1, by1 = transform.box_to_original(0, 0, size, size)
    assert 0 <= bx0 <= bx1 <= cols and 0 <= by0 <= by1 <= rows


def test_box_to_original_clips_to_the_image() -> None:
    transform = Transform.fit((100, 400), CropBox(0, 0, 400, 100), 64)
    # The model square extends 24 model px (150 original px) above and below the content.
    assert transform.box_to_original(0, 0, 64, 64) == (0.0, 0.0, 400.0, 100.0)
    x0, y0, x1, y1 = transform.box_to_original(16, 28, 32, 36)
    assert (x0, y0, x1, y1) == pytest.approx((100.0, 25.0, 200.0, 75.0))


@pytest.mark.parametrize(("shape", "size"), [((900, 700), 256), ((90, 70), 256)])
def test_transform_matches_the_resized_pixels(shape: tuple[int, int], size: int) -> None:
    # A bright square on tissue: its centroid in the model image is where the transform says.
    rows, cols = shape
    image = np.zeros(shape)
    image[rows // 10 : rows - rows // 7, cols // 9 : cols - cols // 8] = TISSUE
    sy, sx = rows // 3, cols // 2
    side = max(4, rows // 10)
    image[sy : sy + side, sx : sx + side] = 1.0
    result = preprocess(image, size=size, want_lcn=False)
    bright = result.raw > 0.5
    ys, xs = np.nonzero(bright)
    weights = result.raw[bright] + 1
    found = np.array([np.average(xs + 0.5, weights=weights), np.average(ys + 0.5, weights=weights)])
    expected = result.transform.to_model_points([sx + side / 2, sy + side / 2])
    np.testing.assert_allclose(found, expected, atol=1.0)


def test_transform_rejects_bad_points_and_boxes() -> None:
    transform = Transform.fit((100, 100), CropBox(0, 0, 100, 100), 64)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        transform.to_model_points(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="x1 < x0"):
        transform.box_to_original(10, 10, 5, 20)
    with pytest.raises(ValueError, match="exceeds the original image"):
        Transform.fit((100, 100), CropBox(0, 0, 101, 100), 64)
    with pytest.raises(ValueError, match="invalid crop box"):
        CropBox(5, 0, 5, 10)


# --------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("dtype", DTYPES)
def test_preprocess_outputs_for_every_dtype(dtype: type) -> None:
    shape = (300, 220)
    content = CropBox(30, 20, 200, 280)
    result = preprocess(to_dtype(radiograph(shape, content, noise=0.02), dtype), size=64)
    assert result.lcn is not None
    box = result.transform.content_box
    outside = np.ones((64, 64), dtype=bool)
    outside[box.slices()] = False
    for channel in (result.raw, result.lcn):
        assert channel.dtype == np.float32 and channel.shape == (64, 64)
        assert channel.min() >= -1.0 and channel.max() <= 1.0
        assert not channel.flags.writeable
    assert outside.any()
    assert np.all(result.raw[outside] == -1.0)
    assert np.all(result.lcn[outside] == 0.0)
    inside = result.raw[box.slices()]
    assert inside.max() == 1.0 and float(np.median(inside)) > -0.5  # tissue is not black
    assert max(box.width, box.height) == 64


def test_preprocess_is_invariant_to_linear_intensity_changes() -> None:
    image = radiograph((240, 200), CropBox(20, 30, 180, 220), noise=0.03)
    a = preprocess(image, size=64)
    b = preprocess(image * 1234.5 + 77.0, size=64)
    assert a.transform == b.transform
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-4)
    assert a.lcn is not None and b.lcn is not None
    np.testing.assert_allclose(a.lcn, b.lcn, atol=1e-3)


def test_lcn_is_zero_mean_and_spreads_over_the_range() -> None:
    image = radiograph((400, 320), CropBox(0, 0, 320, 400), noise=0.05)
    result = preprocess(image, size=128)
    assert result.lcn is not None
    lcn = result.lcn[result.transform.content_box.slices()]
    assert abs(float(lcn.mean())) < 0.02
    assert 0.1 < float(lcn.std()) < 0.6
    assert lcn.min() < -0.5 and lcn.max() > 0.5


def test_lcn_removes_a_smooth_gradient() -> None:
    # A pure intensity ramp (exposure gradient) carries no local contrast.
    ramp = np.tile(np.linspace(-1.0, 1.0, 200, dtype=np.float32), (160, 1))
    sigma = 4.0
    lcn = local_contrast_normalize(ramp, sigma, 3.0)
    margin = int(4 * sigma)
    assert np.abs(lcn[margin:-margin, margin:-margin]).max() < 1e-3


def test_lcn_divides_by_local_contrast() -> None:
    # Texture of amplitude 1 on the left and 4 on the right: the mean local std is about 2.5,
    # so the right half (above that floor) comes out in unit local-std, whatever the scale.
    rng = np.random.default_rng(3)
    texture = rng.normal(0.0, 1.0, (128, 256)).astype(np.float32)
    texture[:, 128:] *= 4.0
    clip = 3.0
    lcn = local_contrast_normalize(texture, 2.0, clip)
    right_std = float(lcn[:, 160:].std())
    assert 0.8 / clip < right_std < 1.2 / clip
    assert float(lcn[:, :96].std()) < 0.6 * right_std  # below the floor: not amplified
    for factor in (0.01, 50.0):
        scaled = local_contrast_normalize(texture * np.float32(factor), 2.0, clip)
        np.testing.assert_allclose(scaled, lcn, atol=1e-4)


def test_lcn_has_no_false_edge_at_the_padding() -> None:
    # Flat tissue touching the padding: the content border must stay neutral in LCN, while
    # the bone edges inside respond strongly.
    shape = (200, 400)  # wide: the model square gets padding above and below
    image = radiograph(shape, CropBox(0, 0, 400, 200))
    result = preprocess(image, size=128)
    assert result.lcn is not None
    box = result.transform.content_box
    assert box.y0 > 0  # there is padding
    rim = result.lcn[box.y0 : box.y0 + 3, box.x0 : box.x0 + 20]
    assert np.abs(rim).max() < 0.02
    assert np.abs(result.lcn).max() > 0.3


def test_want_lcn_false_skips_lcn_and_keeps_raw() -> None:
    image = radiograph((200, 160), CropBox(10, 10, 150, 190), noise=0.02)
    both = preprocess(image, size=64)
    raw_only = preprocess(image, size=64, want_lcn=False)
    assert raw_only.lcn is None
    np.testing.assert_array_equal(raw_only.raw, both.raw)
    assert raw_only.transform == both.transform


def test_preprocessed_is_frozen() -> None:
    result = preprocess(radiograph((64, 64), CropBox(0, 0, 64, 64), noise=0.05), size=32)
    with pytest.raises(FrozenInstanceError):
        result.raw = result.raw  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        result.raw[0, 0] = 0.0


def test_real_fracatlas_image_at_256_and_1024() -> None:
    image = cv2.imread(str(FRACATLAS_IMAGE), cv2.IMREAD_GRAYSCALE)
    assert image is not None
    small = preprocess(image, size=256)
    large = preprocess(image, size=1024)
    for result, size in ((small, 256), (large, 1024)):
        assert result.raw.shape == (size, size)
        assert result.lcn is not None and result.lcn.shape == (size, size)
        assert result.transform.original_shape == image.shape
        crop = result.transform.crop
        content = result.transform.content_box
        back = result.transform.box_to_original(content.x0, content.y0, content.x1, content.y1)
        np.testing.assert_allclose(back, (crop.x0, crop.y0, crop.x1, crop.y1), atol=1e-6)
    assert small.transform.crop == large.transform.crop
    # The two sizes show the same picture: 1024 shrunk to 256 matches the 256 output.
    shrunk = cv2.resize(np.asarray(large.raw), (256, 256), interpolation=cv2.INTER_AREA)
    box = small.transform.content_box.slices()
    assert float(np.abs(shrunk[box] - small.raw[box]).mean()) < 0.02


# --------------------------------------------------------------------------- settings


def test_settings_round_trip_through_a_mapping() -> None:
    original = PreprocessSettings(size=512, lcn_sigma=0.01, lcn_clip=2.5)
    table = original.to_mapping()
    assert table == {"size": 512, "lcn_sigma": 0.01, "lcn_clip": 2.5, "version": PREPROCESS_VERSION}
    assert PreprocessSettings.from_mapping(table) == original
    assert PreprocessSettings.from_mapping({}) == PreprocessSettings()
    assert PreprocessSettings().lcn_sigma == DEFAULT_LCN_SIGMA


def test_settings_apply_matches_preprocess() -> None:
    image = radiograph((150, 120), CropBox(5, 5, 115, 145), noise=0.02)
    via_settings = PreprocessSettings(size=64, lcn_sigma=0.02, lcn_clip=2.0).apply(image)
    direct = preprocess(image, size=64, lcn_sigma=0.02, lcn_clip=2.0)
    np.testing.assert_array_equal(via_settings.raw, direct.raw)
    assert via_settings.lcn is not None and direct.lcn is not None
    np.testing.assert_array_equal(via_settings.lcn, direct.lcn)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"size": 512, "colour": "rgb"}, "unknown pre-processing settings"),
        ({"size": "1024"}, "size must be an integer"),
        ({"size": True}, "size must be an integer"),
        ({"size": 16}, "below the minimum"),
        ({"lcn_sigma": 0.0}, "lcn_sigma=0.0 must be"),
        ({"lcn_sigma": 0.5}, "lcn_sigma=0.5 must be"),
        ({"lcn_clip": float("nan")}, "lcn_clip=nan must be"),
        ({"lcn_clip": "3"}, "lcn_clip must be a number"),
        ({"version": PREPROCESS_VERSION + 1}, "pre-processing version"),
    ],
)
def test_settings_reject_bad_values(mapping: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessSettings.from_mapping(mapping)


# --------------------------------------------------------------------------- bad input


def _with(value: float) -> np.ndarray:
    image = radiograph((64, 64), CropBox(0, 0, 64, 64), noise=0.05)
    image[10, 10] = value
    return image


def _speck() -> np.ndarray:
    image = np.zeros((200, 200))
    image[100:110, 100:110] = 1.0
    return image


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ([[0.0] * 64] * 64, "must be a numpy array"),
        (np.zeros((64, 64, 3), np.uint8), "colour .* converted to grayscale"),
        (np.zeros((64, 64, 2)), "must be 2-D"),
        (np.zeros(64), "must be 2-D"),
        (np.zeros((0, 64)), "empty"),
        (np.ones((64, 64), dtype=bool), "dtype bool"),
        (np.ones((64, 64), dtype=np.complex128), "dtype complex128"),
        (np.full((64, 64), "a"), "dtype <U1"),
        (np.zeros((31, 100)), "smaller than 32"),
        (np.zeros((100, 20)), "smaller than 32"),
        (_with(np.nan), "NaN or infinite"),
        (_with(np.inf), "NaN or infinite"),
        (np.full((64, 64), 7, np.uint16), "constant"),
        (_speck(), "only .* px of content remain"),
    ],
)
def test_bad_input_raises_value_error(image: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preprocess(image, size=64)  # type: ignore[arg-type]


def test_check_image_accepts_a_valid_image() -> None:
    image = np.zeros((MIN_SIDE, MIN_SIDE), np.int16)
    assert check_image(image) is image


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"size": 16}, "below the minimum"), ({"lcn_sigma": -1.0}, "lcn_sigma=-1.0 must be")],
)
def test_bad_settings_raise_value_error(kwargs: dict[str, float], message: str) -> None:
    image = radiograph((64, 64), CropBox(0, 0, 64, 64), noise=0.05)
    with pytest.raises(ValueError, match=message):
        preprocess(image, **kwargs)  # type: ignore[arg-type]
