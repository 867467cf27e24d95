"""Choosing the marching-cubes iso-level from the masks.

A trained field's density scale is not fixed: it depends on the sampling step it was trained
with and on how opaque the product's thin parts came out (a wicker wall may stay half
transparent and still render right, because the liner behind it fills in). One fixed level
either keeps the fog shell around the product or drops thin walls. The masks say what the
product's outline is from every camera, so the level whose occupied voxels cast silhouettes
closest to the masks is the one to mesh at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from tasks.isolation_geometry import load_views, project


def _silhouette(uv: np.ndarray, size: tuple[int, int], radius_px: int) -> np.ndarray:
    """Pixels hit by projected voxel centres ``uv (M, 2)``, closed to fill the gaps between them."""
    w, h = size
    image = np.zeros((h, w), np.uint8)
    col, row = np.floor(uv[:, 0]), np.floor(uv[:, 1])
    ok = np.isfinite(col) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    image[row[ok].astype(np.intp), col[ok].astype(np.intp)] = 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))
    return cv2.morphologyEx(image, cv2.MORPH_CLOSE, kernel) > 0


def silhouette_iou(
    density: np.ndarray,
    axes: Sequence[np.ndarray],
    transforms: Path,
    levels: Sequence[float],
    views: int,
    work_px: int = 160,
    max_cells: int = 96,
) -> dict[float, float]:
    """Mean IoU between masks and the silhouettes of ``density > level``, for each level.

    density ``[X, Y, Z]`` sampled where ``axes`` (three 1-D coordinate arrays) cross;
    ``views`` masks, evenly picked, shrunk so their longer side is ``work_px`` (the test is
    about outlines, not detail). The grid is thinned to at most ``max_cells`` per axis for the
    same reason: a 256³ grid costs 20x the time and changes no outline at ``work_px``.
    """
    stride = max(1, -(-max(density.shape) // max_cells))
    density = density[::stride, ::stride, ::stride]
    axes = [np.asarray(a)[::stride] for a in axes]
    cams = load_views(transforms)
    root = Path(transforms).parent
    meta = cams.raw["frames"]
    picks = np.unique(np.linspace(0, len(cams) - 1, min(views, len(cams))).round().astype(int))
    voxel = np.array([abs(a[1] - a[0]) if len(a) > 1 else 0.0 for a in axes])
    scores: dict[float, list[float]] = {float(level): [] for level in levels}
    for index in picks:
        mask = cv2.imread(str(root / meta[index]["mask_path"]), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(f"mask {meta[index]['mask_path']} of {transforms} is missing: rerun segment")
        w, h = (int(s) for s in cams.sizes[index])
        scale = work_px / max(w, h)
        small = cv2.resize(mask, (max(1, round(w * scale)), max(1, round(h * scale))), cv2.INTER_AREA) > 127
        for level in scores:
            idx = np.argwhere(density > level)
            if len(idx) == 0:
                scores[level].append(0.0)
                continue
            centres = np.stack([axes[a][idx[:, a]] for a in range(3)], axis=1)
            uv, depth = project(cams, int(index), centres)
            voxel_px = cams.intrinsics[index, :2].max() * scale * voxel.max() / max(float(depth[depth > 0].min()), 1e-9)
            sil = _silhouette(uv * scale, small.shape[::-1], max(1, int(np.ceil(voxel_px))))
            union = (sil | small).sum()
            scores[level].append(float((sil & small).sum() / union) if union else 0.0)
    return {level: float(np.mean(v)) for level, v in scores.items()}


def choose_iso_level(scores: dict[float, float], tolerance: float) -> float:
    """The lowest level whose IoU is within ``tolerance`` of the best.

    Of the levels that match the masks about equally well, the loosest keeps thin parts: on the
    H100 basket run the best-scoring level (288) cut holes (F-score 0.36) where 85 gave 0.51.
    """
    best = max(scores.values())
    return min(level for level, iou in scores.items() if iou >= best - tolerance)
