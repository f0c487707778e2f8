"""Output heads on the stride-8 DRN features: probability map, image pooling, image logit.

Jones et al. (2020) describe ensemble members that differ in "whether or not the model produces a
probability map output", "whether or not the model has an attention mechanism" and "whether or
not spatial pyramid pooling is used instead of average pooling", without giving the layers. The
design here:

* ``MapHead``: a 1x1 convolution to one channel gives fracture logits on the stride-8 grid (the
  DRN segmentation set-up, fyu/drn ``segment.py``, also classifies the last features with a 1x1
  convolution); ``upsample_map`` resizes them bilinearly to the input size.
* ``ImagePool``: plain pooling over the cells of a grid: one cell (global average pooling), or
  the spatial pyramid of He et al. 2014 ("Spatial Pyramid Pooling in Deep Convolutional Networks
  for Visual Recognition", ECCV 2014): levels ``SPP_LEVELS`` = 1x1, 2x2 and 4x4 cells, max-pooled
  in each cell as in that paper, giving a fixed-length vector whatever the image size.
* Attention (``attention=True``): the map head's probabilities ``a = sigmoid(map_logits)`` on the
  stride-8 grid weight an average over each cell, ``sum(f * a) / (sum(a) + eps)`` (written with
  cell means, so ``eps`` is per pixel), and these attended features are concatenated with the plain
  ones. The image score can thus look at the suspected fracture sites while the concatenated plain
  features keep the whole-image context (a negative image, whose map is near zero everywhere,
  still has informative features). Gradients of the image loss flow into the map head through the
  attention weights; the paper trains these members with a heavier localisation loss (10:1).
* ``ImageHead``: dropout then a linear layer to ONE logit per image (fracture present).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.models.options import PoolKind

SPP_LEVELS: tuple[int, ...] = (1, 2, 4)
"""Cells per side of the spatial-pyramid levels (1 + 4 + 16 = 21 cells)."""

ATTENTION_EPS = 1e-6
"""Added to the mean attention weight of a cell so that an all-zero map cannot divide by zero."""

HEAD_INIT_STD = 0.01
"""Std of the head weights: DRN's fan-out rule would give std sqrt(2) to a one-output layer."""


def init_head_layer(layer: nn.Conv2d | nn.Linear) -> None:
    """Small normal weights and zero bias, so that initial logits start near 0 (p = 0.5)."""
    nn.init.normal_(layer.weight, mean=0.0, std=HEAD_INIT_STD)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MapHead(nn.Module):
    """Fracture logits per stride-8 cell: a 1x1 convolution of the features to one channel."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, 1, kernel_size=1, bias=True)
        init_head_layer(self.classifier)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, C, h, w]`` features to ``[B, 1, h, w]`` logits."""
        return self.classifier(features)


def upsample_map(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``[B, 1, h, w]`` logits to ``size`` (the input's height and width)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def attention_average(features: Tensor, weights: Tensor, cells: int) -> Tensor:
    """Attention-weighted mean of ``features`` over a ``cells`` x ``cells`` grid.

    ``features`` is ``[B, C, h, w]``, ``weights`` ``[B, 1, h, w]`` in [0, 1]; the result,
    ``[B, C, cells, cells]``, is computed in at least float32 (bf16 sums of many small weights
    lose too much precision) and returned in the features' dtype.
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    f = features.to(dtype)
    a = weights.to(dtype)
    weighted = F.adaptive_avg_pool2d(f * a, cells)
    mass = F.adaptive_avg_pool2d(a, cells)
    return (weighted / (mass + ATTENTION_EPS)).to(features.dtype)


def plain_pool(features: Tensor, kind: PoolKind, cells: int) -> Tensor:
    """Average (``"avg"``) or max (``"spp"``, He et al.) pooling to a ``cells`` x ``cells`` grid."""
    if kind == "avg":
        return F.adaptive_avg_pool2d(features, cells)
    return F.adaptive_max_pool2d(features, cells)


class ImagePool(nn.Module):
    """Pool ``[B, C, h, w]`` features (and attention weights) into ``[B, out_features]``."""

    def __init__(self, channels: int, *, kind: PoolKind, attention: bool) -> None:
        super().__init__()
        self.kind: PoolKind = kind
        self.attention = attention
        self.levels: tuple[int, ...] = (1,) if kind == "avg" else SPP_LEVELS
        cells = sum(level * level for level in self.levels)
        self.out_features = channels * cells * (2 if attention else 1)

    def forward(self, features: Tensor, weights: Tensor | None = None) -> Tensor:
        if self.attention != (weights is not None):
            raise ValueError(
                "attention pooling needs attention weights and plain pooling takes none"
                f" (attention={self.attention}, weights given: {weights is not None})"
            )
        parts = [plain_pool(features, self.kind, level).flatten(1) for level in self.levels]
        if weights is not None:
            parts += [
                attention_average(features, weights, level).flatten(1) for level in self.levels
            ]
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, levels={self.levels}, attention={self.attention}"


class ImageHead(nn.Module):
    """Dropout then a linear layer to one fracture logit per image (``[B, F]`` to ``[B]``)."""

    def __init__(self, in_features: int, *, drop_rate: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=drop_rate)
        self.fc = nn.Linear(in_features, 1)
        init_head_layer(self.fc)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(self.dropout(pooled)).squeeze(1)
