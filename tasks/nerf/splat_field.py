"""The trained surfels as a :class:`~tasks.nerf.base.RadianceField` for the mesh stage.

``render`` rasterises (tasks/nerf/surfels.py) and turns camera z into distance along each ray, as
the fusion expects; ``depth_surface`` is 2DGS's median depth, where the pixel's opacity crosses
0.5 (surfels have no volume to cross a different level inside). ``density`` and ``color`` at points
(the texture baker's millions of queries) are read from a voxel grid the surfels are painted into
once: on the GPU a lookup is one ``grid_sample``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.nerf.surfels import Surfels, quat_to_rotation, ray_distance_scale, rasterize

SH_C0 = 0.28209479177387814  # band 0 of the colour's spherical harmonics


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

    def __init__(
        self, surfels: Surfels, aabb: Tensor, sh_degree: int, engine: str, grid_resolution: int, render_rows: int,
        dense_max_pairs: int,
    ) -> None:
        self.surfels = Surfels(**{k: v.detach() for k, v in vars(surfels).items()})
        self.aabb = aabb
        self.sh_degree = sh_degree
        self.engine = engine
        self.grid_resolution = grid_resolution
        self.render_rows = render_rows
        self.dense_max_pairs = dense_max_pairs
        self._grid: Tensor | None = None

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
        else:  # the dense engine holds pixels × surfels: bands of rows, as many as dense_max_pairs allows
            parts = []
            band_rows = max(1, min(self.render_rows, self.dense_max_pairs // max(1, width * len(self.surfels.means))))
            for top in range(0, height, band_rows):
                rows = min(band_rows, height - top)
                band = intrinsics.clone()
                band[3] -= top
                parts.append(rasterize(self.surfels, c2w, band, width, rows, self.sh_degree, engine="torch"))
        image = {key: torch.cat([p[key] for p in parts]) for key in ("rgb", "alpha", "depth", "median")}
        scale = ray_distance_scale(intrinsics, width, height)
        return {"rgb": image["rgb"], "alpha": image["alpha"], "depth": image["depth"] * scale,
                "depth_surface": image["median"] * scale}

    def _painted(self) -> Tensor:
        """``[1, 4, R, R, R]`` over the box, built once: mass-weighted colour (channels 0-2) and
        opacity mass (channel 3), laid out as ``grid_sample`` reads them (grid axes x, y, z).

        Each surfel leaves its opacity at its centre and at one standard deviation along both
        tangents (a plus sign of five points, 0.4 / 0.15 × 4 of it), spread over the eight
        nearest grid points; its colour is its view-averaged (band 0) colour.
        """
        if self._grid is None:
            r = self.grid_resolution
            s = self.surfels
            axes = quat_to_rotation(s.quats)  # [N, 3, 3]
            steps = torch.tensor([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=s.means.dtype, device=self.device)
            share = torch.tensor([0.4, 0.15, 0.15, 0.15, 0.15], device=self.device)
            offsets = (steps[None, :, :, None] * s.scales[:, None, :, None] * axes[:, None, :, :2].transpose(-1, -2)).sum(2)
            points = (s.means[:, None] + offsets).reshape(-1, 3)  # [N * 5, 3]
            mass = (s.opacities[:, None] * share).reshape(-1)
            colour = (0.5 + SH_C0 * s.sh[:, 0]).clamp(0, 1).repeat_interleave(len(share), 0)
            unit = (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0]) * (r - 1)
            base = unit.floor().long()
            frac = unit - base
            density = torch.zeros(r**3, device=self.device)
            paint = torch.zeros(r**3, 3, device=self.device)
            for corner in range(8):
                pick = torch.tensor([(corner >> k) & 1 for k in range(3)], device=self.device)
                idx = base + pick
                weight = torch.where(pick.bool(), frac, 1 - frac).prod(-1) * mass
                ok = ((idx >= 0) & (idx < r)).all(-1)
                flat = (idx[ok, 0] * r + idx[ok, 1]) * r + idx[ok, 2]
                density.index_add_(0, flat, weight[ok])
                paint.index_add_(0, flat, weight[ok, None] * colour[ok])
            self._grid = torch.cat([paint, density[:, None]], 1).T.reshape(1, 4, r, r, r).contiguous()
        return self._grid

    def _lookup(self, points: Tensor) -> Tensor:
        """Trilinear values of the painted grid at points ``[P, 3]`` → ``[P, 4]`` (0 outside the box)."""
        unit = (points.to(self.device) - self.aabb[0]) / (self.aabb[1] - self.aabb[0]) * 2 - 1  # [-1, 1], x first
        # grid_sample's last coordinate indexes the first grid axis: hand it (z, y, x).
        sampled = F.grid_sample(self._painted(), unit.flip(-1)[None, :, None, None], align_corners=True)
        return sampled[0, :, :, 0, 0].T

    @torch.no_grad()
    def density(self, points: Tensor) -> Tensor:
        """points ``[N, 3]`` → density ``[N]``: the surfels' opacity per voxel, as an optical depth of 2 per voxel."""
        voxel = float((self.aabb[1] - self.aabb[0]).max()) / (self.grid_resolution - 1)
        return (self._lookup(points)[:, 3] * 2.0 / voxel).to(points)

    @torch.no_grad()
    def color(self, points: Tensor, directions: Tensor) -> Tensor:
        """RGB ``[N, 3]``: the nearby surfels' colours (view-averaged), weighted by their opacity there."""
        values = self._lookup(points)
        return (values[:, :3] / values[:, 3:].clamp(min=1e-8)).clamp(0, 1).to(points)
