"""Dilated Residual Networks for fracture detection (Yu et al. 2017; Jones et al. 2020).

``build_model(name, **options)`` builds a randomly initialised ``DRN`` by name (see
``list_models()``); ``ModelOptions`` holds the per-member options; a model's ``forward`` returns
a ``ModelOutput`` (image logit, optional map logit).
"""

from inference.models.drn import DRN, ModelOutput, count_parameters
from inference.models.options import ModelOptions
from inference.models.registry import build_model, list_models, register_model

__all__ = [
    "DRN",
    "ModelOptions",
    "ModelOutput",
    "build_model",
    "count_parameters",
    "list_models",
    "register_model",
]
