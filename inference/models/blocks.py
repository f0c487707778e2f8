"""Building blocks of the Dilated Residual Networks (conv-BN-ReLU, basic and bottleneck blocks).

The blocks follow Yu, Koltun & Funkhouser, "Dilated Residual Networks" (CVPR 2017) and the
authors' reference implementation (github.com/fyu/drn, ``drn.py``), itself derived from the
torchvision ResNet: 3x3 convolutions without bias followed by batch normalisation, a 1x1
projection shortcut (conv + BN) where the shape changes, and the option of dropping the residual
connection (``residual=False``), which DRN-C uses in its de-gridding levels 7 and 8.

Where a block has no residual connection it also has no projection shortcut: the reference code
builds one there and never adds it to the output, which only matters for DRN-C-58 (not provided
here), whose published parameter count includes that unused projection.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

CHANNEL_DIVISOR = 8
"""Scaled channel counts are multiples of this (and at least this), as in timm/MobileNet."""


def scale_channels(channels: int, width: float) -> int:
    """Scale a channel count by ``width`` and round it to the nearest multiple of 8 (minimum 8).

    As in timm's ``make_divisible``, rounding never removes more than 10 % of the scaled count,
    so ``width=1.0`` keeps every DRN channel count (all are multiples of 8) unchanged.
    """
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    scaled = channels * width
    rounded = max(
        CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR
    )
    if rounded < 0.9 * scaled:
        rounded += CHANNEL_DIVISOR
    return rounded


def conv3x3(
    in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1
) -> nn.Conv2d:
    """A 3x3 convolution without bias whose padding keeps the size (up to the stride)."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        bias=False,
    )


class ConvBnReLU(nn.Sequential):
    """Convolution (no bias), batch normalisation and ReLU: the plain layer of DRN-D."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the size, got {kernel_size}")
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size=kernel_size,
                stride=stride,
                padding=dilation * (kernel_size - 1) // 2,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def projection_shortcut(in_channels: int, out_channels: int, *, stride: int) -> nn.Sequential:
    """The 1x1 convolution + BN shortcut used where a residual block changes shape."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _shortcut(
    in_channels: int, out_channels: int, *, stride: int, residual: bool
) -> nn.Module | None:
    """The projection a residual block needs, or None (identity, or no residual connection)."""
    if residual and (stride != 1 or in_channels != out_channels):
        return projection_shortcut(in_channels, out_channels, stride=stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (dilations ``dilation[0]`` then ``dilation[1]``), optional residual.

    ``expansion`` is 1: the block outputs ``planes`` channels.
    """

    expansion: ClassVar[int] = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: tuple[int, int] = (1, 1),
        residual: bool = True,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv3x3(in_channels, planes, stride=stride, dilation=dilation[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_channels, dilation=dilation[1])
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.shortcut = _shortcut(in_channels, out_channels, stride=stride, residual=residual)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride and dilation ``dilation[1]``), 1x1 expand by 4, optional residual.

    As in the reference code (and torchvision ResNet v1.5) the stride sits on the 3x3 convolution.
    """

    expansion: ClassVar[int] = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: tuple[int, int] = (1, 1),
        residual: bool = True,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride=stride, dilation=dilation[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.shortcut = _shortcut(in_channels, out_channels, stride=stride, residual=residual)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(out)


BlockType = type[BasicBlock] | type[Bottleneck]


def residual_level(
    block: BlockType,
    in_channels: int,
    planes: int,
    num_blocks: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    residual: bool = True,
) -> nn.Sequential:
    """``num_blocks`` residual blocks; the first carries the stride and any shape change.

    Every convolution of the level uses ``dilation``: DRN levels 5-8 keep their dilation from the
    first block on (the reference code's ``new_level=False``), which is what makes them see the
    same context as the strided ResNet levels they replace.
    """
    if num_blocks < 1:
        raise ValueError(f"a level needs at least one block, got {num_blocks}")
    blocks: list[nn.Module] = []
    channels = in_channels
    for index in range(num_blocks):
        blocks.append(
            block(
                channels,
                planes,
                stride=stride if index == 0 else 1,
                dilation=(dilation, dilation),
                residual=residual,
            )
        )
        channels = planes * block.expansion
    return nn.Sequential(*blocks)


def conv_level(
    in_channels: int, out_channels: int, num_convs: int, *, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """``num_convs`` 3x3 conv-BN-ReLU layers (DRN-D's levels 1, 2, 7 and 8); the first strides."""
    if num_convs < 1:
        raise ValueError(f"a level needs at least one convolution, got {num_convs}")
    return nn.Sequential(
        *(
            ConvBnReLU(
                in_channels if index == 0 else out_channels,
                out_channels,
                stride=stride if index == 0 else 1,
                dilation=dilation,
            )
            for index in range(num_convs)
        )
    )
