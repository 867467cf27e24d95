"""Ground truth for tests: a rendered turntable's true cameras and how far estimates are from them.

``tools.turntable.render_turntable`` writes ``<out>/truth/cameras.json`` (fl_x, fl_y, cx, cy,
w, h, ``frames[].transform_matrix`` 4x4 c2w in OpenGL axes, world in metres, +Z up).
Estimated cameras live in another world (COLMAP's, or our normalised one), so they are
compared after a similarity alignment of the camera centres (Umeyama 1991).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TruthCameras:
    """A turntable's true cameras. ``c2w``: ``(N, 4, 4)`` OpenGL camera-to-world, metres."""

    c2w: np.ndarray
    fl_x: float
    fl_y: float
    cx: float
    cy: float
    w: int
    h: int
    raw: dict

    @property
    def centers(self) -> np.ndarray:
        """``(N, 3)`` camera centres."""
        return self.c2w[:, :3, 3]


def load_truth_cameras(truth_dir: Path) -> TruthCameras:
    """Read ``truth_dir/cameras.json`` (``truth_dir`` is the turntable's ``truth`` folder)."""
    raw = json.loads((Path(truth_dir) / "cameras.json").read_text())
    frames = sorted(raw["frames"], key=lambda f: f.get("index", 0))
    c2w = np.array([f["transform_matrix"] for f in frames], dtype=np.float64)
    return TruthCameras(
        c2w=c2w,
        fl_x=float(raw["fl_x"]),
        fl_y=float(raw["fl_y"]),
        cx=float(raw["cx"]),
        cy=float(raw["cy"]),
        w=int(raw["w"]),
        h=int(raw["h"]),
        raw=raw,
    )


def align_similarity(src_centers: np.ndarray, dst_centers: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Umeyama least-squares similarity with ``dst ≈ s * R @ src + t``.

    ``src_centers``, ``dst_centers``: ``(N, 3)`` matched points, N ≥ 3 not collinear.
    Returns ``(s, R (3, 3), t (3,))``.
    """
    src = np.asarray(src_centers, dtype=np.float64)
    dst = np.asarray(dst_centers, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 3:
        raise ValueError(f"align_similarity needs two (N>=3, 3) arrays, got {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    # Keep a proper rotation: flip the weakest axis when the best orthogonal map is a reflection.
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0
    rot = u @ np.diag(d) @ vt
    var_src = (src_c**2).sum() / len(src)
    scale = float((sing * d).sum() / var_src)
    trans = mu_dst - scale * rot @ mu_src
    return scale, rot, trans


def rotation_angle_deg(rot_a: np.ndarray, rot_b: np.ndarray) -> np.ndarray:
    """Angles in degrees of ``rot_a^T rot_b`` for ``(N, 3, 3)`` stacks → ``(N,)``."""
    rel = np.einsum("nji,njk->nik", rot_a, rot_b)
    cos = (np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def camera_errors(est_c2w: np.ndarray, true_c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-camera errors of estimated vs true poses, after aligning the estimated centres.

    ``est_c2w``, ``true_c2w``: ``(N, 4, 4)`` matched c2w (same camera axes convention).
    Returns ``(rotation_error_deg (N,), position_error (N,))``, positions in the true world's
    units (metres for turntables).
    """
    est = np.asarray(est_c2w, dtype=np.float64)
    true = np.asarray(true_c2w, dtype=np.float64)
    scale, rot, trans = align_similarity(est[:, :3, 3], true[:, :3, 3])
    aligned_centers = scale * est[:, :3, 3] @ rot.T + trans
    aligned_rots = rot[None] @ est[:, :3, :3]
    position_error = np.linalg.norm(aligned_centers - true[:, :3, 3], axis=1)
    return rotation_angle_deg(aligned_rots, true[:, :3, :3]), position_error
