"""The ensemble: load the members the manifest lists, run them, average, post-process.

Each member sees the input it was trained on (raw, LCN or both stacked) at its own size. Image
scores are the unweighted mean of the members' sigmoid scores; the probability map is the
unweighted mean over the members that have a map head (Jones et al. 2020, "Analysis stage").
Maps of members at different input sizes are resized to the largest size before averaging; the
transform of that size maps boxes back to the original pixels.

Speed (``inference/precision.py``): members run under ``torch.inference_mode``, optionally in bf16
autocast and the channels-last memory layout (``precision = auto | fp32 | bf16``,
``channels_last``); fp32 without channels-last (the default) gives the reference scores.

Memory (``inference/memory.py``): ``analyse`` and ``predict`` take a study's views in chunks of at
most ``max_batch`` images (``None``: sized for each call from the device's free memory), each
chunk pre-processed, run and post-processed before the next, so memory is bounded by the setting,
not by the number of views; the results per image do not depend on the chunking.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from inference.manifest import Manifest, ManifestError, MemberSpec, read_manifest
from inference.manifest import verified_weights_path as verified_weights_path
from inference.memory import (
    AUTO_CAP,
    auto_max_batch,
    available_bytes,
    check_max_batch,
    chunk_bounds,
    image_bytes,
    largest_activation,
    member_image_bytes,
    retained_image_bytes,
)
from inference.models import DRN, build_model
from inference.postprocess import postprocess
from inference.precision import FP32, SpeedSettings, resolve_speed
from inference.preprocess import Preprocessed, Transform
from inference.records import AlgorithmInfo, ImageResult
from inference.regions import group_for


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    return torch.device(requested)


@dataclass(frozen=True)
class EnsembleOutput:
    """Averaged outputs for one image, before post-processing.

    ``prob_map`` is in model space of the largest member size (``transform.model_size``), or None
    when no member has a map head. ``member_scores`` keeps each member's score, in manifest order.
    """

    score: float
    prob_map: np.ndarray | None
    transform: Transform
    member_scores: tuple[float, ...]


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds spent in each stage of one ``analyse`` call (all images together)."""

    preprocess: float
    inference: float
    postprocess: float

    def __add__(self, other: Timings) -> Timings:
        return Timings(
            self.preprocess + other.preprocess,
            self.inference + other.inference,
            self.postprocess + other.postprocess,
        )


def build_member(spec: MemberSpec) -> DRN:
    """The member's network with random weights (the architecture only)."""
    options = spec.options.to_mapping()
    return build_model(spec.arch, **options)


def load_member(manifest: Manifest, spec: MemberSpec, device: torch.device) -> DRN:
    """Build the member and load its verified safetensors weights; errors say what is wrong."""
    path = verified_weights_path(manifest, spec)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ManifestError(
            f"member '{spec.name}': {path.name} is not a valid safetensors file: {exc}"
        ) from exc
    model = build_member(spec)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ManifestError(
            f"member '{spec.name}': {path.name} does not fit {spec.arch} with its options "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ManifestError(
                f"member '{spec.name}': tensor {key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval()


def _lcn(view: Preprocessed) -> np.ndarray:
    if view.lcn is None:
        raise ValueError("an LCN member was given inputs prepared without LCN")
    return view.lcn


def member_input(spec: MemberSpec, views: Sequence[Preprocessed]) -> torch.Tensor:
    """Batch tensor [B, C, size, size] of the member's input kind."""
    if spec.input == "raw":
        planes = [np.stack([v.raw]) for v in views]
    elif spec.input == "lcn":
        planes = [np.stack([_lcn(v)]) for v in views]
    else:
        planes = [np.stack([v.raw, _lcn(v)]) for v in views]
    return torch.from_numpy(np.ascontiguousarray(np.stack(planes), dtype=np.float32))


def content_rect(transform: Transform) -> tuple[int, int, int, int]:
    """Where the image content lies in model space (the rest is resize padding)."""
    box = transform.content_box
    return box.x0, box.y0, box.x1, box.y1


def _resize_map(prob_map: np.ndarray, size: int) -> np.ndarray:
    if prob_map.shape[0] == size:
        return prob_map
    return cv2.resize(prob_map, (size, size), interpolation=cv2.INTER_LINEAR)


class Ensemble:
    """A loaded ensemble. ``Ensemble.load(folder)`` checks every hash before building anything.

    ``max_batch``: the most views run through the members at once (an integer), or None for
    ``auto`` (sized for each call from the device's free memory, see ``inference/memory.py``).
    """

    def __init__(
        self,
        manifest: Manifest,
        models: Sequence[DRN],
        device: torch.device,
        speed: SpeedSettings = FP32,
        max_batch: int | None = None,
    ) -> None:
        if len(models) != len(manifest.members):
            raise ValueError("one model per manifest member is required")
        self.manifest = manifest
        self.models = tuple(speed.apply_layout(m) for m in models)
        self.device = device
        self.speed = speed
        self.max_batch = check_max_batch(max_batch)
        self._autocast = speed.autocast(device)
        self.map_size = max(m.size for m in manifest.members)

    @classmethod
    def load(
        cls,
        folder: Path | str,
        device: str = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
        max_batch: int | None = None,
    ) -> Ensemble:
        """Load and verify the ensemble; ``precision`` (auto, fp32, bf16) and ``channels_last``
        (None: on with bf16) are resolved for the device by :func:`resolve_speed`;
        ``max_batch``: views per chunk (None: auto)."""
        check_max_batch(max_batch)
        manifest = read_manifest(Path(folder))
        target = select_device(device)
        speed = resolve_speed(precision, channels_last, target)
        for spec in manifest.members:  # every hash first: refuse before spending time building
            verified_weights_path(manifest, spec)
        models = [load_member(manifest, spec, target) for spec in manifest.members]
        ensemble = cls(manifest, models, target, speed, max_batch)
        if max_batch is None:  # auto: estimate now (a probe pass per member), not in a study
            ensemble.image_bytes  # noqa: B018
        return ensemble

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo(
            name=f"fracture-drn-ensemble/{self.manifest.name}",
            version=self.manifest.version,
            operating_point="92.5% sensitivity per calibration group (possible fracture); "
            "high-specificity threshold (fracture)",
        )

    @cached_property
    def image_bytes(self) -> int:
        """Estimated peak bytes one more image of a chunk costs (``inference/memory.py``)."""
        flip = "hflip" in self.manifest.tta
        members = [
            member_image_bytes(largest_activation(model, spec.in_chans, spec.size), flip)
            for spec, model in zip(self.manifest.members, self.models, strict=True)
        ]
        maps = any(spec.options.map_head for spec in self.manifest.members)
        return image_bytes(members, retained_image_bytes(self._sizes(), self.map_size, maps))

    def batch_size(self, count: int, max_batch: int | None = None) -> int:
        """Views per chunk for a call with ``count`` images: ``max_batch`` (default: the
        ensemble's setting), or with ``auto`` what the device's free memory holds now."""
        chosen = check_max_batch(max_batch) or self.max_batch
        if count <= 1:
            return 1
        if chosen is None:
            cap = AUTO_CAP.get(self.device.type, AUTO_CAP["cpu"])
            chosen = auto_max_batch(available_bytes(self.device), self.image_bytes, cap)
        return max(1, min(chosen, count))

    def _sizes(self) -> dict[int, bool]:
        """Each input size used, and whether any member at that size needs LCN."""
        sizes: dict[int, bool] = {}
        for spec in self.manifest.members:
            sizes[spec.size] = sizes.get(spec.size, False) or spec.input != "raw"
        return sizes

    def preprocess_all(self, images: Sequence[np.ndarray]) -> dict[int, list[Preprocessed]]:
        """Pre-process each image once per distinct member size (LCN only where needed)."""
        base = self.manifest.preprocessing
        return {
            size: [replace(base, size=size).apply(img, want_lcn=lcn) for img in images]
            for size, lcn in self._sizes().items()
        }

    @torch.inference_mode()
    def run_members(self, prepared: dict[int, list[Preprocessed]]) -> list[EnsembleOutput]:
        """Run every member on the whole batch and average scores and maps."""
        n = len(next(iter(prepared.values())))
        scores = np.zeros((len(self.models), n), dtype=np.float64)
        map_sum = np.zeros((n, self.map_size, self.map_size), dtype=np.float32)
        n_maps = 0
        for index, (spec, model) in enumerate(zip(self.manifest.members, self.models, strict=True)):
            batch = member_input(spec, prepared[spec.size])
            batch = batch.to(self.device, memory_format=self.speed.memory_format)
            member_scores, maps = self._run_member(model, batch)
            scores[index] = member_scores
            if maps is not None:
                for i in range(n):
                    map_sum[i] += _resize_map(maps[i], self.map_size)
                n_maps += 1
        reference = prepared[self.map_size]
        return [
            EnsembleOutput(
                score=float(scores[:, i].mean()),
                prob_map=map_sum[i] / n_maps if n_maps else None,
                transform=reference[i].transform,
                member_scores=tuple(float(s) for s in scores[:, i]),
            )
            for i in range(n)
        ]

    def _run_member(self, model: DRN, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """One member's sigmoid scores [B] and probability maps [B, S, S] (None without a map
        head); with ``hflip`` test-time augmentation, the mean over the image and its mirror
        (the mirror's map flipped back)."""
        flip = "hflip" in self.manifest.tta
        n = batch.shape[0]
        with self._autocast():
            out = model(torch.cat([batch, batch.flip(-1)]) if flip else batch)
        scores = torch.sigmoid(out.score_logit.float())
        maps = None if out.map_logit is None else torch.sigmoid(out.map_logit.float())[:, 0]
        if flip:
            scores = (scores[:n] + scores[n:]) / 2
            maps = None if maps is None else (maps[:n] + maps[n:].flip(-1)) / 2
        return scores.cpu().numpy(), None if maps is None else maps.cpu().numpy()

    def restricted(self, names: Sequence[str]) -> Ensemble:
        """The same ensemble with only the named members (e.g. the members of one cross-fitting
        fold, for out-of-fold scores); shares the loaded networks."""
        chosen = [i for i, spec in enumerate(self.manifest.members) if spec.name in set(names)]
        if len(chosen) != len(set(names)):
            raise ValueError(f"not every member of {sorted(names)} is in the ensemble")
        manifest = replace(self.manifest, members=tuple(self.manifest.members[i] for i in chosen))
        models = [self.models[i] for i in chosen]
        return Ensemble(manifest, models, self.device, self.speed, self.max_batch)

    def predict(
        self, images: Sequence[np.ndarray], *, max_batch: int | None = None
    ) -> list[EnsembleOutput]:
        """Averaged score and map per image; the images (views of a study) go through in
        chunks of :meth:`batch_size` (the outputs, maps included, are all kept)."""
        outputs: list[EnsembleOutput] = []
        for start, stop in chunk_bounds(len(images), self.batch_size(len(images), max_batch)):
            outputs += self.run_members(self.preprocess_all(images[start:stop]))
        return outputs

    def finish(self, output: EnsembleOutput, region: str | None) -> ImageResult:
        """Decision and boxes (original pixels) for one image of the given region key."""
        group, fallback = group_for(region, self.manifest.thresholds)
        thresholds, missing = self.manifest.thresholds_for(group)
        if missing:
            group, fallback = "global", True
        decision, boxes = postprocess(
            output.score,
            output.prob_map,
            thresholds,
            valid=content_rect(output.transform),
            box_to_original=output.transform.box_to_original,
        )
        return ImageResult(
            score=output.score,
            decision=decision,
            boxes=tuple(boxes),
            region=region,
            group=group,
            group_fallback=fallback,
            thresholds=thresholds,
        )

    def analyse(
        self,
        images: Sequence[np.ndarray],
        regions: Sequence[str | None],
        *,
        max_batch: int | None = None,
    ) -> tuple[list[ImageResult], Timings]:
        """Full pipeline for the views of one study: results per image and stage timings.

        The views go through in chunks of :meth:`batch_size` (``max_batch`` overrides the
        ensemble's setting for this call): each chunk is pre-processed, run and post-processed
        before the next is pre-processed, so only one chunk's inputs and maps are alive at once.
        A refused image (ValueError) ends the call, as with one batch.
        """
        if len(images) != len(regions):
            raise ValueError(f"{len(images)} images but {len(regions)} regions")
        results: list[ImageResult] = []
        timings = Timings(0.0, 0.0, 0.0)
        for start, stop in chunk_bounds(len(images), self.batch_size(len(images), max_batch)):
            part, spent = self._analyse_chunk(images[start:stop], regions[start:stop])
            results += part
            timings += spent
        return results, timings

    def _analyse_chunk(
        self, images: Sequence[np.ndarray], regions: Sequence[str | None]
    ) -> tuple[list[ImageResult], Timings]:
        """Pre-process, run and post-process one chunk of views as one batch."""
        t0 = time.perf_counter()
        prepared = self.preprocess_all(images)
        t1 = time.perf_counter()
        outputs = self.run_members(prepared)
        t2 = time.perf_counter()
        results = [self.finish(out, region) for out, region in zip(outputs, regions, strict=True)]
        t3 = time.perf_counter()
        return results, Timings(preprocess=t1 - t0, inference=t2 - t1, postprocess=t3 - t2)
