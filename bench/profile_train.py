"""Where a training step's time goes: the top operators of a short training run under torch.profiler.

    python -m bench.profile_train --run bench-out/gpu --steps 300 [nerf overrides]

``--run`` is a ``bench.run_stages`` output folder (its ``records.json``); its masks are trained
on again for ``--steps`` steps, then the operators are listed by device time (CUDA) or CPU time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.records import load_records
from flows.config import compose_config
from tasks import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    extra = [f"nerf.steps={args.steps}", "nerf.eval_max_frames=1", "nerf.save_previews=false", *args.overrides]
    cfg = compose_config([f"profile={args.profile}", *extra])
    masks = load_records(args.run)["segment"]
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        train.train_field(masks, args.out, cfg["nerf"], "profile")
    print(f"{args.steps} steps (+ 1 eval frame) in {time.perf_counter() - started:.1f} s under the profiler")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
