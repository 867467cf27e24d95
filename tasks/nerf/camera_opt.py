"""Refining the solved cameras while the field trains (nerfstudio's SO3xR3 camera optimiser).

A camera solve leaves each frame's pose a little off (the 1080p basket: 0.3° median rotation
error, ~3 mm at its distance, which is the 1 % geometry threshold). Frames that disagree by that
much make the field blur fine relief or copy texture into depth. Each training frame gets a small
rigid correction, learned with the field from the same photometric loss:

    c2w' = c2w @ [[exp(omega), tau], [0, 1]]      omega, tau [3] in the camera's own axes

An L2 penalty keeps the corrections small: moving every camera together (the gauge) changes no
pixel, so without it the rig would drift. Frames that are not trained on (held out) get the mean
correction of their nearest trained neighbours in capture order, so the held-out figure keeps
measuring views whose pixels the field never saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

# What a backend that refines cameras writes into its checkpoint folder; the mesh stage then
# renders the field from these poses instead of the solved ones.
REFINED_TRANSFORMS = "refined_transforms.json"


def so3_exp(omega: Tensor) -> Tensor:
    """Rotation matrices of axis-angle vectors (Rodrigues). omega ``[N, 3]`` radians → ``[N, 3, 3]``.

    Differentiable at 0 (the corrections start there): sin(θ)/θ and (1 - cos θ)/θ² by their
    Taylor series below 1e-4 rad.
    """
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]  # [N, 1, 1]
    theta = theta2.clamp(min=1e-24).sqrt()
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp(min=1e-24))
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(k)
    return eye + a * k + b * (k @ k)


class CameraCorrections(nn.Module):
    """One learned rigid correction per frame of a capture: ``delta [F, 6]`` = omega (radians), tau.

    Only ``trained`` frames are learned; the rest follow their neighbours (:meth:`filled`).
    """

    def __init__(self, n_frames: int, trained: list[int]) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(n_frames, 6))
        self.register_buffer("trained", torch.zeros(n_frames, dtype=torch.bool))
        self.trained[trained] = True

    def apply(self, c2w: Tensor, delta: Tensor | None = None) -> Tensor:
        """Corrected poses: c2w ``[F, 4, 4]`` (OpenGL, one per frame) → ``[F, 4, 4]``."""
        delta = self.delta if delta is None else delta
        correction = torch.eye(4, dtype=c2w.dtype, device=c2w.device).repeat(delta.shape[0], 1, 1)
        correction[:, :3, :3] = so3_exp(delta[:, :3].to(c2w.dtype))
        correction[:, :3, 3] = delta[:, 3:].to(c2w.dtype)
        return c2w @ correction

    def penalty(self, rotation_weight: float, translation_weight: float) -> Tensor:
        """``rotation_weight`` x mean rotation (radians) + ``translation_weight`` x mean translation
        (world units) of the trained frames' corrections (nerfstudio's regulariser: norms, not squares)."""
        # A weighted mean, not delta[trained]: selecting rows waits for the GPU, which a captured
        # training step (tasks/nerf/graphed.py) cannot.
        weight = self.trained.to(self.delta.dtype) / self.trained.sum().clamp(min=1)
        rotation = ((self.delta[:, :3].square().sum(-1) + 1e-12).sqrt() * weight).sum()
        translation = ((self.delta[:, 3:].square().sum(-1) + 1e-12).sqrt() * weight).sum()
        return rotation_weight * rotation + translation_weight * translation

    @torch.no_grad()
    def filled(self) -> Tensor:
        """``delta [F, 6]`` where every frame not trained on gets the mean of the nearest trained
        frame before and after it in capture order (one of them at the ends)."""
        delta = self.delta.detach().clone()
        trained = self.trained.nonzero()[:, 0].tolist()
        if not trained:
            return torch.zeros_like(delta)
        for frame in (~self.trained).nonzero()[:, 0].tolist():
            before = [t for t in trained if t < frame]
            after = [t for t in trained if t > frame]
            neighbours = ([before[-1]] if before else []) + ([after[0]] if after else [])
            delta[frame] = delta[neighbours].mean(0)
        return delta


def rotation_degrees(delta: Tensor) -> Tensor:
    """Rotation angle of each correction ``[F, 6]`` → ``[F]`` degrees."""
    return torch.rad2deg(delta[:, :3].norm(dim=-1))


def write_refined_transforms(source: Path, names: list[str], c2w: Tensor, out_path: Path) -> Path:
    """A copy of ``source`` (a transforms.json) with each frame's pose replaced by the refined one.

    ``names[i]`` is frame ``i``'s ``file_path`` as ``source`` writes it, ``c2w [F, 4, 4]`` its refined
    pose. Relative paths (frames, masks, sparse points) are rebased to ``out_path``'s folder, so the
    copy reads the same files.
    """
    source, out_path = Path(source), Path(out_path)
    meta = json.loads(source.read_text())
    poses = {name: pose for name, pose in zip(names, c2w.detach().cpu().double().tolist())}

    def rebase(path: str) -> str:
        return path if os.path.isabs(path) else os.path.relpath(source.parent / path, out_path.parent)

    for frame in meta.get("frames", []):
        name = str(frame.get("file_path", ""))
        if name not in poses:
            raise ValueError(f"{source}: frame {name!r} was not in the trained capture; retrain the field")
        frame["transform_matrix"] = poses[name]
        for key in ("file_path", "mask_path", "depth_file_path"):
            if key in frame:
                frame[key] = rebase(str(frame[key]))
    extra = meta.get("korokoro")
    if isinstance(extra, dict) and "point_views" in extra:
        meta["korokoro"] = {**extra, "point_views": rebase(str(extra["point_views"]))}
    out_path.write_text(json.dumps(meta, indent=1))
    return out_path
