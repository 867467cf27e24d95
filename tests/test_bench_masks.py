"""Bench tools that compare masks and renderings with a turntable's truth (bench/holdout_errors.py,
bench/mask_sets.py, bench/perfect_ceiling.py)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from bench.holdout_errors import worst_frame_figure
from bench.mask_sets import score_masks
from bench.quality import true_mask
from tasks.nerf.dataset import load_capture

H, W = 60, 80


def write_truth(folder, masks: list[np.ndarray]) -> None:
    """Truth masks ``frame_<i>.png`` at twice the frames' size (as a 1080p video under 540p frames)."""
    (folder / "masks").mkdir(parents=True)
    for i, mask in enumerate(masks):
        big = cv2.resize(mask.astype(np.uint8) * 255, (2 * W, 2 * H), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / "masks" / f"frame_{i:05d}.png"), big)


def write_capture(folder, masks: list[np.ndarray], distortion: float = 0.0):
    """A transforms.json with frames and masks as the segment stage writes them."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    frames = []
    for i, mask in enumerate(masks):
        cv2.imwrite(str(folder / "images" / f"frame_{i:05d}.png"), np.full((H, W, 3), 90, np.uint8))
        cv2.imwrite(str(folder / "masks" / f"frame_{i:05d}.png"), mask.astype(np.uint8) * 255)
        frames.append({"file_path": f"images/frame_{i:05d}.png", "mask_path": f"masks/frame_{i:05d}.png",
                       "transform_matrix": np.eye(4).tolist()})
    meta = {"camera_model": "OPENCV", "fl_x": 70.0, "fl_y": 70.0, "cx": W / 2, "cy": H / 2, "w": W, "h": H,
            "k1": distortion, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames}
    (folder / "transforms.json").write_text(json.dumps(meta))
    return folder / "transforms.json", meta


def rectangle(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_score_masks_counts_added_and_missed_pixels(tmp_path):
    truth = [rectangle(10, 30, 10, 40), rectangle(20, 50, 30, 60)]
    predicted = [rectangle(10, 30, 10, 45), rectangle(25, 50, 30, 60)]  # 100 px added; 150 px missed
    write_truth(tmp_path / "truth", truth)
    transforms, _ = write_capture(tmp_path / "seg", predicted)
    scores = score_masks(transforms, tmp_path / "truth")
    assert scores["added_of_truth"] == pytest.approx(100 / (600 + 900))
    assert scores["missed_of_truth"] == pytest.approx(150 / (600 + 900))
    assert scores["iou_median"] == pytest.approx((600 / 700 + 750 / 900) / 2)
    assert scores["iou_worst"] == pytest.approx(750 / 900)


@pytest.mark.parametrize("distortion", [0.0, -0.25])
def test_true_masks_line_up_with_the_training_capture(tmp_path, distortion):
    # The run's masks are the true ones; after the capture's undistortion both must still agree exactly.
    truth = [rectangle(5, 55, 4, 40), rectangle(12, 48, 30, 78)]
    write_truth(tmp_path / "truth", truth)
    transforms, meta = write_capture(tmp_path / "seg", truth, distortion)
    capture = load_capture(transforms, 1, 0, torch.device("cpu"))
    k = np.array([[70.0, 0, W / 2], [0, 70.0, H / 2], [0, 0, 1]])
    for i in range(2):
        lined_up = true_mask(tmp_path / "truth", i, W, H, (k, np.array([distortion, 0.0, 0.0, 0.0])))
        np.testing.assert_array_equal(lined_up, capture.masks[i].numpy())
    if distortion:  # undistortion moved the mask: without it the masks would not line up
        assert not np.array_equal(true_mask(tmp_path / "truth", 0, W, H), capture.masks[0].numpy())


def test_a_missing_true_mask_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"frame_00003\.png.*tools/turntable\.py"):
        true_mask(tmp_path, 3, W, H)


def test_the_worst_frame_figure_has_four_panels_cropped_to_the_product(tmp_path):
    truth = rectangle(10, 40, 20, 60)
    added, missed = rectangle(10, 40, 60, 62), rectangle(38, 40, 20, 60)
    frame = np.random.default_rng(0).random((H, W, 3))
    worst = {"row": {"frame": "frame_00008.jpg", "psnr_run_mask": 27.0, "psnr_true_mask": 31.0}, "frame": frame,
             "rendered": frame * 0.9, "error": np.full((H, W), 0.01), "added": added, "missed": missed, "truth": truth}
    worst_frame_figure(worst, tmp_path / "worst.png", pad=4)
    image = cv2.imread(str(tmp_path / "worst.png"))
    assert image.shape == (22 + (40 - 10) + 2 * 4, 4 * ((62 - 20) + 2 * 4), 3)


def test_the_perfect_renderer_draws_the_turntables_own_silhouettes(tmp_path):
    pytest.importorskip("pyrender")
    from bench.perfect_ceiling import _true_renderer
    from tools.turntable import render_turntable

    render_turntable("basket", tmp_path, frames=6, width=96, height=72, elevation_deg=30.0, progress=False)
    render = _true_renderer(json.loads((tmp_path / "truth" / "meta.json").read_text()))
    for index in (0, 4):
        rgb, coverage = render(index)
        true = cv2.imread(str(tmp_path / "truth" / "masks" / f"frame_{index:05d}.png"), cv2.IMREAD_GRAYSCALE) > 127
        np.testing.assert_array_equal(coverage > 0, true)
        assert rgb.shape == (72, 96, 3) and rgb[~true].max() == 0  # on black: premultiplied, exact alpha
