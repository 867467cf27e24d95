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


def _gmm_log_likelihood(pixels: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Log-density of ``pixels (N, 3)`` under one of GrabCut's 5-component colour models (its 65-float layout:
    weights, means, covariances). → ``(N,)``."""
    weights, means, covs = model[:5], model[5:20].reshape(5, 3), model[20:].reshape(5, 3, 3)
    out = np.full(len(pixels), -np.inf)
    for k in np.flatnonzero(weights > 0):
        cov = covs[k] + 0.01 * np.eye(3)  # GrabCut adds the same white noise before inverting
        diff = pixels - means[k]
        maha = ((diff @ np.linalg.inv(cov)) * diff).sum(1)  # a BLAS product: ~4x faster than einsum here
        out = np.logaddexp(out, np.log(weights[k]) - 0.5 * (maha + np.log(np.linalg.det(cov)) + 3 * np.log(2 * np.pi)))
    return out


def _colour_models(samples: np.ndarray, is_product: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """GrabCut's own colour models (background, product) fitted to ``samples (N, 3)`` uint8, no cut."""
    labels = np.where(is_product, cv2.GC_FGD, cv2.GC_BGD).astype(np.uint8)[None]
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    cv2.grabCut(np.ascontiguousarray(samples[None]), labels, None, bgd, fgd, 0, cv2.GC_INIT_WITH_MASK)
    return bgd[0], fgd[0]


def see_through(image: np.ndarray, mask: np.ndarray, settings: Any) -> np.ndarray:
    """``(H, W)`` bool: thick parts of ``mask`` coloured like the background just around the product.

    A handle's opening, the gap under a chair's seat: there the frame shows the background, but the
    visual hull cannot carve it (other views see product along those rays), so the hull-guided
    GrabCut keeps the opening filled once the first pass filled it, and a filled opening teaches
    the field an opaque patch of background. Colour tells them apart: GrabCut's colour models
    are fitted to a ring of background around the mask and to the mask, the pixels far likelier
    background (``settings.see_through_margin``, in nats) are taken out of the product's model
    and the test repeated; what is that thick (an opening by ``see_through_min_radius_px``) is
    returned, grown back over its mixed rim.
    """
    out = np.zeros(mask.shape, dtype=bool)
    found = _box(mask)
    if found is None or settings.see_through_margin <= 0:
        return out
    h, w = mask.shape
    inner, outer = settings.band_px + 1, settings.band_px + 1 + max(4, int(0.1 * max(found[1] - found[0], found[3] - found[2])))
    y0, y1, x0, x1 = max(found[0] - outer, 0), min(found[1] + outer, h), max(found[2] - outer, 0), min(found[3] + outer, w)
    crop, img = mask[y0:y1, x0:x1].astype(np.uint8), image[y0:y1, x0:x1]
    ring = (cv2.dilate(crop, _disc_kernel(outer)) > 0) & ~(cv2.dilate(crop, _disc_kernel(inner)) > 0)
    inside = crop > 0
    if ring.sum() < 50 or inside.sum() < 50:
        return out
    rng = np.random.default_rng(settings.seed)

    def subsample(sel: np.ndarray, n: int = 4000) -> np.ndarray:
        pixels = img[sel]
        return pixels[rng.choice(len(pixels), n, replace=False)] if len(pixels) > n else pixels

    product_pixels = img[inside].astype(np.float64)
    candidates = np.zeros(len(product_pixels), dtype=bool)
    for _ in range(2):  # the second fit leaves the first round's background-coloured pixels out of the product's model
        keep = inside.copy()
        keep[inside] = ~candidates
        bg_samples, fg_samples = subsample(ring), subsample(keep)
        if len(fg_samples) < 50:
            return out
        samples = np.concatenate([bg_samples, fg_samples]).astype(np.uint8)
        bgd, fgd = _colour_models(samples, np.arange(len(samples)) >= len(bg_samples), settings.seed)
        ratio = _gmm_log_likelihood(product_pixels, bgd) - _gmm_log_likelihood(product_pixels, fgd)
        candidates = ratio > settings.see_through_margin
    region, likelier = np.zeros(crop.shape, np.uint8), np.zeros(crop.shape, bool)
    region[inside], likelier[inside] = candidates, ratio > 0
    kernel = _disc_kernel(settings.see_through_min_radius_px)
    core = cv2.morphologyEx(region, cv2.MORPH_OPEN, kernel) > 0
    # The opening rounds the core's corners off, and the opening's rim mixes product and background
    # (and JPEG's ringing): take every connected patch of pixels at all likelier background that
    # touches a core.
    count, labels = cv2.connectedComponents(likelier.astype(np.uint8), connectivity=8)
    touched = np.zeros(count, dtype=bool)
    touched[np.unique(labels[core])] = True
    touched[0] = False
    out[y0:y1, x0:x1] = touched[labels]
    return out
