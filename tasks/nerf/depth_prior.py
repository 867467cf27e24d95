"""A depth prior from the camera solve's sparse points: where the surface is along some rays.

COLMAP triangulates thousands of feature points on the product and records which frames saw
each one (``point_views.npz``, written by the colmap stage). A frame that saw a point sees
nothing in front of it: along the ray from that camera to the point, opacity must stay near
0 up to the point and reach about 1 just past it. Colour alone leaves this loose where the
product's texture is dark or repetitive (the inside of a basket, a weave, a box's printed
letters): the field then puts a soft shell around the surface or fog in a cavity, and the
mesh stage's depth moves with it. This is the line-of-sight form of DS-NeRF's prior (Deng et
al. 2022; Rematas et al. 2022): cheap, since the rays are a small extra share of a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.nerf.dataset import Capture
from tasks.nerf.packed import PackedSamples
from tasks.nerf.rays import camera_to_pixels


@dataclass(frozen=True)
class SparseDepth:
    """Observations of sparse points by training frames.

    origins ``[M, 3]`` camera centres, directions ``[M, 3]`` unit rays towards the points,
    depth ``[M]`` distance to the point along the ray (normalised world units).
    """

    origins: Tensor
    directions: Tensor
    depth: Tensor

    def __len__(self) -> int:
        return int(self.depth.shape[0])

    def pick(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` random observations → origins ``[n, 3]``, directions ``[n, 3]``, depth ``[n]``."""
        rows = torch.randint(len(self), (n,), device=self.depth.device, generator=generator)
        return self.origins[rows], self.directions[rows], self.depth[rows]


def read_point_views(transforms: Path) -> dict[str, np.ndarray] | None:
    """The sparse points file ``transforms.json`` names (``point_views.npz``: ``xyz``, ``error``,
    ``view_point``, ``view_frame``, ``frame_names``); None when it names none (cameras made
    elsewhere), an error naming the fix when the named file is missing."""
    meta = json.loads(Path(transforms).read_text()).get("korokoro", {})
    if "point_views" not in meta:
        return None
    path = Path(transforms).parent / meta["point_views"]
    if not path.is_file():
        raise FileNotFoundError(f"{transforms} names sparse points {path}, which are missing: rerun the colmap stage")
    with np.load(path) as data:
        return dict(data)


def reliable_points(data: dict[str, np.ndarray], max_error_px: float, min_views: int) -> np.ndarray:
    """Per sparse point ``[P]`` bool: seen by at least ``min_views`` frames, with a mean
    reprojection error of at most ``max_error_px``."""
    views = np.bincount(data["view_point"].astype(np.int64), minlength=len(data["xyz"]))
    return (data["error"] <= max_error_px) & (views >= min_views)


def load_sparse_depth(transforms: Path, capture: Capture, frame_ids: list[int], max_error_px: float, min_views: int) -> SparseDepth | None:
    """The observations of ``transforms``' sparse points by the capture's frames ``frame_ids``.

    Kept: points seen by at least ``min_views`` frames with a mean reprojection error of at
    most ``max_error_px``, observed where the frame's mask shows the product (a matched
    background feature says nothing about the product). ``None`` when the transforms name no
    ``point_views`` file (cameras made elsewhere) or nothing is left.
    """
    data = read_point_views(transforms)
    if data is None:
        return None
    by_name = {Path(name).name: i for i, name in enumerate(capture.names)}
    frame_of = np.array([by_name.get(str(name), -1) for name in data["frame_names"]], np.int64)
    view_frame = frame_of[data["view_frame"]] if len(frame_of) else np.zeros(0, np.int64)
    point = data["view_point"].astype(np.int64)
    keep = np.isin(view_frame, np.asarray(frame_ids)) & reliable_points(data, max_error_px, min_views)[point]
    if not keep.any():
        return None
    device = capture.c2w.device
    frames = torch.from_numpy(view_frame[keep]).to(device)
    xyz = torch.from_numpy(data["xyz"][point[keep]]).to(device, torch.float32)
    c2w = capture.c2w[frames]
    origins = c2w[:, :3, 3]
    # Where the point lands in its frame: only product pixels count.
    cam = ((xyz - origins)[:, None, :] @ c2w[:, :3, :3])[:, 0]  # camera axes (OpenGL: looks along -z)
    u, v, z = camera_to_pixels(cam, capture.intrinsics[frames])
    u, v = u.long(), v.long()
    inside = (z > 0) & (u >= 0) & (u < capture.width) & (v >= 0) & (v < capture.height)
    on_product = inside.clone()
    on_product[inside] = capture.masks[frames[inside], v[inside], u[inside]]
    if not bool(on_product.any()):
        return None
    offset = xyz[on_product] - origins[on_product]
    depth = offset.norm(dim=-1)
    return SparseDepth(origins[on_product], offset / depth[:, None], depth)


def line_of_sight_loss(
    weights: Tensor, samples: PackedSamples, depth: Tensor, margin: float, rays: slice = slice(None)
) -> Tensor:
    """Mean over rays of the opacity in front of ``depth - margin`` plus what is missing at ``depth + margin``.

    weights ``[K]`` of packed ``samples`` of R rays, target ``depth [R]``, ``margin`` in world
    units → a 0-d loss over the rays ``rays`` picks (all by default; a training batch's prior
    rays ride behind its colour rays, and no sample needs selecting out). Zero when each ray's
    opacity rises from 0 to 1 inside the ``2 margin`` window around its point.
    """
    ray_ids = samples.ray_indices
    target = depth[ray_ids]
    zeros = weights.new_zeros(samples.n_rays)
    in_front = zeros.index_add(0, ray_ids, torch.where(samples.t_mid < target - margin, weights, torch.zeros_like(weights)))
    reached = zeros.index_add(0, ray_ids, torch.where(samples.t_mid < target + margin, weights, torch.zeros_like(weights)))
    return (in_front + (1.0 - reached).clamp(min=0))[rays].mean()
