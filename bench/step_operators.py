"""How many PyTorch operators a training step dispatches, by the part of the step that calls them.

    python -m bench.step_operators --run RUN [--profile gpu] [nerf overrides]

``--run`` is a ``bench.run_stages`` output folder (its masks and cameras). Training runs on the
CPU with small batches (the count does not depend on their size) for 20 steps; three late steps,
one of them with an occupancy refresh, are counted with a ``TorchDispatchMode``. Views (no kernel
on a GPU) are listed apart. A GPU step is paced by launching these, so fewer is faster there; on
CUDA the fused encoding and Adam replace most of the ``hashgrid`` and ``adam`` rows.
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tasks.nerf.camera_opt as camera_opt
import tasks.nerf.field as field
import tasks.nerf.hashgrid as hashgrid
import tasks.nerf.ngp as ngp
import tasks.nerf.ngp_step as ngp_step
from bench.records import load_records
from flows.config import compose_config
from tasks import train

VIEWS = {"unsqueeze", "select", "view", "t", "detach", "slice", "expand", "_unsafe_view", "unbind", "permute",
         "alias", "reshape", "squeeze", "as_strided", "split", "transpose", "_local_scalar_dense"}
COUNTED_STEPS = (17, 18, 19)


class OperatorCount(TorchDispatchMode):
    """Operators dispatched while ``counting``, by the innermost labelled part of the step."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = ["other"]
        self.ops: collections.Counter[str] = collections.Counter()
        self.views: collections.Counter[str] = collections.Counter()
        self.counting = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            name = str(func.overloadpacket).split(".")[-1]
            (self.views if name in VIEWS else self.ops)[self.parts[-1]] += 1
        return func(*args, **(kwargs or {}))

    def label(self, owner, name: str, part: str) -> None:
        """Count what ``owner.name`` dispatches as ``part`` (for this process)."""
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def labelled(*args, **kwargs):
            self.parts.append(part)
            try:
                return inner(*args, **kwargs)
            finally:
                self.parts.pop()

        setattr(owner, name, labelled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    count = OperatorCount()
    for owner, name, part in [
        (hashgrid.HashGrid, "forward", "hashgrid"), (field, "spherical_harmonics", "sh"),
        (field, "composite_packed", "composite"), (ngp_step, "distortion_loss", "distortion"),
        (ngp_step, "line_of_sight_loss", "depth prior"), (field, "visible_samples", "early stop"),
        (field.GridSampler, "sample", "sampler"), (ngp.OccupancyGrid, "update", "occupancy"),
        (torch.optim.Adam, "step", "adam"), (torch.Tensor, "backward", "backward"),
        (camera_opt.CameraCorrections, "apply", "cameras"), (camera_opt.CameraCorrections, "penalty", "cameras"),
        (ngp_step, "render_rays", "render (rest)"), (field.NgpModel, "forward", "model (rest)"),
        (field.NgpModel, "geometry", "model (rest)"),
    ]:
        count.label(owner, name, part)
    steps = {"n": 0}
    draw_rays = ngp_step.sample_training_rays

    def step_start(*a, **k):  # every step draws its rays first
        steps["n"] += 1
        count.counting = steps["n"] in COUNTED_STEPS
        return draw_rays(*a, **k)

    ngp_step.sample_training_rays = step_start
    count.label(ngp_step, "sample_training_rays", "rays")
    cfg = compose_config([f"profile={args.profile}", "nerf.device=cpu", "nerf.steps=20", "nerf.occ_warmup_steps=4",
                          "nerf.occ_update_every=3", "nerf.rays_per_batch=512", "nerf.depth_rays_per_batch=64",
                          "nerf.eval_max_frames=1", "nerf.eval_train_frames=0", "nerf.save_previews=false", *args.overrides])
    masks = load_records(args.run)["segment"]
    with tempfile.TemporaryDirectory() as out, count:
        train.train_field(masks, Path(out), cfg["nerf"], "count")
    steps_counted = len(COUNTED_STEPS)
    print("per step: operators, views, part")
    for part in sorted(set(count.ops) | set(count.views), key=lambda p: -count.ops[p]):
        print(f"{count.ops[part] / steps_counted:7.1f} {count.views[part] / steps_counted:7.1f}  {part}")
    print(f"{sum(count.ops.values()) / steps_counted:7.1f} {sum(count.views.values()) / steps_counted:7.1f}  total")


if __name__ == "__main__":
    main()
