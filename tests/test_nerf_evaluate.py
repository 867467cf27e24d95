"""Held-out quality figures: SSIM on object pixels next to PSNR (tasks/nerf/evaluate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from tasks.nerf.dataset import Capture
from tasks.nerf.evaluate import background_plate, composite_on_plate, evaluate_frames, object_ssim, ssim_map

H, W = 48, 64


def product_frame(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured ellipse (the product) on a busy background: image ``[H, W, 3]`` 0..1, mask ``[H, W]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    mask = ((yy - 24) / 15) ** 2 + ((xx - 30) / 20) ** 2 <= 1
    smooth = 0.5 + 0.25 * np.sin(xx[..., None] / 4 + np.arange(3)) * np.cos(yy[..., None] / 5)
    fine = 0.15 * (((xx // 2 + yy // 2) % 2)[..., None] - 0.5)  # detail that a blur wipes out
    image = np.where(mask[..., None], smooth + fine, rng.random((H, W, 3)))
    return torch.tensor(image, dtype=torch.float32), torch.tensor(mask)


def test_ssim_map_matches_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.random((30, 40, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    _, full = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, channel_axis=-1, full=True)
    ours = ssim_map(torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1)).permute(1, 2, 0)
    assert ours.shape == (20, 30, 3)  # "valid" windows: 5 pixels lost on each side
    np.testing.assert_allclose(ours.numpy(), full[5:-5, 5:-5], atol=1e-4)


def test_object_ssim_ignores_the_background_and_counts_the_object():
    truth, mask = product_frame(0)
    premultiplied = truth * mask[..., None]  # a perfect rendering on black
    total, pixels = object_ssim(premultiplied, truth, mask)
    assert pixels == int(mask.sum()) and total / pixels == pytest.approx(1.0, abs=1e-5)

    other_background, _ = product_frame(1)  # same product, another background: nothing changes
    assert object_ssim(premultiplied, other_background, mask)[0] == pytest.approx(total, rel=1e-6)
    floaters = premultiplied + (~mask)[..., None] * 0.7  # stuff rendered outside the mask: ignored like PSNR
    assert object_ssim(floaters, truth, mask)[0] == pytest.approx(total, rel=1e-6)

    noisy = (premultiplied + 0.1 * torch.randn(H, W, 3, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    half_opaque = premultiplied * 0.6  # missing opacity darkens a premultiplied rendering
    noisy_ssim = object_ssim(noisy, truth, mask)[0] / pixels
    assert 0.0 < noisy_ssim < 0.9
    assert object_ssim(half_opaque, truth, mask)[0] / pixels < 0.99
    assert object_ssim(truth, truth, torch.zeros(H, W, dtype=torch.bool)) == (0.0, 0)


class ReplayField:
    """Renders frame i (found by its c2w's x translation) as stored: a stand-in for a trained field."""

    def __init__(self, renders: list[torch.Tensor], alphas: list[torch.Tensor]) -> None:
        self.renders, self.alphas = renders, alphas

    def render(self, c2w, intrinsics, width, height, surface_opacity=0.5):
        i = int(c2w[0, 3])
        return {"rgb": self.renders[i], "alpha": self.alphas[i], "depth": torch.zeros(height, width)}


def capture_of(frames: list[tuple[torch.Tensor, torch.Tensor]]) -> Capture:
    c2w = torch.eye(4).repeat(len(frames), 1, 1)
    c2w[:, 0, 3] = torch.arange(len(frames), dtype=torch.float32)
    return Capture(
        images=torch.stack([(img * 255).round().to(torch.uint8) for img, _ in frames]),
        masks=torch.stack([m for _, m in frames]),
        c2w=c2w,
        intrinsics=torch.tensor([[50.0, 50.0, W / 2, H / 2]]).repeat(len(frames), 1),
        names=[f"f{i}" for i in range(len(frames))],
        train_ids=[],
        holdout_ids=list(range(len(frames))),
    )


def test_evaluate_frames_reports_ssim_next_to_psnr():
    frames = [product_frame(s) for s in range(3)]
    capture = capture_of(frames)
    truths = [capture.images[i].float() / 255 for i in range(3)]
    masks = [m.float() for _, m in frames]
    perfect = evaluate_frames(ReplayField([t * m[..., None] for t, m in zip(truths, masks)], masks), capture, [0, 1, 2])
    assert perfect["ssim_object"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["psnr_object"] > 90 and perfect["mask_iou"] == 1.0

    blurred = [torch.nn.functional.avg_pool2d(t.permute(2, 0, 1)[None], 3, 1, 1)[0].permute(1, 2, 0) * m[..., None]
               for t, m in zip(truths, masks)]
    worse = evaluate_frames(ReplayField(blurred, masks), capture, [0, 1, 2])
    assert 0.3 < worse["ssim_object"] < 0.99 and worse["psnr_object"] < 40
    # Pooled over object pixels: the mean of per-frame sums over the total count.
    sums = [object_ssim(b, t, m.bool()) for b, t, m in zip(blurred, truths, masks)]
    assert worse["ssim_object"] == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=1e-6)
    empty = evaluate_frames(ReplayField([], []), capture, [])
    assert empty == {"psnr_object": None, "psnr_object_on_black": None, "ssim_object": None, "mask_iou": None}


def soft_silhouette_frame(background=(0.32, 0.52, 0.40)):
    """A disc of product over a plain background with anti-aliased edge pixels, as a renderer makes them.

    → frame ``[H, W, 3]``, coverage ``[H, W]`` in 0..1, product colour ``[H, W, 3]``, mask (coverage > 0.5)."""
    yy, xx = torch.meshgrid(torch.arange(H * 4.0), torch.arange(W * 4.0), indexing="ij")
    fine = (((yy - 96) / 60) ** 2 + ((xx - 120) / 80) ** 2 <= 1).float()
    coverage = torch.nn.functional.avg_pool2d(fine[None, None], 4)[0, 0]  # 4 x 4 supersampling
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    colour = torch.stack([0.6 + 0.2 * torch.sin(xs / 3.0), 0.5 + 0.2 * torch.cos(ys / 4.0), 0.3 + 0 * xs], -1)
    frame = coverage[..., None] * colour + (1 - coverage[..., None]) * torch.tensor(background)
    return frame, coverage, colour, coverage > 0.5


def test_the_plate_is_the_background_behind_the_product():
    frame, _, _, mask = soft_silhouette_frame()
    plate = background_plate(frame, mask)
    torch.testing.assert_close(plate[mask], torch.tensor([0.32, 0.52, 0.40]).expand(int(mask.sum()), 3), atol=1e-5, rtol=0)
    everything = torch.ones(H, W, dtype=torch.bool)  # no background at all: black, not a division by zero
    assert torch.equal(background_plate(frame, everything), torch.zeros(H, W, 3))


def test_a_perfect_field_scores_high_on_silhouette_pixels_where_on_black_it_cannot():
    frame, coverage, colour, mask = soft_silhouette_frame()
    capture = capture_of([(frame, mask)])
    perfect = ReplayField([coverage[..., None] * colour], [coverage])  # premultiplied on black, exact alpha
    figures = evaluate_frames(perfect, capture, [0])
    assert figures["psnr_object"] > 45  # only the uint8 rounding of the frame is left
    assert figures["psnr_object_on_black"] < figures["psnr_object"] - 10  # the edges' background share counted as error
    # Missing opacity still costs: a field that left the product's inside half transparent.
    faint = ReplayField([0.5 * coverage[..., None] * colour], [0.5 * coverage])
    assert evaluate_frames(faint, capture, [0])["psnr_object"] < 20
    composited = composite_on_plate(perfect.renders[0], perfect.alphas[0], background_plate(frame, mask))
    torch.testing.assert_close(composited, frame, atol=2e-5, rtol=0)
