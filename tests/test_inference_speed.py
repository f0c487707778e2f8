"""Inference speed options keep the answers: channels-last in fp32 gives the plain path's scores,
bf16 autocast stays within the documented tolerance of fp32; shipped weights, real FracAtlas
radiographs (three, run as one study batch). Speed figures are in benchmarks/, not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.ensemble import Ensemble, EnsembleOutput
from inference.imageio import read_grayscale
from inference.precision import (
    BF16_SCORE_TOLERANCE,
    FP32,
    SpeedSettings,
    cpu_flags,
    resolve_speed,
)
from inference.preprocess import Preprocessed

from .conftest import FRACATLAS, REPO

WEIGHTS = REPO / "ensemble_weights"
Prepared = dict[int, list[Preprocessed]]
#: Three real radiographs (hand, shoulder, leg) of different sizes.
IMAGES = ("IMG0000019.jpg", "IMG0002303.jpg", "IMG0000001.jpg")


@pytest.fixture(scope="module")
def prepared() -> Prepared:
    images = [read_grayscale(FRACATLAS / "images" / name) for name in IMAGES]
    return Ensemble.load(WEIGHTS, device="cpu").preprocess_all(images)


@pytest.fixture(scope="module")
def reference(prepared: Prepared) -> list[EnsembleOutput]:
    return Ensemble.load(WEIGHTS, device="cpu").run_members(prepared)


def run(prepared: Prepared, precision: str, channels_last: bool) -> list[EnsembleOutput]:
    ensemble = Ensemble.load(WEIGHTS, "cpu", precision=precision, channels_last=channels_last)
    assert ensemble.speed == SpeedSettings(precision, channels_last)
    return ensemble.run_members(prepared)


def test_default_load_is_plain_fp32() -> None:
    assert Ensemble.load(WEIGHTS, device="cpu").speed == FP32


def test_fp32_channels_last_gives_the_plain_scores_and_maps(
    prepared: Prepared,
    reference: list[EnsembleOutput],
) -> None:
    outputs = run(prepared, "fp32", True)
    for out, ref in zip(outputs, reference, strict=True):
        np.testing.assert_allclose(out.member_scores, ref.member_scores, rtol=0, atol=1e-5)
        assert out.prob_map is not None and ref.prob_map is not None
        np.testing.assert_allclose(out.prob_map, ref.prob_map, rtol=0, atol=1e-4)


def test_bf16_scores_stay_within_the_documented_tolerance_of_fp32(
    prepared: Prepared,
    reference: list[EnsembleOutput],
) -> None:
    outputs = run(prepared, "bf16", True)
    differences = [abs(out.score - ref.score) for out, ref in zip(outputs, reference, strict=True)]
    assert max(differences) <= BF16_SCORE_TOLERANCE, differences
    assert any(d > 0 for d in differences), "bf16 autocast did not change any score: not applied"


def test_resolve_speed_decides_auto_and_refuses_unknown_values() -> None:
    cpu = torch.device("cpu")
    assert resolve_speed("fp32", None, cpu) == FP32
    assert resolve_speed("bf16", None, cpu) == SpeedSettings("bf16", True)
    assert resolve_speed("bf16", False, cpu) == SpeedSettings("bf16", False)
    assert resolve_speed("fp32", True, cpu) == SpeedSettings("fp32", True)
    auto = resolve_speed("auto", None, cpu)
    assert auto.channels_last == (auto.precision == "bf16")
    # auto: bf16 exactly where the CPU multiplies bf16 natively (AMX or AVX-512 BF16)
    assert (auto.precision == "bf16") == bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_speed("fp16", None, cpu)
