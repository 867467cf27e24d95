"""The ngp trainer's optimiser and learning-rate schedule.

Adam as instant-ngp configures it, and rates a captured CUDA graph can follow: with
``capturable`` each group's rate is a device tensor that :func:`set_learning_rate` fills in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tasks.nerf.camera_opt import CameraCorrections
from tasks.nerf.field import NgpModel

if TYPE_CHECKING:
    from tasks.nerf.ngp import NgpSettings


def learning_rate_factor(step: int, s: NgpSettings) -> float:
    """Linear warm-up, then exponential decay down to ``lr_final_factor`` at the last step."""
    if step < s.lr_warmup_steps:
        return (step + 1) / s.lr_warmup_steps
    progress = (step - s.lr_warmup_steps) / max(1, s.steps - s.lr_warmup_steps)
    return s.lr_final_factor**progress


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Each group's rate = its base times ``factor``; tensor rates (a captured step reads them) in place."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(base * factor)
        else:
            group["lr"] = base * factor


def make_optimizer(model: NgpModel, cameras: CameraCorrections | None, s: NgpSettings, capturable: bool) -> torch.optim.Adam:
    """Adam with eps 1e-15 as instant-ngp: hash entries see rare, tiny gradients that a larger eps
    would swallow. Weight decay only on the MLPs. ``capturable``: rates are device tensors, so a
    captured CUDA graph's step follows the schedule."""
    cuda = model.aabb.device.type == "cuda"
    lr: float | Tensor = torch.tensor(s.lr, device=model.aabb.device) if capturable else s.lr
    optimizer = torch.optim.Adam(
        [
            {"params": [model.encoding.table], "weight_decay": 0.0},
            {"params": [*model.density_mlp.parameters(), *model.color_mlp.parameters()], "weight_decay": s.weight_decay},
        ],
        lr=lr, betas=(0.9, 0.99), eps=s.adam_eps,
        # One fused kernel for the 16M-entry table instead of a chain of elementwise ones.
        fused=cuda, capturable=capturable,
    )
    if cameras is not None:
        pose_lr: float | Tensor = torch.tensor(s.pose_lr, device=model.aabb.device) if capturable else s.pose_lr
        optimizer.add_param_group({"params": [cameras.delta], "lr": pose_lr, "weight_decay": 0.0})
    return optimizer
