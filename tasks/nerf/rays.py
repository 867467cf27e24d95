"""Rays and volume rendering: pinhole rays, ray–box intersection, stratified samples, and
alpha compositing. Pure functions on batched tensors; no state, CPU and CUDA alike.

Samples live in a dense ``[R, S]`` layout (R rays, S sample slots along each ray, a
``valid`` mask for slots past the box exit). Culled slots simply get zero density, so
compositing stays one vectorised cumulative sum per batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pixel_rays(c2w: Tensor, intrinsics: Tensor, pixels: Tensor, within: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rays through pixels of pinhole cameras (OpenGL axes: camera looks along -z, y up).

    c2w ``[R, 4, 4]`` (or ``[4, 4]`` shared), intrinsics ``[R, 4]`` (or ``[4]``) = fx, fy, cx, cy,
    pixels ``[R, 2]`` integer (u = column, v = row) → origins ``[R, 3]``, unit directions ``[R, 3]``.
    ``within [R, 2]`` in [0, 1): where inside its pixel each ray passes (default: the centre, 0.5).
    """
    intrinsics = intrinsics.expand(pixels.shape[0], 4)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    du, dv = (0.5, 0.5) if within is None else within.unbind(-1)
    u = pixels[:, 0].to(intrinsics.dtype) + du
    v = pixels[:, 1].to(intrinsics.dtype) + dv
    # Image rows go down while camera y goes up, hence the minus sign on y.
    dirs_cam = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], dim=-1)  # [R, 3]
    c2w = c2w.expand(pixels.shape[0], 4, 4)
    dirs = (c2w[:, :3, :3] @ dirs_cam[:, :, None])[..., 0]
    origins = c2w[:, :3, 3]
    return origins, dirs / dirs.norm(dim=-1, keepdim=True)


def camera_to_pixels(cam: Tensor, intrinsics: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Points in camera axes ``[..., 3]`` (OpenGL: the camera looks along -z, y up) → pixel
    coordinates u, v ``[...]`` (float; pixel centres at +0.5, as :func:`pixel_rays` casts them) and
    depth ``[...]`` along the viewing axis (≤ 0 behind the camera). intrinsics ``[..., 4]`` = fx, fy,
    cx, cy, broadcast against the points."""
    depth = -cam[..., 2]
    fx, fy, cx, cy = intrinsics.unbind(-1)
    z = depth.clamp(min=1e-6)
    return cx + fx * cam[..., 0] / z, cy - fy * cam[..., 1] / z, depth


def intersect_aabb(origins: Tensor, directions: Tensor, aabb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays against a box.

    origins, directions ``[R, 3]``, aabb ``[2, 3]`` (min, max) → t_near ``[R]`` (>= 0),
    t_far ``[R]``, hit ``[R]`` bool (the ray enters the box in front of its origin).
    """
    # A tiny epsilon keeps axis-parallel rays finite (±huge instead of nan).
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    inv = 1.0 / safe
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far, t_far > t_near


def stratified_samples(
    t_near: Tensor, t_far: Tensor, step: float, n_slots: int, jitter: bool, generator: torch.Generator | None = None,
    per_ray: bool = False,
) -> tuple[Tensor, Tensor]:
    """Samples at a fixed world step from the box entry, one jittered sample per interval.

    t_near, t_far ``[R]`` → t_mid ``[R, S]`` sample distances, valid ``[R, S]`` (inside the box).
    A fixed step (not a fixed count per ray) keeps ``sigma * step`` comparable between rays,
    which is what the occupancy threshold relies on. ``per_ray``: one jitter shared by a ray's
    samples, which then stay evenly spaced (as nerfacc's traversal places them).
    """
    slots = torch.arange(n_slots, device=t_near.device, dtype=t_near.dtype)
    if jitter:
        offset = torch.rand(t_near.shape[0], 1 if per_ray else n_slots, device=t_near.device, generator=generator)
    else:
        offset = torch.full((1, n_slots), 0.5, device=t_near.device, dtype=t_near.dtype)
    t_mid = t_near[:, None] + (slots[None] + offset) * step
    return t_mid, t_mid < t_far[:, None]


def composite(
    sigmas: Tensor, colors: Tensor, t_mid: Tensor, step: float, surface_opacity: float | None = None,
    solid_alpha: float = 0.0,
) -> dict[str, Tensor]:
    """Alpha compositing along each ray (front to back).

    sigmas ``[R, S]`` (0 in culled / invalid slots), colors ``[R, S, 3]``, t_mid ``[R, S]``.
    Returns ``rgb [R, 3]`` (premultiplied, no background), ``alpha [R]`` (accumulated
    opacity), ``depth [R]`` (expected distance, 0 where empty), ``weights [R, S]``; with
    ``surface_opacity``, also ``depth_surface [R]``: where the opacity reaches that level (0 where it never does),
    with ``solid_alpha``, the opacity of only the samples at least that opaque on their own, as if
    the thinner haze were not there.
    """
    optical_depth = sigmas * step  # [R, S]
    alpha = 1.0 - torch.exp(-optical_depth)
    # Transmittance before each sample: exclusive cumulative sum of optical depth.
    transmittance = torch.exp(-(torch.cumsum(optical_depth, dim=-1) - optical_depth))
    weights = transmittance * alpha
    accumulated = weights.sum(-1)
    rgb = (weights[..., None] * colors).sum(-2)
    depth = (weights * t_mid).sum(-1)
    out = {"rgb": rgb, "alpha": accumulated, "depth": depth, "weights": weights}
    if surface_opacity is not None:
        counted = weights
        if solid_alpha > 0:  # composite again without the haze, as if it were not there
            solid = optical_depth * (alpha >= solid_alpha)
            counted = torch.exp(-(torch.cumsum(solid, dim=-1) - solid)) * (1.0 - torch.exp(-solid))
        running = torch.cumsum(counted, dim=-1)
        crossed = (running < surface_opacity).sum(-1).clamp(max=t_mid.shape[-1] - 1)
        reached = running[:, -1] >= surface_opacity
        out["depth_surface"] = torch.where(reached, t_mid.gather(-1, crossed[:, None])[:, 0], torch.zeros_like(depth))
    return out


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of colours in 0..1 from their mean squared error (floored at 1e-10, i.e. 100 dB)."""
    return -10.0 * math.log10(max(mse, 1e-10))
