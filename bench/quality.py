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


def source_index_by_name(frames_json: Path) -> dict[str, int]:
    """Frame file name → the index of the video frame it came from (``frames.json``)."""
    return {Path(f["file"]).name: f["source_index"] for f in json.loads(Path(frames_json).read_text())["frames"]}


def source_indices(frames_json: Path, transforms: Path) -> list[int]:
    """For each frame of ``transforms.json``, the index of the video frame it came from."""
    by_name = source_index_by_name(frames_json)
    return [by_name[Path(f["file_path"]).name] for f in json.loads(Path(transforms).read_text())["frames"]]


def true_mask(truth_dir: Path, source_index: int, width: int, height: int,
              undistort: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The turntable's mask of video frame ``source_index`` at ``width`` x ``height``. → ``[H, W]`` bool.

    Shrunk the way the frames stage shrinks frames (area averaging), thresholded at one half.
    ``undistort`` = (K, distortion) of the frame as solved: the mask is resampled the way the
    training capture resamples its frames and masks (tasks/nerf/dataset.py), so both line up.
    """
    path = Path(truth_dir) / "masks" / f"frame_{source_index:05d}.png"
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"true mask {path} is missing; render the turntable again with tools/turntable.py")
    mask = np.where(cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA) > 127, 255, 0).astype(np.uint8)
    if undistort is not None and np.any(undistort[1] != 0):
        k, dist = undistort
        map_x, map_y = cv2.initUndistortRectifyMap(k, dist, None, k, (width, height), cv2.CV_32FC1)
        mask = cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return mask > 127


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


def world_to_truth(frames_json: Path, transforms: Path, truth_dir: Path) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity ``(s, R (3, 3), t (3,))`` from the pipeline's normalised +Z-up world to the
    truth's metric world, fitted on the solved vs true camera centres."""
    truth = load_truth_cameras(truth_dir)
    est = np.array([f["transform_matrix"] for f in json.loads(Path(transforms).read_text())["frames"]])[:, :3, 3]
    return align_similarity(est, truth.centers[source_indices(frames_json, transforms)])


def glb_in_truth_frame(glb: Path, frames_json: Path, transforms: Path, truth_dir: Path) -> trimesh.Trimesh:
    """The exported GLB moved into the truth's metric, +Z-up world."""
    mesh = trimesh.load(glb, force="mesh")
    s, R, t = world_to_truth(frames_json, transforms, truth_dir)
    z_up = np.asarray(mesh.vertices) @ Y_UP_TO_Z_UP.T
    return trimesh.Trimesh(vertices=s * z_up @ R.T + t, faces=mesh.faces, process=False)


def refine_alignment(
    source: np.ndarray, target: np.ndarray, max_dist: float, iterations: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Trimmed point-to-point ICP, rigid: ``target ≈ source @ R.T + t``.

    ``source`` ``(N, 3)``, ``target`` ``(M, 3)``; pairs farther apart than ``max_dist`` are
    ignored, so parts one surface has and the other lacks do not pull. Returns ``(R (3, 3), t (3,))``.
    Why: aligning through the solved camera centres carries the cameras' own error (a few
    millimetres at 1 % of the orbit radius) into the geometry figures; Tanks and Temples'
    evaluation refines its alignment the same way.
    """
    tree = cKDTree(target)
    R, t = np.eye(3), np.zeros(3)
    for _ in range(iterations):
        moved = source @ R.T + t
        d, j = tree.query(moved, distance_upper_bound=max_dist, workers=-1)
        ok = np.isfinite(d)
        if ok.sum() < 10:
            break
        a, b = moved[ok], target[j[ok]]
        mu_a, mu_b = a.mean(0), b.mean(0)
        u, _, vt = np.linalg.svd((b - mu_b).T @ (a - mu_a))
        step = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0]) @ vt
        R, t = step @ R, step @ (t - mu_a) + mu_b
    return R, t


def _surface_figures(est_pts: np.ndarray, true_pts: np.ndarray, diag: float) -> dict[str, float]:
    d_est, _ = cKDTree(true_pts).query(est_pts, workers=-1)
    d_true, _ = cKDTree(est_pts).query(true_pts, workers=-1)
    tau = 0.01 * diag
    precision, recall = float((d_est < tau).mean()), float((d_true < tau).mean())
    chamfer = 0.5 * (d_est.mean() + d_true.mean())
    return {
        "chamfer_m": float(chamfer),
        "chamfer_of_diag": float(chamfer / diag),
        "fscore_1pct": 2 * precision * recall / max(precision + recall, 1e-12),
        "precision_1pct": precision,
        "recall_1pct": recall,
    }


def geometry_quality(estimate: trimesh.Trimesh, truth_mesh: Path, samples: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Chamfer distance and F-score at 1 % of the true bbox diagonal, both in metres and relative.

    Reported twice: aligned through the cameras only, and (keys ending ``_icp``) after a rigid
    ICP refinement of that alignment (``icp_shift_m`` and ``icp_rotation_deg`` say how far it moved).
    """
    truth = trimesh.load(truth_mesh, force="mesh")
    diag = float(np.linalg.norm(truth.extents))
    est_pts = np.asarray(trimesh.sample.sample_surface(estimate, samples, seed=seed)[0])
    true_pts, true_faces = trimesh.sample.sample_surface(truth, samples, seed=seed)
    true_pts = np.asarray(true_pts)
    figures = _surface_figures(est_pts, true_pts, diag)
    R, t = refine_alignment(est_pts[::8], true_pts, max_dist=0.03 * diag)
    aligned = est_pts @ R.T + t
    figures.update({f"{k}_icp": v for k, v in _surface_figures(aligned, true_pts, diag).items()})
    # Recall split by which way the true surface faces: an orbit above the product never sees its
    # underside (normal pointing down), so that part says how the unseen base was closed.
    d_true, _ = cKDTree(aligned).query(true_pts, workers=-1)
    normals = np.asarray(truth.face_normals)[true_faces]
    down, inward = facing_parts(true_pts, normals, truth.bounds.mean(0))
    figures["underside_fraction"] = float(down.mean())
    figures["recall_1pct_icp_underside"] = float((d_true[down] < 0.01 * diag).mean()) if down.any() else None
    figures["recall_1pct_icp_rest"] = float((d_true[~down] < 0.01 * diag).mean())
    # ...and the inside of an open product (a basket's inner walls), seen only through its opening.
    figures["inward_fraction"] = float(inward.mean())
    figures["recall_1pct_icp_inward"] = float((d_true[inward] < 0.01 * diag).mean()) if inward.any() else None
    figures.update(precision_by_facing(aligned, true_pts, normals, diag))
    figures["icp_shift_m"] = float(np.linalg.norm(aligned.mean(0) - est_pts.mean(0)))
    figures["icp_rotation_deg"] = float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))
    extent_err = (estimate.extents - truth.extents) / truth.extents
    figures["bbox_extent_error_max"] = float(np.abs(extent_err).max())
    figures["bbox_diag_m"] = diag
    return figures


def facing_parts(points: np.ndarray, normals: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which surface samples ``[N, 3]`` (normals ``[N, 3]``) face down (normal z < -0.7: the
    underside an orbit above never sees) and which face in (sideways normals pointing towards the
    vertical axis through ``centre [3]``: an open product's inner walls) → two ``[N]`` bool masks."""
    towards_axis = np.einsum("ij,ij->i", normals[:, :2], points[:, :2] - centre[:2]) < 0
    return normals[:, 2] < -0.7, towards_axis & (np.abs(normals[:, 2]) <= 0.7)


def precision_by_facing(est_pts: np.ndarray, true_pts: np.ndarray, true_normals: np.ndarray, diag: float) -> dict[str, float | None]:
    """Where the estimate misses, and which way: precision at 1 % split by the facing of the
    nearest true surface (``top`` normal z > 0.7, ``bottom`` < -0.7, ``side``), and the median
    signed offset along that normal (positive: the estimate lies outside, i.e. inflated).

    est_pts ``[N, 3]``, true_pts ``[M, 3]`` with the normals ``[M, 3]`` of the faces they lie on.
    """
    d_est, nearest = cKDTree(true_pts).query(est_pts, workers=-1)
    normals = true_normals[nearest]
    offset = np.einsum("ij,ij->i", est_pts - true_pts[nearest], normals)
    near = d_est < 0.03 * diag  # outliers say nothing about a bias
    figures: dict[str, float | None] = {}
    for name, part in (("top", normals[:, 2] > 0.7), ("bottom", normals[:, 2] < -0.7), ("side", np.abs(normals[:, 2]) <= 0.7)):
        figures[f"precision_1pct_icp_{name}"] = float((d_est[part] < 0.01 * diag).mean()) if part.any() else None
        both = part & near
        figures[f"offset_median_of_diag_{name}"] = float(np.median(offset[both]) / diag) if both.any() else None
    return figures


def rounded_geometry(estimate: trimesh.Trimesh, truth_mesh: Path) -> dict[str, float | None]:
    """:func:`geometry_quality` with its figures rounded for a table row."""
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in geometry_quality(estimate, truth_mesh).items()}


def markdown_table(rows: list[dict], keys: list[str] | tuple[str, ...]) -> str:
    """``rows`` as a Markdown table of ``keys`` (missing values print as None)."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def run_figures(train_metrics: dict, mesh_metrics: dict) -> dict[str, float | int | None]:
    """The figures every run records in its stages' metrics.json (train: PSNR and SSIM on object
    pixels of the held-out frames, training time, peak memory; mesh: triangles, file sizes)."""
    extra = train_metrics.get("extra") or {}
    return {
        "psnr_holdout_object": extra.get("psnr_holdout_object"),
        "ssim_holdout_object": extra.get("ssim_holdout_object"),
        "train_seconds": train_metrics.get("seconds"),
        "train_peak_memory_mb": train_metrics.get("peak_memory_mb"),
        "triangles": mesh_metrics.get("triangles"),
        "glb_bytes": mesh_metrics.get("glb_bytes"),
        "obj_bytes": mesh_metrics.get("obj_bytes"),
        "usdz_bytes": mesh_metrics.get("usdz_bytes"),
    }
