"""Honest quality numbers of a trained field on whole frames of the capture.

``psnr_object``: render the frame from its camera and compare with the true frame on the
product's pixels only (mask = 255). The rendering is premultiplied on black, so missing
opacity on the product costs PSNR instead of being hidden by a background. The squared
error is pooled over all object pixels of all given frames before taking the log.
``mask_iou``: rendered alpha > 0.5 against the mask, pooled the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from tasks.nerf.dataset import Capture
from tasks.nerf.field import NgpRadianceField


def evaluate_frames(field: NgpRadianceField, capture: Capture, frame_ids: Sequence[int]) -> dict[str, float | None]:
    """Object PSNR (dB) and mask IoU over ``frame_ids``; ``None`` when there are no frames."""
    squared_error, object_values, intersection, union = 0.0, 0, 0, 0
    for i in frame_ids:
        view = field.render(capture.c2w[i], capture.intrinsics[i], capture.width, capture.height)
        truth = capture.images[i].float() / 255.0
        mask = capture.masks[i]
        squared_error += float(((view["rgb"] - truth)[mask] ** 2).sum())
        object_values += int(mask.sum()) * 3
        rendered_mask = view["alpha"] > 0.5
        intersection += int((rendered_mask & mask).sum())
        union += int((rendered_mask | mask).sum())
    if not frame_ids or object_values == 0:
        return {"psnr_object": None, "mask_iou": None}
    mse = max(squared_error / object_values, 1e-10)
    return {"psnr_object": -10.0 * math.log10(mse), "mask_iou": intersection / max(union, 1)}


def save_previews(field: NgpRadianceField, capture: Capture, frame_ids: Sequence[int], out_dir: Path) -> None:
    """``preview_<frame>.png``: true frame | rendering (on black) | rendered alpha, side by side."""
    for i in frame_ids:
        view = field.render(capture.c2w[i], capture.intrinsics[i], capture.width, capture.height)
        truth = capture.images[i].cpu().numpy()
        rendered = (view["rgb"].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        alpha = (view["alpha"].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        strip = np.concatenate([truth, rendered, np.repeat(alpha[..., None], 3, -1)], axis=1)
        cv2.imwrite(str(Path(out_dir) / f"preview_{i:04d}.png"), strip[..., ::-1])
