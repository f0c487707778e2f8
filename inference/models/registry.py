"""Model registry: builders of the DRN family by name (timm style).

Each builder takes the ``ModelOptions`` fields as keyword-only arguments (checked at run time,
unknown names rejected) and returns a randomly initialised ``DRN``. ``build_model(name, **options)``
looks a builder up by name; ``list_models()`` names them all. Layer counts per level follow the
reference code (github.com/fyu/drn, ``drn.py``): DRN-C-26 and DRN-D-22 have 1, 1, 2, 2, 2, 2, 1, 1
blocks/convs in levels 1-8; DRN-C-42, DRN-D-38 and (with bottlenecks) DRN-D-54 have
1, 1, 3, 4, 6, 3, 1, 1; DRN-D-105 has 1, 1, 3, 4, 23, 3, 1, 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from inference.models.blocks import BasicBlock, Bottleneck
from inference.models.drn import DRN, DRNSpec
from inference.models.options import ModelOptions

ModelBuilder = Callable[..., DRN]
BuilderT = TypeVar("BuilderT", bound=ModelBuilder)

_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(builder: BuilderT) -> BuilderT:
    """Register ``builder`` under its function name; a name may be registered only once."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_BUILDERS)


def build_model(name: str, **options: object) -> DRN:
    """A new, randomly initialised model ``name`` with the given ``ModelOptions`` fields."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None
    return builder(**options)


_SHALLOW = (1, 1, 2, 2, 2, 2, 1, 1)
_DEEP = (1, 1, 3, 4, 6, 3, 1, 1)

DRN_C_26 = DRNSpec("drn_c_26", "C", BasicBlock, _SHALLOW)
DRN_C_42 = DRNSpec("drn_c_42", "C", BasicBlock, _DEEP)
DRN_D_22 = DRNSpec("drn_d_22", "D", BasicBlock, _SHALLOW)
DRN_D_38 = DRNSpec("drn_d_38", "D", BasicBlock, _DEEP)
DRN_D_54 = DRNSpec("drn_d_54", "D", Bottleneck, _DEEP)
DRN_D_105 = DRNSpec("drn_d_105", "D", Bottleneck, (1, 1, 3, 4, 23, 3, 1, 1))


def _build(spec: DRNSpec, options: dict[str, object]) -> DRN:
    return DRN(spec, ModelOptions.from_mapping(options))


@register_model
def drn_c_26(**options: object) -> DRN:
    """DRN-C-26: basic blocks, residual levels 1-6, non-residual de-gridding levels 7-8."""
    return _build(DRN_C_26, options)


@register_model
def drn_c_42(**options: object) -> DRN:
    """DRN-C-42: DRN-C-26 with ResNet-34's 3, 4, 6, 3 blocks in levels 3-6."""
    return _build(DRN_C_42, options)


@register_model
def drn_d_22(**options: object) -> DRN:
    """DRN-D-22: conv layers in levels 1-2 and 7-8, two basic blocks in each of levels 3-6."""
    return _build(DRN_D_22, options)


@register_model
def drn_d_38(**options: object) -> DRN:
    """DRN-D-38: DRN-D-22 with ResNet-34's 3, 4, 6, 3 blocks in levels 3-6."""
    return _build(DRN_D_38, options)


@register_model
def drn_d_54(**options: object) -> DRN:
    """DRN-D-54: DRN-D with ResNet-50's 3, 4, 6, 3 bottleneck blocks in levels 3-6."""
    return _build(DRN_D_54, options)


@register_model
def drn_d_105(**options: object) -> DRN:
    """DRN-D-105: DRN-D with ResNet-101's 3, 4, 23, 3 bottleneck blocks in levels 3-6."""
    return _build(DRN_D_105, options)
