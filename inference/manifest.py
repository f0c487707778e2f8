"""The weights' manifest: ``ensemble_weights/manifest.toml`` read into typed frozen records.

The manifest says everything needed to rebuild and run the ensemble, so that pre-processing settings
travel with the weights::

    [ensemble]
    name = "cpu-reference"
    version = "2026.11.27"
    trained = true                 # false: random weights, for tests only
    description = "..."
    tta = ["hflip"]                # optional test-time augmentation: also run every member on
                                   # the mirrored image and average (scores and maps)

    [preprocessing]                # shared by all members (inference.preprocess.PreprocessSettings)
    lcn_sigma = 0.0078125          # LCN Gaussian sigma as a fraction of the member's size
    lcn_clip = 3.0
    version = 1

    [[members]]
    name = "d22-raw-map"
    arch = "drn_d_22"              # a name from ``python -m inference models``
    input = "raw"                  # raw | lcn | both
    size = 256                     # square input side in pixels
    weights = "d22-raw-map.safetensors"
    sha256 = "..."                 # of the weights file; checked before loading
    fold = 0                       # optional: cross-fitted member tuned on this fold of split.json
    [members.options]              # keyword options of the builder (inference.models.ModelOptions)
    width = 0.5
    map_head = true

    [thresholds.global]            # one table per calibration group; "global" is required
    sensitivity = 0.31             # 92.5 % sensitivity operating point
    high_specificity = 0.62        # fracture (not only possible fracture) at or above this
    binarize = 0.5                 # map binarization for boxes
    calibrated = true

The ``[calibration]`` table, when present, records how the thresholds were obtained (free-form
numbers and strings, kept for the model card and ``evaluate``).
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from inference.models import ModelOptions
from inference.preprocess import PreprocessSettings
from inference.records import Thresholds

InputKind = Literal["raw", "lcn", "both"]
INPUT_KINDS: tuple[InputKind, ...] = ("raw", "lcn", "both")
TTA_KINDS = ("hflip",)
"""Test-time augmentations the ensemble knows: ``hflip`` (the mirror image, as left and right
limbs are mirror images of each other)."""
MANIFEST_NAME = "manifest.toml"


class ManifestError(ValueError):
    """The manifest or a weights file it names is missing, malformed or does not match."""


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member as the manifest lists it."""

    name: str
    arch: str
    input: InputKind
    size: int
    weights: str
    sha256: str
    options: ModelOptions
    fold: int | None = None

    @property
    def in_chans(self) -> int:
        return 2 if self.input == "both" else 1

    def to_mapping(self) -> dict[str, Any]:
        options = {k: v for k, v in self.options.to_mapping().items() if k != "in_chans"}
        fold = {} if self.fold is None else {"fold": self.fold}
        return {
            "name": self.name,
            "arch": self.arch,
            "input": self.input,
            "size": self.size,
            "weights": self.weights,
            "sha256": self.sha256,
            **fold,
            "options": options,
        }


@dataclass(frozen=True)
class Manifest:
    """The whole manifest; ``folder`` is where the weights files live."""

    name: str
    version: str
    trained: bool
    description: str
    preprocessing: PreprocessSettings
    members: tuple[MemberSpec, ...]
    thresholds: Mapping[str, Thresholds]
    calibration: Mapping[str, Any] = field(default_factory=dict)
    folder: Path = Path(".")
    tta: tuple[str, ...] = ()

    @property
    def folds(self) -> tuple[int, ...]:
        """The cross-fitting folds the members are tuned on (sorted; empty: none)."""
        return tuple(sorted({m.fold for m in self.members if m.fold is not None}))

    def thresholds_for(self, group: str) -> tuple[Thresholds, bool]:
        """Thresholds of ``group`` and whether they are a fallback (the global ones)."""
        if group in self.thresholds and self.thresholds[group].calibrated:
            return self.thresholds[group], False
        return self.thresholds["global"], True

    def to_mapping(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ensemble": {
                "name": self.name,
                "version": self.version,
                "trained": self.trained,
                "description": self.description,
                **({"tta": list(self.tta)} if self.tta else {}),
            },
            # the input size is per member; the shared table holds the rest
            "preprocessing": {
                k: v for k, v in self.preprocessing.to_mapping().items() if k != "size"
            },
            "members": [m.to_mapping() for m in self.members],
            "thresholds": {
                group: {
                    "sensitivity": t.sensitivity,
                    "high_specificity": t.high_specificity,
                    "binarize": t.binarize,
                    "calibrated": t.calibrated,
                }
                for group, t in self.thresholds.items()
            },
        }
        if self.calibration:
            data["calibration"] = dict(self.calibration)
        return data


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where}: missing or malformed table [{key}]")
    return value


def _field(table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ManifestError(f"{where}: missing key '{key}'")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _parse_member(table: Mapping[str, Any], index: int) -> MemberSpec:
    where = f"members[{index}]"
    name = _field(table, "name", str, where)
    where = f"member '{name}'"
    kind = _field(table, "input", str, where)
    if kind not in INPUT_KINDS:
        raise ManifestError(f"{where}: input must be one of {INPUT_KINDS}, got {kind!r}")
    size = _field(table, "size", int, where)
    if size < 32 or size % 8:
        raise ManifestError(f"{where}: size must be a multiple of 8 and >= 32, got {size}")
    sha = _field(table, "sha256", str, where).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError(f"{where}: sha256 must be 64 hex digits")
    raw_options = table.get("options", {})
    if not isinstance(raw_options, Mapping):
        raise ManifestError(f"{where}: [options] must be a table")
    in_chans = 2 if kind == "both" else 1
    try:
        options = ModelOptions.from_mapping({**raw_options, "in_chans": in_chans})
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: bad options: {exc}") from exc
    fold = _field(table, "fold", int, where) if "fold" in table else None
    if fold is not None and fold < 0:
        raise ManifestError(f"{where}: fold must be >= 0, got {fold}")
    return MemberSpec(
        name=name,
        arch=_field(table, "arch", str, where),
        input=cast(InputKind, kind),
        size=size,
        weights=_field(table, "weights", str, where),
        sha256=sha,
        options=options,
        fold=fold,
    )


def _parse_thresholds(data: Mapping[str, Any]) -> dict[str, Thresholds]:
    table = _table(data, "thresholds", "manifest")
    result: dict[str, Thresholds] = {}
    for group, values in table.items():
        where = f"thresholds.{group}"
        if not isinstance(values, Mapping):
            raise ManifestError(f"{where}: must be a table")
        try:
            result[group] = Thresholds(
                sensitivity=_field(values, "sensitivity", float, where),
                high_specificity=_field(values, "high_specificity", float, where),
                binarize=_field(values, "binarize", float, where),
                calibrated=bool(values.get("calibrated", True)),
            )
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
    if "global" not in result:
        raise ManifestError("manifest: [thresholds.global] is required (the fallback group)")
    return result


def parse_manifest(data: Mapping[str, Any], folder: Path) -> Manifest:
    """Check and convert a decoded manifest; raises ManifestError naming the bad key."""
    ensemble = _table(data, "ensemble", "manifest")
    members_raw = data.get("members")
    if not isinstance(members_raw, list) or not members_raw:
        raise ManifestError("manifest: at least one [[members]] entry is required")
    members = tuple(_parse_member(m, i) for i, m in enumerate(members_raw))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest: member names must be unique, got {names}")
    try:
        preprocessing = PreprocessSettings.from_mapping(dict(data.get("preprocessing", {})))
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest: bad [preprocessing]: {exc}") from exc
    calibration = data.get("calibration", {})
    if not isinstance(calibration, Mapping):
        raise ManifestError("manifest: [calibration] must be a table")
    tta = ensemble.get("tta", [])
    if not isinstance(tta, list) or any(t not in TTA_KINDS for t in tta):
        raise ManifestError(f"ensemble: tta must list some of {list(TTA_KINDS)}, got {tta!r}")
    if any(m.fold is None for m in members) and any(m.fold is not None for m in members):
        raise ManifestError("manifest: either every member names its fold or none does")
    return Manifest(
        name=_field(ensemble, "name", str, "ensemble"),
        version=_field(ensemble, "version", str, "ensemble"),
        trained=_field(ensemble, "trained", bool, "ensemble"),
        description=str(ensemble.get("description", "")),
        preprocessing=preprocessing,
        members=members,
        thresholds=_parse_thresholds(data),
        calibration=dict(calibration),
        folder=folder,
        tta=tuple(tta),
    )


def read_manifest(folder: Path) -> Manifest:
    """Read ``folder/manifest.toml``; errors name the file and what is wrong."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {folder}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from exc
    return parse_manifest(data, folder)


def verified_weights_path(manifest: Manifest, member: MemberSpec) -> Path:
    """The member's weights file, after checking it exists and its SHA-256 matches."""
    path = manifest.folder / member.weights
    if not path.is_file():
        raise ManifestError(f"member '{member.name}': weights file {path} is missing")
    actual = sha256_file(path)
    if actual != member.sha256:
        raise ManifestError(
            f"member '{member.name}': {path.name} has sha256 {actual}, "
            f"the manifest expects {member.sha256}"
        )
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_table(name: str, table: Mapping[str, Any], array: bool = False) -> list[str]:
    header = f"[[{name}]]" if array else f"[{name}]"
    lines = [header]
    nested: list[str] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            nested += ["", *_toml_table(f"{name}.{key}", value)]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return lines + nested


def dump_manifest(manifest: Manifest) -> str:
    """TOML text of a manifest (tomllib reads it back to an equal Manifest)."""
    data = manifest.to_mapping()
    lines = ["# Written by `python -m inference`; see inference/manifest.py for the format.", ""]
    for key in ("ensemble", "preprocessing"):
        lines += [*_toml_table(key, data[key]), ""]
    for member in data["members"]:
        lines += [*_toml_table("members", member, array=True), ""]
    for group, values in data["thresholds"].items():
        lines += [*_toml_table(f"thresholds.{group}", values), ""]
    if "calibration" in data:
        lines += [*_toml_table("calibration", data["calibration"]), ""]
    return "\n".join(lines)


def write_manifest(manifest: Manifest) -> Path:
    """Write ``manifest.toml`` into the manifest's folder, atomically."""
    path = manifest.folder / MANIFEST_NAME
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dump_manifest(manifest), encoding="utf-8")
    tmp.replace(path)
    return path
