"""A :class:`CameraRig` built from a rendered turntable's truth, without running COLMAP.

``build_rig_fixture(turntable_dir, out_dir)`` turns ``tools.turntable.render_turntable`` output
into what the colmap stage would hand over:

- ``out_dir/images/frame_00000.png ...``: the decoded video frames (upright);
- ``out_dir/transforms.json``: the true cameras moved into the normalised product world
  (origin = where the cameras look, +Z up, mean camera distance ``camera_distance``) with
  ``tasks.geometry.normalizing_similarity``, the same convention the colmap stage uses;
- ``out_dir/points.npy``: ``(N, 6)`` float32 sparse points (xyz, rgb in 0..1) in that world:
  points on the true mesh (with a little noise, seen-from-above faces only, like a real SfM
  cloud) plus background points on the floor around the object and far away on the walls, so
  a detector must really pick the product out of them.

It also returns a :class:`RigTruth` (true masks, the similarity, the true object box in the
normalised world) for scoring. Reuse it in any test that needs cameras without COLMAP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.geometry import apply_similarity_to_points, apply_similarity_to_poses, normalizing_similarity
from tasks.types import CameraRig


@dataclass(frozen=True)
class RigTruth:
    """What the fixture knows for certain, in the normalised world."""

    masks: tuple[Path, ...]  # true object masks, one per frame, uint8 255 = object
    similarity: np.ndarray  # (4, 4) metres world → normalised world
    object_aabb: np.ndarray  # (2, 3) min/max corner of the true mesh, normalised world
    floor_z: float  # height of the floor plane (the object's base), normalised world

    def load_masks(self) -> list[np.ndarray]:
        """True masks as ``(H, W)`` bool arrays."""
        return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 127 for p in self.masks]


def decode_video_frames(video: Path) -> list[np.ndarray]:
    """All frames of ``video`` as upright ``(H, W, 3)`` uint8 BGR arrays (honours display rotation)."""
    import av  # noqa: PLC0415

    frames = []
    with av.open(str(video)) as container:
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="bgr24")
            turns = int(getattr(frame, "rotation", 0) or 0) // 90
            frames.append(np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image)
    if not frames:
        raise ValueError(f"{video} has no decodable video frames")
    return frames


def _surface_points(mesh_path: Path, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3)`` points on the visible (not downward-facing) surface of the true mesh, metres."""
    import trimesh  # noqa: PLC0415

    mesh = trimesh.load(mesh_path, force="mesh", process=False)
    # Oversample, then drop the bottom (faces looking down are never seen by an orbit above it).
    points, face_index = trimesh.sample.sample_surface(mesh, count * 2, seed=int(rng.integers(1 << 31)))
    keep = mesh.face_normals[face_index][:, 2] > -0.5
    points = np.asarray(points)[keep]
    return points[:count]


def build_rig_fixture(
    turntable_dir: Path,
    out_dir: Path,
    *,
    object_points: int = 1500,
    floor_points: int = 1500,
    far_points: int = 800,
    noise_fraction: float = 0.004,
    camera_distance: float = 2.0,
    seed: int = 0,
) -> tuple[CameraRig, RigTruth]:
    """Write a CameraRig fixture from ``turntable_dir`` (a ``render_turntable`` output) into ``out_dir``.

    ``object_points`` sampled on the mesh get Gaussian noise of ``noise_fraction`` × object
    diagonal; ``floor_points`` lie on the floor (z = 0) in a ring from just outside the object to
    3 object diagonals away; ``far_points`` lie on a far cylinder (walls). Set the background
    counts to 0 for a product floating in nothing.
    """
    turntable_dir, out_dir = Path(turntable_dir), Path(out_dir)
    truth_dir = turntable_dir / "truth"
    cameras = json.loads((truth_dir / "cameras.json").read_text())
    frames_meta = sorted(cameras["frames"], key=lambda f: f.get("index", 0))
    c2w = np.array([f["transform_matrix"] for f in frames_meta], dtype=np.float64)
    images = decode_video_frames(turntable_dir / "video.mp4")
    if len(images) != len(c2w):
        raise ValueError(f"{turntable_dir}: {len(images)} video frames but {len(c2w)} cameras")

    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    sim = normalizing_similarity(c2w, camera_distance)
    c2w_norm = apply_similarity_to_poses(sim, c2w)
    frames = []
    for i, (image, pose) in enumerate(zip(images, c2w_norm)):
        name = f"frame_{i:05d}.png"
        cv2.imwrite(str(image_dir / name), image)
        frames.append({"file_path": f"images/{name}", "transform_matrix": pose.tolist(), "colmap_im_id": i + 1})
    transforms = {
        "camera_model": "OPENCV",
        **{k: cameras[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")},
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "frames": frames,
        "korokoro": {"normalization": sim.tolist(), "source": "tests.rig_fixtures (true cameras)"},
    }
    transforms_path = out_dir / "transforms.json"
    transforms_path.write_text(json.dumps(transforms, indent=1))

    rng = np.random.default_rng(seed)
    meta = json.loads((truth_dir / "meta.json").read_text())
    lo, hi = np.asarray(meta["bbox_min_m"]), np.asarray(meta["bbox_max_m"])
    diag = float(np.linalg.norm(hi - lo))
    on_object = _surface_points(truth_dir / "mesh.ply", object_points, rng)
    on_object = on_object + rng.normal(scale=noise_fraction * diag, size=on_object.shape)
    radius = rng.uniform(0.6 * diag, 3.0 * diag, size=floor_points)
    angle = rng.uniform(0.0, 2 * np.pi, size=floor_points)
    floor = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.normal(scale=1e-3 * diag, size=floor_points)], 1)
    far_r = float(np.linalg.norm(c2w[:, :3, 3], axis=1).mean()) * 2.5
    angle = rng.uniform(0.0, 2 * np.pi, size=far_points)
    far = np.stack([far_r * np.cos(angle), far_r * np.sin(angle), rng.uniform(0.0, far_r, far_points)], 1)
    xyz = apply_similarity_to_points(sim, np.concatenate([on_object, floor, far]))
    rgb = rng.uniform(0.0, 1.0, size=xyz.shape)
    points_path = out_dir / "points.npy"
    np.save(points_path, np.concatenate([xyz, rgb], axis=1).astype(np.float32))

    box = np.stack([lo, hi])
    corners = apply_similarity_to_points(sim, box[np.indices((2, 2, 2)).reshape(3, -1).T, [0, 1, 2]])
    rig = CameraRig(
        dir=out_dir,
        transforms=transforms_path,
        points=points_path,
        registered=len(frames),
        total=len(frames),
        reprojection_error_px=0.0,
        fingerprint=f"fixture-{turntable_dir.name}-{seed}",
    )
    truth = RigTruth(
        masks=tuple(truth_dir / "masks" / f"frame_{i:05d}.png" for i in range(len(frames))),
        similarity=sim,
        object_aabb=np.stack([corners.min(0), corners.max(0)]),
        floor_z=float(apply_similarity_to_points(sim, np.zeros((1, 3)))[0, 2]),
    )
    return rig, truth


def render_rig_fixture(
    object_name: str,
    out_dir: Path,
    *,
    background: str = "plain",
    frames: int = 24,
    width: int = 240,
    height: int = 180,
    seed: int = 0,
    **fixture_kwargs,
) -> tuple[CameraRig, RigTruth]:
    """Render a turntable of ``object_name`` under ``out_dir/turntable`` and build its rig in ``out_dir/rig``."""
    from tools.turntable import render_turntable  # noqa: PLC0415

    out_dir = Path(out_dir)
    render_turntable(object_name, out_dir / "turntable", frames=frames, width=width, height=height,
                     background=background, seed=seed)
    return build_rig_fixture(out_dir / "turntable", out_dir / "rig", seed=seed, **fixture_kwargs)
