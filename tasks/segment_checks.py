"""Per-frame checks of the segment stage's consistency step: does a mask cover its seed points, jump
against its neighbours, leak out of the visual hull or miss what the other views agree on?

``settings`` is a ``tasks.segment.SegmenterSettings``; masks are ``(H, W)`` bool arrays.
"""

from __future__ import annotations

from typing import Any, Mapping

import cv2
import numpy as np

from tasks import isolation_geometry as geo
from tasks.segment_grabcut import _box, _disc_kernel


def seed_coverage(mask: np.ndarray, detection: Mapping[str, Any]) -> float | None:
    """Fraction of the detection's fg seeds (projected product points) inside ``mask``; None without seeds."""
    seeds = np.asarray(detection.get("seeds_fg") or [], dtype=np.float64).reshape(-1, 2)
    if len(seeds) == 0:
        return None
    h, w = mask.shape
    col = np.clip(np.floor(seeds[:, 0]).astype(np.intp), 0, w - 1)
    row = np.clip(np.floor(seeds[:, 1]).astype(np.intp), 0, h - 1)
    return float(mask[row, col].mean())


def first_pass_outliers(
    masks: list[np.ndarray], detections: list[Mapping[str, Any]], order: np.ndarray, settings: Any
) -> list[str]:
    """Per frame "" or why its first-pass mask is not trusted.

    A mask must cover its own fg seeds (the product's 3D points project inside the true
    silhouette whatever the view) and must not jump in area or centroid against its
    ``neighbour_window`` neighbours along ``order`` ``(N,)`` (frame indices in capture order).
    The area test is loose: a thin product seen edge-on legitimately halves its area in a few degrees.
    """
    stats = geo.thread_map(geo.area_and_centroid, masks, workers=settings.workers)
    area = np.array([s[0] for s in stats])
    centroid = np.array([s[1] for s in stats])
    n_px = np.array([m.size for m in masks], dtype=np.float64)
    flags = [""] * len(masks)
    for pos, i in enumerate(order):
        if area[i] < settings.min_area_fraction:
            flags[i] = "empty"
            continue
        coverage = seed_coverage(masks[i], detections[i])
        if coverage is not None and coverage < settings.min_seed_coverage:
            flags[i] = f"covers {coverage:.0%} of its seed points"
            continue
        lo, hi = max(0, pos - settings.neighbour_window), min(len(order), pos + settings.neighbour_window + 1)
        nb = np.array([j for j in order[lo:hi] if j != i and area[j] >= settings.min_area_fraction], dtype=np.intp)
        if len(nb) == 0:
            continue
        med_area = float(np.median(area[nb]))
        ratio = area[i] / med_area
        if ratio > settings.max_area_ratio or ratio < 1.0 / settings.max_area_ratio:
            flags[i] = f"area x{ratio:.2f} vs neighbours"
            continue
        jump = float(np.linalg.norm(centroid[i] - np.median(centroid[nb], axis=0)))
        if jump > settings.max_centroid_jump * np.sqrt(med_area * n_px[i]):
            flags[i] = f"centroid moved {jump:.1f} px"
    return flags


def coverage(mask: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of ``reference`` pixels inside ``mask`` (1.0 for an empty reference)."""
    total = np.count_nonzero(reference)
    return 1.0 if total == 0 else float(np.count_nonzero(mask & reference) / total)


def missing_blobs(mask: np.ndarray, consensus: np.ndarray, settings: Any) -> np.ndarray:
    """``(H, W)`` bool: solid parts of the others' consensus that ``mask`` lacks (holes, cut-off parts).

    Thin slivers along the outline are dropped by an opening: where view i sees a thin product
    edge-on, the other views cannot bound it as tightly, and that is no fault of mask i.
    """
    lacking = consensus & ~mask
    out = np.zeros(mask.shape, dtype=bool)
    found = _box(lacking)
    if found is None:
        return out
    # The opening only needs the lacking pixels' box plus the disc (outside it everything stays 0).
    h, w = mask.shape
    r = settings.hole_min_radius_px + 1
    y0, y1, x0, x1 = max(found[0] - r, 0), min(found[1] + r, h), max(found[2] - r, 0), min(found[3] + r, w)
    crop = lacking[y0:y1, x0:x1].astype(np.uint8)
    out[y0:y1, x0:x1] = cv2.morphologyEx(crop, cv2.MORPH_OPEN, _disc_kernel(settings.hole_min_radius_px)) > 0
    return out


def hull_disagreement(mask: np.ndarray, loose: np.ndarray, consensus: np.ndarray, settings: Any) -> str:
    """"" or why ``mask`` disagrees with the hull: leaks out of the voted hull, or misses the consensus."""
    leak = 1.0 - coverage(loose, mask)
    if leak > settings.max_leak_fraction:
        return f"{leak:.0%} outside the hull"
    missing = np.count_nonzero(missing_blobs(mask, consensus, settings)) / max(np.count_nonzero(consensus), 1)
    if missing > settings.max_missing_fraction:
        return f"misses {missing:.0%} of the other views' consensus"
    return ""
