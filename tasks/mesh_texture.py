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
from PIL import Image


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded 0..1 → linear 0..1 (IEC 61966-2-1), any shape."""
    rgb = np.clip(rgb, 0.0, 1.0)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """Linear 0..1 → sRGB-encoded 0..1, any shape."""
    rgb = np.clip(rgb, 0.0, 1.0)
    return np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * rgb ** (1 / 2.4) - 0.055)


def view_directions(normals: np.ndarray, views: int, cone_deg: float) -> np.ndarray:
    """Directions looking at the surface: ``-normal`` plus a ring tilted by ``cone_deg``.

    normals ``[N, 3]`` unit → ``[N, K, 3]`` unit, K = views.
    """
    inward = -normals
    if views <= 1:
        return inward[:, None, :]
    # Any tangent frame works: pick the axis least aligned with the normal to cross with.
    helper = np.eye(3)[np.argmin(np.abs(normals), axis=1)]
    tangent = np.cross(normals, helper)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    bitangent = np.cross(normals, tangent)
    phi = 2 * math.pi * np.arange(views - 1) / (views - 1)
    tilt = math.radians(cone_deg)
    ring = (
        math.cos(tilt) * inward[:, None, :]
        + math.sin(tilt) * (np.cos(phi)[None, :, None] * tangent[:, None, :] + np.sin(phi)[None, :, None] * bitangent[:, None, :])
    )
    return np.concatenate([inward[:, None, :], ring], axis=1)


def shade(
    field,
    points: np.ndarray,
    normals: np.ndarray,
    views: int,
    cone_deg: float,
    ray_samples: int,
    ray_half_length: float,
    chunk_points: int,
    device: str,
    shared_ray: bool = False,
) -> np.ndarray:
    """Surface colour in the field's colour space. points, normals ``[N, 3]`` → ``[N, 3]``.

    For each of ``views`` directions a short ray crosses the surface (from ``ray_half_length``
    outside to as far inside) and its colours are alpha-composited, normalised by the total
    weight: the iso-surface of a NeRF is not exactly where its colour lives, and the short
    ray finds it. With ``ray_samples = 1`` the surface point itself is queried. Views are averaged.

    ``shared_ray``: one ray along the inverted normal finds where the colour lives (its
    density-weighted mean depth), and every view's colour is read at that one point: S density
    + K colour queries per point instead of K × S of each (5 views × 8 samples: 13 instead of 80).
    """
    if shared_ray:
        return _shade_shared_ray(field, points, normals, views, cone_deg, ray_samples, ray_half_length, chunk_points, device)
    dirs = view_directions(normals, views, cone_deg)  # [N, K, 3]
    offsets = np.linspace(-ray_half_length, ray_half_length, ray_samples) if ray_samples > 1 else np.zeros(1)
    delta = 2 * ray_half_length / max(ray_samples, 1)
    per_point = dirs.shape[1] * len(offsets)
    step = max(1, chunk_points // per_point)
    out = np.empty((len(points), 3), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(points), step):
            p = points[start : start + step, None, None, :]
            d = dirs[start : start + step, :, None, :]
            samples = p + d * offsets[None, None, :, None]  # [n, K, S, 3]
            n, k, s = samples.shape[:3]
            flat_pts = torch.from_numpy(samples.reshape(-1, 3).astype(np.float32)).to(device)
            flat_dirs = torch.from_numpy(np.broadcast_to(d, samples.shape).reshape(-1, 3).astype(np.float32)).to(device)
            rgb = field.color(flat_pts, flat_dirs).float().reshape(n, k, s, 3)
            if s > 1:
                sigma = field.density(flat_pts).float().reshape(n, k, s)
                alpha = 1.0 - torch.exp(-sigma.clamp(min=0) * delta)
                transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha[..., :-1]], -1), -1)
                weight = alpha * transmittance
                total = weight.sum(-1, keepdim=True)
                centre = rgb[:, :, s // 2]  # no density on the ray (rare): the surface point's colour
                composited = (weight[..., None] * rgb).sum(2) / total.clamp(min=1e-6)
                rgb_view = torch.where(total > 1e-4, composited, centre)
            else:
                rgb_view = rgb[:, :, 0]
            out[start : start + n] = rgb_view.mean(1).clamp(0, 1).cpu().numpy()
    return out


def _shade_shared_ray(
    field, points: np.ndarray, normals: np.ndarray, views: int, cone_deg: float, ray_samples: int,
    ray_half_length: float, chunk_points: int, device: str,
) -> np.ndarray:
    """:func:`shade` with one depth-finding ray per point along ``-normal`` (see its docstring)."""
    k = max(views, 1)
    s = max(ray_samples, 1)
    step = max(1, chunk_points // max(k, s))
    offsets = torch.linspace(-ray_half_length, ray_half_length, s, device=device) if s > 1 else torch.zeros(1, device=device)
    delta = 2 * ray_half_length / s
    out = np.empty((len(points), 3), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(points), step):
            p = torch.from_numpy(np.ascontiguousarray(points[start : start + step], dtype=np.float32)).to(device)
            nrm = normals[start : start + step]
            inward = -torch.from_numpy(np.ascontiguousarray(nrm, dtype=np.float32)).to(device)
            if s > 1:
                samples = p[:, None, :] + inward[:, None, :] * offsets[None, :, None]  # [n, S, 3]
                sigma = field.density(samples.reshape(-1, 3)).float().reshape(-1, s).to(device)
                alpha = 1.0 - torch.exp(-sigma.clamp(min=0) * delta)
                transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], -1), -1)
                weight = alpha * transmittance
                total = weight.sum(-1)
                depth = (weight * offsets[None, :]).sum(-1) / total.clamp(min=1e-6)
                depth = torch.where(total > 1e-4, depth, torch.zeros_like(depth))  # no density: the point itself
                p = p + inward * depth[:, None]
            dirs = torch.from_numpy(view_directions(nrm, k, cone_deg).astype(np.float32)).to(device)  # [n, K, 3]
            n = len(p)
            flat_pts = p[:, None, :].expand(n, dirs.shape[1], 3).reshape(-1, 3)
            rgb = field.color(flat_pts, dirs.reshape(-1, 3)).float().reshape(n, dirs.shape[1], 3)
            out[start : start + n] = rgb.mean(1).clamp(0, 1).cpu().numpy()
    return out


def rasterize_uv(
    uv: np.ndarray, faces: np.ndarray, size: int, chunk_texels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Texels whose centre lies inside a triangle of the UV layout.

    uv ``[V, 2]`` in 0..1 (v up), faces ``[F, 3]`` → ``rows [T]``, ``cols [T]`` (image indices,
    row 0 at the top), ``face [T]``, ``bary [T, 3]``. Vectorised over each triangle's texel
    bounding box, ``chunk_texels`` candidate texels at a time.
    """
    pix = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], 1)  # texel centres sit at k + 0.5
    tri = pix[faces]  # [F, 3, 2]
    lo = np.clip(np.ceil(tri.min(1) - 0.5), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(tri.max(1) - 0.5), 0, size - 1).astype(np.int64)
    extent = np.maximum(hi - lo + 1, 0)
    count = extent[:, 0] * extent[:, 1]
    ends = np.cumsum(count)
    rows_out, cols_out, face_out, bary_out = [], [], [], []
    first = 0
    while first < len(faces):
        # Faces [first, last) whose candidates fit in one chunk (at least one face).
        base = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + chunk_texels, side="right")))
        fid = np.repeat(np.arange(first, last), count[first:last])
        local = np.arange(len(fid)) - np.repeat(np.cumsum(count[first:last]) - count[first:last], count[first:last])
        col = lo[fid, 0] + local % np.maximum(extent[fid, 0], 1)
        row = lo[fid, 1] + local // np.maximum(extent[fid, 0], 1)
        p = np.stack([col + 0.5, row + 0.5], 1)
        a, b, c = tri[fid, 0], tri[fid, 1], tri[fid, 2]
        v0, v1, v2 = b - a, c - a, p - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        ok_den = np.abs(den) > 1e-12
        den = np.where(ok_den, den, 1.0)
        w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        w0 = 1.0 - w1 - w2
        inside = ok_den & (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
        rows_out.append(row[inside])
        cols_out.append(col[inside])
        face_out.append(fid[inside])
        bary_out.append(np.stack([w0, w1, w2], 1)[inside])
        first = last
    return np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(face_out), np.concatenate(bary_out)


def dilate_texture(image: np.ndarray, filled: np.ndarray, pixels: int) -> np.ndarray:
    """Grow charts outwards by ``pixels`` (mean of filled neighbours), then fill the rest with the mean.

    image ``[H, W, 3]`` float, filled ``[H, W]`` bool → ``[H, W, 3]``. Stops bilinear filtering and
    mipmaps from pulling background colour across chart seams.
    """
    image = np.where(filled[..., None], image, 0.0).astype(np.float32)
    weight = filled.astype(np.float32)
    for _ in range(pixels):
        total = cv2.boxFilter(image * weight[..., None], -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        count = cv2.boxFilter(weight, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        grow = (weight == 0) & (count > 0)
        if not grow.any():
            break
        image[grow] = total[grow] / count[grow][:, None]
        weight = np.where(grow, 1.0, weight).astype(np.float32)
    if weight.any():
        image[weight == 0] = image[weight > 0].mean(0)
    return image


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
) -> tuple[np.ndarray, float]:
    """Texture image of the surface colour ``shade_fn(points [N,3], normals [N,3]) → [N,3]``.

    Geometry ``[V, 3]`` (+ unit normals) and ``uv [V, 2]`` share the ``faces [F, 3]`` indexing.
    Returns ``[size, size, 3]`` in shade_fn's colour space and the fraction of texels covered.
    """
    rows, cols, face, bary = rasterize_uv(uv, faces, size, chunk_texels)
    if len(rows) == 0:
        raise RuntimeError("no texel centre fell inside any triangle of the UV layout")
    corners = faces[face]  # [T, 3]
    points = np.einsum("tk,tkc->tc", bary, vertices[corners])
    texel_normals = np.einsum("tk,tkc->tc", bary, normals[corners])
    texel_normals /= np.maximum(np.linalg.norm(texel_normals, axis=1, keepdims=True), 1e-12)
    image = np.zeros((size, size, 3), dtype=np.float32)
    filled = np.zeros((size, size), dtype=bool)
    image[rows, cols] = shade_fn(points, texel_normals)
    filled[rows, cols] = True
    coverage = float(filled.mean())
    return dilate_texture(image, filled, dilate_px), coverage
