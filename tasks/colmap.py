"""cameras stage: still frames → solved cameras in ``transforms.json`` (pycolmap 4.2.1).

SIFT features with one shared camera for the whole video, matching (exhaustive, or a
circular sequential window for a 360° orbit), incremental or global (GLOMAP) mapping, then
the largest model is turned into the nerfstudio / instant-ngp ``transforms.json`` in a
normalised product world (see ``tasks.geometry.normalizing_similarity``).

Outputs in ``out_dir``: ``transforms.json``, ``points.npy`` (``(N, 6)`` float32 xyz + rgb
0..1), ``point_views.npz`` (which frames saw which point), ``sparse/0`` (the COLMAP model, for
debugging) and ``database.db``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pycolmap

from tasks.geometry import (
    apply_similarity_to_points,
    apply_similarity_to_poses,
    normalizing_similarity,
    world_to_camera_cv_to_c2w_gl,
)
from tasks.types import CameraRig, FrameSet

MATCHERS = ("exhaustive", "sequential")
MAPPERS = ("incremental", "global")
# COLMAP camera models whose parameters we can write as transforms.json's OPENCV fields.
CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
DEVICES = ("auto", "cpu", "cuda")


class CameraSolveError(RuntimeError):
    """The video's frames could not be turned into enough solved cameras."""


@dataclass(frozen=True)
class ColmapSettings:
    """Every tunable of the cameras stage (conf/colmap/default.yaml documents each one)."""

    camera_model: str = "SIMPLE_RADIAL"
    default_focal_length_factor: float = 1.2
    focal_length_35mm: float = 0.0
    max_image_size: int = 1600
    max_num_features: int = 8192
    sift_peak_threshold: float = 0.003
    num_threads: int = -1
    device: str = "auto"
    matcher: str = "sequential"
    exhaustive_max_frames: int = 0
    sequential_overlap: int = 8
    quadratic_overlap: bool = False
    loop_closure: bool = True
    max_ratio: float = 0.8
    min_num_inliers: int = 15
    mapper: str = "incremental"
    init_min_num_inliers: int = 30
    init_min_tri_angle: float = 6.0
    abs_pose_min_num_inliers: int = 15
    refine_principal_point: bool = False
    random_seed: int = 0
    mapping_attempts: int = 3
    fallback_mapper: str = "global"
    min_registered_fraction: float = 0.6
    camera_distance: float = 2.0

    def __post_init__(self) -> None:
        checks = [
            (self.matcher in MATCHERS, f"matcher={self.matcher!r}: use one of {MATCHERS}"),
            (self.mapper in MAPPERS, f"mapper={self.mapper!r}: use one of {MAPPERS}"),
            (self.fallback_mapper in (*MAPPERS, "none"), f"fallback_mapper={self.fallback_mapper!r}: use one of {MAPPERS} or 'none'"),
            (self.mapping_attempts >= 1, "mapping_attempts must be >= 1"),
            (self.camera_model in CAMERA_MODELS, f"camera_model={self.camera_model!r}: use one of {CAMERA_MODELS}"),
            (self.device in DEVICES, f"device={self.device!r}: use one of {DEVICES}"),
            (0.0 < self.min_registered_fraction <= 1.0, "min_registered_fraction must be in (0, 1]"),
            (self.camera_distance > 0.0, "camera_distance must be > 0"),
            (self.sequential_overlap >= 1, "sequential_overlap must be >= 1"),
            (self.focal_length_35mm >= 0.0, "focal_length_35mm must be 0 (unknown) or the lens' 35 mm-equivalent focal in mm"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("bad colmap settings (conf/colmap/*.yaml): " + "; ".join(errors))


def read_frame_list(frames: FrameSet) -> list[dict]:
    """The frames.json entries in video order; raises ValueError naming the problem."""
    index = Path(frames.index)
    if not index.is_file():
        raise ValueError(f"FrameSet index {index} does not exist: rerun the frames stage")
    entries = json.loads(index.read_text()).get("frames", [])
    if len(entries) < 2:
        raise ValueError(f"FrameSet {index} lists {len(entries)} frames: at least 2 are needed")
    missing = [e["file"] for e in entries if not (Path(frames.dir) / e["file"]).is_file()]
    if missing:
        raise ValueError(f"FrameSet {index} lists frames missing from {frames.dir}: {missing[:5]}")
    sizes = {(int(e["width"]), int(e["height"])) for e in entries}
    if len(sizes) != 1:
        raise ValueError(f"FrameSet {index} mixes frame sizes {sorted(sizes)}: one camera needs one size")
    return entries


def orbit_pairs(names: list[str], overlap: int, quadratic: bool, loop_closure: bool) -> list[tuple[str, str]]:
    """Image pairs for a sequential video: each frame with its next ``overlap`` frames.

    ``quadratic`` adds the frames 2^k ahead (k < overlap), like COLMAP's quadratic overlap;
    ``loop_closure`` wraps the offsets around the end so a closed 360° orbit matches its
    last frames with its first ones.
    """
    n = len(names)
    offsets = set(range(1, overlap + 1))
    if quadratic:
        offsets |= {2**k for k in range(overlap) if 2**k < n}
    i = np.arange(n)[:, None]
    j = i + np.array(sorted(offsets))[None, :]
    if loop_closure:
        j = j % n
    keep = (j < n) & (j != i)
    a, b = np.broadcast_to(i, j.shape)[keep], j[keep]
    pair_ids = np.unique(np.sort(np.stack([a, b], axis=1), axis=1), axis=0)
    return [(names[p], names[q]) for p, q in pair_ids]


# Diagonal of a 35 mm film frame (36 x 24 mm): CIPA DC-008 defines the 35 mm-equivalent focal
# length by the diagonal, so it holds for any aspect ratio.
_FILM_DIAGONAL_MM = 43.267


def known_camera_params(settings: ColmapSettings, width: int, height: int) -> str:
    """COLMAP's parameter string for a camera of known focal length (``focal_length_35mm``).

    Why: a video that only circles the product at one height is a critical motion for
    self-calibration (Sturm 1997): the focal length trades against the product's height and
    bundle adjustment settles anywhere along that family (5 % low on the 1080p basket). A
    phone's own focal length, when known, removes the ambiguity.
    """
    focal = settings.focal_length_35mm * float(np.hypot(width, height)) / _FILM_DIAGONAL_MM
    cx, cy = width / 2.0, height / 2.0
    params = {
        "SIMPLE_PINHOLE": [focal, cx, cy],
        "PINHOLE": [focal, focal, cx, cy],
        "SIMPLE_RADIAL": [focal, cx, cy, 0.0],
        "RADIAL": [focal, cx, cy, 0.0, 0.0],
        "OPENCV": [focal, focal, cx, cy, 0.0, 0.0, 0.0, 0.0],
    }[settings.camera_model]
    return ",".join(f"{value:.6g}" for value in params)


def _device(settings: ColmapSettings) -> pycolmap.Device:
    return getattr(pycolmap.Device, settings.device)


def _extract(database: Path, image_dir: Path, names: list[str], settings: ColmapSettings, size: tuple[int, int]) -> None:
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = settings.camera_model
    reader.default_focal_length_factor = settings.default_focal_length_factor
    if settings.focal_length_35mm > 0:
        reader.camera_params = known_camera_params(settings, *size)
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = settings.max_image_size
    extraction.num_threads = settings.num_threads
    extraction.sift.max_num_features = settings.max_num_features
    extraction.sift.peak_threshold = settings.sift_peak_threshold
    pycolmap.extract_features(
        database,
        image_dir,
        image_names=names,
        camera_mode=pycolmap.CameraMode.SINGLE,
        reader_options=reader,
        extraction_options=extraction,
        device=_device(settings),
    )


def _match(database: Path, names: list[str], work_dir: Path, settings: ColmapSettings) -> str:
    """Match features; returns the matcher actually used (short videos go exhaustive)."""
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = settings.num_threads
    matching.sift.max_ratio = settings.max_ratio
    verification = pycolmap.TwoViewGeometryOptions()
    verification.min_num_inliers = settings.min_num_inliers
    use_exhaustive = settings.matcher == "exhaustive" or len(names) <= settings.exhaustive_max_frames
    if use_exhaustive:
        pycolmap.match_exhaustive(
            database, matching_options=matching, verification_options=verification, device=_device(settings)
        )
        return "exhaustive"
    # COLMAP's own sequential matcher cannot wrap around a closed orbit without a vocabulary
    # tree, so we list the circular window's pairs ourselves.
    pairs = orbit_pairs(names, settings.sequential_overlap, settings.quadratic_overlap, settings.loop_closure)
    pair_file = work_dir / "pairs.txt"
    pair_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    pairing = pycolmap.ImportedPairingOptions()
    pairing.match_list_path = str(pair_file)
    pycolmap.match_image_pairs(
        database,
        matching_options=matching,
        pairing_options=pairing,
        verification_options=verification,
        device=_device(settings),
    )
    return "sequential"


def _map(database: Path, image_dir: Path, models_dir: Path, settings: ColmapSettings) -> dict:
    if settings.mapper == "incremental":
        options = pycolmap.IncrementalPipelineOptions()
        options.num_threads = settings.num_threads
        options.random_seed = settings.random_seed
        options.min_num_matches = settings.min_num_inliers
        options.ba_refine_principal_point = settings.refine_principal_point
        options.ba_refine_focal_length = settings.focal_length_35mm <= 0
        options.mapper.init_min_num_inliers = settings.init_min_num_inliers
        options.mapper.init_min_tri_angle = settings.init_min_tri_angle
        options.mapper.abs_pose_min_num_inliers = settings.abs_pose_min_num_inliers
        return pycolmap.incremental_mapping(database, image_dir, models_dir, options)
    options = pycolmap.GlobalPipelineOptions()
    options.num_threads = settings.num_threads
    options.random_seed = settings.random_seed
    options.min_num_matches = settings.min_num_inliers
    options.mapper.bundle_adjustment.refine_principal_point = settings.refine_principal_point
    options.mapper.bundle_adjustment.refine_focal_length = settings.focal_length_35mm <= 0
    return pycolmap.global_mapping(database, image_dir, models_dir, options)


def _registered(rec: pycolmap.Reconstruction | None) -> int:
    return 0 if rec is None else sum(img.has_pose for img in rec.images.values())


def _map_until_enough(
    database: Path, image_dir: Path, models_dir: Path, settings: ColmapSettings, needed: int
) -> tuple[pycolmap.Reconstruction | None, list[dict]]:
    """Map, and if too few frames register, map again with another seed, then the other mapper.

    Threaded incremental mapping is not deterministic: now and then it starts from a poor
    initial pair and stops at two frames (seen 2 runs in 6 on a 48-frame turntable that
    otherwise registers all 48). Matching is kept; only mapping is repeated, which is cheap.
    """
    plans = [replace(settings, random_seed=settings.random_seed + i) for i in range(max(1, settings.mapping_attempts))]
    if settings.fallback_mapper not in ("none", settings.mapper):
        plans.append(replace(settings, mapper=settings.fallback_mapper))
    best, attempts = None, []
    for plan in plans:
        pycolmap.set_random_seed(plan.random_seed)
        rec = _largest_model(_map(database, image_dir, models_dir, plan))
        shutil.rmtree(models_dir)
        models_dir.mkdir()
        attempts.append({"mapper": plan.mapper, "seed": plan.random_seed, "registered": _registered(rec)})
        if _registered(rec) > _registered(best):
            best = rec
        if _registered(best) >= needed:
            break
    shutil.rmtree(models_dir)
    return best, attempts


def opencv_intrinsics(camera: pycolmap.Camera) -> dict[str, float]:
    """transforms.json's pinhole + OPENCV distortion fields from a COLMAP camera."""
    p = [float(x) for x in camera.params]
    model = camera.model_name
    if model == "SIMPLE_PINHOLE":
        fx = fy = p[0]
        cx, cy, k1, k2, p1, p2 = p[1], p[2], 0.0, 0.0, 0.0, 0.0
    elif model == "PINHOLE":
        fx, fy, cx, cy, k1, k2, p1, p2 = *p[:4], 0.0, 0.0, 0.0, 0.0
    elif model == "SIMPLE_RADIAL":
        fx = fy = p[0]
        cx, cy, k1, k2, p1, p2 = p[1], p[2], p[3], 0.0, 0.0, 0.0
    elif model == "RADIAL":
        fx = fy = p[0]
        cx, cy, k1, k2, p1, p2 = p[1], p[2], p[3], p[4], 0.0, 0.0
    elif model == "OPENCV":
        fx, fy, cx, cy, k1, k2, p1, p2 = p
    else:
        raise ValueError(f"camera model {model} cannot be written to transforms.json: use one of {CAMERA_MODELS}")
    return {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "k1": k1, "k2": k2, "p1": p1, "p2": p2}


def _largest_model(models: dict) -> pycolmap.Reconstruction | None:
    if not models:
        return None
    return max(models.values(), key=lambda rec: rec.num_reg_images())


def _seller_advice(registered: int, needed: int, total: int) -> str:
    return (
        f"only {registered} of {total} frames could be placed in 3D (at least {needed} needed). "
        "Film again: move slower and keep the product in frame, add more light, avoid "
        "blur and reflections, and put the product on a textured surface (a newspaper or "
        "patterned cloth) so its position can be tracked."
    )


POINT_VIEWS = "point_views.npz"


def write_point_views(path: Path, rec: pycolmap.Reconstruction, point_ids: list[int], xyz: np.ndarray, names: list[str]) -> None:
    """Which frames saw which sparse point: the depth prior of training (tasks/nerf/depth_prior.py).

    ``xyz [N, 3]`` float32 in the normalised world (rows of ``point_ids``), ``error [N]`` mean
    reprojection error in pixels, ``frame_names [F]`` the frames' file names, and one row per
    observation: ``view_point [M]`` (row of xyz) and ``view_frame [M]`` (row of frame_names).
    """
    frame_of = {name: i for i, name in enumerate(names)}
    image_frame = {image_id: frame_of.get(image.name, -1) for image_id, image in rec.images.items()}
    view_point, view_frame = [], []
    for row, point_id in enumerate(point_ids):
        for element in rec.points3D[point_id].track.elements:
            frame = image_frame.get(element.image_id, -1)
            if frame >= 0:
                view_point.append(row)
                view_frame.append(frame)
    np.savez_compressed(
        path, xyz=xyz.astype(np.float32), error=np.array([rec.points3D[i].error for i in point_ids], np.float32),
        frame_names=np.array([Path(n).name for n in names]), view_point=np.array(view_point, np.int32),
        view_frame=np.array(view_frame, np.int32),
    )


def solve_cameras(frames: FrameSet, out_dir: Path, settings: ColmapSettings, fingerprint: str) -> CameraRig:
    """Solve one shared camera and every frame's pose; write transforms.json and points.npy.

    Raises ``CameraSolveError`` when fewer than ``min_registered_fraction`` of the frames
    register, ``ValueError`` for a malformed FrameSet.
    """
    entries = read_frame_list(frames)
    names = [e["file"] for e in entries]
    image_dir = Path(frames.dir).resolve()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    database = out_dir / "database.db"
    models_dir = out_dir / "models"
    sparse_dir = out_dir / "sparse" / "0"
    for stale in (database, models_dir, sparse_dir):  # a rerun starts from scratch
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    models_dir.mkdir()
    pycolmap.set_random_seed(settings.random_seed)

    _extract(database, image_dir, names, settings, (frames.width, frames.height))
    matcher_used = _match(database, names, out_dir, settings)
    total = len(names)
    needed = int(np.ceil(settings.min_registered_fraction * total))
    rec, attempts = _map_until_enough(database, image_dir, models_dir, settings, needed)
    registered_names = set() if rec is None else {img.name for img in rec.images.values() if img.has_pose}
    if len(registered_names) < needed:
        raise CameraSolveError(_seller_advice(len(registered_names), needed, total))
    sparse_dir.mkdir(parents=True)
    rec.write(sparse_dir)

    by_name = {img.name: img for img in rec.images.values() if img.has_pose}
    ordered = [n for n in names if n in registered_names]
    w2c_cv = np.stack([by_name[n].cam_from_world().matrix() for n in ordered])  # (R, 3, 4)
    c2w = world_to_camera_cv_to_c2w_gl(w2c_cv)
    try:
        sim = normalizing_similarity(c2w, settings.camera_distance)
    except ValueError as err:
        raise CameraSolveError(f"solved cameras cannot be normalised ({err}): film an orbit around the product") from err
    c2w_world = apply_similarity_to_poses(sim, c2w)

    point_ids = list(rec.points3D.keys())
    xyz = np.array([rec.points3D[i].xyz for i in point_ids], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([rec.points3D[i].color for i in point_ids], dtype=np.float64).reshape(-1, 3) / 255.0
    points = np.concatenate([apply_similarity_to_points(sim, xyz), rgb], axis=1).astype(np.float32)
    points_path = out_dir / "points.npy"
    np.save(points_path, points)
    views_path = out_dir / POINT_VIEWS
    write_point_views(views_path, rec, point_ids, points[:, :3], ordered)

    camera = by_name[ordered[0]].camera
    reprojection_error = float(rec.compute_mean_reprojection_error())
    transforms = {
        "camera_model": "OPENCV",
        **opencv_intrinsics(camera),
        "w": int(camera.width),
        "h": int(camera.height),
        "frames": [
            {"file_path": os.path.relpath(image_dir / n, out_dir), "transform_matrix": m.tolist()}
            for n, m in zip(ordered, c2w_world)
        ],
        "korokoro": {
            "normalization": sim.tolist(),
            "registered": len(ordered),
            "total": total,
            "reprojection_error_px": reprojection_error,
            "mapper": settings.mapper,
            "mapping_attempts": attempts,
            "matcher": matcher_used,
            "colmap_camera_model": camera.model_name,
            "point_views": POINT_VIEWS,
            "settings": asdict(settings),
        },
    }
    transforms_path = out_dir / "transforms.json"
    transforms_path.write_text(json.dumps(transforms, indent=2))
    return CameraRig(
        dir=out_dir,
        transforms=transforms_path,
        points=points_path,
        registered=len(ordered),
        total=total,
        reprojection_error_px=reprojection_error,
        fingerprint=fingerprint,
    )
