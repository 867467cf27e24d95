"""The ngp trainer's batch: draw rays, render them, and the losses, in two forms.

:meth:`NgpStep.eager_losses` is the general step (any sampler, the depth prior, camera
refinement, the depth-smoothness stencils, mixed precision); :meth:`NgpStep.fixed_losses` renders into batches of fixed
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
from tasks.nerf.rays import pixel_rays
from tasks.nerf.smoothness import STENCIL, pick_stencils, second_difference_loss

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


@dataclass(frozen=True)
class StepRays:
    """One step's rays, rendered together: the colour batch's ``n_color`` rays, then the sparse-point
    prior's (``point_depth [N]`` holds their points' depth, 0 on every other ray), then the
    depth-smoothness stencils' (five rays each, ``stencil_valid [S]``). origins, directions ``[N, 3]``."""

    origins: Tensor
    directions: Tensor
    n_color: int
    n_prior: int = 0
    point_depth: Tensor | None = None
    stencil_valid: Tensor | None = None

    @property
    def prior(self) -> slice:
        return slice(self.n_color, self.n_color + self.n_prior)

    @property
    def stencils(self) -> slice:
        start = self.n_color + self.n_prior
        return slice(start, start + (0 if self.stencil_valid is None else self.stencil_valid.shape[0] * len(STENCIL)))


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

    def draw(self) -> tuple[Batch, Tensor | None]:
        """``rays_per_batch`` random training rays, through the refined poses when cameras learn
        (→ the batch and those poses ``[F, 4, 4]``, None without refinement)."""
        poses = None if self.cameras is None else self.cameras.apply(self.capture.c2w)
        origins, directions, rgb, mask = sample_training_rays(
            self.capture, self.pixels, self.s.rays_per_batch, self.generator, self.s.pixel_jitter, poses
        )
        background = torch.rand(rgb.shape, device=rgb.device, generator=self.generator)
        target = rgb * mask[:, None] + background * (1 - mask[:, None])
        return Batch(origins, directions, target, background, mask), poses

    def photometric(
        self, out: dict[str, Tensor], samples: PackedSamples, batch: Batch, distortion_rays: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(colour + alpha + distortion loss, colour loss) of ``batch``'s rays, the first rows of
        ``out``; ``samples`` may carry more rays after them (prior rays, padding). The
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

    def step_rays(self, batch: Batch, poses: Tensor | None, use_prior: bool, use_smooth: bool = False) -> StepRays:
        """The batch's rays, followed by ``depth_rays_per_batch`` rays of the sparse-point prior
        (with ``use_prior``) and ``depth_smooth_stencils`` stencils of the smoothness prior (with
        ``use_smooth``): one render and one backward serve every loss."""
        origins, directions = [batch.origins], [batch.directions]
        n_color, n_prior, point_depth, valid = batch.origins.shape[0], 0, None, None
        if use_prior and self.sparse is not None:
            prior_origins, prior_directions, point_depth = self.sparse.pick(self.s.depth_rays_per_batch, self.generator)
            origins.append(prior_origins)
            directions.append(prior_directions)
            n_prior = point_depth.shape[0]
        if use_smooth:
            frame, u, v, valid = pick_stencils(self.pixels, self.capture.masks, self.s.depth_smooth_stencils,
                                               self.s.depth_smooth_stride_px, self.generator)
            # The stencils judge the field's depth, not the cameras: the refined poses stay fixed here.
            c2w = (self.capture.c2w if poses is None else poses.detach())[frame.flatten()]
            stencil_origins, stencil_directions = pixel_rays(c2w, self.capture.intrinsics[frame.flatten()],
                                                             torch.stack([u.flatten(), v.flatten()], -1))
            origins.append(stencil_origins)
            directions.append(stencil_directions)
        origins_all, directions_all = torch.cat(origins), torch.cat(directions)
        if point_depth is not None:  # every other ray gets depth 0: the prior's loss reads only its own
            total = origins_all.shape[0]
            point_depth = torch.cat([point_depth.new_zeros(n_color), point_depth,
                                     point_depth.new_zeros(total - n_color - n_prior)])
        return StepRays(origins_all, directions_all, n_color, n_prior, point_depth, valid)

    def prior_losses(self, out: dict[str, Tensor], samples: PackedSamples, rays: StepRays, padding: int = 0) -> Tensor:
        """The priors' weighted losses: the sparse points' line of sight, the stencils' second
        differences and the camera penalty (0 when none is on). ``padding`` rays follow ``rays``."""
        loss = out["alpha"].new_zeros(())
        if rays.point_depth is not None:
            depth = torch.cat([rays.point_depth, rays.point_depth.new_zeros(padding)]) if padding else rays.point_depth
            loss = loss + self.s.depth_loss_weight * line_of_sight_loss(
                out["weights"], samples, depth, self.s.depth_margin * self.diagonal, rays.prior)
        if rays.stencil_valid is not None:
            depth = out["depth"][rays.stencils].float().view(-1, len(STENCIL))
            alpha = out["alpha"][rays.stencils].float().view(-1, len(STENCIL))
            loss = loss + self.s.depth_smooth_weight * second_difference_loss(
                depth, alpha, rays.stencil_valid, self.diagonal, self.s.depth_smooth_robust)
        if self.cameras is not None:
            loss = loss + self.cameras.penalty(self.s.pose_rotation_penalty, self.s.pose_translation_penalty)
        return loss

    def eager_losses(self, use_prior: bool, use_amp: bool, use_smooth: bool = False) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """One batch through :func:`render_rays` → (loss, colour loss, (marched, visible) sample counts)."""
        batch, poses = self.draw()
        rays = self.step_rays(batch, poses, use_prior, use_smooth)
        with torch.autocast(device_type=rays.origins.device.type, dtype=torch.float16, enabled=use_amp):
            out, samples = render_rays(self.model, self.sampler, rays.origins, rays.directions, jitter=True,
                                       generator=self.generator, early_stop_eps=self.s.early_stop_eps)
        loss, color_loss = self.photometric(out, samples, batch)
        return loss + self.prior_losses(out, samples, rays), color_loss, (int(out["marched"]), int(out["samples"]))

    def fixed_losses(
        self, capacity: SampleCapacity, use_prior: bool = False, use_smooth: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One batch in fixed-size sample batches, nothing waiting for the GPU → (loss, colour
        loss, counts ``[2]`` of marched and visible samples)."""
        batch, poses = self.draw()
        rays = self.step_rays(batch, poses, use_prior, use_smooth)
        out, samples, counts = render_fixed(self.model, self.grid, rays.origins, rays.directions, capacity,
                                            self.s.early_stop_eps, self.generator)
        # Padding rays are left out of the distortion loss's mean, as the eager step has none.
        loss, color_loss = self.photometric(out, samples, batch, distortion_rays=rays.origins.shape[0])
        return loss + self.prior_losses(out, samples, rays, PADDING_RAYS), color_loss, counts
