"""Quality figures against a rendered turntable's truth: cameras, masks, geometry.

Estimated results live in the pipeline's normalised world; the truth in metres. The solved
camera centres, matched to the true ones frame by frame, give the similarity between them.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import trimesh
from scipy.spatial import cKDTree

from tests.truth import align_similarity, camera_errors, load_truth_cameras

Y_UP_TO_Z_UP = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # inverse of the GLB export's turn


def source_indices(frames_json: Path, transforms: Path) -> list[int]:
    """For each frame of ``transforms.json``, the index of the video frame it came from."""
    frames = json.loads(Path(frames_json).read_text())["frames"]
    by_name = {Path(f["file"]).name: f["source_index"] for f in frames}
    return [by_name[Path(f["file_path"]).name] for f in json.loads(Path(transforms).read_text())["frames"]]


def camera_quality(frames_json: Path, transforms: Path, truth_dir: Path) -> dict[str, float]:
    """Median rotation error (deg) and position error (fraction of the orbit radius)."""
    truth = load_truth_cameras(truth_dir)
    est = np.array([f["transform_matrix"] for f in json.loads(Path(transforms).read_text())["frames"]])
    true = truth.c2w[source_indices(frames_json, transforms)]
    rot, pos = camera_errors(est, true)
    radius = float(np.linalg.norm(truth.centers - truth.centers.mean(0), axis=1).mean())
    return {
        "rotation_error_deg_median": float(np.median(rot)),
        "position_error_of_radius_median": float(np.median(pos) / radius),
        "registered": int(len(est)),
        "frames": int(len(json.loads(Path(frames_json).read_text())["frames"])),
    }


def mask_quality(frames_json: Path, masks_transforms: Path, truth_dir: Path) -> dict[str, float]:
    """IoU of each predicted mask with the true mask of its video frame."""
    meta = json.loads(Path(masks_transforms).read_text())
    root = Path(masks_transforms).parent
    ious = []
    for frame, index in zip(meta["frames"], source_indices(frames_json, masks_transforms)):
        pred = cv2.imread(str(root / frame["mask_path"]), cv2.IMREAD_GRAYSCALE) > 127
        true = cv2.imread(str(Path(truth_dir) / "masks" / f"frame_{index:05d}.png"), cv2.IMREAD_GRAYSCALE) > 127
        if true.shape != pred.shape:
            true = cv2.resize(true.astype(np.uint8), pred.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        ious.append((pred & true).sum() / max((pred | true).sum(), 1))
    return {"mask_iou_median": float(np.median(ious)), "mask_iou_worst": float(np.min(ious))}


def glb_in_truth_frame(glb: Path, frames_json: Path, transforms: Path, truth_dir: Path) -> trimesh.Trimesh:
    """The exported GLB moved into the truth's metric, +Z-up world."""
    mesh = trimesh.load(glb, force="mesh")
    truth = load_truth_cameras(truth_dir)
    est = np.array([f["transform_matrix"] for f in json.loads(Path(transforms).read_text())["frames"]])[:, :3, 3]
    s, R, t = align_similarity(est, truth.centers[source_indices(frames_json, transforms)])
    z_up = np.asarray(mesh.vertices) @ Y_UP_TO_Z_UP.T
    return trimesh.Trimesh(vertices=s * z_up @ R.T + t, faces=mesh.faces, process=False)


def geometry_quality(estimate: trimesh.Trimesh, truth_mesh: Path, samples: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Chamfer distance and F-score at 1 % of the true bbox diagonal, both in metres and relative."""
    truth = trimesh.load(truth_mesh, force="mesh")
    diag = float(np.linalg.norm(truth.extents))
    est_pts = np.asarray(trimesh.sample.sample_surface(estimate, samples, seed=seed)[0])
    true_pts = np.asarray(trimesh.sample.sample_surface(truth, samples, seed=seed)[0])
    d_est, _ = cKDTree(true_pts).query(est_pts)
    d_true, _ = cKDTree(est_pts).query(true_pts)
    tau = 0.01 * diag
    precision, recall = float((d_est < tau).mean()), float((d_true < tau).mean())
    chamfer = 0.5 * (d_est.mean() + d_true.mean())
    extent_err = (estimate.extents - truth.extents) / truth.extents
    return {
        "chamfer_m": float(chamfer),
        "chamfer_of_diag": float(chamfer / diag),
        "fscore_1pct": 2 * precision * recall / max(precision + recall, 1e-12),
        "precision_1pct": precision,
        "recall_1pct": recall,
        "bbox_extent_error_max": float(np.abs(extent_err).max()),
        "bbox_diag_m": diag,
    }
