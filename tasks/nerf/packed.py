"""Volume rendering of packed samples: the layout nerfacc uses, in plain PyTorch.

A batch of R rays carries K samples in one flat list, grouped by ray: ``ray_indices [K]``
(non-decreasing), ``t_starts [K]``, ``t_ends [K]``. Only samples in occupied space exist,
so the MLPs, the compositing and the backward pass all scale with K instead of R x slots.

Per-ray running sums (transmittance, the accumulated weight) are one global ``cumsum``
minus its value where each ray starts, in float64: a batch's summed optical depth reaches
1e5-1e6, where float32's rounding would already shift transmittance by a few percent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from tasks.nerf.hashgrid import gather_rows


@dataclass
class PackedSamples:
    """K samples of ``n_rays`` rays: ray_indices ``[K]`` int64 (non-decreasing), t_starts, t_ends ``[K]``."""

    ray_indices: Tensor
    t_starts: Tensor
    t_ends: Tensor
    n_rays: int

    @property
    def t_mid(self) -> Tensor:
        """Sample positions along their rays ``[K]``."""
        return (self.t_starts + self.t_ends) / 2

    @functools.cached_property
    def first(self) -> Tensor:
        """Index of the first sample of each sample's ray ``[K]`` int64; computed once and shared by
        every running sum over these samples (compositing, the distortion loss)."""
        return torch.searchsorted(self.ray_indices, self.ray_indices)

    def select(self, keep: Tensor) -> "PackedSamples":
        """The samples where ``keep [K]`` (bool) holds; order, and so grouping by ray, is kept."""
        return PackedSamples(self.ray_indices[keep], self.t_starts[keep], self.t_ends[keep], self.n_rays)

    def take(self, index: Tensor, padding_rays: int) -> "PackedSamples":
        """The samples at ``index [C]`` (int64, non-decreasing), where ``index == K`` stands for a
        padding sample of width zero, which weighs nothing in compositing or in any loss. The
        last ``padding_rays`` rays hold the padding (:func:`padding_ray_indices`). How a
        fixed-size batch (tasks/nerf/graphed.py) holds K samples."""
        zero = self.t_starts.new_zeros(1)
        rays = torch.cat([self.ray_indices, self.ray_indices.new_zeros(1)])[index]
        pad = padding_ray_indices(self.n_rays - padding_rays, index.shape[0], padding_rays, index.device)
        return PackedSamples(torch.where(index == self.ray_indices.shape[0], pad, rays), torch.cat([self.t_starts, zero])[index],
                             torch.cat([self.t_ends, zero])[index], self.n_rays)

    def points(self, origins: Tensor, directions: Tensor) -> Tensor:
        """World positions of the samples. origins, directions ``[R, 3]`` → ``[K, 3]``."""
        return self.per_sample(origins) + self.t_mid[:, None] * self.per_sample(directions)

    def per_sample(self, per_ray: Tensor) -> Tensor:
        """Each sample's row of ``per_ray [R, C]`` → ``[K, C]``. Its backward (when refined cameras
        make rays differentiable) adds atomically instead of sorting a million indices."""
        return gather_rows(per_ray, self.ray_indices)


def padding_ray_indices(n_rays: int, capacity: int, padding_rays: int, device: torch.device | str) -> Tensor:
    """The ray each slot of a fixed batch of ``capacity`` samples gives its padding: ``n_rays + j *
    padding_rays // capacity`` for slot ``j`` ``[capacity]`` int64, after every real ray and
    non-decreasing. Why several rays: compositing adds every sample into its ray's row
    atomically, and a whole batch's padding on one row would queue its adds of zero there."""
    return n_rays + torch.arange(capacity, device=device) * padding_rays // capacity


def segment_cumsum(values: Tensor, ray_indices: Tensor, exclusive: bool, first: Tensor | None = None) -> Tensor:
    """Running sum of ``values [K]`` within each ray's run of samples → ``[K]`` (float64).

    ``ray_indices [K]`` must be non-decreasing. Exclusive: each sample's sum leaves itself out.
    ``first [K]``: index of each sample's ray's first sample (:attr:`PackedSamples.first`), if known.
    """
    values = values.double()
    total = torch.cumsum(values, dim=0)
    before = total - values  # sum of everything before each sample
    if first is None:  # searchsorted on the sorted ray ids
        first = torch.searchsorted(ray_indices, ray_indices)
    base = before[first]
    return (before if exclusive else total) - base


def depth_at_opacity(weights: Tensor, samples: PackedSamples, level: float) -> Tensor:
    """Where each ray's accumulated opacity first reaches ``level``: weights ``[K]`` → ``[R]``.

    The position of the first sample at which the running sum of weights reaches ``level``
    (0 where the ray never gets that opaque).
    """
    rays, n_rays = samples.ray_indices, samples.n_rays
    reached = segment_cumsum(weights, rays, exclusive=False, first=samples.first) >= level
    order = torch.arange(rays.shape[0], device=rays.device)
    no_sample = rays.shape[0]
    first = torch.full((n_rays,), no_sample, device=rays.device, dtype=torch.long)
    first = first.scatter_reduce(0, rays, torch.where(reached, order, no_sample), reduce="amin")
    return torch.cat([samples.t_mid, samples.t_mid.new_zeros(1)])[first]


def composite_packed(
    sigmas: Tensor, colors: Tensor, samples: PackedSamples, surface_opacity: float | None = None, solid_alpha: float = 0.0
) -> dict[str, Tensor]:
    """Alpha compositing of packed samples, front to back.

    sigmas ``[K]``, colors ``[K, 3]`` → ``rgb [R, 3]`` (premultiplied, no background),
    ``alpha [R]`` (accumulated opacity), ``depth [R]`` (expected distance, 0 where empty),
    ``weights [K]``; with ``surface_opacity``, also ``depth_surface [R]``: the first sample
    where the opacity reaches that level (0 where it never does); with ``solid_alpha``, the
    opacity of only the samples at least that opaque on their own, as if the thinner haze were
    not there. Matches :func:`tasks.nerf.rays.composite` on the
    same samples.
    """
    rays, n_rays = samples.ray_indices, samples.n_rays
    optical_depth = sigmas.float() * (samples.t_ends - samples.t_starts)
    transmittance = torch.exp(-segment_cumsum(optical_depth, rays, exclusive=True, first=samples.first)).float()
    sample_alpha = 1.0 - torch.exp(-optical_depth)
    weights = transmittance * sample_alpha
    t_mid = samples.t_mid
    zeros = weights.new_zeros(n_rays)
    alpha = zeros.index_add(0, rays, weights)
    out = {
        "rgb": weights.new_zeros(n_rays, 3).index_add(0, rays, weights[:, None] * colors.float()),
        "alpha": alpha,
        "depth": zeros.index_add(0, rays, weights * t_mid),
        "weights": weights,
    }
    if surface_opacity is not None:
        with torch.no_grad():
            counted = weights
            if solid_alpha > 0:  # composite again without the haze, as if it were not there
                solid = optical_depth * (sample_alpha >= solid_alpha)
                counted = torch.exp(-segment_cumsum(solid, rays, exclusive=True, first=samples.first)) * (1.0 - torch.exp(-solid))
            out["depth_surface"] = depth_at_opacity(counted, samples, surface_opacity)
    return out


@torch.no_grad()
def visible_samples(sigmas: Tensor, samples: PackedSamples, early_stop_eps: float) -> Tensor:
    """Which samples still let light through: transmittance before them above ``early_stop_eps``.

    sigmas ``[K]`` (a cheap density-only pass) → keep ``[K]`` bool. Samples behind an opaque
    surface add at most ``early_stop_eps`` to a pixel, so the colour MLP and the backward pass
    can skip them (instant-ngp and nerfacc stop rays the same way).
    """
    optical_depth = sigmas.float() * (samples.t_ends - samples.t_starts)
    transmittance = torch.exp(-segment_cumsum(optical_depth, samples.ray_indices, exclusive=True, first=samples.first))
    return transmittance > early_stop_eps


def distortion_loss(weights: Tensor, samples: PackedSamples, scale: float, n_rays: int | None = None) -> Tensor:
    """Mip-NeRF 360's distortion loss, mean over rays: small when each ray's weight sits in one thin interval.

    weights ``[K]``; ``scale`` divides distances (the box diagonal) so the loss does not depend
    on the scene's units; ``n_rays``: the rays to average over (default ``samples.n_rays``; a
    fixed-size batch leaves out its padding ray). ``sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 d_i`` in the O(K)
    form of Barron et al. 2022: ``2 sum_i w_i (m_i W_<i - S_<i)``, with W, S the running sums
    of w and w * m along the ray.
    """
    rays = samples.ray_indices
    mid = samples.t_mid / scale
    width = (samples.t_ends - samples.t_starts) / scale
    # Two 1-D running sums, not one over a stacked [K, 2]: CUDA scans a 1-D tensor in parallel but
    # an outer dimension one column per thread, and the stacked form doubled the H100's training time.
    before_w = segment_cumsum(weights, rays, exclusive=True, first=samples.first).float()
    before_wm = segment_cumsum(weights * mid, rays, exclusive=True, first=samples.first).float()
    per_sample = 2.0 * weights * (mid * before_w - before_wm) + weights**2 * width / 3.0
    return per_sample.sum() / max(samples.n_rays if n_rays is None else n_rays, 1)
