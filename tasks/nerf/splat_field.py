"""The trained surfels as a :class:`~tasks.nerf.base.RadianceField` for the mesh stage.

``render`` rasterises (tasks/nerf/surfels.py) and turns camera z into distance along each ray, as
the fusion expects; ``depth_surface`` is 2DGS's median depth, where the pixel's opacity crosses
0.5 (surfels have no volume to cross a different level inside). ``density`` and ``color`` at points
(the texture baker's queries) come from the ``neighbours`` nearest surfels: each one is a disc
whose opacity, spread across a thin normal profile, integrates to its alpha along its normal.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.nerf.surfels import Surfels, quat_to_rotation, ray_distance_scale, rasterize, surfel_colors

THICKNESS = 0.5  # a disc's normal profile: this fraction of its smaller standard deviation


def activated(params: Mapping[str, Tensor]) -> Surfels:
    """Raw trained parameters (log scales, opacity logits, split SH) → :class:`Surfels`."""
    return Surfels(
        means=params["means"],
        quats=F.normalize(params["quats"], dim=-1),
        scales=torch.exp(params["scales"][:, :2]),
        opacities=torch.sigmoid(params["opacities"]),
        sh=torch.cat([params["sh0"], params["shN"]], 1),
    )


class SplatRadianceField:
    """Surfels ``[N]`` in the box ``aabb [2, 3]``, rendered with ``engine`` (torch or gsplat)."""

    def __init__(self, surfels: Surfels, aabb: Tensor, sh_degree: int, engine: str, neighbours: int, render_rows: int) -> None:
        self.surfels = Surfels(**{k: v.detach() for k, v in vars(surfels).items()})
        self.aabb = aabb
        self.sh_degree = sh_degree
        self.engine = engine
        self.neighbours = max(1, min(neighbours, len(self.surfels.means)))
        self.render_rows = render_rows
        self._tree = None

    @property
    def device(self) -> torch.device:
        return self.surfels.means.device

    @torch.no_grad()
    def render(
        self, c2w: Tensor, intrinsics: Tensor, width: int, height: int, surface_opacity: float = 0.5,
        solid_alpha: float = 0.0,
    ) -> dict[str, Tensor]:
        """One view: ``rgb [H, W, 3]`` (premultiplied), ``alpha``, ``depth`` (expected distance) and
        ``depth_surface`` (the median: where opacity crosses 0.5, 0 where it never does), all ``[H, W]``.

        ``surface_opacity`` and ``solid_alpha`` are the volume fields' knobs: surfels are flat, and
        gsplat's kernel reports only the 0.5 crossing.
        """
        c2w = c2w.to(self.device, torch.float32)
        intrinsics = intrinsics.to(self.device, torch.float32)
        if self.engine == "gsplat":
            parts = [rasterize(self.surfels, c2w, intrinsics, width, height, self.sh_degree, engine="gsplat")]
        else:  # the dense engine holds pixels × surfels: render bands of rows
            parts = []
            for top in range(0, height, self.render_rows):
                rows = min(self.render_rows, height - top)
                band = intrinsics.clone()
                band[3] -= top
                parts.append(rasterize(self.surfels, c2w, band, width, rows, self.sh_degree, engine="torch"))
        image = {key: torch.cat([p[key] for p in parts]) for key in ("rgb", "alpha", "depth", "median")}
        scale = ray_distance_scale(intrinsics, width, height)
        return {"rgb": image["rgb"], "alpha": image["alpha"], "depth": image["depth"] * scale,
                "depth_surface": image["median"] * scale}

    def _nearest(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Indices ``[P, K]`` of each point's nearest surfel centres, and the points' offsets ``[P, K, 3]``."""
        from scipy.spatial import cKDTree

        if self._tree is None:
            self._tree = cKDTree(self.surfels.means.cpu().numpy())
        _, index = self._tree.query(points.detach().cpu().numpy(), k=self.neighbours)
        index = torch.from_numpy(np.asarray(index).reshape(len(points), -1)).to(self.device)
        return index, points.to(self.device)[:, None, :] - self.surfels.means[index]

    def _disc_weights(self, index: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
        """Each neighbour's in-plane Gaussian × opacity ``[P, K]`` and normal profile ``[P, K]`` at the offsets."""
        axes = quat_to_rotation(self.surfels.quats[index.reshape(-1)]).reshape(*index.shape, 3, 3)
        local = (offset[..., None, :] @ axes)[..., 0, :]  # [P, K, 3] along the two tangents and the normal
        scales = self.surfels.scales[index]  # [P, K, 2]
        in_plane = torch.exp(-0.5 * ((local[..., :2] / scales) ** 2).sum(-1)) * self.surfels.opacities[index]
        thickness = THICKNESS * scales.amin(-1)
        profile = torch.exp(-0.5 * (local[..., 2] / thickness) ** 2) / (thickness * math.sqrt(2 * math.pi))
        return in_plane.clamp(max=0.999), profile

    @torch.no_grad()
    def density(self, points: Tensor) -> Tensor:
        """points ``[N, 3]`` → density ``[N]``: each disc's ``-log(1 - alpha)`` spread over its normal profile."""
        if len(points) == 0:
            return points.new_zeros(0)
        alpha, profile = self._disc_weights(*self._nearest(points))
        inside = ((points >= self.aabb[0].to(points)) & (points <= self.aabb[1].to(points))).all(-1)
        return (-torch.log1p(-alpha) * profile).sum(-1).to(points) * inside

    @torch.no_grad()
    def color(self, points: Tensor, directions: Tensor) -> Tensor:
        """RGB ``[N, 3]``: the nearby discs' colours seen along ``directions``, weighted by their alpha there."""
        if len(points) == 0:
            return points.new_zeros(0, 3)
        index, offset = self._nearest(points)
        alpha, profile = self._disc_weights(index, offset)
        weight = alpha * profile * self.surfels.scales[index].amin(-1) + 1e-12  # nearest still counts when all are far
        basis_dirs = -directions.to(self.device)  # SH colour is keyed by the direction from camera to surfel
        colours = []
        for k in range(index.shape[1]):
            part = Surfels(self.surfels.means[index[:, k]], self.surfels.quats[index[:, k]], self.surfels.scales[index[:, k]],
                           self.surfels.opacities[index[:, k]], self.surfels.sh[index[:, k]])
            colours.append(surfel_colors(part, part.means + basis_dirs, self.sh_degree))
        stacked = torch.stack(colours, 1)  # [P, K, 3]
        return ((weight[..., None] * stacked).sum(1) / weight.sum(1, keepdim=True)).clamp(0, 1).to(points)
