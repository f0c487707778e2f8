"""Training throughput of ensemble members on this machine: images per second for a few training
steps (forward, joint loss, backward, Adam) in fp32 and bf16 autocast, on random data of the
member's input shape. Used to size the ``cpu-reference`` config (see docs/performance.md).

    python benchmarks/train_speed.py configs/cpu-reference.toml [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext

import torch

from inference.models import build_model
from inference.training.config import load_config
from inference.training.loss import joint_loss


def images_per_second(config_member, precision: str, steps: int) -> float:  # type: ignore[no-untyped-def]
    draft, settings = config_member.draft, config_member.training
    options = draft.model_options()
    model = build_model(draft.arch, **options.to_mapping())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = settings.batch_size
    x = torch.randn(batch, options.in_chans, draft.size, draft.size)
    mask = (torch.rand(batch, 1, draft.size, draft.size) > 0.99).float()
    label = (torch.rand(batch) > 0.5).float()
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
        else nullcontext
    timings = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with context():
            out = model(x)
        parts = joint_loss(out.score_logit.float(),
                           None if out.map_logit is None else out.map_logit.float(), label, mask,
                           map_weight=settings.loss_map_weight(options.attention))
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
        timings.append(time.perf_counter() - t0)
    timings = sorted(timings[1:])  # the first step warms up
    return batch / timings[len(timings) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, median of {args.steps - 1} steps")
    print("member | size | batch | fp32 img/s | bf16 img/s | bf16 epoch of 2575 images (min)")
    for member in config.members:
        fp32 = images_per_second(member, "fp32", args.steps)
        bf16 = images_per_second(member, "bf16", args.steps)
        print(f"{member.draft.name} | {member.draft.size} | {member.training.batch_size} | "
              f"{fp32:.1f} | {bf16:.1f} | {2575 / bf16 / 60:.1f}", flush=True)


if __name__ == "__main__":
    main()
