"""Which pixels a training step learns from: the box's view, and more of them on the product.

A step draws ``rays_per_batch`` pixels of the training frames. Uniform over each frame's view
of the box (``aabb_pixel_rects``) wastes most of them on background when the product is
small in the box (a basket is ~25 % of its box's pixels): the field then sees each product
pixel about once in a whole GPU run and under-fits fine texture. ``object_fraction`` of every
batch is therefore drawn from the product's pixels instead (the masks, grown by
``margin_px`` so the silhouette's edge is learned too); the rest stays uniform over the
rectangles, which is what teaches the emptiness around the product. instant-ngp reaches the
same end with an error map; masks are cheaper and we have them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from tasks.nerf.dataset import Capture, grow_mask
from tasks.nerf.rays import pixel_rays


@dataclass(frozen=True)
class TrainingPixels:
    """Where training rays are drawn from.

    frame_ids ``[T]`` int64 training frames; rects ``[T, 4]`` int64 (u0, v0, u1, v1) their views
    of the box, end-exclusive; object_pixels ``[P]`` int64 flat indices ``frame * H * W + v * W + u``
    of the (grown) product pixels inside those rectangles; object_fraction in [0, 1].
    """

    frame_ids: Tensor
    rects: Tensor
    object_pixels: Tensor
    object_fraction: float

    @functools.cached_property
    def rect_areas(self) -> Tensor:
        """Pixels in each frame's rectangle ``[T]`` (float): how uniform rays are shared out."""
        return ((self.rects[:, 2] - self.rects[:, 0]) * (self.rects[:, 3] - self.rects[:, 1])).float()

    @functools.cached_property
    def rect_cdf(self) -> Tensor:
        """Share of the rectangles' pixels in the frames up to each one ``[T]`` (float64, last = 1)."""
        total = torch.cumsum(self.rect_areas.double(), dim=0)
        return total / total[-1]

    def pick_object_pixels(self, n: int, width: int, height: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` pixels drawn uniformly from the product pool → frame, u, v ``[n]`` (int64)."""
        flat = self.object_pixels[torch.randint(self.object_pixels.numel(), (n,), device=self.object_pixels.device,
                                                generator=generator)]
        return flat // (width * height), flat % width, flat // width % height

    def pick(self, n_rays: int, width: int, height: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``n_rays`` pixels → frame ``[n]``, u ``[n]``, v ``[n]`` (int64): object ones first."""
        n_object = round(n_rays * self.object_fraction) if self.object_pixels.numel() else 0
        n_uniform = n_rays - n_object
        device = self.rects.device
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        # Each branch runs only when it draws rays: a step is paced by launching kernels, and
        # empty tensors cost a launch each all the same.
        if n_object:
            parts.append(self.pick_object_pixels(n_object, width, height, generator))
        if n_uniform:
            # Inverse CDF, not torch.multinomial: the same draw, and safe inside a captured CUDA graph.
            uniform = torch.rand(n_uniform, device=device, generator=generator, dtype=torch.float64)
            pick = torch.searchsorted(self.rect_cdf, uniform, right=True).clamp(max=self.rects.shape[0] - 1)
            rect = self.rects[pick]
            uv01 = torch.rand(n_uniform, 2, device=device, generator=generator)
            u_rect = (rect[:, 0] + (uv01[:, 0] * (rect[:, 2] - rect[:, 0])).long()).clamp(max=width - 1)
            v_rect = (rect[:, 1] + (uv01[:, 1] * (rect[:, 3] - rect[:, 1])).long()).clamp(max=height - 1)
            parts.append((self.frame_ids[pick], u_rect, v_rect))
        if len(parts) == 1:
            return parts[0]
        if not parts:  # no rays asked for
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty, empty
        frames, u, v = (torch.cat(column) for column in zip(*parts))
        return frames, u, v


def training_pixels(
    capture: Capture, frame_ids: Tensor, rects: Tensor, object_fraction: float, margin_px: int,
    keep_object_pixels: bool = False,
) -> TrainingPixels:
    """The product pixels of ``frame_ids`` (masks grown by ``margin_px``, kept inside ``rects``).

    frame_ids ``[T]``, rects ``[T, 4]`` as in ``TrainingPixels``. With ``object_fraction`` 0 the
    pool is left empty (no memory spent on it) unless ``keep_object_pixels`` asks for it.
    """
    if not 0.0 <= object_fraction <= 1.0:
        raise ValueError(f"nerf.object_ray_fraction must be within [0, 1], got {object_fraction}")
    if margin_px < 0:
        raise ValueError(f"nerf.object_ray_margin_px must be >= 0, got {margin_px}")
    device = capture.masks.device
    h, w = capture.height, capture.width
    pools = []
    if object_fraction > 0 or keep_object_pixels:
        cols = torch.arange(w, device=device)
        rows = torch.arange(h, device=device)
        for frame, (u0, v0, u1, v1) in zip(frame_ids.tolist(), rects.tolist()):
            grown = grow_mask(capture.masks[frame], margin_px)
            inside = grown & ((rows >= v0) & (rows < v1))[:, None] & ((cols >= u0) & (cols < u1))[None, :]
            pools.append(inside.flatten().nonzero()[:, 0] + frame * h * w)
    object_pixels = torch.cat(pools) if pools else torch.zeros(0, dtype=torch.int64, device=device)
    return TrainingPixels(frame_ids, rects, object_pixels, object_fraction)


def sample_training_rays(
    capture: Capture, pixels: TrainingPixels, n_rays: int, generator: torch.Generator, jitter: bool = False,
    c2w: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n_rays`` training rays drawn as ``pixels`` says.

    → origins ``[R, 3]``, directions ``[R, 3]``, rgb ``[R, 3]`` in 0..1, mask ``[R]`` float
    (1 = product). With ``jitter`` each ray passes a random point of its pixel instead of the
    centre (instant-ngp does the same): a pixel's colour is the average over its area, and
    texture finer than a pixel is then learned as that average instead of as whatever one
    point shows. ``c2w [F, 4, 4]`` replaces the capture's poses (refined cameras; gradients flow
    into them through the rays).
    """
    frames, u, v = pixels.pick(n_rays, capture.width, capture.height, generator)
    within = torch.rand(n_rays, 2, device=u.device, generator=generator) if jitter else None
    poses = capture.c2w if c2w is None else c2w
    origins, directions = pixel_rays(poses[frames], capture.intrinsics[frames], torch.stack([u, v], -1), within)
    rgb = capture.images[frames, v, u].float() / 255.0
    mask = capture.masks[frames, v, u].float()
    return origins, directions, rgb, mask
