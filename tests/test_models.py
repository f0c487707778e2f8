"""Tests of the DRN family (inference.models): registry, options, shapes, architecture, init."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from inference.models import (
    DRN,
    ModelOptions,
    ModelOutput,
    build_model,
    count_parameters,
    list_models,
)
from inference.models.blocks import BasicBlock, ConvBnReLU, scale_channels
from inference.models.heads import SPP_LEVELS

REQUIRED_MODELS = ("drn_c_26", "drn_c_42", "drn_d_22", "drn_d_38", "drn_d_54")

# ImageNet parameter counts (3 input channels, 1000-class classifier) from the fyu/drn README.
PUBLISHED_PARAMETERS = {
    "drn_c_26": 21.1e6,
    "drn_c_42": 31.2e6,
    "drn_d_22": 16.4e6,
    "drn_d_38": 26.5e6,
    "drn_d_54": 35.8e6,
    "drn_d_105": 54.8e6,
}

# (map_head, attention): no map, map only, map + attention.
HEAD_MODES = [(False, False), (True, False), (True, True)]
HEAD_MODE_IDS = {(False, False): "nomap", (True, False): "map", (True, True): "map+attention"}
OPTION_COMBOS = [
    pytest.param(in_chans, pool, mode, id=f"{in_chans}ch-{pool}-{HEAD_MODE_IDS[mode]}")
    for in_chans, pool, mode in itertools.product((1, 2), ("avg", "spp"), HEAD_MODES)
]
SIZES = [(64, 64), (96, 128), (37, 53)]  # the last: not a multiple of 8
SMALL_WIDTH = 0.25


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_model(name: str = "drn_d_22", **options: object) -> DRN:
    torch.manual_seed(0)
    return build_model(name, width=SMALL_WIDTH, **options)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """``got`` equals ``want`` up to ``rel`` times the largest magnitude of ``want`` (at least 1).

    Untrained deep members in eval mode (unit BN statistics) reach activations in the hundreds,
    so a fixed absolute tolerance would not fit all of them.
    """
    scale = max(1.0, want.abs().max().item())
    assert (got.float() - want.float()).abs().max().item() <= rel * scale


def backbone_levels(model: DRN) -> list[nn.Sequential]:
    """Levels 1-8 of the backbone (its first module is the 7x7 stem)."""
    levels = list(model.backbone)[1:]
    assert all(isinstance(level, nn.Sequential) for level in levels)
    return [level for level in levels if isinstance(level, nn.Sequential)]


def test_registry_holds_the_required_models_sorted() -> None:
    names = list_models()
    assert set(REQUIRED_MODELS) <= set(names)
    assert names == sorted(names)


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'drn_x_1'") as info:
        build_model("drn_x_1")
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(("in_chans", "pool", "head_mode"), OPTION_COMBOS)
def test_forward_shapes_and_values(
    name: str, in_chans: int, pool: str, head_mode: tuple[bool, bool]
) -> None:
    map_head, attention = head_mode
    model = small_model(
        name, in_chans=in_chans, pool=pool, map_head=map_head, attention=attention
    ).eval()
    torch.manual_seed(1)
    for height, width in SIZES:
        x = torch.randn(2, in_chans, height, width)
        with torch.no_grad():
            out = model(x)
            single = model(x[1:])
        assert isinstance(out, ModelOutput)
        assert out.score_logit.shape == (2,)
        assert out.score_logit.dtype == torch.float32
        assert torch.isfinite(out.score_logit).all()
        # Each image is scored on its own: no mixing across the batch.
        assert_close_to_scale(single.score_logit, out.score_logit[1:], rel=1e-4)
        if map_head:
            assert out.map_logit is not None and single.map_logit is not None
            assert out.map_logit.shape == (2, 1, height, width)
            assert torch.isfinite(out.map_logit).all()
            assert_close_to_scale(single.map_logit, out.map_logit[1:], rel=1e-4)
        else:
            assert out.map_logit is None


@pytest.mark.parametrize("name", list_models())
def test_backbone_has_output_stride_8_and_paper_dilations(name: str) -> None:
    model = small_model(name)
    x = torch.randn(1, 1, 72, 104)
    with torch.no_grad():
        features = model.backbone(x)
    assert features.shape == (1, model.feature_dim, 9, 13)
    levels = backbone_levels(model)
    assert len(levels) == 8
    dilations = []
    for level in levels:
        convs = [m for m in level.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert convs, "every level has 3x3 convolutions"
        assert len({conv.dilation for conv in convs}) == 1, "one dilation per level"
        dilations.append(convs[0].dilation[0])
    assert dilations == [1, 1, 1, 1, 2, 4, 2, 1]
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize("name", list_models())
def test_degridding_levels_follow_the_variant(name: str) -> None:
    model = small_model(name)
    levels = backbone_levels(model)
    outer = [levels[0], levels[1], levels[6], levels[7]]
    if model.spec.arch == "C":
        for level in outer:
            assert all(isinstance(block, BasicBlock) for block in level)
        assert all(block.residual for level in levels[:6] for block in level)
        assert not any(block.residual for level in levels[6:] for block in level)
    else:
        for level in outer:
            assert all(isinstance(layer, ConvBnReLU) for layer in level)


@pytest.mark.parametrize("name", list_models())
def test_full_width_parameter_count_matches_published(name: str) -> None:
    model = build_model(name, in_chans=3)
    imagenet_classifier = model.feature_dim * 1000 + 1000
    total = count_parameters(model, exclude_head=True) + imagenet_classifier
    assert total == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.02)
    assert count_parameters(model, exclude_head=False) > count_parameters(model, exclude_head=True)


def test_initialisation_is_drn_kaiming_and_unit_batch_norm() -> None:
    model = build_model("drn_d_22")
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    biggest = max(convs, key=lambda conv: conv.weight.numel())
    fan_out = biggest.out_channels * biggest.kernel_size[0] * biggest.kernel_size[1]
    assert biggest.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert abs(biggest.weight.mean().item()) < 0.05 * math.sqrt(2.0 / fan_out)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)


def test_same_seed_gives_identical_weights() -> None:
    first = small_model("drn_c_26", map_head=True).state_dict()
    second = small_model("drn_c_26", map_head=True).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_width_scales_channels_to_multiples_of_8() -> None:
    full = build_model("drn_d_22")
    small = small_model("drn_d_22")
    assert full.feature_dim == 512
    assert small.feature_dim == 128
    for conv in (m for m in small.backbone.modules() if isinstance(m, nn.Conv2d)):
        assert conv.out_channels % 8 == 0 and conv.out_channels >= 8


@given(
    channels=st.integers(min_value=1, max_value=4096),
    width=st.floats(min_value=0.01, max_value=4.0, allow_nan=False),
)
def test_scale_channels_rounds_to_multiples_of_8(channels: int, width: float) -> None:
    scaled = channels * width
    result = scale_channels(channels, width)
    assert result % 8 == 0
    assert result >= 8
    assert result >= 0.9 * scaled
    assert result <= max(8.0, scaled + 8.0)


@pytest.mark.parametrize("channels", [16, 32, 64, 128, 256, 512])
def test_scale_channels_keeps_drn_widths_at_width_one(channels: int) -> None:
    assert scale_channels(channels, 1.0) == channels


def test_spp_image_features_have_one_vector_per_pyramid_cell() -> None:
    cells = sum(level * level for level in SPP_LEVELS)
    plain = small_model(pool="spp")
    attended = small_model(pool="spp", map_head=True, attention=True)
    assert plain.pool.out_features == plain.feature_dim * cells
    assert attended.pool.out_features == 2 * plain.feature_dim * cells
    assert small_model(pool="avg").pool.out_features == plain.feature_dim


@pytest.mark.parametrize("attention", [False, True])
def test_score_depends_on_map_head_only_with_attention(attention: bool) -> None:
    model = small_model(map_head=True, attention=attention).eval()
    x = torch.randn(2, 1, 64, 64)
    assert model.map_head is not None
    with torch.no_grad():
        before = model(x).score_logit
        model.map_head.classifier.weight.mul_(50.0)
        after = model(x).score_logit
    assert torch.equal(before, after) is not attention


def test_backward_gives_finite_gradients_everywhere() -> None:
    model = small_model("drn_c_26", in_chans=2, pool="spp", map_head=True, attention=True)
    model.train()
    x = torch.randn(3, 2, 64, 96)
    labels = torch.tensor([1.0, 0.0, 1.0])
    masks = (torch.rand(3, 1, 64, 96) > 0.9).float()
    out = model(x)
    assert out.map_logit is not None
    loss = F.binary_cross_entropy_with_logits(out.score_logit, labels)
    loss = loss + 3.0 * F.binary_cross_entropy_with_logits(out.map_logit, masks)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_image_loss_reaches_map_head_through_attention() -> None:
    model = small_model(map_head=True, attention=True).train()
    out = model(torch.randn(2, 1, 64, 64))
    out.score_logit.sum().backward()
    assert model.map_head is not None
    grad = model.map_head.classifier.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_bf16_autocast_channels_last_inference_mode() -> None:
    model = small_model(in_chans=2, pool="spp", map_head=True, attention=True).eval()
    x = torch.randn(2, 2, 64, 96)
    with torch.inference_mode():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x_last = x.contiguous(memory_format=torch.channels_last)
        last = model(x_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x_last)
    assert reference.map_logit is not None and last.map_logit is not None
    assert low.map_logit is not None
    assert_close_to_scale(last.score_logit, reference.score_logit, rel=1e-4)
    assert_close_to_scale(last.map_logit, reference.map_logit, rel=1e-4)
    assert low.score_logit.shape == (2,)
    assert low.map_logit.shape == (2, 1, 64, 96)
    for got, want in (
        (low.score_logit, reference.score_logit),
        (low.map_logit, reference.map_logit),
    ):
        assert torch.isfinite(got).all()
        assert_close_to_scale(got, want, rel=0.05)


def test_dropout_is_active_only_in_training() -> None:
    model = small_model(drop_rate=0.5)
    x = torch.randn(4, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).score_logit, model(x).score_logit)
    model.train()
    with torch.no_grad():
        torch.manual_seed(2)
        first = model(x).score_logit
        torch.manual_seed(3)
        second = model(x).score_logit
    assert not torch.equal(first, second)


def test_attention_without_map_head_raises() -> None:
    with pytest.raises(ValueError, match="attention=True needs map_head=True"):
        build_model("drn_d_22", attention=True)
    with pytest.raises(ValueError, match="attention=True needs map_head=True"):
        ModelOptions(attention=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool": "max"}, "pool must be one of"),
        ({"in_chans": 0}, "in_chans must be at least 1"),
        ({"in_chans": True}, "in_chans must be an integer"),
        ({"in_chans": 1.0}, "in_chans must be an integer"),
        ({"width": 0}, "width must be in"),
        ({"width": "wide"}, "width must be a number"),
        ({"drop_rate": 1.0}, "drop_rate must be in"),
        ({"map_head": "yes"}, "map_head must be true or false"),
        ({"depth": 3}, "unknown model option"),
    ],
)
def test_bad_options_raise(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("drn_d_22", **options)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 2, 64, 64), r"expected input of shape \[B, 1, H, W\]"),
        ((1, 64, 64), r"expected input of shape"),
        ((1, 1, 4, 64), "at least 8"),
    ],
)
def test_bad_input_raises(shape: tuple[int, ...], message: str) -> None:
    model = small_model()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


@given(
    in_chans=st.integers(min_value=1, max_value=4),
    pool=st.sampled_from(["avg", "spp"]),
    head_mode=st.sampled_from(HEAD_MODES),
    width=st.floats(min_value=0.05, max_value=4.0, allow_nan=False),
    drop_rate=st.floats(min_value=0.0, max_value=0.99, allow_nan=False),
)
def test_model_options_round_trip(
    in_chans: int, pool: str, head_mode: tuple[bool, bool], width: float, drop_rate: float
) -> None:
    options = ModelOptions.from_mapping(
        {
            "in_chans": in_chans,
            "pool": pool,
            "map_head": head_mode[0],
            "attention": head_mode[1],
            "width": width,
            "drop_rate": drop_rate,
        }
    )
    mapping = options.to_mapping()
    assert all(isinstance(value, int | float | str | bool) for value in mapping.values())
    assert ModelOptions.from_mapping(mapping) == options


def test_model_options_accept_integer_width_and_default_to_paper_baseline() -> None:
    assert ModelOptions.from_mapping({"width": 1}) == ModelOptions()
    assert ModelOptions.from_mapping({}).to_mapping() == {
        "in_chans": 1,
        "pool": "avg",
        "map_head": False,
        "attention": False,
        "width": 1.0,
        "drop_rate": 0.0,
    }


def test_model_options_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['dilation'\]"):
        ModelOptions.from_mapping({"in_chans": 2, "dilation": 4})


def test_model_keeps_its_options_for_the_manifest() -> None:
    model = small_model("drn_d_38", in_chans=2, pool="spp", map_head=True)
    assert model.spec.name == "drn_d_38"
    assert model.options == ModelOptions(in_chans=2, pool="spp", map_head=True, width=SMALL_WIDTH)
