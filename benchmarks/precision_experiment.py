"""Does bf16 autocast keep the accuracy of fp32 training? Train every member of a config twice,
once per precision, all in parallel (made for one GPU), then compare tuning and validation AUCs.

    python benchmarks/precision_experiment.py --config configs/cpu-reference.toml \\
        --data ../shared/datasets/fracatlas --work /tmp/precision --max-minutes 10

Prints a Markdown table and writes it, with the raw numbers (JSON), into --work (and --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from inference.ensemble import Ensemble
from inference.imageio import read_grayscale
from inference.training.config import load_config
from inference.training.dataset import load_dataset
from inference.training.split import load_split

PRECISIONS = ("fp32", "bf16")


def train_command(args: argparse.Namespace, precision: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "inference", "train", "--config", str(args.config),
            "--data", str(args.data), "--out", str(args.work / precision / "weights"),
            "--runs", str(args.work / precision / "runs"), "--no-progress",
            "--set", f"precision={precision}", "--set", f"max_minutes={args.max_minutes}",
            "--set", f"workers={args.loader_workers}", *extra]


def validation_aucs(weights: Path, data: Path) -> dict[str, float]:
    ensemble = Ensemble.load(weights)
    by_id = {r.image_id: r for r in load_dataset(data)}
    records = [by_id[i] for i in load_split(weights / "split.json").validation]
    labels = np.array([r.fractured for r in records])
    scores = []
    for start in range(0, len(records), 32):
        images = [read_grayscale(r.path) for r in records[start:start + 32]]
        scores += [o.member_scores for o in ensemble.predict(images)]
    matrix = np.array(scores)
    result = {m.name: float(roc_auc_score(labels, matrix[:, i]))
              for i, m in enumerate(ensemble.manifest.members)}
    result["ensemble"] = float(roc_auc_score(labels, matrix.mean(axis=1)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    members = [m.draft.name for m in load_config(args.config).members]
    for precision in PRECISIONS:  # the split and the pre-processing cache, once per folder
        subprocess.run(train_command(args, precision, "--prepare-only"), check=True)
    jobs = []
    for precision in PRECISIONS:
        for member in members:
            log = (args.work / precision / f"{member}.log").open("w")
            jobs.append(subprocess.Popen(train_command(args, precision, "--member", member),
                                         stdout=log, stderr=subprocess.STDOUT))
    failed = [job.args for job in jobs if job.wait() != 0]
    if failed:
        print(f"{len(failed)} training runs failed; see the logs in {args.work}", flush=True)
    raw: dict[str, dict[str, object]] = {}
    for precision in PRECISIONS:
        weights = args.work / precision / "weights"
        log = json.loads((weights / "training.json").read_text())
        validation = validation_aucs(weights, args.data)
        raw[precision] = {"training": log, "validation_auc": validation}
    lines = ["| member | fp32 tuning AUC | bf16 tuning AUC | fp32 validation AUC | "
             "bf16 validation AUC | fp32 epochs | bf16 epochs |", "|---|---|---|---|---|---|---|"]
    for member in [*members, "ensemble"]:
        cells = [member]
        for key in ("best_tuning_auc",):
            cells += [f"{raw[p]['training'][member][key]:.3f}" if member in raw[p]["training"]
                      else "-" for p in PRECISIONS]
        cells += [f"{raw[p]['validation_auc'][member]:.3f}" for p in PRECISIONS]
        cells += [str(raw[p]["training"][member]["epochs_run"]) if member in raw[p]["training"]
                  else "-" for p in PRECISIONS]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    for folder in filter(None, (args.work, args.out)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "precision.md").write_text(table + "\n")
        (folder / "precision.json").write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    main()
