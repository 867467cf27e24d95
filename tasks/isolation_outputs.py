"""Files the segment stage writes: masks, rgba cut-outs, transforms with mask_path, hull, sheet, stats."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from tasks import isolation_geometry as geo

if TYPE_CHECKING:  # pragma: no cover
    from tasks.segment import Reconciled

_OUTLINE_BGR = {"accepted": (0, 255, 0), "refined-from-hull": (0, 200, 255), "merged-with-hull": (0, 0, 255)}


def _imwrite(path: Path, image: np.ndarray, params: list[int]) -> None:
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"could not write {path}")


def contact_sheet_size(frame_count: int, frame_width: int, frame_height: int, columns: int, thumb_width: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the contact sheet for these frames and settings."""
    thumb_height = max(1, round(frame_height * thumb_width / frame_width))
    cols = max(1, min(columns, frame_count))
    rows = int(np.ceil(frame_count / cols))
    return cols * thumb_width, rows * thumb_height


def contact_sheet(images: list[np.ndarray], masks: list[np.ndarray], status: list[str], settings: Any) -> np.ndarray:
    """A grid of thumbnails ``(H, W, 3)`` BGR: each frame tinted by its mask, outlined by its status.

    Green outline = accepted first-pass mask, orange = re-segmented from the hull alone, red = merged
    with the other views' consensus (it missed parts they agree on).
    """
    h0, w0 = images[0].shape[:2]
    tw = settings.sheet_thumb_width
    th = max(1, round(h0 * tw / w0))
    sheet_w, sheet_h = contact_sheet_size(len(images), w0, h0, settings.sheet_columns, tw)
    cols = sheet_w // tw
    sheet = np.zeros((sheet_h, sheet_w, 3), np.uint8)

    def draw(k: int, image: np.ndarray, mask: np.ndarray, state: str) -> None:
        thumb = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
        small = cv2.resize(mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        colour = np.array(_OUTLINE_BGR.get(state, (255, 255, 255)), np.float32)
        tinted = thumb.astype(np.float32)
        tinted[small > 0] = (1 - settings.sheet_tint) * tinted[small > 0] + settings.sheet_tint * colour
        thumb = tinted.astype(np.uint8)
        contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(thumb, contours, -1, tuple(int(c) for c in colour), 1)
        r, c = divmod(k, cols)
        sheet[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = thumb

    geo.thread_map(draw, range(len(images)), images, masks, status, workers=getattr(settings, "workers", 1))
    return sheet


def write_outputs(out_dir: Path, views: geo.Views, images: list[np.ndarray], result: "Reconciled", settings: Any,
                  first_sources: list[str] | None = None) -> dict[str, Path]:
    """Write every segment output into ``out_dir``; returns the MaskSet paths (transforms, hull, ...).

    ``first_sources``: per frame, what made its first-pass mask (``grabcut``, ``sam``, ...).
    """
    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    (out_dir / "rgba").mkdir(parents=True, exist_ok=True)
    frames_raw = views.raw["frames"]
    transforms = {k: v for k, v in views.raw.items() if k != "frames"}
    transforms["frames"] = []
    if "point_views" in transforms.get("korokoro", {}):
        # The colmap stage's sparse points stay where they are: point to them from here.
        meta = dict(transforms["korokoro"])
        meta["point_views"] = os.path.relpath(views.base / meta["point_views"], out_dir)
        transforms["korokoro"] = meta
    workers = getattr(settings, "workers", 1)
    # OpenCV's fast defaults (SUB filter, RLE strategy) at the chosen zlib level; a level alone turns on
    # the slow all-filters search.
    png = [cv2.IMWRITE_PNG_COMPRESSION, int(getattr(settings, "png_compression", 1)),
           cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
           cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    stems = [f"{i:05d}_{Path(p).stem}" for i, p in enumerate(views.file_paths)]  # index first: unique even if stems repeat

    def write(stem: str, image: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray]:
        mask_u8 = np.asarray(mask, dtype=bool).view(np.uint8) * np.uint8(255)  # bool is one byte of 0 / 1
        _imwrite(out_dir / "masks" / f"{stem}.png", mask_u8, png)
        rgba = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
        rgba[..., 3] = mask_u8
        _imwrite(out_dir / "rgba" / f"{stem}.png", rgba, png)
        return geo.area_and_centroid(mask)

    shapes = geo.thread_map(write, stems, images, result.masks, workers=workers)
    per_frame = []
    for i, (stem, (area, centroid)) in enumerate(zip(stems, shapes)):
        frame = dict(frames_raw[i])
        frame["file_path"] = os.path.relpath(views.images[i], out_dir)
        frame["mask_path"] = f"masks/{stem}.png"
        transforms["frames"].append(frame)
        per_frame.append({
            "file_path": views.file_paths[i],
            "mask_path": frame["mask_path"],
            "area_fraction": round(area, 6),
            "centroid_px": [None if np.isnan(c) else round(float(c), 2) for c in centroid],
            "first_pass": None if first_sources is None else first_sources[i],
            "first_pass_rejected": result.first_flags[i] or None,
            "status": result.status[i],
            "iou_with_hull": round(result.hull_iou[i], 4),
        })
    transforms_path = out_dir / "transforms.json"
    transforms_path.write_text(json.dumps(transforms, indent=1))

    np.save(out_dir / "hull.npy", result.occupancy)
    hull_path = out_dir / "hull.json"
    aabb = result.hull_aabb if result.hull_aabb is not None else result.grid_aabb
    hull_path.write_text(json.dumps({
        "aabb": np.asarray(aabb).tolist(),
        "grid": "hull.npy",
        "grid_aabb": np.asarray(result.grid_aabb).tolist(),
        "grid_shape": list(result.occupancy.shape),
        "voxel": result.voxel,
        "max_miss_fraction": settings.hull_max_miss_fraction,
    }, indent=1))

    sheet_path = out_dir / "contact_sheet.jpg"
    cv2.imwrite(str(sheet_path), contact_sheet(images, result.masks, result.status, settings))

    stats_path = out_dir / "stats.json"
    counts = {s: result.status.count(s) for s in sorted(set(result.status))}
    stats_path.write_text(json.dumps({
        "frames": per_frame,
        "status_counts": counts,
        "first_pass_counts": dict(sorted(Counter(f.split(" ")[0] for f in first_sources or []).items())),
        "first_pass_rejected": sum(bool(f) for f in result.first_flags),
        "median_iou_with_hull": float(np.median(result.hull_iou)),
    }, indent=1))
    return {"transforms": transforms_path, "hull": hull_path, "contact_sheet": sheet_path, "stats": stats_path}
