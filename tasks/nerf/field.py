"""The ngp field (hash grid + two small MLPs), the ray sampler, and rendering of ray batches.

``make_sampler`` is the seam for a faster sampler: today it always returns the plain-torch
:class:`GridSampler` (dense ``[R, S]`` slots + occupancy culling); a CUDA build could return
one wrapping nerfacc's ``OccGridEstimator`` instead, as long as it hands back the same
:class:`RaySamples`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tasks.nerf.hashgrid import HashGrid, spherical_harmonics, trunc_exp
from tasks.nerf.occupancy import OccupancyGrid
from tasks.nerf.rays import composite, intersect_aabb, pixel_rays, stratified_samples


class NgpModel(nn.Module):
    """Density and colour of points in the box ``aabb [2, 3]`` (world coordinates)."""

    def __init__(
        self,
        aabb: Tensor,
        n_levels: int,
        features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        finest_resolution: int,
        hidden_dim: int,
        geo_feat_dim: int,
        color_hidden_dim: int,
    ) -> None:
        super().__init__()
        self.register_buffer("aabb", aabb.float().clone())
        self.encoding = HashGrid(n_levels, features_per_level, log2_hashmap_size, base_resolution, finest_resolution)
        self.density_mlp = nn.Sequential(
            nn.Linear(self.encoding.output_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1 + geo_feat_dim)
        )
        self.color_mlp = nn.Sequential(
            nn.Linear(geo_feat_dim + 16, color_hidden_dim),
            nn.ReLU(),
            nn.Linear(color_hidden_dim, color_hidden_dim),
            nn.ReLU(),
            nn.Linear(color_hidden_dim, 3),
        )

    def geometry(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points ``[N, 3]`` → density ``[N]`` (float32, >= 0), geometry feature ``[N, geo_feat_dim]``."""
        unit = (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        out = self.density_mlp(self.encoding(unit))
        # exp of an fp16 logit overflows past ~11: activate in float32.
        return trunc_exp(out[:, 0].float()), out[:, 1:]

    def density(self, points: Tensor) -> Tensor:
        """points ``[N, 3]`` → density ``[N]``; zero outside the box."""
        inside = ((points >= self.aabb[0]) & (points <= self.aabb[1])).all(-1)
        return self.geometry(points)[0] * inside

    def forward(self, points: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """points, unit directions ``[N, 3]`` → density ``[N]``, rgb ``[N, 3]`` in 0..1 (float32)."""
        sigma, geo = self.geometry(points)
        sh = spherical_harmonics(directions).to(geo.dtype)
        rgb = torch.sigmoid(self.color_mlp(torch.cat([geo, sh], dim=-1)).float())
        return sigma, rgb


@dataclass
class RaySamples:
    """Samples of R rays in S slots: t_mid ``[R, S]``, keep ``[R, S]`` (inside the box and occupied), step size."""

    t_mid: Tensor
    keep: Tensor
    step: float


class GridSampler:
    """Fixed-step stratified samples through the box, culled by an occupancy grid (plain torch)."""

    def __init__(self, aabb: Tensor, step: float, occupancy: OccupancyGrid) -> None:
        self.aabb = aabb
        self.step = step
        self.occupancy = occupancy
        # Enough slots to cross the box along its diagonal.
        self.n_slots = int(math.ceil(float((aabb[1] - aabb[0]).norm()) / step)) + 1

    def sample(self, origins: Tensor, directions: Tensor, jitter: bool, generator: torch.Generator | None = None) -> RaySamples:
        t_near, t_far, hit = intersect_aabb(origins, directions, self.aabb)
        t_mid, valid = stratified_samples(t_near, t_far, self.step, self.n_slots, jitter, generator)
        valid &= hit[:, None]
        points = origins[:, None] + t_mid[..., None] * directions[:, None]  # [R, S, 3]
        occupied = self.occupancy.query(points.reshape(-1, 3)).reshape(valid.shape)
        return RaySamples(t_mid=t_mid, keep=valid & occupied, step=self.step)


def make_sampler(aabb: Tensor, step: float, occupancy: OccupancyGrid) -> GridSampler:
    """The sampler for this device. Seam for nerfacc's OccGridEstimator on CUDA (not used yet)."""
    return GridSampler(aabb, step, occupancy)


def render_rays(
    model: NgpModel,
    sampler: GridSampler,
    origins: Tensor,
    directions: Tensor,
    jitter: bool,
    generator: torch.Generator | None = None,
    median: bool = False,
) -> dict[str, Tensor]:
    """Render a batch of rays ``[R, 3], [R, 3]`` → ``rgb [R, 3]`` (premultiplied), ``alpha [R]``,
    ``depth [R]`` (and ``depth_median [R]`` with ``median``), plus ``samples`` (how many samples
    reached the MLPs, a 0-d tensor).

    The MLPs run only on kept samples; the rest keep zero density.
    """
    samples = sampler.sample(origins, directions, jitter, generator)
    n_rays, n_slots = samples.t_mid.shape
    flat = samples.keep.reshape(-1).nonzero()[:, 0]  # [K]
    ray_of_sample = flat // n_slots
    points = origins[ray_of_sample] + samples.t_mid.reshape(-1)[flat, None] * directions[ray_of_sample]
    sigma, rgb = model(points, directions[ray_of_sample])
    sigmas = torch.zeros(n_rays * n_slots, device=origins.device, dtype=sigma.dtype).index_put((flat,), sigma)
    colors = torch.zeros(n_rays * n_slots, 3, device=origins.device, dtype=rgb.dtype).index_put((flat,), rgb)
    out = composite(sigmas.reshape(n_rays, n_slots), colors.reshape(n_rays, n_slots, 3), samples.t_mid, samples.step, median)
    out["samples"] = torch.tensor(flat.shape[0])
    return out


class NgpRadianceField:
    """A trained ngp field behind the :class:`tasks.nerf.base.RadianceField` interface (inference only)."""

    def __init__(self, model: NgpModel, sampler: GridSampler, chunk: int) -> None:
        self.model = model.eval()
        self.sampler = sampler
        self.chunk = chunk
        self.aabb = model.aabb

    @property
    def device(self) -> torch.device:
        return self.aabb.device

    @torch.no_grad()
    def density(self, points: Tensor) -> Tensor:
        """points ``[N, 3]`` → density ``[N]`` (0 outside the box and in empty cells), in chunks."""
        points = points.to(self.device, torch.float32)
        # Cells the occupancy grid dropped (carved by the masks, or faded) are never rendered,
        # so their density was never trained: report them empty, as rendering sees them.
        occupancy = self.sampler.occupancy
        parts = [self.model.density(part) * occupancy.query(part) for part in points.split(self.chunk * 8)]
        return torch.cat(parts) if parts else points.new_zeros(0)

    @torch.no_grad()
    def color(self, points: Tensor, directions: Tensor) -> Tensor:
        """points, unit directions ``[N, 3]`` → rgb ``[N, 3]`` in 0..1."""
        points = points.to(self.device, torch.float32)
        directions = directions.to(self.device, torch.float32)
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        parts = [self.model(p, d)[1] for p, d in zip(points.split(self.chunk * 8), directions.split(self.chunk * 8))]
        return torch.cat(parts) if parts else points.new_zeros(0, 3)

    @torch.no_grad()
    def render(self, c2w: Tensor, intrinsics: Tensor, width: int, height: int) -> dict[str, Tensor]:
        """One view: c2w ``[4, 4]`` (OpenGL), intrinsics ``[4]`` fx, fy, cx, cy →
        ``rgb [H, W, 3]`` (premultiplied), ``alpha [H, W]``, ``depth [H, W]`` (expected distance) and
        ``depth_median [H, W]`` (where opacity crosses one half; 0 where it never does); rays go in chunks."""
        c2w = c2w.to(self.device, torch.float32)
        intrinsics = intrinsics.to(self.device, torch.float32)
        v, u = torch.meshgrid(torch.arange(height, device=self.device), torch.arange(width, device=self.device), indexing="ij")
        pixels = torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)
        keys = ("rgb", "alpha", "depth", "depth_median")
        parts: dict[str, list[Tensor]] = {key: [] for key in keys}
        for part in pixels.split(self.chunk):
            origins, directions = pixel_rays(c2w, intrinsics, part)
            out = render_rays(self.model, self.sampler, origins, directions, jitter=False, median=True)
            for key in keys:
                parts[key].append(out[key].float())
        shapes = {"rgb": (height, width, 3)}
        return {key: torch.cat(parts[key]).reshape(shapes.get(key, (height, width))) for key in keys}
