"""``python -m inference``: list models, predict on image files, train, calibrate, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "ensemble_weights"
DEFAULT_DATA = Path("../shared/datasets/fracatlas")


def _cmd_models(_: argparse.Namespace) -> int:
    from inference.models import list_models

    for name in list_models():
        print(name)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from inference.ensemble import Ensemble
    from inference.imageio import read_grayscale
    from inference.regions import region_by_key

    region = region_by_key(args.region).key if args.region else None
    t0 = time.perf_counter()
    ensemble = Ensemble.load(args.weights, device=args.device)
    load_seconds = time.perf_counter() - t0
    images = [read_grayscale(path) for path in args.images]
    results, timings = ensemble.analyse(images, [region] * len(images))
    if not ensemble.manifest.trained:
        print(
            "warning: the weights in use are NOT trained (random initialisation); "
            "results are meaningless",
            file=sys.stderr,
        )
    if args.json:
        payload = [
            {
                "image": str(path),
                "region": result.region,
                "group": result.group,
                "group_fallback": result.group_fallback,
                "score": round(result.score, 6),
                "decision": str(result.decision),
                "boxes": [
                    {
                        k: round(v, 2) if k != "score" else round(v, 4)
                        for k, v in asdict(box).items()
                    }
                    for box in result.boxes
                ],
                "timings": {
                    "load_weights_s": round(load_seconds, 4),
                    "preprocess_s": round(timings.preprocess / len(images), 4),
                    "inference_s": round(timings.inference / len(images), 4),
                    "postprocess_s": round(timings.postprocess / len(images), 4),
                },
            }
            for path, result in zip(args.images, results, strict=True)
        ]
        print(json.dumps(payload, indent=2))
        return 0
    for path, result in zip(args.images, results, strict=True):
        boxes = "; ".join(
            f"({b.x0:.0f},{b.y0:.0f})-({b.x1:.0f},{b.y1:.0f}) p={b.score:.2f}" for b in result.boxes
        )
        print(
            f"{path}: {result.decision} score={result.score:.4f} group={result.group}"
            f"{' (fallback)' if result.group_fallback else ''} boxes=[{boxes}]"
        )
    print(
        f"timings: load {load_seconds:.2f}s, preprocess {timings.preprocess:.2f}s, "
        f"inference {timings.inference:.2f}s, postprocess {timings.postprocess:.2f}s "
        f"for {len(images)} image(s) on {ensemble.device}",
        file=sys.stderr,
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from inference.ensemble import select_device
    from inference.training import distributed
    from inference.training.config import load_config
    from inference.training.train import train_ensemble

    config = load_config(args.config)
    world = distributed.world_from_env()  # torchrun: one process per GPU (or CPU share)
    device = distributed.start(world, select_device(args.device))
    try:
        results = train_ensemble(
            config,
            data_root=args.data,
            out=args.out,
            runs=args.runs,
            device=device,
            resume=args.resume,
            only=args.member,
            progress=not args.no_progress,
            workers=args.workers,
            prepare_only=args.prepare_only,
            overrides=dict(_setting(text) for text in args.set),
            world=world,
            stream=args.stream,
        )
    finally:
        distributed.stop(world)
    if not world.main:
        return 0
    for result in results:
        final = result.final_tuning_auc
        print(
            f"{result.name}: best tuning AUC {result.best_tuning_auc:.4f} at epoch "
            f"{result.best_epoch} of {result.epochs_run} ({result.stopped})"
            f"{'' if final is None else f', final {final:.4f}'}, "
            f"{result.seconds / 60:.1f} min on {result.processes} x {result.device} "
            f"{result.precision}"
        )
    return 0


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a TOML value (a bare word is taken as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        parsed: object = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from inference.evaluation import calibrate_folder

    summary = calibrate_folder(
        args.weights,
        args.data,
        split_path=args.split,
        device=args.device,
        version=args.version,
        evaluate_out=args.evaluate_out,
    )
    print(summary)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from inference.evaluation import evaluate_folder

    result = evaluate_folder(
        args.weights,
        args.data,
        args.out,
        split_path=args.split,
        subset=args.subset,
        device=args.device,
        seed=args.seed,
    )
    overall = result.overall
    print(
        f"n={overall.n} positives={overall.n_positive} AUC={overall.auc:.4f} "
        f"[{overall.auc_ci.low:.4f}, {overall.auc_ci.high:.4f}] "
        f"sensitivity={overall.sensitivity:.3f} specificity={overall.specificity:.3f}; "
        f"wrote {args.out}/metrics.json, report.md, roc.png"
    )
    return 0


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the networks run (auto: CUDA when available, else the CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="print the registered architectures, one per line")
    models.set_defaults(func=_cmd_models)

    predict = sub.add_parser("predict", help="run the ensemble on PNG/JPEG/TIFF files")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--region", help="anatomical region key (see inference/regions.py)")
    predict.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    _add_device(predict)
    predict.add_argument("--json", action="store_true", help="print a JSON list")
    predict.set_defaults(func=_cmd_predict)

    train = sub.add_parser("train", help="train an ensemble (or member) config")
    train.add_argument("--config", type=Path, required=True)
    train.add_argument("--data", type=Path, default=DEFAULT_DATA)
    train.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_WEIGHTS,
        help="weights folder the trained members are exported into",
    )
    train.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="folder for checkpoints, histories and the pre-processing cache",
    )
    train.add_argument("--member", help="train only this member of an ensemble config")
    train.add_argument("--resume", action="store_true", help="continue interrupted runs")
    _add_device(train)
    train.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for pre-processing (default: all cores)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [training] setting of every member, e.g. precision=fp32 or "
        "max_minutes=10 (TOML values)",
    )
    train.add_argument(
        "--stream",
        action="store_true",
        help="decode and pre-process the images in every epoch (data loader workers: "
        "[training] workers) instead of writing the pre-processing cache",
    )
    train.add_argument(
        "--prepare-only",
        action="store_true",
        help="only write the split and the pre-processing cache, then stop",
    )
    train.set_defaults(func=_cmd_train)

    calibrate = sub.add_parser("calibrate", help="thresholds from tuning + validation predictions")
    calibrate.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    calibrate.add_argument("--data", type=Path, default=DEFAULT_DATA)
    calibrate.add_argument(
        "--split",
        type=Path,
        default=None,
        help="split.json (default: the one in the weights folder)",
    )
    calibrate.add_argument("--version", default=None, help="new ensemble version string")
    calibrate.add_argument(
        "--evaluate-out",
        type=Path,
        default=None,
        help="also evaluate the validation split from the same predictions into this folder",
    )
    _add_device(calibrate)
    calibrate.set_defaults(func=_cmd_calibrate)

    evaluate = sub.add_parser("evaluate", help="metrics, report and ROC on a labelled folder")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--split", type=Path, default=None, help="split.json to take a subset")
    evaluate.add_argument(
        "--subset",
        choices=("train", "tuning", "validation"),
        default=None,
        help="evaluate only this part of the split (needs a split)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_device(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:  # bad input, bad manifest, bad config: a clear message, no trace
        print(f"error: {exc}", file=sys.stderr)
        return 2
