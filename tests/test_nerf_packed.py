"""Packed volume rendering (tasks/nerf/packed.py) and the ray samplers (tasks/nerf/field.py).

The packed path must give what the dense ``[R, S]`` compositing gives on the same samples,
values and gradients; the nerfacc sampler must emit the samples the torch one does (CUDA only).
"""

from __future__ import annotations

import math

import pytest
import torch

from tasks.nerf.field import GridSampler, NgpModel, make_sampler, render_rays
from tasks.nerf.occupancy import OccupancyGrid
from tasks.nerf.packed import PackedSamples, composite_packed, distortion_loss, segment_cumsum, visible_samples
from tasks.nerf.rays import composite, pixel_rays

STEP = 0.05


def dense_batch(seed: int = 0, n_rays: int = 6, n_slots: int = 40):
    """Random densities with whole runs of empty slots (culled), as a dense batch and packed."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = torch.rand(n_rays, n_slots, generator=generator) * 30
    keep = torch.rand(n_rays, n_slots, generator=generator) > 0.4
    keep[2] = False  # one ray with no samples at all
    sigmas = sigmas * keep
    colors = torch.rand(n_rays, n_slots, 3, generator=generator)
    t_mid = 1.0 + (torch.arange(n_slots) + 0.5)[None].expand(n_rays, -1) * STEP
    flat = keep.reshape(-1).nonzero()[:, 0]
    t = t_mid.reshape(-1)[flat]
    samples = PackedSamples(flat // n_slots, t - STEP / 2, t + STEP / 2, n_rays)
    return sigmas, colors, t_mid, keep, flat, samples


def test_segment_cumsum_restarts_at_every_ray():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    rays = torch.tensor([0, 0, 0, 3, 3, 5])
    assert segment_cumsum(values, rays, exclusive=False).tolist() == [1, 3, 6, 4, 9, 6]
    assert segment_cumsum(values, rays, exclusive=True).tolist() == [0, 1, 3, 0, 4, 0]


def test_packed_compositing_matches_dense_values_and_gradients():
    sigmas, colors, t_mid, keep, flat, samples = dense_batch()
    dense_sigmas = sigmas.clone().requires_grad_(True)
    dense = composite(dense_sigmas, colors, t_mid, STEP, surface_opacity=0.5)
    packed_sigmas = sigmas.reshape(-1)[flat].clone().requires_grad_(True)
    packed = composite_packed(packed_sigmas, colors.reshape(-1, 3)[flat], samples, surface_opacity=0.5)
    for key in ("rgb", "alpha", "depth", "depth_surface"):
        torch.testing.assert_close(packed[key], dense[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed["weights"], dense["weights"].reshape(-1)[flat], rtol=1e-5, atol=1e-6)
    assert packed["alpha"][2] == 0 and packed["depth_surface"][2] == 0
    # The surface level without the haze (here: samples under half opaque) agrees too, and moves.
    dense_solid = composite(sigmas, colors, t_mid, STEP, surface_opacity=0.5, solid_alpha=0.5)["depth_surface"]
    packed_solid = composite_packed(sigmas.reshape(-1)[flat], colors.reshape(-1, 3)[flat], samples, 0.5, 0.5)["depth_surface"]
    torch.testing.assert_close(packed_solid, dense_solid)
    assert not torch.equal(dense_solid, dense["depth_surface"].detach())
    # Same loss, same gradient on every kept sample.
    target = torch.rand(sigmas.shape[0], 3, generator=torch.Generator().manual_seed(1))
    ((dense["rgb"] - target) ** 2).sum().backward()
    ((packed["rgb"] - target) ** 2).sum().backward()
    torch.testing.assert_close(packed_sigmas.grad, dense_sigmas.grad.reshape(-1)[flat], rtol=1e-4, atol=1e-6)


def test_transmittance_stays_exact_over_a_large_batch():
    # 20,000 rays each fully opaque: the batch's summed optical depth is 1e6, where a float32
    # running sum could no longer resolve one ray's first samples.
    n_rays, per_ray = 20_000, 10
    rays = torch.arange(n_rays).repeat_interleave(per_ray)
    t = torch.arange(per_ray).repeat(n_rays).float() * STEP
    samples = PackedSamples(rays, t, t + STEP, n_rays)
    sigmas = torch.full((n_rays * per_ray,), 100.0 / STEP / per_ray)  # optical depth 10 per sample
    out = composite_packed(sigmas, torch.ones(n_rays * per_ray, 3), samples)
    first_weight = 1 - math.exp(-10.0)
    torch.testing.assert_close(out["weights"][-per_ray], torch.tensor(first_weight), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["alpha"], torch.ones(n_rays), rtol=1e-6, atol=1e-6)


def test_early_stop_drops_samples_behind_an_opaque_surface_only():
    n_slots = 30
    t = torch.arange(n_slots).float() * STEP
    samples = PackedSamples(torch.zeros(n_slots, dtype=torch.long), t, t + STEP, 1)
    sigmas = torch.zeros(n_slots)
    sigmas[10:13] = 200.0  # opaque from slot 10: transmittance < 1e-4 from slot 11 on
    keep = visible_samples(sigmas, samples, early_stop_eps=1e-4)
    assert keep[:11].all() and not keep[11:].any()
    colors = torch.rand(n_slots, 3, generator=torch.Generator().manual_seed(2))
    full = composite_packed(sigmas, colors, samples)
    cut = composite_packed(sigmas[keep], colors[keep], samples.select(keep))
    torch.testing.assert_close(cut["rgb"], full["rgb"], atol=1e-4, rtol=0)


def test_distortion_loss_matches_its_definition_and_prefers_one_thin_interval():
    sigmas, colors, t_mid, keep, flat, samples = dense_batch(seed=3)
    weights = composite_packed(sigmas.reshape(-1)[flat], colors.reshape(-1, 3)[flat], samples)["weights"]
    scale = 2.0
    brute = torch.zeros(())
    for ray in range(samples.n_rays):
        on = samples.ray_indices == ray
        w, m = weights[on], samples.t_mid[on] / scale
        d = (samples.t_ends - samples.t_starts)[on] / scale
        brute = brute + (w[:, None] * w[None] * (m[:, None] - m[None]).abs()).sum() + (w**2 * d).sum() / 3
    torch.testing.assert_close(distortion_loss(weights, samples, scale), brute / samples.n_rays, rtol=1e-4, atol=1e-7)
    # The same total weight in one sample scores lower than spread over ten.
    t = torch.arange(10).float() * STEP
    one = PackedSamples(torch.zeros(10, dtype=torch.long), t, t + STEP, 1)
    spread = distortion_loss(torch.full((10,), 0.09), one, 1.0)
    peaked = distortion_loss(torch.tensor([0.0] * 5 + [0.9] + [0.0] * 4), one, 1.0)
    assert peaked < spread


def box_grid(device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, OccupancyGrid]:
    aabb = torch.tensor([[-1.0, -0.8, -0.5], [1.0, 0.8, 0.5]], device=device)
    grid = OccupancyGrid(aabb, 16, STEP, 0.01, 0.95)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grid.bits = (torch.rand(16**3, generator=generator) > 0.7).to(device)
    grid.revision += 1
    return aabb, grid


def orbit_rays(n_rays: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(4)
    angle = torch.rand(n_rays, generator=generator) * 2 * math.pi
    origins = torch.stack([3 * torch.cos(angle), 3 * torch.sin(angle), torch.full_like(angle, 1.0)], -1)
    targets = (torch.rand(n_rays, 3, generator=generator) - 0.5) * 1.5
    directions = torch.nn.functional.normalize(targets - origins, dim=-1)
    return origins.to(device), directions.to(device)


def test_grid_sampler_packs_exactly_the_occupied_slots_inside_the_box():
    aabb, grid = box_grid()
    origins, directions = orbit_rays(64)
    samples = GridSampler(aabb, STEP, grid).sample(origins, directions, jitter=False)
    assert samples.ray_indices.numel() > 0
    assert bool((samples.ray_indices[1:] >= samples.ray_indices[:-1]).all())
    points = samples.points(origins, directions)
    assert bool(grid.query(points).all())
    torch.testing.assert_close(samples.t_ends - samples.t_starts, torch.full_like(samples.t_starts, STEP))


def test_make_sampler_names_bad_choices():
    aabb, grid = box_grid()
    with pytest.raises(ValueError, match="nerf.sampler='fast' is not one of auto, torch, nerfacc"):
        make_sampler(aabb, STEP, grid, "fast")
    with pytest.raises(ValueError, match="nerf.sampler=nerfacc needs a CUDA device"):
        make_sampler(aabb, STEP, grid, "nerfacc")
    assert isinstance(make_sampler(aabb, STEP, grid, "auto"), GridSampler)


def test_render_rays_with_early_stop_matches_full_render():
    aabb, grid = box_grid()
    grid.bits[:] = True
    torch.manual_seed(0)
    model = NgpModel(aabb, 4, 2, 12, 4, 32, 16, 7, 16)
    with torch.no_grad():
        model.density_mlp[-1].bias[0] = 4.0  # dense enough that rays turn opaque inside the box
    origins, directions = orbit_rays(128)
    sampler = GridSampler(aabb, STEP, grid)
    with torch.no_grad():
        full, all_samples = render_rays(model, sampler, origins, directions, jitter=False, surface_opacity=0.5)
        cut, kept = render_rays(model, sampler, origins, directions, jitter=False, surface_opacity=0.5, early_stop_eps=1e-4)
    assert kept.ray_indices.numel() < all_samples.ray_indices.numel() / 2
    for key in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(cut[key], full[key], atol=2e-3, rtol=0)
    torch.testing.assert_close(cut["depth_surface"], full["depth_surface"])


@pytest.mark.gpu
def test_nerfacc_sampler_emits_the_torch_samplers_samples():
    pytest.importorskip("nerfacc")
    aabb, grid = box_grid("cuda")
    origins, directions = orbit_rays(256, "cuda")
    sampler = make_sampler(aabb, STEP, grid, "nerfacc")
    reference = GridSampler(aabb, STEP, grid).sample(origins, directions, jitter=False)
    ours = sampler.sample(origins, directions, jitter=False)
    # Boundary cases differ by float rounding of where a midpoint falls; nearly all agree.
    assert abs(ours.ray_indices.numel() - reference.ray_indices.numel()) <= 0.01 * reference.ray_indices.numel()
    per_ray = torch.bincount(ours.ray_indices, minlength=256) - torch.bincount(reference.ray_indices, minlength=256)
    assert float((per_ray != 0).float().mean()) < 0.05
    assert bool(grid.query(ours.points(origins, directions)).float().mean() > 0.99)
    # A changed grid reaches the estimator.
    grid.bits[:] = False
    grid.revision += 1
    assert sampler.sample(origins, directions, jitter=True).ray_indices.numel() == 0


def test_pixel_rays_pass_where_asked_inside_the_pixel():
    c2w = torch.eye(4)
    intrinsics = torch.tensor([100.0, 100.0, 50.0, 50.0])
    pixels = torch.tensor([[49, 49], [49, 49]])
    _, centre = pixel_rays(c2w, intrinsics, pixels[:1])
    _, corners = pixel_rays(c2w, intrinsics, pixels, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    torch.testing.assert_close(corners[0], centre[0])
    # u = 50, v = 49 (top-right corner of the pixel left of and above the centre): +x, +y in OpenGL.
    expected = torch.nn.functional.normalize(torch.tensor([0.0, 0.01, -1.0]), dim=0)
    torch.testing.assert_close(corners[1], expected)
