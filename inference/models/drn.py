"""Dilated Residual Networks (DRN-C and DRN-D) with the fracture-detection heads.

Sources:

* F. Yu, V. Koltun, T. Funkhouser, "Dilated Residual Networks", CVPR 2017 (arXiv:1705.09914):
  Sec. 3-4 and Fig. 5/Table 1 for the levels, dilations and de-gridding.
* The authors' reference code, github.com/fyu/drn (``drn.py``: level layout, channel widths
  16-32-64-128-256-512-512-512, layer counts per model, initialisation; ``README.md``: ImageNet
  parameter counts 21.1M (C-26), 31.2M (C-42), 16.4M (D-22), 26.5M (D-38), 35.8M (D-54),
  54.8M (D-105)). The code here is written afresh from those descriptions.
* Jones et al. 2020 (npj Digit Med 3:144) for the ensemble variants (input, map, attention,
  pooling): see ``heads.py`` and ``options.py``.

Architecture (eight levels, output stride 8):

* Level 1 keeps full resolution (a 7x7 stem convolution with 16 channels, then level 1 proper),
  levels 2-4 each halve it: output stride 8 after level 4, with no max pooling anywhere.
* Levels 5 and 6 replace ResNet's last two strided stages by dilation 2 and 4, keeping stride 8.
* Levels 7 and 8 ("de-gridding") use dilation 2 then 1 to remove the gridding artefacts of the
  dilated levels.
* DRN-C: levels 1-2 are basic residual blocks, levels 7-8 basic blocks WITHOUT residual
  connections (a residual connection would carry the gridding through).
* DRN-D (the simplified variant of the reference code): levels 1-2 and 7-8 are plain 3x3
  conv-BN-ReLU layers.

Initialisation as in the reference code: convolutions Kaiming-normal with fan-out
(std sqrt(2 / (k * k * out_channels))), batch norm weight 1 and bias 0; the one-output heads get
small normal weights instead (see ``heads.py``). Nothing is ever downloaded: no pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor, nn

from inference.models.blocks import (
    BasicBlock,
    BlockType,
    ConvBnReLU,
    conv_level,
    residual_level,
    scale_channels,
)
from inference.models.heads import ImageHead, ImagePool, MapHead, upsample_map
from inference.models.options import ModelOptions

OUTPUT_STRIDE = 8
MIN_INPUT_SIZE = OUTPUT_STRIDE
"""Smallest accepted input height/width: one cell of the stride-8 feature grid."""

DRN_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 512, 512)
"""Channels (``planes``, before a bottleneck's expansion) of levels 1-8 at width 1."""

LEVEL_STRIDES: tuple[int, ...] = (1, 2, 2, 2, 1, 1, 1, 1)
LEVEL_DILATIONS: tuple[int, ...] = (1, 1, 1, 1, 2, 4, 2, 1)
STEM_KERNEL = 7


@dataclass(frozen=True)
class DRNSpec:
    """One member of the DRN family: its variant, residual block, and blocks per level 1-8.

    ``layers[i]`` counts residual blocks (or conv layers, for DRN-D levels 1, 2, 7, 8) of
    level ``i + 1``. Levels 1, 2, 7 and 8 always use 3x3 basic blocks / conv layers; ``block``
    is the block of levels 3-6.
    """

    name: str
    arch: Literal["C", "D"]
    block: BlockType
    layers: tuple[int, int, int, int, int, int, int, int]

    def __post_init__(self) -> None:
        if self.arch not in ("C", "D"):
            raise ValueError(f"arch must be 'C' or 'D', got {self.arch!r}")
        if min(self.layers) < 1:
            raise ValueError(f"every level needs at least one block, got {self.layers}")


class ModelOutput(NamedTuple):
    """What a DRN returns: one fracture logit per image, and the map logits if it has a map head.

    ``score_logit``: ``[B]``. ``map_logit``: ``[B, 1, H, W]`` (the input's size) or None.
    Both are logits (apply ``torch.sigmoid`` for probabilities), in the compute dtype.
    """

    score_logit: Tensor
    map_logit: Tensor | None


class DRN(nn.Module):
    """A Dilated Residual Network with an image-level head and an optional probability map.

    ``backbone`` maps ``[B, in_chans, H, W]`` to ``[B, feature_dim, ceil(H/8), ceil(W/8)]``;
    ``map_head`` (optional) gives stride-8 logits; ``pool`` and ``head`` give one logit per image.
    ``spec`` and ``options`` are kept so that a manifest can record how to rebuild the model.
    """

    def __init__(self, spec: DRNSpec, options: ModelOptions) -> None:
        super().__init__()
        self.spec = spec
        self.options = options
        self.backbone, self.feature_dim = _build_backbone(spec, options)
        self.map_head = MapHead(self.feature_dim) if options.map_head else None
        self.pool = ImagePool(self.feature_dim, kind=options.pool, attention=options.attention)
        self.head = ImageHead(self.pool.out_features, drop_rate=options.drop_rate)

    def forward(self, x: Tensor) -> ModelOutput:
        """Logits for ``[B, in_chans, H, W]`` images: ``[B]`` per image, ``[B, 1, H, W]`` map."""
        self._check_input(x)
        features = self.backbone(x)
        map_small = None if self.map_head is None else self.map_head(features)
        weights = map_small.sigmoid() if self.options.attention and map_small is not None else None
        score_logit = self.head(self.pool(features, weights))
        map_logit = None if map_small is None else upsample_map(map_small, (x.shape[2], x.shape[3]))
        return ModelOutput(score_logit=score_logit, map_logit=map_logit)

    def _check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is ``[B, in_chans, H, W]`` with H, W >= 8."""
        if x.ndim != 4 or x.shape[1] != self.options.in_chans:
            raise ValueError(
                f"expected input of shape [B, {self.options.in_chans}, H, W], got {tuple(x.shape)}"
            )
        if min(x.shape[2], x.shape[3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"input height and width must be at least {MIN_INPUT_SIZE}, "
                f"got {tuple(x.shape[2:])}"
            )


def _build_backbone(spec: DRNSpec, options: ModelOptions) -> tuple[nn.Sequential, int]:
    """The stem and levels 1-8 of ``spec`` at ``options.width``; returns them and their width."""
    channels = [scale_channels(c, options.width) for c in DRN_CHANNELS]
    modules: list[nn.Module] = [ConvBnReLU(options.in_chans, channels[0], kernel_size=STEM_KERNEL)]
    in_channels = channels[0]
    for level in range(8):
        stride, dilation = LEVEL_STRIDES[level], LEVEL_DILATIONS[level]
        count, out_planes = spec.layers[level], channels[level]
        # Levels 1, 2, 7, 8 are "outer": 3x3 basic blocks in DRN-C, plain conv layers in DRN-D;
        # levels 7 and 8 (index 6, 7) have no residual connection in either variant.
        outer = level in (0, 1, 6, 7)
        if outer and spec.arch == "D":
            module = conv_level(in_channels, out_planes, count, stride=stride, dilation=dilation)
            in_channels = out_planes
        else:
            block: BlockType = BasicBlock if outer else spec.block
            module = residual_level(
                block,
                in_channels,
                out_planes,
                count,
                stride=stride,
                dilation=dilation,
                residual=level < 6,
            )
            in_channels = out_planes * block.expansion
        modules.append(module)
    backbone = nn.Sequential(*modules)
    _init_backbone(backbone)
    return backbone, in_channels


def _init_backbone(backbone: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convolutions, unit BN weights and zero BN biases (DRN)."""
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def count_parameters(model: DRN, *, exclude_head: bool) -> int:
    """Number of trainable parameters; with ``exclude_head`` only the backbone's.

    The backbone count plus ``feature_dim * 1000 + 1000`` (an ImageNet linear classifier) is
    what the DRN README reports for a 3-channel full-width model.
    """
    module: nn.Module = model.backbone if exclude_head else model
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
