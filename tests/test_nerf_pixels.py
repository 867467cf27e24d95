"""Training pixels (tasks/nerf/pixels.py): the object share of each batch, the grown masks, the rays."""

from __future__ import annotations

import pytest
import torch

from tasks.nerf.dataset import Capture
from tasks.nerf.pixels import sample_training_rays, training_pixels

H, W = 40, 60


def small_capture(n_frames: int = 3) -> Capture:
    """Frames whose product is a 4 x 5 block at a different place in each frame; pixel colour encodes (frame, v, u)."""
    masks = torch.zeros(n_frames, H, W, dtype=torch.bool)
    for f in range(n_frames):
        masks[f, 10 + f : 14 + f, 20 + 2 * f : 25 + 2 * f] = True
    frames = torch.arange(n_frames)[:, None, None].expand(n_frames, H, W)
    rows = torch.arange(H)[None, :, None].expand(n_frames, H, W)
    cols = torch.arange(W)[None, None, :].expand(n_frames, H, W)
    images = torch.stack([frames * 50, rows * 4, cols * 4], -1).to(torch.uint8)
    return Capture(
        images=images,
        masks=masks,
        c2w=torch.eye(4).repeat(n_frames, 1, 1),
        intrinsics=torch.tensor([[50.0, 50.0, W / 2, H / 2]]).repeat(n_frames, 1),
        names=[f"f{i}" for i in range(n_frames)],
        train_ids=list(range(n_frames)),
        holdout_ids=[],
    )


def whole_frames(n_frames: int) -> torch.Tensor:
    return torch.tensor([[0, 0, W, H]]).repeat(n_frames, 1)


def test_the_object_pool_is_the_masks_pixels_grown_by_the_margin():
    capture = small_capture()
    ids = torch.tensor([0, 2])
    exact = training_pixels(capture, ids, whole_frames(2), 0.5, margin_px=0)
    assert exact.object_pixels.numel() == 2 * 4 * 5
    frame, rest = exact.object_pixels // (H * W), exact.object_pixels % (H * W)
    assert set(frame.tolist()) == {0, 2}  # only the training frames
    assert capture.masks.reshape(-1)[exact.object_pixels].all()
    grown = training_pixels(capture, ids, whole_frames(2), 0.5, margin_px=1)
    assert grown.object_pixels.numel() == 2 * 6 * 7  # a one-pixel ring around each block
    assert set(exact.object_pixels.tolist()) < set(grown.object_pixels.tolist())
    assert rest.max() < H * W


def test_the_pool_stays_inside_each_frames_box_rectangle():
    capture = small_capture(1)
    # The rectangle cuts the block (rows 10-13, cols 20-24) after column 22.
    pool = training_pixels(capture, torch.tensor([0]), torch.tensor([[0, 0, 23, H]]), 1.0, margin_px=0).object_pixels
    assert pool.numel() == 4 * 3 and (pool % W).max() == 22


def test_a_batch_has_the_asked_share_of_product_rays_and_the_rays_match_their_pixels():
    capture = small_capture()
    ids = torch.tensor([0, 1, 2])
    generator = torch.Generator().manual_seed(0)
    uniform = training_pixels(capture, ids, whole_frames(3), 0.0, margin_px=0)
    assert uniform.object_pixels.numel() == 0  # nothing spent on a pool that is never drawn from
    _, _, _, mask = sample_training_rays(capture, uniform, 4000, generator)
    assert mask.mean() < 0.05  # 20 of 2400 pixels are product
    focused = training_pixels(capture, ids, whole_frames(3), 0.75, margin_px=0)
    origins, directions, rgb, mask = sample_training_rays(capture, focused, 4000, generator)
    assert origins.shape == directions.shape == rgb.shape == (4000, 3)
    assert mask[:3000].all()  # the object share comes first, every one of them on the product
    assert 0.75 < float(mask.mean()) < 0.8
    # The colour is the pixel's own: recover (frame, v, u) from it and check the mask there.
    frame, v, u = (rgb[:, 0] * 255 / 50).round().long(), (rgb[:, 1] * 255 / 4).round().long(), (rgb[:, 2] * 255 / 4).round().long()
    assert torch.equal(capture.masks[frame, v, u].float(), mask)
    # Each ray leaves its frame's camera through its pixel's centre (camera looks along -z).
    expected = torch.stack([(u + 0.5 - W / 2) / 50.0, -(v + 0.5 - H / 2) / 50.0, -torch.ones(4000)], -1)
    torch.testing.assert_close(directions, expected / expected.norm(dim=-1, keepdim=True))


def test_every_frame_of_the_pool_is_drawn():
    capture = small_capture()
    pixels = training_pixels(capture, torch.tensor([0, 1, 2]), whole_frames(3), 1.0, margin_px=0)
    frames, u, v = pixels.pick(3000, W, H, torch.Generator().manual_seed(1))
    counts = torch.bincount(frames, minlength=3)
    assert (counts > 800).all()


@pytest.mark.parametrize("fraction, margin", [(-0.1, 0), (1.5, 0), (0.5, -1)])
def test_bad_settings_name_the_setting(fraction, margin):
    with pytest.raises(ValueError, match="nerf.object_ray"):
        training_pixels(small_capture(), torch.tensor([0]), whole_frames(1), fraction, margin)


def test_uniform_rays_share_frames_by_their_rectangles_area_and_skip_empty_ones():
    capture = small_capture()
    rects = torch.tensor([[0, 0, W, H], [0, 0, 0, H], [0, 0, W // 2, H]])  # full, empty, half
    pixels = training_pixels(capture, torch.tensor([0, 1, 2]), rects, 0.0, margin_px=0)
    frames, u, v = pixels.pick(30000, W, H, torch.Generator().manual_seed(2))
    counts = torch.bincount(frames, minlength=3)
    assert counts[1] == 0
    assert abs(float(counts[0]) / float(counts[2]) - 2.0) < 0.1
    assert bool((u[frames == 2] < W // 2).all())
