"""Occupancy grid (instant-ngp's density grid) in plain PyTorch: a ``G^3`` grid over the
field's box holding a decaying maximum of the density seen in each cell, and a bitfield of
the cells worth sampling. Rendering skips samples in empty cells, so the MLPs only run
where there is something to see.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import cv2
import numpy as np
import torch
from torch import Tensor

from tasks.nerf.rays import camera_to_pixels


class OccupancyGrid:
    """Bitfield over ``aabb`` at ``resolution^3``; cells are indexed x-fastest.

    ``threshold`` is an opacity per render step (instant-ngp uses 0.01): a cell is occupied
    when ``1 - exp(-sigma * step) > threshold``, i.e. ``sigma > -log(1 - threshold) / step``.
    """

    def __init__(self, aabb: Tensor, resolution: int, step: float, threshold: float, decay: float) -> None:
        if resolution < 2:
            raise ValueError(f"occupancy grid resolution must be >= 2, got {resolution}")
        self.aabb = aabb.float()
        self.resolution = resolution
        self.decay = decay
        self.sigma_threshold = float(-torch.log1p(torch.tensor(-threshold)) / step)
        n_cells = resolution**3
        # Start fully occupied: before the first update everything is worth sampling.
        self.density = torch.full((n_cells,), float("inf"), device=aabb.device)
        self.bits = torch.ones(n_cells, dtype=torch.bool, device=aabb.device)
        # Cells the masks prove empty (see carve); they never come back.
        self.carved = torch.zeros(n_cells, dtype=torch.bool, device=aabb.device)
        # Bumped whenever ``bits`` change, so a sampler holding a copy knows to refresh it.
        self.revision = 0

    @property
    def device(self) -> torch.device:
        return self.aabb.device

    @property
    def occupied_fraction(self) -> float:
        return float(self.bits.float().mean())

    def cell_index(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Flat cell of world points. points ``[N, 3]`` → index ``[N]`` int64, inside ``[N]`` bool."""
        unit = (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        inside = ((unit >= 0) & (unit <= 1)).all(-1)
        cell = (unit * self.resolution).long().clamp(0, self.resolution - 1)
        index = cell[:, 0] + self.resolution * (cell[:, 1] + self.resolution * cell[:, 2])
        return index, inside

    def query(self, points: Tensor) -> Tensor:
        """Whether world points fall in occupied cells. points ``[N, 3]`` → ``[N]`` bool."""
        index, inside = self.cell_index(points)
        return self.bits[index] & inside

    def cell_centers(self) -> Tensor:
        """World centre of every cell. → ``[G^3, 3]``."""
        cells = torch.arange(self.resolution**3, device=self.device)
        res = self.resolution
        coords = torch.stack([cells % res, (cells // res) % res, cells // (res * res)], dim=-1).float()
        return self.aabb[0] + (coords + 0.5) / res * (self.aabb[1] - self.aabb[0])

    @torch.no_grad()
    def carve(self, c2w: Tensor, intrinsics: Tensor, masks: Tensor, tolerance: float) -> None:
        """Mark cells empty that the masks show as background (a visual hull, vote-based).

        c2w ``[F, 4, 4]`` (OpenGL), intrinsics ``[F, 4]``, masks ``[F, H, W]`` bool of training
        frames. A cell counts as background in a view when its centre projects farther from
        the mask than the cell's own projected radius; it is carved when that holds in more
        than ``tolerance`` of the views that see it, so a few bad masks cannot cut the product.
        """
        centers = self.cell_centers()  # [C, 3]
        half_diagonal = float((self.aabb[1] - self.aabb[0]).norm()) / self.resolution / 2
        height, width = masks.shape[1:]
        seen = torch.zeros(centers.shape[0], device=self.device)
        outside = torch.zeros(centers.shape[0], device=self.device)
        w2c = torch.linalg.inv(c2w)
        # Distance (px) from every pixel to the nearest product pixel, every view at once in
        # threads (OpenCV lets go of the GIL), from one copy of the masks: per view, on a GPU
        # host, the copies and transforms made carving 150 views take seconds.
        background = 1 - masks.cpu().numpy().astype(np.uint8)
        with ThreadPoolExecutor() as pool:
            distances = list(pool.map(lambda view: cv2.distanceTransform(view, cv2.DIST_L2, 5), background))
        for view in range(masks.shape[0]):  # one vectorised pass over all cells per frame
            distance = torch.from_numpy(distances[view]).to(self.device)
            cam = centers @ w2c[view, :3, :3].T + w2c[view, :3, 3]
            u, v, depth = camera_to_pixels(cam, intrinsics[view])
            in_view = (depth > 1e-6) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
            pixel_distance = distance[v.long().clamp(0, height - 1), u.long().clamp(0, width - 1)]
            radius = intrinsics[view, 0] * half_diagonal / depth.clamp(min=1e-6)
            seen += in_view.float()
            outside += (in_view & (pixel_distance > radius)).float()
        # In place, as every change of the grid: a captured training step (tasks/nerf/graphed.py)
        # reads these very tensors on each replay.
        self.carved.copy_((outside > tolerance * seen) & (seen > 0))
        self.bits &= ~self.carved
        self.revision += 1

    def cell_points(self, cells: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A uniformly random world point inside each cell. cells ``[M]`` int64 → ``[M, 3]``."""
        res = self.resolution
        coords = torch.stack([cells % res, (cells // res) % res, cells // (res * res)], dim=-1).float()
        jitter = torch.rand(cells.shape[0], 3, device=self.device, generator=generator)
        unit = (coords + jitter) / res
        return self.aabb[0] + unit * (self.aabb[1] - self.aabb[0])

    @torch.no_grad()
    def update(
        self,
        density_fn: Callable[[Tensor], Tensor],
        fraction: float,
        chunk: int,
        generator: torch.Generator | None = None,
    ) -> None:
        """Refresh a random ``fraction`` of cells (all of them when ``fraction >= 1``).

        Each chosen cell takes ``max(old * decay, sigma(random point in cell))`` (the EMA of
        instant-ngp / nerfacc); bits are then ``density > min(sigma_threshold, mean density)``,
        the mean keeping the grid from emptying while the field is still faint.
        """
        candidates = (~self.carved).nonzero()[:, 0]
        if candidates.numel() == 0:
            return
        if fraction < 1.0:
            n_pick = max(1, int(candidates.numel() * fraction))
            candidates = candidates[torch.randint(0, candidates.numel(), (n_pick,), device=self.device, generator=generator)]
        cells = candidates
        sigmas = torch.cat([density_fn(self.cell_points(part, generator)).float() for part in cells.split(chunk)])
        # Cells still at +inf (never evaluated) forget that on their first visit.
        old = torch.nan_to_num(self.density[cells], posinf=0.0) * self.decay
        self.density[cells] = torch.maximum(old, sigmas)
        live = self.density[torch.isfinite(self.density) & ~self.carved]
        mean = float(live.mean()) if live.numel() else self.sigma_threshold
        torch.logical_and(self.density > min(self.sigma_threshold, mean), ~self.carved, out=self.bits)
        self.revision += 1

    def state_dict(self) -> dict[str, Tensor | int | float]:
        return {
            "resolution": self.resolution,
            "decay": self.decay,
            "sigma_threshold": self.sigma_threshold,
            "density": self.density.cpu(),
            "bits": self.bits.cpu(),
            "carved": self.carved.cpu(),
        }

    @classmethod
    def from_state(cls, aabb: Tensor, state: dict) -> "OccupancyGrid":
        grid = cls.__new__(cls)
        grid.aabb = aabb.float()
        grid.resolution = int(state["resolution"])
        grid.decay = float(state["decay"])
        grid.sigma_threshold = float(state["sigma_threshold"])
        grid.density = state["density"].to(aabb.device)
        grid.bits = state["bits"].to(aabb.device)
        grid.carved = state["carved"].to(aabb.device)
        grid.revision = 0
        return grid
