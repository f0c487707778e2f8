"""The paper's joint loss: image-level BCE plus per-pixel map BCE on fractured images.

"The joint loss function is defined as a weighted sum of two terms. The first term is the
average per-pixel binary cross-entropy loss between the predicted probability map and the
ground truth map for radiographs with a fracture present. The second term is a binary
cross-entropy loss for the image-level classification score. The weights ... are in the ratio
(localization:classification) of 3:1 (default) or 10:1 (for models ... with an attention
layer)."

Choice: ``total = map_weight * map + image_weight * image`` with ``image_weight = 1``, i.e.
3:1 means ``3 * map + image`` (not normalised by the weight sum). The image term then has the
same scale in models with and without a map head, so logged image losses compare across the
ensemble; the overall factor does not matter to Adam, which is invariant to a constant scale
of the loss. Both terms use BCE-with-logits (log-sum-exp form, stable for large logits).

The map term is the mean over every pixel of the images that count for it (by default the
fractured ones), i.e. the mean of per-image pixel means, since all maps of a batch share a
size. A batch without such an image has a map term of exactly 0 (no NaN from an empty mean).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

MAP_WEIGHT_DEFAULT = 3.0
"""Localisation weight of members without attention (3:1)."""
MAP_WEIGHT_ATTENTION = 10.0
"""Localisation weight of members with an attention layer (10:1)."""


class LossParts(NamedTuple):
    """The weighted total (to back-propagate) and its unweighted terms (to log)."""

    total: torch.Tensor
    image: torch.Tensor
    map: torch.Tensor


def joint_loss(
    score_logit: torch.Tensor,
    map_logit: torch.Tensor | None,
    label: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    map_weight: float = MAP_WEIGHT_DEFAULT,
    image_weight: float = 1.0,
    localized: torch.Tensor | None = None,
    smoothing: float = 0.0,
) -> LossParts:
    """The joint loss of a batch.

    ``score_logit``: (B,) image-level logits. ``label``: (B,) 0/1 targets. ``map_logit`` and
    ``mask``: (B, 1, H, W) map logits and 0/1 ground-truth maps, or None for a member without
    a map head (then the loss is ``image_weight * image``, the map part is 0 and ``mask``
    and ``localized`` are not used).
    ``localized``: optional (B,) bool, which images' maps count; default ``label > 0.5``. Pass
    ``label.bool() & has_boxes`` where some fractured images carry no annotation, so an empty
    map does not teach "no fracture here".
    ``smoothing``: label smoothing of the image term, targets ``eps/2`` and ``1 - eps/2``.
    """
    _check_vector(score_logit, "score_logit")
    _check_vector(label, "label")
    if label.shape != score_logit.shape:
        raise ValueError(
            f"label shape {tuple(label.shape)} != score_logit {tuple(score_logit.shape)}"
        )
    if map_weight < 0 or image_weight < 0:
        raise ValueError(f"weights must be >= 0, got map {map_weight}, image {image_weight}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    target = label.to(score_logit.dtype) * (1.0 - smoothing) + smoothing / 2
    image_term = F.binary_cross_entropy_with_logits(score_logit, target)
    if map_logit is None:
        zero = image_term.new_zeros(())
        return LossParts(total=image_weight * image_term, image=image_term, map=zero)
    map_term = _map_term(map_logit, mask, label, localized)
    total = map_weight * map_term + image_weight * image_term
    return LossParts(total=total, image=image_term, map=map_term)


def _map_term(
    map_logit: torch.Tensor,
    mask: torch.Tensor | None,
    label: torch.Tensor,
    localized: torch.Tensor | None,
) -> torch.Tensor:
    """Mean per-pixel BCE over the selected images; 0 where none is selected."""
    batch = label.shape[0]
    if map_logit.dim() != 4 or map_logit.shape[0] != batch or map_logit.shape[1] != 1:
        raise ValueError(f"map_logit must be (B={batch}, 1, H, W), got {tuple(map_logit.shape)}")
    if mask is None or mask.shape != map_logit.shape:
        got = None if mask is None else tuple(mask.shape)
        raise ValueError(f"mask must match map_logit {tuple(map_logit.shape)}, got {got}")
    if localized is None:
        selected = label > 0.5
    else:
        if localized.shape != label.shape or localized.dtype != torch.bool:
            raise ValueError(f"localized must be a bool ({batch},) tensor")
        selected = localized
    if not bool(selected.any()):
        return map_logit.new_zeros(())
    return F.binary_cross_entropy_with_logits(
        map_logit[selected], mask[selected].to(map_logit.dtype)
    )


def _check_vector(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.shape[0] == 0:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
        raise ValueError(f"{name} must be a non-empty (B,) tensor, got {shape}")
