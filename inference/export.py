"""Writing weights folders: safetensors files plus the manifest that lists them.

Used by training (one trained member at a time, appended to the ensemble's folder) and by tests and
benchmarks that need an ensemble with random weights. A folder written with random weights says
``trained = false`` in its manifest and its thresholds are marked uncalibrated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from inference.manifest import (
    Manifest,
    MemberSpec,
    read_manifest,
    sha256_file,
    write_manifest,
)
from inference.models import ModelOptions, build_model
from inference.preprocess import PreprocessSettings
from inference.records import Thresholds

#: Thresholds of a folder that has not been calibrated yet (flagged ``calibrated = false``).
UNCALIBRATED = Thresholds(sensitivity=0.5, high_specificity=0.5, binarize=0.5, calibrated=False)


@dataclass(frozen=True)
class MemberDraft:
    """What is known of a member before its weights are written."""

    name: str
    arch: str
    input: str
    size: int
    options: Mapping[str, Any]
    fold: int | None = None

    def model_options(self) -> ModelOptions:
        in_chans = 2 if self.input == "both" else 1
        return ModelOptions.from_mapping({**self.options, "in_chans": in_chans})


def save_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float16) -> str:
    """Save floating-point tensors as ``dtype`` (integers as they are); return the file's sha256."""
    state = {
        key: (
            t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()
        ).contiguous()
        for key, t in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    # safetensors writes through a private temporary file (mode 0600): weights are not secret,
    # and the service user must be able to read what an admin exported
    path.chmod(0o644)
    return sha256_file(path)


def member_spec(draft: MemberDraft, weights: str, sha256: str) -> MemberSpec:
    return MemberSpec(
        name=draft.name,
        arch=draft.arch,
        input=draft.input,  # type: ignore[arg-type]  # checked by parse on read-back
        size=draft.size,
        weights=weights,
        sha256=sha256,
        options=draft.model_options(),
        fold=draft.fold,
    )


def empty_manifest(
    folder: Path,
    *,
    name: str,
    version: str,
    trained: bool,
    description: str = "",
    preprocessing: PreprocessSettings | None = None,
    tta: tuple[str, ...] = (),
) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        trained=trained,
        description=description,
        preprocessing=preprocessing or PreprocessSettings(),
        members=(),
        thresholds={"global": UNCALIBRATED},
        folder=folder,
        tta=tta,
    )


def add_member(
    folder: Path,
    draft: MemberDraft,
    model: torch.nn.Module,
    *,
    template: Manifest,
    dtype: torch.dtype = torch.float16,
) -> Manifest:
    """Save a member's weights into ``folder`` and list it in the manifest there (replacing a member
    of the same name). ``template`` supplies the ensemble fields when the folder has no manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = f"{draft.name}.safetensors"
    sha = save_weights(model, folder / weights, dtype)
    manifest = read_manifest(folder) if (folder / "manifest.toml").is_file() else template
    members = [m for m in manifest.members if m.name != draft.name]
    members.append(member_spec(draft, weights, sha))
    updated = replace(manifest, members=tuple(members), folder=folder)
    write_manifest(updated)
    return updated


def write_random_ensemble(
    folder: Path,
    drafts: Sequence[MemberDraft],
    *,
    name: str = "random",
    seed: int = 0,
    preprocessing: PreprocessSettings | None = None,
    thresholds: Mapping[str, Thresholds] | None = None,
) -> Manifest:
    """An ensemble of randomly initialised members (for tests and benchmarks, never shipped)."""
    torch.manual_seed(seed)
    template = empty_manifest(
        folder,
        name=name,
        version=f"random-{seed}",
        trained=False,
        description="random initialisation, not trained: for tests and benchmarks only",
        preprocessing=preprocessing,
    )
    manifest = template
    for draft in drafts:
        model = build_model(draft.arch, **draft.model_options().to_mapping())
        manifest = add_member(folder, draft, model, template=template, dtype=torch.float32)
    if thresholds is not None:
        manifest = replace(manifest, thresholds=dict(thresholds))
        write_manifest(manifest)
    return manifest
