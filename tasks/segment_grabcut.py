"""GrabCut helpers of the segment stage: trimaps from the detector's box and from the hull, and GrabCut on a crop.

Everything here works on one frame and only touches the region around the product, so
``tasks.segment`` runs it for many frames at once in threads (OpenCV releases the GIL).
``settings`` is a ``tasks.segment.SegmenterSettings``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import cv2
import numpy as np


@lru_cache(maxsize=32)
def _disc_kernel(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` around the non-zero pixels of ``mask``, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def run_grabcut(image: np.ndarray, trimap: np.ndarray, object_px: int, settings: Any, *,
                iterations: int | None = None, crop_margin: float | None = None) -> np.ndarray:
    """GrabCut from a ``trimap (H, W)`` of cv2.GC_* labels on ``image (H, W, 3)`` BGR → bool mask.

    Runs on a crop around the undecided region (plus ``crop_margin`` of its size for the colour
    models, ``settings.crop_margin`` by default) resampled so that region spans about ``object_px``
    pixels: small products get sub-pixel outlines, large frames stay fast. ``iterations`` defaults
    to ``settings.grabcut_iterations``. Falls back to the trimap's fg labels when GrabCut cannot
    start (no fg or no bg samples).
    """
    h, w = trimap.shape
    found = _box(trimap != cv2.GC_BGD)
    if found is None:
        return np.zeros((h, w), dtype=bool)
    y0, y1, x0, x1 = found
    margin = settings.crop_margin if crop_margin is None else crop_margin
    pad = int(np.ceil(margin * max(y1 - y0, x1 - x0))) + 2
    scale = float(np.clip(object_px / max(y1 - y0, x1 - x0), settings.min_work_scale, settings.max_work_scale))
    y0, y1, x0, x1 = max(y0 - pad, 0), min(y1 + pad, h), max(x0 - pad, 0), min(x1 + pad, w)
    crop_img, crop_map = image[y0:y1, x0:x1], trimap[y0:y1, x0:x1]
    size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    work_img = cv2.resize(crop_img, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    labels = cv2.resize(crop_map, size, interpolation=cv2.INTER_NEAREST)
    fg_init = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    bg_init = (labels == cv2.GC_BGD) | (labels == cv2.GC_PR_BGD)
    if fg_init.any() and bg_init.any():
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        # GrabCut seeds its colour models with k-means++ from OpenCV's per-thread RNG: reseed it so
        # a frame's mask depends neither on the frames this thread did before nor on the threads.
        cv2.setRNGSeed(int(getattr(settings, "seed", 0)))
        cv2.grabCut(np.ascontiguousarray(work_img), labels, None, bgd, fgd,
                    settings.grabcut_iterations if iterations is None else iterations, cv2.GC_INIT_WITH_MASK)
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.float32)
    # Back to frame pixels by area averaging: a pixel is product when most of it is.
    fg = cv2.resize(fg, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR)
    mask = np.zeros((h, w), dtype=bool)
    # Everything outside the crop is background, so the blob filter only needs the crop.
    mask[y0:y1, x0:x1] = keep_main_components(fg > 0.5, settings.keep_component_fraction)
    return mask


def keep_main_components(mask: np.ndarray, fraction: float) -> np.ndarray:
    """Drop connected blobs smaller than ``fraction`` of the largest one (specks of background)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.concatenate([[False], areas >= fraction * areas.max()])
    return keep[labels]


def _mark_points(trimap: np.ndarray, uv: np.ndarray, label: int, radius: int) -> None:
    """Set discs of ``radius`` around pixel positions ``uv (M, 2)`` to ``label`` (in place)."""
    if len(uv) == 0:
        return
    h, w = trimap.shape
    col, row = np.floor(uv[:, 0]).astype(np.intp), np.floor(uv[:, 1]).astype(np.intp)
    ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    if not ok.any():
        return
    col, row = col[ok], row[ok]
    # Only the seeds' bounding box (plus the disc) is dilated, not the whole frame.
    y0, y1 = max(int(row.min()) - radius, 0), min(int(row.max()) + radius + 1, h)
    x0, x1 = max(int(col.min()) - radius, 0), min(int(col.max()) + radius + 1, w)
    dots = np.zeros((y1 - y0, x1 - x0), np.uint8)
    dots[row - y0, col - x0] = 1
    trimap[y0:y1, x0:x1][cv2.dilate(dots, _disc_kernel(radius)) > 0] = label


def box_trimap(shape: tuple[int, int], detection: Mapping[str, Any], settings: Any) -> np.ndarray:
    """First-pass trimap ``(H, W)`` uint8 from a detection: box, fg seeds' hull, seeds."""
    h, w = shape
    trimap = np.full((h, w), cv2.GC_BGD, np.uint8)
    box = detection.get("box")
    if box is None:
        return trimap
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    trimap[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = cv2.GC_PR_BGD
    fg = np.asarray(detection.get("seeds_fg") or [], dtype=np.float64).reshape(-1, 2)
    if len(fg) >= 3:
        region = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(region, cv2.convexHull(np.floor(fg).astype(np.int32)), 1)
        trimap[(region > 0) & (trimap == cv2.GC_PR_BGD)] = cv2.GC_PR_FGD
        # Seeds deep inside the seeds' outline are certain; near the outline noise may put them outside.
        found = _box(region)
        depth = np.zeros((h, w), np.float32)
        if found is not None:  # the distance to the outline only matters inside it: transform its box (+1 px of zeros)
            ry0, ry1, rx0, rx1 = max(found[0] - 1, 0), min(found[1] + 1, h), max(found[2] - 1, 0), min(found[3] + 1, w)
            depth[ry0:ry1, rx0:rx1] = cv2.distanceTransform(region[ry0:ry1, rx0:rx1], cv2.DIST_L2, 3)
        col = np.clip(np.floor(fg[:, 0]).astype(np.intp), 0, w - 1)
        row = np.clip(np.floor(fg[:, 1]).astype(np.intp), 0, h - 1)
        _mark_points(trimap, fg[depth[row, col] >= settings.seed_edge_px], cv2.GC_FGD, settings.seed_radius_px)
    bg = np.asarray(detection.get("seeds_bg") or [], dtype=np.float64).reshape(-1, 2)
    _mark_points(trimap, bg, cv2.GC_BGD, settings.seed_radius_px)
    return trimap


def grabcut_first_pass(image: np.ndarray, detection: Mapping[str, Any], settings: Any) -> np.ndarray:
    """The weight-free first pass: GrabCut initialised with the detector's box and seeds."""
    trimap = box_trimap(image.shape[:2], detection, settings)
    if not (trimap != cv2.GC_BGD).any():
        return np.zeros(image.shape[:2], dtype=bool)
    return run_grabcut(image, trimap, settings.first_pass_object_px, settings)


def hull_trimap(hull_mask: np.ndarray, first: np.ndarray | None, settings: Any) -> np.ndarray:
    """Refine trimap ``(H, W)``: certain outside/inside the hull's outline, undecided in a band.

    With a trusted first-pass mask ``first``, certain fg needs both to agree and undecided pixels
    start from the first pass; without one (rejected frame) the hull alone is the prior.
    """
    h, w = hull_mask.shape
    trimap = np.full((h, w), cv2.GC_BGD, np.uint8)
    found = _box(hull_mask)
    if found is None:
        return trimap
    # Morphology only around the hull (the band's width of margin), not over the whole frame.
    m = settings.band_px + 1
    y0, y1, x0, x1 = max(found[0] - m, 0), min(found[1] + m, h), max(found[2] - m, 0), min(found[3] + m, w)
    hull = hull_mask[y0:y1, x0:x1]
    sub = trimap[y0:y1, x0:x1]
    band = _disc_kernel(settings.band_px)
    h8 = hull.astype(np.uint8)
    sub[cv2.dilate(h8, band) > 0] = cv2.GC_PR_BGD
    if first is None:
        sub[hull] = cv2.GC_PR_FGD
        sub[_erode(h8, _disc_kernel(2 * settings.band_px), (y0, y1, x0, x1), (h, w)) > 0] = cv2.GC_FGD
    else:
        first = first[y0:y1, x0:x1]
        sub[first & (sub == cv2.GC_PR_BGD)] = cv2.GC_PR_FGD
        sub[_erode(h8 & first.astype(np.uint8), band, (y0, y1, x0, x1), (h, w)) > 0] = cv2.GC_FGD
    return trimap


def _erode(crop: np.ndarray, kernel: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """``cv2.erode`` of a crop at ``box`` of a frame of ``shape`` as if run on the whole frame.

    The frame's border counts as foreground (OpenCV's default for erosion); a crop side inside
    the frame is padded with background, which is what the frame holds there.
    """
    y0, y1, x0, x1 = box
    h, w = shape
    r = kernel.shape[0] // 2
    pads = [0 if y0 > 0 else r, 0 if y1 < h else r, 0 if x0 > 0 else r, 0 if x1 < w else r]
    if not any(pads):
        return cv2.erode(crop, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    padded = cv2.copyMakeBorder(crop, *pads, cv2.BORDER_CONSTANT, value=1)
    out = cv2.erode(padded, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return out[pads[0]:out.shape[0] - pads[1], pads[2]:out.shape[1] - pads[3]]
