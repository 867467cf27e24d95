"""The product's surface from the field's rendered depth: TSDF fusion, carved by the masks.

Why not a density level: a trained NeRF is a soft cloud. Where a wicker wall or a printed box
face came out half transparent, every density level either leaves the wall porous or keeps the
fog around it (on the H100 turntables the best level gave F-score@1 % of 0.5). The depth at
which a ray's opacity reaches a set level (``surface_opacity``) is far steadier: it is what the
images were fitted to. A level under one half, where the ray enters the shell, moves least
with the texture (a median depth sank behind a box's dark print; bench/depth_errors.py).
Fusing those depths from many views into a truncated signed distance (Curless and Levoy 1996;
nerfstudio's ``tsdf`` export does the same for its fields) gives one clean, closed wall.

The masks say more than the depth: a pixel of background means the whole ray through it is
empty, so a voxel that enough views see on background is outside, whatever the field holds.

Space no camera sees (behind the surface from every view) is decided by what it touches
(:func:`fill_hidden`): hidden space that opens onto space seen empty is empty (the depths of a
basket), hidden space closed in by seen surfaces is solid (the inside of a box). The base: a
product filmed on a table is never seen from below; everything under the lowest surface the
views see is cut away and a thin floor closes it there (``close_base``), instead of the visual
hull's wedge under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from torch import Tensor

from tasks.isolation_geometry import load_views
from tasks.nerf.rays import camera_to_pixels


@dataclass(frozen=True)
class FusionSettings:
    """The fused surface's settings: ``mesh.fusion`` in conf/mesh/*.yaml documents each key."""

    views: int = 64
    long_side: int = 384
    truncation_voxels: float = 4.0
    behind_voxels: float | None = None
    min_alpha: float = 0.5
    surface_opacity: float = 0.3
    solid_alpha: float = 0.0
    carve_fraction: float = 0.1
    open_fraction: float = 0.05
    close_base: bool = True
    base_percentile: float = 0.1
    base_thickness_voxels: float = 2.0

    def __post_init__(self) -> None:
        checks = {
            "views": self.views >= 1, "long_side": self.long_side >= 16, "truncation_voxels": self.truncation_voxels > 0,
            "behind_voxels": self.behind_voxels is None or 0 < self.behind_voxels <= self.truncation_voxels,
            "min_alpha": 0 < self.min_alpha < 1,
            "surface_opacity": 0 < self.surface_opacity < 1, "solid_alpha": 0 <= self.solid_alpha < 1,
            "carve_fraction": 0 <= self.carve_fraction < 1,
            "open_fraction": 0 <= self.open_fraction < 1, "base_percentile": 0 <= self.base_percentile < 100,
            "base_thickness_voxels": self.base_thickness_voxels >= 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "mesh.fusion: " + ", ".join(f"{key}={getattr(self, key)!r}" for key in bad) + " out of range "
                "(views ≥ 1, long_side ≥ 16, truncation_voxels > 0, behind_voxels in (0, truncation_voxels] or null, min_alpha and surface_opacity in (0, 1), solid_alpha and fractions in [0, 1), "
                "base_percentile in [0, 100), base_thickness_voxels ≥ 0)"
            )


def _undistorted_mask(path: Path, intrinsics: np.ndarray, distortion: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Binary mask ``[H, W]`` in the pinhole camera the field renders (undistorted like the frames)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"mask {path} is missing or unreadable: rerun the segment stage")
    if mask.shape[::-1] != tuple(size):
        mask = cv2.resize(mask, tuple(size), interpolation=cv2.INTER_NEAREST)
    if np.any(distortion != 0):
        fx, fy, cx, cy = intrinsics
        k = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], np.float64)
        map_x, map_y = cv2.initUndistortRectifyMap(k, distortion, None, k, tuple(size), cv2.CV_32FC1)
        mask = cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return mask > 127


def _crop(mask: np.ndarray, long_side: int) -> tuple[int, int, float, int, int]:
    """The mask's bounding box (grown by 2 %) and the scale that fits its longer side into ``long_side``.

    Returns ``(x0, y0, scale, width, height)`` of the crop to render, in scaled pixels.
    """
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    margin = max(2, int(0.02 * max(rows[-1] - rows[0], cols[-1] - cols[0])))
    x0, x1 = max(0, cols[0] - margin), min(w, cols[-1] + 1 + margin)
    y0, y1 = max(0, rows[0] - margin), min(h, rows[-1] + 1 + margin)
    scale = min(1.0, long_side / max(x1 - x0, y1 - y0))
    return int(x0), int(y0), scale, max(1, int(round((x1 - x0) * scale))), max(1, int(round((y1 - y0) * scale)))


def _surface_depth(out: dict[str, Tensor], settings: FusionSettings) -> Tensor:
    """Distance to the surface along each ray ``[H, W]`` (nan where the field is not opaque enough).

    Where the opacity reaches ``surface_opacity`` when the backend renders it, else the mean
    termination (an opaque renderer's depth).
    """
    alpha = out["alpha"].float()
    if "depth_surface" in out:
        # 0 = the counted opacity never reached the level (all of it haze thinner than solid_alpha).
        depth = out["depth_surface"].float()
        enough = (alpha >= max(settings.min_alpha, settings.surface_opacity)) & (depth > 0)
    else:
        depth, enough = out["depth"].float() / alpha.clamp(min=1e-6), alpha >= settings.min_alpha
    return torch.where(enough, depth, torch.full_like(depth, float("nan")))


@dataclass(frozen=True)
class FusionView:
    """One view the fusion renders: the product's crop of a frame, in the field's pinhole camera.

    ``c2w [4, 4]`` (OpenGL), full-frame ``intrinsics`` (fx, fy, cx, cy) and ``size`` (w, h);
    ``crop`` = (x0, y0, scale) and ``crop_size`` (w, h) of the rendered crop, ``crop_k [4]`` its
    intrinsics, ``crop_mask [h, w]`` (bool) the mask sampled on the crop's pixel centres.
    """

    index: int
    c2w: Tensor
    intrinsics: tuple[float, float, float, float]
    size: tuple[int, int]
    crop: tuple[int, int, float]
    crop_size: tuple[int, int]
    crop_k: Tensor
    crop_mask: Tensor


def fusion_views(transforms: Path, settings: FusionSettings) -> Iterator[FusionView]:
    """The ``settings.views`` evenly picked frames of ``transforms`` whose mask shows the product."""
    cams = load_views(transforms)
    frames = cams.raw["frames"]
    picks = np.unique(np.linspace(0, len(cams) - 1, min(settings.views, len(cams))).round().astype(int))
    for index in picks:
        w, h = (int(v) for v in cams.sizes[index])
        mask = _undistorted_mask(Path(transforms).parent / frames[index]["mask_path"], cams.intrinsics[index], cams.distortion[index], (w, h))
        if not mask.any():
            continue
        x0, y0, scale, cw, ch = _crop(mask, settings.long_side)
        fx, fy, cx, cy = (float(value) for value in cams.intrinsics[index])
        crop_k = torch.tensor([fx * scale, fy * scale, (cx - x0) * scale, (cy - y0) * scale], dtype=torch.float32)
        # The mask on the crop's pixel centres, so voxels land on the same pixels in both.
        us = ((torch.arange(cw) + 0.5) / scale + x0).long().clamp(0, w - 1)
        vs = ((torch.arange(ch) + 0.5) / scale + y0).long().clamp(0, h - 1)
        crop_mask = torch.from_numpy(mask)[vs[:, None], us[None, :]]
        c2w = torch.tensor(cams.c2w[index], dtype=torch.float32)
        yield FusionView(int(index), c2w, (fx, fy, cx, cy), (w, h), (x0, y0, scale), (cw, ch), crop_k, crop_mask)


def fuse_depth(
    field: Any, box: np.ndarray, resolution: int, transforms: Path, settings: FusionSettings, device: str = "cpu"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Truncated signed distance of the product on a ``resolution``³ grid over ``box`` ``[2, 3]``.

    ``field`` is a :class:`tasks.nerf.base.RadianceField`; ``transforms`` the masks'
    ``transforms.json`` (cameras + ``mask_path``). Returns the grid ``[R, R, R]`` float32
    (indexed x, y, z; world units, negative inside, clipped to ± the truncation) and a record
    (views used, truncation, base height).
    """
    dev = torch.device(device)
    axes = [torch.linspace(float(box[0, k]), float(box[1, k]), resolution, device=dev) for k in range(3)]
    voxel = float(np.max((box[1] - box[0]) / max(resolution - 1, 1)))
    trunc = settings.truncation_voxels * voxel
    # A view writes free space up to trunc in front of its surface but solid only this far behind
    # it: a wall thinner than two truncations (a basket's) is seen from both sides, and a full
    # band behind each side would cancel the other side's surface.
    behind = (settings.behind_voxels if settings.behind_voxels is not None else settings.truncation_voxels) * voxel
    grid = _Accumulator(resolution**3, dev)
    heights: list[Tensor] = []
    # One x-slab of voxel centres at a time keeps memory at a few hundred MB for 384³ grids.
    slab = max(1, (1 << 22) // (resolution * resolution))
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)
    used = 0
    for view in fusion_views(transforms, settings):
        used += 1
        cw, ch = view.crop_size
        with torch.no_grad():
            out = field.render(view.c2w, view.crop_k, cw, ch, surface_opacity=settings.surface_opacity,
                               solid_alpha=settings.solid_alpha)
        crop_mask = view.crop_mask.to(dev)
        depth = _surface_depth(out, settings).to(dev)
        depth = torch.where(crop_mask, depth, torch.full_like(depth, float("nan")))
        heights.append(_surface_heights(depth, view.crop_k.to(dev), view.c2w.to(dev)))
        projected = _View(view, torch.linalg.inv(view.c2w).to(dev), torch.tensor(view.intrinsics, device=dev), crop_mask, depth)
        for start in range(0, resolution, slab):
            xs = axes[0][start : start + slab]
            pts = torch.cat([xs.repeat_interleave(len(yz))[:, None], yz.repeat(len(xs), 1)], 1)
            grid.add(slice(start * len(yz), start * len(yz) + len(pts)), projected, pts, trunc, behind)
    if used == 0:
        raise ValueError(f"no mask of {transforms} shows the product: rerun the segment stage")
    tsdf, observed = grid.result(trunc, settings.carve_fraction)
    tsdf, observed = tsdf.reshape((resolution,) * 3), observed.reshape((resolution,) * 3)
    record: dict[str, Any] = {"views": used, "truncation": trunc, "behind": behind, "voxel": voxel,
                              "unobserved_fraction": float((~observed).float().mean())}
    seen_z = torch.cat(heights)
    if settings.close_base and len(seen_z):
        base = float(torch.quantile(seen_z, settings.base_percentile / 100.0))
        below = axes[2] < base
        floor = (axes[2] >= base) & (axes[2] < base + settings.base_thickness_voxels * voxel)
        tsdf[:, :, below], observed[:, :, below] = trunc, True
        # Hidden voxels just above the base become a floor: it closes the product where it stood
        # and keeps the hidden space above it from counting as open to the outside below.
        hidden_floor = ~observed[:, :, floor]
        tsdf[:, :, floor] = torch.where(hidden_floor, torch.full_like(tsdf[:, :, floor], -trunc), tsdf[:, :, floor])
        observed[:, :, floor] = True
        record["base_z"] = base
    hidden = fill_hidden(observed.cpu().numpy(), (tsdf > 0).cpu().numpy(), settings.open_fraction)
    tsdf = torch.where(observed, tsdf, torch.from_numpy(np.where(hidden, -trunc, trunc).astype(np.float32)).to(dev))
    record["hidden_solid_fraction"] = float(hidden.mean())
    return tsdf.cpu().numpy().astype(np.float32), record


@dataclass
class _View:
    """One rendered view on the fusion's device: its :class:`FusionView` (size, crop), world→camera
    ``[4, 4]``, full-frame intrinsics ``[4]``, and the crop's mask and surface depth ``[h, w]`` (nan = none)."""

    source: FusionView
    w2c: Tensor
    intrinsics: Tensor
    mask: Tensor
    depth: Tensor


class _Accumulator:
    """Running sums over the flattened grid: signed distances from depth, and mask votes."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.sdf_sum = torch.zeros(n, device=device)
        self.weight = torch.zeros(n, device=device)
        self.carve_votes = torch.zeros(n, device=device)
        self.in_view = torch.zeros(n, device=device)

    def add(self, rows: slice, view: _View, points: Tensor, trunc: float, behind: float) -> None:
        """Project ``points [M, 3]`` (the voxels ``rows``) into ``view`` and count what it says:
        signed distances from ``trunc`` in front of its surface to ``behind`` behind it."""
        cam = points @ view.w2c[:3, :3].T + view.w2c[:3, 3]
        u_full, v_full, z = camera_to_pixels(cam, view.intrinsics)
        (w, h), (x0, y0, scale) = view.source.size, view.source.crop
        in_image = (z > 1e-6) & (u_full >= 0) & (u_full < w) & (v_full >= 0) & (v_full < h)
        ch, cw = view.mask.shape
        u = torch.floor((u_full - x0) * scale).long()
        v = torch.floor((v_full - y0) * scale).long()
        in_crop = in_image & (u >= 0) & (u < cw) & (v >= 0) & (v < ch)
        uc, vc = u.clamp(0, cw - 1), v.clamp(0, ch - 1)
        on_product = view.mask[vc, uc] & in_crop
        # Depth is distance along the ray: compare it with the voxel's distance from the camera.
        observed = view.depth[vc, uc] - cam.norm(dim=-1)
        has_depth = on_product & torch.isfinite(observed) & (observed > -behind)
        self.sdf_sum[rows] += torch.where(has_depth, observed.clamp(max=trunc), torch.zeros_like(z))
        self.weight[rows] += has_depth.float()
        # In the image but off the mask (the crop holds all of the mask): the ray is empty there.
        self.carve_votes[rows] += (in_image & ~on_product).float()
        self.in_view[rows] += in_image.float()

    def result(self, trunc: float, carve_fraction: float) -> tuple[Tensor, Tensor]:
        """The fused signed distance ``[N]`` and which voxels were observed ``[N]`` (bool).

        The masks' votes count only where more than ``carve_fraction`` of the views that see a
        voxel put it on background: one mask a few pixels short (a shadow at the base, a soft
        edge) must not carve into the product, as the training's occupancy carving does.
        """
        carved = self.carve_votes > carve_fraction * self.in_view
        votes = torch.where(carved, self.carve_votes, torch.zeros_like(self.carve_votes))
        weight = self.weight + votes
        tsdf = (self.sdf_sum + trunc * votes) / weight.clamp(min=1)
        return tsdf, weight > 0


def fill_hidden(observed: np.ndarray, free: np.ndarray, open_fraction: float) -> np.ndarray:
    """Which never-observed voxels are solid. ``[X, Y, Z]`` bool grids → ``[X, Y, Z]`` bool.

    Each connected piece of hidden space is judged by its border: where more than
    ``open_fraction`` of the faces it shares with seen voxels face space seen empty (or the grid's
    edge), it is open, like the depths of a basket the cameras look into but not down to, and
    empty; otherwise it is closed in by seen surfaces, like the inside of a box, and solid. A
    fraction rather than any contact: a mask a pixel short at an edge marks a few voxels inside
    a box as seen empty, and those must not hollow the box out.
    """
    from scipy import ndimage

    hidden = ~observed
    labels, count = ndimage.label(hidden)
    if count == 0:
        return hidden
    open_faces = np.zeros(count + 1)
    all_faces = np.zeros(count + 1)
    padded_free = np.pad(free & observed, 1, constant_values=True)  # beyond the grid: empty
    padded_seen = np.pad(observed, 1, constant_values=True)
    for axis in range(3):
        for step in (-1, 1):
            neighbour = [slice(1, -1)] * 3
            neighbour[axis] = slice(1 + step, labels.shape[axis] + 1 + step)
            neighbour = tuple(neighbour)
            border = hidden & padded_seen[neighbour]  # a hidden voxel whose neighbour was seen
            open_faces += np.bincount(labels[border & padded_free[neighbour]], minlength=count + 1)
            all_faces += np.bincount(labels[border], minlength=count + 1)
    is_open = open_faces > open_fraction * np.maximum(all_faces, 1)
    is_open[0] = False
    return hidden & ~is_open[labels]


def _surface_heights(depth: Tensor, k: Tensor, c2w: Tensor, max_points: int = 20000) -> Tensor:
    """World heights (z) of up to ``max_points`` surface points one view sees, evenly strided.

    depth ``[H, W]`` (distance along the ray, nan = none), crop intrinsics ``[4]``, c2w ``[4, 4]`` → ``[M]``.
    """
    v, u = torch.nonzero(torch.isfinite(depth), as_tuple=True)
    stride = max(1, len(v) // max_points)
    v, u = v[::stride], u[::stride]
    dirs = torch.stack([(u + 0.5 - k[2]) / k[0], -(v + 0.5 - k[3]) / k[1], -torch.ones_like(k[0]).expand(len(u))], -1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    world = c2w[:3, 3] + (dirs @ c2w[:3, :3].T) * depth[v, u][:, None]
    return world[:, 2]
