"""The ngp trainer's batch: draw rays, render them, and the losses, in two forms.

:meth:`NgpStep.eager_losses` is the general step (any sampler, the depth prior, camera
refinement, mixed precision); :meth:`NgpStep.fixed_losses` renders into batches of fixed
size for a captured CUDA graph (:mod:`tasks.nerf.graphed`). Both share the photometric loss,
so the two forms train the same objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tasks.nerf.camera_opt import CameraCorrections
from tasks.nerf.dataset import Capture
from tasks.nerf.depth_prior import SparseDepth, line_of_sight_loss
from tasks.nerf.field import GridSampler, NgpModel, Sampler, render_rays
from tasks.nerf.graphed import PADDING_RAYS, SampleCapacity, render_fixed
from tasks.nerf.packed import PackedSamples, distortion_loss
from tasks.nerf.pixels import TrainingPixels, sample_training_rays

if TYPE_CHECKING:
    from tasks.nerf.ngp import NgpSettings


@dataclass(frozen=True)
class Batch:
    """One step's training rays: origins, directions ``[R, 3]``, target ``[R, 3]`` (the frame's
    colour over a random background), background ``[R, 3]``, mask ``[R]`` (1 = product)."""

    origins: Tensor
    directions: Tensor
    target: Tensor
    background: Tensor
    mask: Tensor


@dataclass
class NgpStep:
    """Everything one training step reads. ``sampler`` marches the eager steps, ``grid`` the fixed
    batches (plain torch over the same occupancy grid); ``diagonal`` is the box's."""

    s: NgpSettings
    model: NgpModel
    sampler: Sampler
    grid: GridSampler
    capture: Capture
    pixels: TrainingPixels
    generator: torch.Generator
    diagonal: float
    sparse: SparseDepth | None = None
    cameras: CameraCorrections | None = None

    def draw(self) -> Batch:
        """``rays_per_batch`` random training rays, through the refined poses when cameras learn."""
        poses = None if self.cameras is None else self.cameras.apply(self.capture.c2w)
        origins, directions, rgb, mask = sample_training_rays(
            self.capture, self.pixels, self.s.rays_per_batch, self.generator, self.s.pixel_jitter, poses
        )
        background = torch.rand(rgb.shape, device=rgb.device, generator=self.generator)
        target = rgb * mask[:, None] + background * (1 - mask[:, None])
        return Batch(origins, directions, target, background, mask)

    def photometric(
        self, out: dict[str, Tensor], samples: PackedSamples, batch: Batch, distortion_rays: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(colour + alpha + distortion loss, colour loss) of ``batch``'s rays, the first rows of
        ``out``; ``samples`` may carry more rays after them (depth-prior rays, padding). The
        distortion loss is a mean over ``distortion_rays`` (default: all of ``samples``' rays)."""
        s, n = self.s, batch.target.shape[0]
        prediction = out["rgb"][:n].float() + (1 - out["alpha"][:n].float())[:, None] * batch.background
        color_loss = torch.mean((prediction - batch.target) ** 2)
        loss = color_loss
        if s.alpha_loss_weight > 0:
            loss = loss + s.alpha_loss_weight * torch.mean((out["alpha"][:n].float() - batch.mask) ** 2)
        if s.distortion_loss_weight > 0:
            loss = loss + s.distortion_loss_weight * distortion_loss(out["weights"], samples, self.diagonal, distortion_rays)
        return loss, color_loss

    def prior_rays(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's rays followed by ``depth_rays_per_batch`` rays of the sparse-point prior →
        origins, directions ``[R + D, 3]`` and each ray's point depth ``[R + D]`` (0 for colour rays)."""
        depth_origins, depth_directions, point_depth = self.sparse.pick(self.s.depth_rays_per_batch, self.generator)
        depth = torch.cat([point_depth.new_zeros(batch.origins.shape[0]), point_depth])
        return torch.cat([batch.origins, depth_origins]), torch.cat([batch.directions, depth_directions]), depth

    def prior_loss(self, out: dict[str, Tensor], samples: PackedSamples, depth: Tensor, n_color: int) -> Tensor:
        """The weighted line-of-sight loss of the prior rays, which follow ``n_color`` colour rays."""
        rays = slice(n_color, n_color + self.s.depth_rays_per_batch)
        return self.s.depth_loss_weight * line_of_sight_loss(
            out["weights"], samples, depth, self.s.depth_margin * self.diagonal, rays)

    def eager_losses(self, use_prior: bool, use_amp: bool) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """One batch through :func:`render_rays` → (loss, colour loss, (marched, visible) sample counts)."""
        batch = self.draw()
        origins, directions = batch.origins, batch.directions
        use_prior = use_prior and self.sparse is not None
        if use_prior:  # the prior's rays ride in the same batch: one render, one backward
            origins, directions, depth = self.prior_rays(batch)
        with torch.autocast(device_type=origins.device.type, dtype=torch.float16, enabled=use_amp):
            out, samples = render_rays(self.model, self.sampler, origins, directions, jitter=True,
                                       generator=self.generator, early_stop_eps=self.s.early_stop_eps)
        loss, color_loss = self.photometric(out, samples, batch)
        if use_prior:
            loss = loss + self.prior_loss(out, samples, depth, batch.origins.shape[0])
        if self.cameras is not None:
            loss = loss + self.cameras.penalty(self.s.pose_rotation_penalty, self.s.pose_translation_penalty)
        return loss, color_loss, (int(out["marched"]), int(out["samples"]))

    def fixed_losses(self, capacity: SampleCapacity, use_prior: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """One batch in fixed-size sample batches, nothing waiting for the GPU → (loss, colour
        loss, counts ``[2]`` of marched and visible samples)."""
        batch = self.draw()
        origins, directions = batch.origins, batch.directions
        use_prior = use_prior and self.sparse is not None
        if use_prior:
            origins, directions, depth = self.prior_rays(batch)
        out, samples, counts = render_fixed(self.model, self.grid, origins, directions, capacity,
                                            self.s.early_stop_eps, self.generator)
        # Padding rays are left out of the distortion loss's mean, as the eager step has none.
        loss, color_loss = self.photometric(out, samples, batch, distortion_rays=origins.shape[0])
        if use_prior:
            loss = loss + self.prior_loss(out, samples, torch.cat([depth, depth.new_zeros(PADDING_RAYS)]),
                                          batch.origins.shape[0])
        if self.cameras is not None:
            loss = loss + self.cameras.penalty(self.s.pose_rotation_penalty, self.s.pose_translation_penalty)
        return loss, color_loss, counts
