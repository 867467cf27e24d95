"""Training steps in fixed-size batches (tasks/nerf/graphed.py), which a CUDA graph replays.

On the CPU the fixed batches must render exactly what the packed path renders on the same
rays, pad with samples that weigh nothing, and report an overflow instead of hiding it; the
capture itself is checked on a GPU (``-m gpu``).
"""

from __future__ import annotations

import pytest
import torch

from tasks.nerf.field import GridSampler, NgpModel, render_rays
from tasks.nerf.graphed import CapturedStep, SampleCapacity, render_fixed
from tasks.nerf.ngp import NgpSettings, cuda_graph_start
from tasks.nerf.packed import PackedSamples, distortion_loss
from tests.test_nerf_packed import STEP, box_grid, orbit_rays


def small_model(aabb: torch.Tensor, density_bias: float = 4.0) -> NgpModel:
    torch.manual_seed(0)
    model = NgpModel(aabb, 4, 2, 12, 4, 32, 16, 7, 16)
    with torch.no_grad():
        model.density_mlp[-1].bias[0] = density_bias  # dense enough that rays turn opaque inside the box
    return model


def packed_and_fixed(extra: int, fraction: float = 1.0) -> tuple[PackedSamples, PackedSamples, torch.Tensor]:
    """64 rays through a random grid, marched packed and into a fixed batch of ``fraction`` of
    the packed count plus ``extra`` samples (4 padding rays): (packed, fixed, the fixed count)."""
    aabb, grid = box_grid()
    origins, directions = orbit_rays(64)
    sampler = GridSampler(aabb, STEP, grid)
    packed = sampler.sample(origins, directions, jitter=False)
    capacity = int(packed.ray_indices.numel() * fraction) + extra
    return packed, *sampler.sample_fixed(origins, directions, capacity, padding_rays=4, jitter=False)


def test_fixed_marching_holds_the_occupied_samples_then_weightless_padding():
    packed, fixed, count = packed_and_fixed(extra=100)
    k = packed.ray_indices.numel()
    assert int(count) == k and fixed.n_rays == 68
    torch.testing.assert_close(fixed.ray_indices[:k], packed.ray_indices)
    torch.testing.assert_close(fixed.t_starts[:k], packed.t_starts)
    torch.testing.assert_close(fixed.t_ends[:k], packed.t_ends)
    # Padding: on the four padding rays, after every real one and in order, with no width.
    pad = fixed.ray_indices[k:]
    assert int(pad.min()) == 64 + (4 * k) // (k + 100) and int(pad.max()) == 67
    assert bool((pad[1:] >= pad[:-1]).all())
    assert bool((fixed.t_ends[k:] == fixed.t_starts[k:]).all())


def test_an_overflowing_batch_keeps_the_first_samples_and_says_how_many_there_were():
    packed, fixed, count = packed_and_fixed(extra=0, fraction=0.5)
    k = packed.ray_indices.numel()
    assert int(count) == k
    torch.testing.assert_close(fixed.ray_indices, packed.ray_indices[: k // 2])


def test_per_ray_jitter_keeps_a_rays_samples_one_step_apart():
    aabb, grid = box_grid()
    grid.bits[:] = True
    origins, directions = orbit_rays(32)
    fixed, count = GridSampler(aabb, STEP, grid).sample_fixed(origins, directions, 20000, 4, jitter=True,
                                                               generator=torch.Generator().manual_seed(3))
    k = int(count)
    same_ray = fixed.ray_indices[1:k] == fixed.ray_indices[: k - 1]
    gaps = (fixed.t_starts[1:k] - fixed.t_starts[: k - 1])[same_ray]
    torch.testing.assert_close(gaps, torch.full_like(gaps, STEP))


def test_take_pads_with_samples_of_no_width_on_the_padding_rays():
    # Three real rays and two padding rays; index 4 (= K) asks for padding.
    samples = PackedSamples(torch.tensor([0, 0, 1, 2]), torch.tensor([0.1, 0.2, 0.3, 0.4]),
                            torch.tensor([0.2, 0.3, 0.4, 0.5]), 5)
    taken = samples.take(torch.tensor([1, 3, 4, 4]), padding_rays=2)
    assert taken.ray_indices.tolist() == [0, 2, 4, 4] and taken.n_rays == 5
    torch.testing.assert_close(taken.t_starts, torch.tensor([0.2, 0.4, 0.0, 0.0]))
    torch.testing.assert_close(taken.t_ends, torch.tensor([0.3, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("early_stop_eps", [0.0, 1e-4])
def test_fixed_batches_render_and_score_what_the_packed_path_does(early_stop_eps):
    aabb, grid = box_grid()
    grid.bits[:] = True
    model = small_model(aabb)
    origins, directions = orbit_rays(128)
    sampler = GridSampler(aabb, STEP, grid)
    packed, packed_samples = render_rays(model, sampler, origins, directions, jitter=False, early_stop_eps=early_stop_eps)
    capacity = SampleCapacity(int(packed["marched"]) + 1000, int(packed["samples"]) + 500)
    fixed, fixed_samples, counts = render_fixed(model, sampler, origins, directions, capacity, early_stop_eps, jitter=False)
    assert counts.tolist() == [int(packed["marched"]), int(packed["samples"])]
    assert fixed_samples.ray_indices.numel() == (capacity.visible if early_stop_eps else capacity.marched)
    for key in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(fixed[key], packed[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distortion_loss(fixed["weights"], fixed_samples, 2.0, n_rays=128),
                               distortion_loss(packed["weights"], packed_samples, 2.0), atol=1e-6, rtol=1e-5)
    # The padding changes no gradient: the fixed batch trains the table exactly as the packed one.
    grads = []
    for out in (packed, fixed):
        model.zero_grad()
        out["rgb"].sum().backward(retain_graph=True)
        grads.append(model.encoding.table.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_capacity_rounds_up_and_grows_when_a_batch_overflowed():
    capacity = SampleCapacity.covering(100_000, 30_000, 1.25)
    assert capacity == SampleCapacity(125952, 37888)  # 1.25 times the counts, up to multiples of 1024
    assert capacity.holds(125952, 1) and not capacity.holds(125953, 1)
    step = CapturedStep(lambda c: (torch.zeros(()), torch.zeros(()), torch.zeros(2, dtype=torch.int64)),
                        optimizer=None, capacity=capacity, margin=1.25, generator=torch.Generator())
    step.peak.copy_(torch.tensor([120_000, 30_000]))
    assert step.check(16) and step.overflows == 0 and int(step.peak.sum()) == 0
    step.peak.copy_(torch.tensor([200_000, 30_000]))
    assert not step.check(32)
    # Both counts get their margin again.
    assert step.capacity == SampleCapacity(250880, 37888) and step.overflows == 1
    assert step.graph is None and int(step.peak.sum()) == 0  # captured again, with room, on the next call
    assert step.history == [(32, 250880, 37888)]


def test_capacity_shrinks_once_most_of_a_batch_would_be_padding():
    step = CapturedStep(lambda c: (torch.zeros(()), torch.zeros(()), torch.zeros(2, dtype=torch.int64)),
                        optimizer=None, capacity=SampleCapacity(250880, 37888), margin=1.25, generator=torch.Generator())
    step.peak.copy_(torch.tensor([150_000, 25_000]))  # needs 188416 of 250880: not worth a capture
    assert step.check(16)
    step.peak.copy_(torch.tensor([100_000, 25_000]))  # needs 125952: half the batch would be padding
    assert not step.check(32) and step.overflows == 0
    assert step.capacity == SampleCapacity(125952, 31744) and step.history == [(32, 125952, 31744)]


def test_the_graph_starts_after_the_eager_steps_and_only_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    s = NgpSettings(steps=2000, cuda_graph_after=32)
    assert cuda_graph_start(s, cuda) == 32
    assert cuda_graph_start(NgpSettings(steps=2000, cuda_graph_after=0), cuda) == 1  # one eager step sizes the batches
    assert cuda_graph_start(s, cpu) == 2000
    assert cuda_graph_start(NgpSettings(steps=2000, pose_lr=1e-3), cuda) == 32  # cameras refine in the graph too
    for eager in (NgpSettings(steps=2000, mixed_precision=True),
                  NgpSettings(steps=2000, cuda_graph="off"), NgpSettings(steps=20, cuda_graph_after=32)):
        assert cuda_graph_start(eager, cuda) == eager.steps
    with pytest.raises(ValueError, match="nerf.cuda_graph='on' is not one of auto, off"):
        cuda_graph_start(NgpSettings(cuda_graph="on"), cuda)


def _train_box_scene(tmp_path, **overrides):
    from tests.test_nerf_ngp import TINY, write_scene
    from tasks.train import train_field
    import json
    from pathlib import Path

    masks = write_scene(tmp_path / "scene")
    settings = {**TINY, "device": "cuda", "cpu_threads": 0, "sampler": "torch", "cuda_graph_after": 128, **overrides}
    record = train_field(masks, tmp_path / "field", settings, "fp-graph")
    return json.loads(Path(record.metrics).read_text())["extra"]


@pytest.mark.gpu
def test_a_captured_step_trains_the_field_as_well_as_eager_steps(tmp_path):
    eager = _train_box_scene(tmp_path / "eager", cuda_graph="off")
    graphed = _train_box_scene(tmp_path / "graphed")
    assert eager["cuda_graph_captures"] == 0 and graphed["cuda_graph_captures"] >= 1
    assert graphed["cuda_graph_from_step"] == 128 and graphed["cuda_graph_capacities"][0][0] == 128
    assert graphed["psnr_holdout_object"] >= 20.0, graphed
    assert abs(graphed["psnr_holdout_object"] - eager["psnr_holdout_object"]) < 1.5, (eager, graphed)


@pytest.mark.gpu
def test_an_overflowing_graph_is_captured_again_with_room(tmp_path):
    # A margin under 1 leaves the batches short of the counts, so every check finds an overflow.
    extra = _train_box_scene(tmp_path, cuda_graph_margin=0.5)
    assert extra["cuda_graph_overflows"] >= 1 and extra["cuda_graph_captures"] >= 2
    assert extra["psnr_holdout_object"] >= 15.0, extra


@pytest.mark.gpu
def test_levels_opening_during_graph_replays_reach_the_captured_step(tmp_path):
    # Coarse-to-fine opens the two finest levels only after the capture at step 128: if the graph
    # kept the weights it was captured with, their entries would never leave instant-ngp's ±1e-4.
    from tasks.nerf.ngp import load_ngp

    extra = _train_box_scene(tmp_path, coarse_to_fine=0.8, coarse_to_fine_start_levels=2)
    assert extra["cuda_graph_captures"] >= 1 and extra["psnr_holdout_object"] >= 18.0, extra
    encoding = load_ngp(tmp_path / "field", "cpu").model.encoding
    finest = encoding.table.detach()[int(encoding.level_offsets[-1]):]
    assert float(finest.abs().max()) > 1e-2


def test_occupancy_refreshes_and_carving_change_the_grid_in_place():
    # A captured step reads the grid's tensors themselves; a refresh that made new ones would be invisible to it.
    aabb, grid = box_grid()
    bits, carved, density = grid.bits.data_ptr(), grid.carved.data_ptr(), grid.density.data_ptr()
    before = grid.bits.clone()
    grid.update(lambda points: (points[:, 0] > 0).float() * 100.0, 1.0, 4096, torch.Generator().manual_seed(0))
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 8:24, 8:24] = True
    c2w = torch.eye(4)[None].clone()
    c2w[0, 2, 3] = 3.0
    grid.carve(c2w, torch.tensor([[40.0, 40.0, 16.0, 16.0]]), masks, 0.1)
    assert (grid.bits.data_ptr(), grid.carved.data_ptr(), grid.density.data_ptr()) == (bits, carved, density)
    assert not torch.equal(grid.bits, before) and bool(grid.carved.any())
