"""Colour half of the mesh stage: field colours at surface points, texel rasterisation, baking.

Colours move between three spaces: the field's (``field_color_space``), linear RGB (glTF
vertex colours) and sRGB-encoded 8-bit (texture images, OBJ vertex colours).
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded 0..1 → linear 0..1 (IEC 61966-2-1), any shape."""
    rgb = np.clip(rgb, 0.0, 1.0)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """Linear 0..1 → sRGB-encoded 0..1, any shape."""
    rgb = np.clip(rgb, 0.0, 1.0)
    return np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * rgb ** (1 / 2.4) - 0.055)


def view_directions(normals: Tensor, views: int, cone_deg: float) -> Tensor:
    """Directions looking at the surface: ``-normal`` plus a ring tilted by ``cone_deg``.

    normals ``[N, 3]`` unit → ``[N, K, 3]`` unit, K = views.
    """
    inward = -normals
    if views <= 1:
        return inward[:, None, :]
    # Any tangent frame works: pick the axis least aligned with the normal to cross with.
    helper = torch.eye(3, dtype=normals.dtype, device=normals.device)[normals.abs().argmin(1)]
    tangent = torch.linalg.cross(normals, helper)
    tangent = tangent / tangent.norm(dim=1, keepdim=True)
    bitangent = torch.linalg.cross(normals, tangent)
    phi = 2 * math.pi * torch.arange(views - 1, dtype=normals.dtype, device=normals.device) / (views - 1)
    tilt = math.radians(cone_deg)
    around = torch.cos(phi)[None, :, None] * tangent[:, None, :] + torch.sin(phi)[None, :, None] * bitangent[:, None, :]
    ring = math.cos(tilt) * inward[:, None, :] + math.sin(tilt) * around
    return torch.cat([inward[:, None, :], ring], dim=1)


def _ray_weights(sigma: Tensor, delta: float) -> Tensor:
    """Alpha-compositing weights of equal steps ``delta`` along rays: sigma ``[..., S]`` → ``[..., S]``."""
    alpha = 1.0 - torch.exp(-sigma.clamp(min=0) * delta)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha[..., :-1]], -1), -1)
    return alpha * transmittance


def shade(
    field,
    points: np.ndarray | Tensor,
    normals: np.ndarray | Tensor,
    views: int,
    cone_deg: float,
    ray_samples: int,
    ray_half_length: float,
    chunk_points: int,
    device: str,
    shared_ray: bool = False,
) -> Tensor:
    """Surface colour in the field's colour space. points, normals ``[N, 3]`` → ``[N, 3]`` float32 on ``device``.

    For each of ``views`` directions a short ray crosses the surface (from ``ray_half_length``
    outside to as far inside) and its colours are alpha-composited, normalised by the total
    weight: the iso-surface of a NeRF is not exactly where its colour lives, and the short
    ray finds it. With ``ray_samples = 1`` the surface point itself is queried. Views are averaged.

    ``shared_ray``: one ray along the inverted normal finds where the colour lives (its
    density-weighted mean depth), and every view's colour is read at that one point: S density
    + K colour queries per point instead of K × S of each (5 views × 8 samples: 13 instead of 80).
    """
    points = torch.as_tensor(points, dtype=torch.float32, device=device)
    normals = torch.as_tensor(normals, dtype=torch.float32, device=device)
    k, s = max(views, 1), max(ray_samples, 1)
    offsets = torch.linspace(-ray_half_length, ray_half_length, s, device=device) if s > 1 else torch.zeros(1, device=device)
    delta = 2 * ray_half_length / s
    step = max(1, chunk_points // (max(k, s) if shared_ray else k * s))
    colour = _shade_shared_ray if shared_ray else _shade_views
    out = torch.empty((len(points), 3), dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, len(points), step):
            chunk = slice(start, start + step)
            out[chunk] = colour(field, points[chunk], normals[chunk], k, cone_deg, offsets, delta).clamp(0, 1)
    return out


def _shade_views(field, p: Tensor, normals: Tensor, views: int, cone_deg: float, offsets: Tensor, delta: float) -> Tensor:
    """:func:`shade` with a short ray per view: p, normals ``[n, 3]`` → ``[n, 3]``."""
    dirs = view_directions(normals, views, cone_deg)[:, :, None, :]  # [n, K, 1, 3]
    samples = p[:, None, None, :] + dirs * offsets[None, None, :, None]  # [n, K, S, 3]
    n, k, s = samples.shape[:3]
    flat = samples.reshape(-1, 3)
    rgb = field.color(flat, dirs.expand(samples.shape).reshape(-1, 3)).float().reshape(n, k, s, 3)
    if s == 1:
        return rgb[:, :, 0].mean(1)
    weight = _ray_weights(field.density(flat).float().reshape(n, k, s).to(p.device), delta)
    total = weight.sum(-1, keepdim=True)
    composited = (weight[..., None] * rgb).sum(2) / total.clamp(min=1e-6)
    return torch.where(total > 1e-4, composited, rgb[:, :, s // 2]).mean(1)  # no density on the ray (rare): the surface point


def _shade_shared_ray(field, p: Tensor, normals: Tensor, views: int, cone_deg: float, offsets: Tensor, delta: float) -> Tensor:
    """:func:`shade` with one depth-finding ray along ``-normal``: p, normals ``[n, 3]`` → ``[n, 3]``."""
    inward = -normals
    s = len(offsets)
    if s > 1:
        samples = p[:, None, :] + inward[:, None, :] * offsets[None, :, None]  # [n, S, 3]
        weight = _ray_weights(field.density(samples.reshape(-1, 3)).float().reshape(-1, s).to(p.device), delta)
        total = weight.sum(-1)
        depth = (weight * offsets[None, :]).sum(-1) / total.clamp(min=1e-6)
        p = p + inward * torch.where(total > 1e-4, depth, torch.zeros_like(depth))[:, None]  # no density: the point itself
    dirs = view_directions(normals, views, cone_deg)  # [n, K, 3]
    n, k = dirs.shape[:2]
    return field.color(p[:, None, :].expand(n, k, 3).reshape(-1, 3), dirs.reshape(-1, 3)).float().reshape(n, k, 3).mean(1)


def rasterize_uv(uv: Tensor, faces: Tensor, size: int, chunk_texels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Texels whose centre lies inside a triangle of the UV layout, on the inputs' device.

    uv ``[V, 2]`` float in 0..1 (v up), faces ``[F, 3]`` int64 → ``rows [T]``, ``cols [T]`` (image
    indices, row 0 at the top), ``face [T]``, ``bary [T, 3]`` (uv's dtype). Vectorised over each
    triangle's texel bounding box, ``chunk_texels`` candidate texels at a time.
    """
    device = uv.device
    pix = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], 1)  # texel centres sit at k + 0.5
    tri = pix[faces]  # [F, 3, 2]
    lo = torch.ceil(tri.amin(1) - 0.5).clamp(0, size - 1).long()
    hi = torch.floor(tri.amax(1) - 0.5).clamp(0, size - 1).long()
    extent = (hi - lo + 1).clamp(min=0)
    count = extent[:, 0] * extent[:, 1]
    ends = torch.cumsum(count, 0).cpu().numpy()  # chunk bounds are planned on the host, once
    out: list[list[Tensor]] = [[], [], [], []]
    first = 0
    while first < len(faces):
        # Faces [first, last) whose candidates fit in one chunk (at least one face).
        base = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + chunk_texels, side="right")))
        counts = count[first:last]
        total = int(ends[last - 1] - base)
        fid = torch.repeat_interleave(torch.arange(first, last, device=device), counts, output_size=total)
        local = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
        width = extent[fid, 0].clamp(min=1)
        col, row = lo[fid, 0] + local % width, lo[fid, 1] + local // width
        a, b, c = tri[fid, 0], tri[fid, 1], tri[fid, 2]
        v0, v1 = b - a, c - a
        v2 = torch.stack([col + 0.5, row + 0.5], 1).to(uv.dtype) - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        ok_den = den.abs() > 1e-12
        den = torch.where(ok_den, den, torch.ones_like(den))
        w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        bary = torch.stack([1.0 - w1 - w2, w1, w2], 1)
        inside = ok_den & (bary >= -1e-6).all(1)
        for kept, values in zip(out, (row, col, fid, bary)):
            kept.append(values[inside])
        first = last
    return tuple(torch.cat(kept) for kept in out)  # type: ignore[return-value]


def box_sum3(x: Tensor) -> Tensor:
    """Sum over each texel's 3×3 neighbourhood (zeros beyond the border): ``[H, W, C]`` → ``[H, W, C]``.

    On the GPU a pooling kernel; on the CPU OpenCV's box filter, 2-3× faster there than
    PyTorch's pooling or convolution (2K texture, 2 cores).
    """
    if x.is_cuda:
        return F.avg_pool2d(x.permute(2, 0, 1)[None], 3, stride=1, padding=1, count_include_pad=True)[0].permute(1, 2, 0) * 9.0
    summed = cv2.boxFilter(x.contiguous().numpy(), -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    return torch.from_numpy(summed.reshape(x.shape))


def dilate_texture(image: Tensor, filled: Tensor, pixels: int) -> Tensor:
    """Grow charts outwards by ``pixels`` (mean of filled neighbours), then fill the rest with the mean.

    image ``[H, W, 3]`` float, filled ``[H, W]`` bool → ``[H, W, 3]`` float32, on their device. Stops
    bilinear filtering and mipmaps from pulling background colour across chart seams.
    """
    # (colour × weight, weight) side by side: one box sum gives each texel's filled neighbours' mean.
    stacked = torch.cat([torch.where(filled[..., None], image.float(), 0.0), filled[..., None].float()], -1)  # [H, W, 4]
    for _ in range(pixels):
        sums = box_sum3(stacked)
        grow = (stacked[..., 3] == 0) & (sums[..., 3] > 0)
        if not bool(grow.any()):
            break
        grown = sums[grow]  # [G, 4]
        stacked[grow] = torch.cat([grown[:, :3] / grown[:, 3:], torch.ones_like(grown[:, 3:])], 1)
    done = stacked[..., 3] > 0
    colour = stacked[..., :3]
    if bool(done.any()):
        colour[~done] = colour[done].mean(0)
    return colour


def encode_image(srgb: np.ndarray, fmt: str, jpeg_quality: int) -> bytes:
    """``[H, W, 3]`` sRGB 0..1 → PNG or JPEG bytes."""
    img = Image.fromarray(np.round(np.clip(srgb, 0, 1) * 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=True)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(jpeg_quality), subsampling=0 if jpeg_quality >= 90 else 2, optimize=True)
    else:
        raise ValueError(f"mesh.texture_format must be 'png' or 'jpeg', got {fmt!r}")
    return buf.getvalue()


def bake_texture(
    vertices: np.ndarray,
    normals: np.ndarray,
    faces: np.ndarray,
    uv: np.ndarray,
    size: int,
    shade_fn,
    dilate_px: int,
    chunk_texels: int,
    device: str = "cpu",
) -> tuple[np.ndarray, float]:
    """Texture image of the surface colour ``shade_fn(points [N,3], normals [N,3]) → [N,3]`` (tensors on ``device``).

    Geometry ``[V, 3]`` (+ unit normals) and ``uv [V, 2]`` share the ``faces [F, 3]`` indexing.
    Rasterisation, interpolation and dilation run on ``device`` (millions of texels: the GPU's
    work, not the host's). Returns ``[size, size, 3]`` in shade_fn's colour space and the fraction
    of texels covered.
    """
    faces_t = torch.as_tensor(np.asarray(faces, dtype=np.int64), device=device)
    rows, cols, face, bary = rasterize_uv(torch.as_tensor(np.asarray(uv, dtype=np.float64), device=device), faces_t, size, chunk_texels)
    if len(rows) == 0:
        raise RuntimeError("no texel centre fell inside any triangle of the UV layout")
    corners = faces_t[face]  # [T, 3]
    weights = bary[..., None]  # [T, 3, 1]

    def interpolate(values: np.ndarray) -> Tensor:
        return (weights * torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)[corners]).sum(1)

    points, texel_normals = interpolate(vertices), interpolate(normals)
    texel_normals = texel_normals / texel_normals.norm(dim=1, keepdim=True).clamp(min=1e-12)
    image = torch.zeros((size, size, 3), dtype=torch.float32, device=device)
    filled = torch.zeros((size, size), dtype=torch.bool, device=device)
    image[rows, cols] = shade_fn(points.float(), texel_normals.float()).to(device=device, dtype=torch.float32)
    filled[rows, cols] = True
    coverage = float(filled.float().mean())
    return dilate_texture(image, filled, dilate_px).cpu().numpy(), coverage
