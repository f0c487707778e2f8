"""The options that vary between members of the ensemble, as one frozen, TOML-friendly record.

Jones et al. (2020) build every ensemble member from a Dilated Residual Network and vary only the
input (pre-processed radiograph, its contrast-normalised version, or both), the presence of a
pixel-wise probability-map output, an attention mechanism, and spatial pyramid pooling versus
average pooling. ``ModelOptions`` holds exactly those choices plus a width multiplier (small
CPU-trainable members) and the dropout rate of the image head. ``to_mapping`` and
``from_mapping`` give plain ``str -> int | float | str | bool`` tables that a TOML manifest stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal, cast, get_args

from inference.tables import checked_keys

PoolKind = Literal["avg", "spp"]
POOL_KINDS: tuple[str, ...] = get_args(PoolKind)

OptionValue = int | float | str | bool


def _require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _require_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelOptions:
    """How one DRN ensemble member is configured (everything but the architecture name).

    ``in_chans``: input channels (1: raw or LCN radiograph, 2: both stacked).
    ``pool``: ``"avg"`` global average pooling or ``"spp"`` spatial pyramid pooling feeds the
    image head. ``map_head``: add the pixel-wise fracture-probability map output.
    ``attention``: weight the image pooling by the map's probabilities (needs ``map_head``).
    ``width``: channel multiplier (channels rounded to multiples of 8, at least 8).
    ``drop_rate``: dropout probability before the image head's linear layer.
    """

    in_chans: int = 1
    pool: PoolKind = "avg"
    map_head: bool = False
    attention: bool = False
    width: float = 1.0
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        if _require_int("in_chans", self.in_chans) < 1:
            raise ValueError(f"in_chans must be at least 1, got {self.in_chans}")
        if self.pool not in POOL_KINDS:
            raise ValueError(f"pool must be one of {POOL_KINDS}, got {self.pool!r}")
        _require_bool("map_head", self.map_head)
        if _require_bool("attention", self.attention) and not self.map_head:
            raise ValueError(
                "attention=True needs map_head=True: the attention weights are the map head's "
                "probabilities"
            )
        width = _require_float("width", self.width)
        if not 0.0 < width <= 16.0:
            raise ValueError(f"width must be in (0, 16], got {self.width}")
        drop_rate = _require_float("drop_rate", self.drop_rate)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        # Integers are accepted for the two float fields (TOML writes ``width = 1``); store floats
        # so that equal options compare and serialise equally.
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "drop_rate", drop_rate)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> ModelOptions:
        """Options from a plain table (e.g. a TOML manifest); unknown keys are an error."""
        # Each value's type is checked at run time in __post_init__.
        return cls(**checked_keys(cls, mapping, "model option(s)"))

    def to_mapping(self) -> dict[str, OptionValue]:
        """The options as a plain table of TOML scalars (inverse of ``from_mapping``)."""
        return cast(dict[str, OptionValue], asdict(self))
