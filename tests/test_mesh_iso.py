"""The iso-level fitted to the masks: drops a fog shell, keeps thin-but-real density."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from tasks.mesh_iso import choose_iso_level, silhouette_iou
from tests.analytic_field import look_at

RADIUS = 0.6


def write_sphere_masks(out: Path, views: int = 8, size: int = 96) -> Path:
    """Exact masks of a sphere at the origin, ray-cast per pixel centre; returns transforms.json."""
    out.mkdir(parents=True, exist_ok=True)
    focal, frames = size * 1.2, []
    v, u = np.mgrid[0:size, 0:size] + 0.5
    rays = np.stack([(u - size / 2) / focal, -(v - size / 2) / focal, -np.ones_like(u)], -1)
    for k in range(views):
        angle = 2 * math.pi * k / views
        c2w = look_at(np.array([3.0 * math.cos(angle), 3.0 * math.sin(angle), 1.0]), np.zeros(3))
        d = rays @ c2w[:3, :3].T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        o = c2w[:3, 3]
        b = d @ o  # |o + t d| = R has a root where (d.o)^2 - (|o|^2 - R^2) >= 0
        hit = b * b - (o @ o - RADIUS**2) >= 0
        cv2.imwrite(str(out / f"mask_{k}.png"), hit.astype(np.uint8) * 255)
        frames.append({"file_path": f"mask_{k}.png", "mask_path": f"mask_{k}.png", "transform_matrix": c2w.tolist()})
    meta = {"fl_x": focal, "fl_y": focal, "cx": size / 2, "cy": size / 2, "w": size, "h": size, "frames": frames}
    (out / "transforms.json").write_text(json.dumps(meta))
    return out / "transforms.json"


def _grid(inner: float, fog: float, fog_radius: float, n: int = 96) -> tuple[np.ndarray, list[np.ndarray]]:
    """Density ``inner`` inside the sphere, ``fog`` out to ``fog_radius``, 0 beyond."""
    axes = [np.linspace(-1.0, 1.0, n) for _ in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    density = np.where(r < RADIUS, inner, np.where(r < fog_radius, fog, 0.0)).astype(np.float32)
    return density, axes


def test_fog_shell_is_left_out(tmp_path: Path) -> None:
    transforms = write_sphere_masks(tmp_path / "masks")
    density, axes = _grid(inner=60.0, fog=8.0, fog_radius=0.8)
    scores = silhouette_iou(density, axes, transforms, [5.0, 10.0, 40.0, 200.0], views=8, work_px=96)
    assert scores[5.0] < scores[10.0] - 0.2  # the fog's outline is far bigger than the masks
    assert scores[10.0] > 0.9 and scores[40.0] > 0.9
    assert scores[200.0] == 0.0  # above every density: nothing left
    assert choose_iso_level(scores, tolerance=0.01) == 10.0  # the loosest level above the fog
    assert choose_iso_level({5.0: 0.5, 10.0: 0.90, 40.0: 0.95}, tolerance=0.01) == 40.0  # unless it fits worse


def test_faint_product_is_not_cut_away(tmp_path: Path) -> None:
    # A half-transparent product (as a NeRF leaves thin walls): only low levels keep it.
    transforms = write_sphere_masks(tmp_path / "masks")
    density, axes = _grid(inner=12.0, fog=0.0, fog_radius=0.6)
    scores = silhouette_iou(density, axes, transforms, [5.0, 10.0, 40.0], views=8, work_px=96)
    assert scores[40.0] == 0.0  # a fixed level of 40 would lose the whole product
    assert choose_iso_level(scores, tolerance=0.01) < 12.0
