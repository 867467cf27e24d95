"""The ngp field (hash grid + two small MLPs), the ray sampler, and rendering of ray batches.

Samplers march rays through the occupancy grid and hand back packed samples
(:class:`tasks.nerf.packed.PackedSamples`): :class:`GridSampler` in plain torch (CPU and CUDA),
:class:`NerfaccSampler` with nerfacc's CUDA traversal. ``make_sampler`` picks one.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn

from tasks.nerf.hashgrid import HashGrid, spherical_harmonics, trunc_exp
from tasks.nerf.occupancy import OccupancyGrid
from tasks.nerf.packed import PackedSamples, composite_packed, padding_ray_indices, visible_samples
from tasks.nerf.rays import intersect_aabb, pixel_rays, stratified_samples


class NgpModel(nn.Module):
    """Density and colour of points in the box ``aabb [2, 3]`` (world coordinates).

    ``geometry_levels`` (0 = all) caps the hash levels the density reads at the coarsest ones;
    the finer levels then feed the colour MLP only. Why: with one shared encoding a field is
    free to explain fine texture (a basket's weave, a box's print) by moving its
    surface by a few millimetres; capped, texture finer than the geometry's levels can only
    be colour.
    """

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
        geometry_levels: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= geometry_levels <= n_levels:
            raise ValueError(f"nerf.geometry_levels={geometry_levels} must be 0 (all) or 1..n_levels={n_levels}")
        self.register_buffer("aabb", aabb.float().clone())
        self.encoding = HashGrid(n_levels, features_per_level, log2_hashmap_size, base_resolution, finest_resolution)
        self.geometry_levels = geometry_levels or n_levels
        geometry_dim = self.geometry_levels * features_per_level
        detail_dim = self.encoding.output_dim - geometry_dim  # the finer levels' features, colour only
        self.density_mlp = nn.Sequential(nn.Linear(geometry_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1 + geo_feat_dim))
        self.color_mlp = nn.Sequential(
            nn.Linear(geo_feat_dim + detail_dim + 16, color_hidden_dim),
            nn.ReLU(),
            nn.Linear(color_hidden_dim, color_hidden_dim),
            nn.ReLU(),
            nn.Linear(color_hidden_dim, 3),
        )
        # Coarse-to-fine (open_levels): each feature is scaled by its level's weight, kept per feature
        # so a call multiplies once. Not saved: a trained field has every level open, and
        # checkpoints stay loadable without it.
        feature_level = torch.arange(n_levels, dtype=torch.float32).repeat_interleave(features_per_level)
        self.register_buffer("_feature_level", feature_level, persistent=False)
        self.register_buffer("feature_weights", torch.ones_like(feature_level), persistent=False)
        self.levels_scaled = False

    @property
    def level_weights(self) -> Tensor:
        """Each level's weight ``[n_levels]`` (a view of the per-feature weights)."""
        return self.feature_weights[:: self.encoding.features_per_level]

    def open_levels(self, progress: float, start_levels: int) -> None:
        """Coarse-to-fine training (Neuralangelo's, on the hash levels): at ``progress`` 0 only the
        ``start_levels`` coarsest levels count; the finer ones open one after another, each fading
        in over one level's span, until all do at 1. Why: the first steps then shape the product
        from coarse features, before fine levels can copy texture into surface or place thin
        false sheets where colour leaves depth loose. Fills the weights in place (no host sync, and
        a captured CUDA graph reads them)."""
        n_levels = self.encoding.n_levels
        opened = start_levels + (n_levels - start_levels) * min(max(progress, 0.0), 1.0)
        self.feature_weights.copy_((opened - self._feature_level).clamp_(0.0, 1.0))
        self.levels_scaled = True

    def _unit(self, points: Tensor) -> Tensor:
        return (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])

    def _encode(self, points: Tensor, n_levels: int | None = None) -> Tensor:
        """points ``[N, 3]`` → the first ``n_levels`` (all) levels' features ``[N, n_levels * F]``."""
        features = self.encoding(self._unit(points), n_levels)
        if not self.levels_scaled:
            return features
        return features * self.feature_weights[: features.shape[1]].to(features.dtype)

    def _density_head(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.density_mlp(features)
        # exp of an fp16 logit overflows past ~11: activate in float32.
        return trunc_exp(out[:, 0].float()), out[:, 1:]

    def geometry(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points ``[N, 3]`` → density ``[N]`` (float32, >= 0), geometry feature ``[N, geo_feat_dim]``."""
        return self._density_head(self._encode(points, self.geometry_levels))

    def density(self, points: Tensor) -> Tensor:
        """points ``[N, 3]`` → density ``[N]``; zero outside the box."""
        inside = ((points >= self.aabb[0]) & (points <= self.aabb[1])).all(-1)
        return self.geometry(points)[0] * inside

    def forward(self, points: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """points, unit directions ``[N, 3]`` → density ``[N]``, rgb ``[N, 3]`` in 0..1 (float32)."""
        features = self._encode(points)
        split = self.geometry_levels * self.encoding.features_per_level
        sigma, geo = self._density_head(features[:, :split])
        sh = spherical_harmonics(directions).to(geo.dtype)
        rgb = torch.sigmoid(self.color_mlp(torch.cat([geo, features[:, split:].to(geo.dtype), sh], dim=-1)).float())
        return sigma, rgb


class GridSampler:
    """Fixed-step stratified samples through the box, culled by an occupancy grid (plain torch).

    Builds a dense ``[R, S]`` slot layout, drops slots outside the box or in empty cells and
    hands back the rest packed; runs anywhere, and is the reference :class:`NerfaccSampler` is
    tested against.
    """

    def __init__(self, aabb: Tensor, step: float, occupancy: OccupancyGrid) -> None:
        self.aabb = aabb
        self.step = step
        self.occupancy = occupancy
        # Enough slots to cross the box along its diagonal.
        self.n_slots = int(math.ceil(float((aabb[1] - aabb[0]).norm()) / step)) + 1

    def _occupied_slots(
        self, origins: Tensor, directions: Tensor, jitter: bool, generator: torch.Generator | None, per_ray: bool
    ) -> tuple[Tensor, Tensor]:
        """Every slot of every ray: t_mid ``[R * S]`` and whether it lies in the box and in an
        occupied cell ``[R * S]`` (bool), row-major, so grouped by ray."""
        t_near, t_far, hit = intersect_aabb(origins, directions, self.aabb)
        t_mid, valid = stratified_samples(t_near, t_far, self.step, self.n_slots, jitter, generator, per_ray)
        valid &= hit[:, None]
        points = origins[:, None] + t_mid[..., None] * directions[:, None]  # [R, S, 3]
        occupied = self.occupancy.query(points.reshape(-1, 3)).reshape(valid.shape)
        return t_mid.reshape(-1), (valid & occupied).reshape(-1)

    def sample(self, origins: Tensor, directions: Tensor, jitter: bool, generator: torch.Generator | None = None) -> PackedSamples:
        """origins, unit directions ``[R, 3]`` → the occupied samples of those rays, packed."""
        t_mid, keep = self._occupied_slots(origins, directions, jitter, generator, per_ray=False)
        flat = keep.nonzero()[:, 0]
        t = t_mid[flat]
        half = self.step / 2
        return PackedSamples(flat // self.n_slots, t - half, t + half, origins.shape[0])

    def sample_fixed(
        self, origins: Tensor, directions: Tensor, capacity: int, padding_rays: int, jitter: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[PackedSamples, Tensor]:
        """The same marching into a batch of fixed size, with no step that waits for the GPU (for a
        captured CUDA graph, tasks/nerf/graphed.py). Jitter is one offset per ray, as nerfacc's.

        origins, unit directions ``[R, 3]`` → ``capacity`` samples of ``R + padding_rays`` rays:
        the occupied ones, grouped by ray, then padding of width zero on rays ``R`` onwards
        (:func:`padding_ray_indices`); and how many occupied samples there were (0-d int64; above
        ``capacity``, the last rays lost their farthest samples).
        """
        t_mid, keep = self._occupied_slots(origins, directions, jitter, generator, per_ray=True)
        n_slots_total = keep.shape[0]
        flat = torch.nonzero_static(keep, size=capacity, fill_value=n_slots_total)[:, 0]
        t = torch.cat([t_mid, t_mid.new_zeros(1)])[flat]
        real = flat < n_slots_total
        half = real * (self.step / 2)
        n_rays = origins.shape[0]
        rays = torch.where(real, flat // self.n_slots, padding_ray_indices(n_rays, capacity, padding_rays, flat.device))
        return PackedSamples(rays, t - half, t + half, n_rays + padding_rays), keep.sum()


class NerfaccSampler:
    """The same marching with nerfacc's CUDA grid traversal: one kernel emits only occupied samples.

    Our :class:`OccupancyGrid` stays the source of truth (updates, mask carving, checkpoints);
    its bits are copied into the ``OccGridEstimator``'s grid whenever they change.
    """

    def __init__(self, aabb: Tensor, step: float, occupancy: OccupancyGrid) -> None:
        import nerfacc  # CUDA only; imported here so the CPU path never needs it

        self._traverse = nerfacc.grid.traverse_grids
        self.aabb = aabb
        self.step = step
        self.occupancy = occupancy
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb.reshape(-1), resolution=occupancy.resolution, levels=1).to(aabb.device)
        self._revision = -1

    def _sync_grid(self) -> None:
        if self._revision != self.occupancy.revision:
            res = self.occupancy.resolution
            # Ours is x-fastest ([z, y, x] as a 3-D view); nerfacc indexes [x, y, z].
            bits = self.occupancy.bits.view(res, res, res).permute(2, 1, 0)
            self.estimator.binaries.copy_(bits[None])
            self._revision = self.occupancy.revision

    def sample(self, origins: Tensor, directions: Tensor, jitter: bool, generator: torch.Generator | None = None) -> PackedSamples:
        """origins, unit directions ``[R, 3]`` → the occupied samples of those rays, packed."""
        self._sync_grid()
        t_near, t_far, hit = intersect_aabb(origins, directions, self.aabb)
        # nerfacc steps [near + k * step, near + (k + 1) * step]: sample midpoints at t_near + (k + u) * step
        # as GridSampler's, with u = 1/2 or, jittered, one random u per ray.
        offset = torch.rand(t_near.shape, device=t_near.device, generator=generator) - 0.5 if jitter else 0.0
        near = (t_near + offset * self.step).contiguous()
        far = torch.where(hit, t_far, near)
        intervals, samples, _ = self._traverse(
            origins.contiguous(), directions.contiguous(), self.estimator.binaries, self.estimator.aabbs,
            near_planes=near, far_planes=far, step_size=self.step,
        )
        t_starts = intervals.vals[intervals.is_left]
        t_ends = intervals.vals[intervals.is_right]
        return PackedSamples(samples.ray_indices.long(), t_starts, t_ends, origins.shape[0])


Sampler = GridSampler | NerfaccSampler
SAMPLERS = ("auto", "torch", "nerfacc")


def make_sampler(aabb: Tensor, step: float, occupancy: OccupancyGrid, kind: str = "auto") -> Sampler:
    """The ray sampler: ``torch`` (:class:`GridSampler`), ``nerfacc`` (:class:`NerfaccSampler`,
    CUDA), or ``auto``: nerfacc on a CUDA device when it imports and compiles, torch otherwise."""
    if kind not in SAMPLERS:
        raise ValueError(f"nerf.sampler={kind!r} is not one of {', '.join(SAMPLERS)}")
    if kind == "torch" or (kind == "auto" and aabb.device.type != "cuda"):
        return GridSampler(aabb, step, occupancy)
    if aabb.device.type != "cuda":
        raise ValueError(f"nerf.sampler=nerfacc needs a CUDA device, the field is on {aabb.device}; use nerf.sampler=auto or torch")
    try:
        sampler = NerfaccSampler(aabb, step, occupancy)
        # nerfacc compiles its CUDA kernels on first use: do it now, so a broken build shows here.
        sampler.sample(aabb[:1], torch.nn.functional.normalize(aabb[1:] - aabb[:1], dim=-1), jitter=False)
        return sampler
    except Exception as error:  # ImportError, or a failed JIT build of nerfacc's kernels
        if kind == "nerfacc":
            raise RuntimeError(
                f"nerf.sampler=nerfacc but nerfacc is not usable here ({error}); install nerfacc==0.5.3 "
                "(pip install korokoro[gpu]; it compiles its CUDA kernels on first use, which needs nvcc) "
                "or use nerf.sampler=torch"
            ) from error
        warnings.warn(f"nerfacc is not usable ({error}); sampling rays in plain torch (slower)", stacklevel=2)
        return GridSampler(aabb, step, occupancy)


def render_rays(
    model: NgpModel,
    sampler: Sampler,
    origins: Tensor,
    directions: Tensor,
    jitter: bool,
    generator: torch.Generator | None = None,
    surface_opacity: float | None = None,
    early_stop_eps: float = 0.0,
    solid_alpha: float = 0.0,
) -> tuple[dict[str, Tensor], PackedSamples]:
    """Render a batch of rays ``[R, 3], [R, 3]`` → ``rgb [R, 3]`` (premultiplied), ``alpha [R]``,
    ``depth [R]`` (and ``depth_surface [R]`` with ``surface_opacity`` and ``solid_alpha``, as
    :func:`composite_packed`), ``weights [K]``, ``samples`` (how many samples reached the MLPs)
    and ``marched`` (how many the occupancy grid let through; both 0-d CPU tensors); and the
    packed samples themselves.

    With ``early_stop_eps > 0`` a density-only pass first drops samples whose transmittance
    is below it (behind an opaque surface), so the colour MLP and backward skip them.
    """
    # Where samples fall is not differentiated (refined cameras get their gradient through the points).
    samples = sampler.sample(origins.detach(), directions.detach(), jitter, generator)
    marched = samples.ray_indices.shape[0]
    points = samples.points(origins, directions)
    if early_stop_eps > 0 and samples.ray_indices.numel() > 0:
        with torch.no_grad():
            keep = visible_samples(model.geometry(points)[0], samples, early_stop_eps)
        samples, points = samples.select(keep), points[keep]
    sigma, rgb = model(points, samples.per_sample(directions))
    out = composite_packed(sigma, rgb, samples, surface_opacity, solid_alpha)
    out["samples"] = torch.tensor(samples.ray_indices.shape[0])
    out["marched"] = torch.tensor(marched)
    return out, samples


class NgpRadianceField:
    """A trained ngp field behind the :class:`tasks.nerf.base.RadianceField` interface (inference only)."""

    def __init__(self, model: NgpModel, sampler: Sampler, chunk: int, early_stop_eps: float = 0.0) -> None:
        self.model = model.eval()
        self.sampler = sampler
        self.chunk = chunk
        self.early_stop_eps = early_stop_eps
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
    def render_chunks(
        self, c2w: Tensor, intrinsics: Tensor, width: int, height: int, surface_opacity: float | None = None,
        solid_alpha: float = 0.0,
    ) -> Iterator[tuple[dict[str, Tensor], PackedSamples]]:
        """One view's pixels, row-major, ``chunk`` rays at a time: what :func:`render_rays` returns for each."""
        c2w = c2w.to(self.device, torch.float32)
        intrinsics = intrinsics.to(self.device, torch.float32)
        v, u = torch.meshgrid(torch.arange(height, device=self.device), torch.arange(width, device=self.device), indexing="ij")
        pixels = torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)
        for part in pixels.split(self.chunk):
            origins, directions = pixel_rays(c2w, intrinsics, part)
            yield render_rays(self.model, self.sampler, origins, directions, jitter=False,
                              surface_opacity=surface_opacity, early_stop_eps=self.early_stop_eps, solid_alpha=solid_alpha)

    @torch.no_grad()
    def render(
        self, c2w: Tensor, intrinsics: Tensor, width: int, height: int, surface_opacity: float = 0.5, solid_alpha: float = 0.0
    ) -> dict[str, Tensor]:
        """One view: c2w ``[4, 4]`` (OpenGL), intrinsics ``[4]`` fx, fy, cx, cy →
        ``rgb [H, W, 3]`` (premultiplied), ``alpha [H, W]``, ``depth [H, W]`` (expected distance) and
        ``depth_surface [H, W]`` (where opacity reaches ``surface_opacity``, counting samples at least
        ``solid_alpha`` opaque; 0 where it never does);
        rays go in chunks."""
        keys = ("rgb", "alpha", "depth", "depth_surface")
        parts: dict[str, list[Tensor]] = {key: [] for key in keys}
        for out, _ in self.render_chunks(c2w, intrinsics, width, height, surface_opacity, solid_alpha):
            for key in keys:
                parts[key].append(out[key].float())
        shapes = {"rgb": (height, width, 3)}
        return {key: torch.cat(parts[key]).reshape(shapes.get(key, (height, width))) for key in keys}
