"""detect stage: a 2D box (plus seed points) around the product in every registered frame.

Backends are registered by name (``detector=<name>`` in Hydra picks one). ``cv2`` is the
weight-free geometric detector: it finds the product in the sparse SfM points near the point the
cameras look at (the normalised world's origin), drops the floor, keeps the densely linked cluster
there, and projects that 3D box into every frame. ``auto`` / ``yolo`` / ``owlvit`` (the seed's
cascade: YOLOv8, then OWL-ViT, then ``cv2``; models on a subset of frames, boxes carried to the
rest through the cameras) live in ``tasks.detect_cascade`` and fill the same ``boxes.json``.

``boxes.json``::

    {"detector": str,                     # the backend that made the boxes (cv2, yolo, owlvit)
     "requested": str,                    # the detector= choice (auto falls back)
     "attempts": [{"detector": str, "outcome": str, ...}],   # model backends tried (auto / yolo / owlvit)
     "aabb": [[x0,y0,z0],[x1,y1,z1]] | null,   # product box, normalised world
     "floor_z": float | null,
     "frames": [{"file_path": str, "box": [x0,y0,x1,y1] | null, "score": float, "source": str,
                 "seeds_fg": [[u,v],...], "seeds_bg": [[u,v],...]}]}

Boxes and seeds are in pixels of the frame; fg seeds are projections of product points (inside
the silhouette whatever the occlusion), bg seeds are projections of other points that cannot lie
on the product in that view (outside the box, or in front of it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from tasks.isolation_geometry import Views, box_corners, load_views, project
from tasks.types import CameraRig, Detections


@dataclass(frozen=True)
class DetectorSettings:
    """Settings of the ``cv2`` geometric detector (conf/detector/cv2.yaml)."""

    name: str = "cv2"
    search_radius: float = 1.2  # only points this close to the origin are candidates (cameras sit at ~2.0)
    core_radius: float = 0.45  # the product's cluster is the one with most points this close to the origin
    min_points: int = 30  # fewer product points than this is an error (nothing to detect)
    link_scale: float = 2.5  # points link when closer than this × the median 4th-neighbour spacing
    floor_removal: bool = True  # fit and drop a horizontal floor plane under the product
    floor_tolerance: float = 0.015  # points this close to the floor plane count as floor
    floor_max_tilt_deg: float = 15.0  # the floor's normal must be within this angle of +Z
    floor_min_fraction: float = 0.1  # a floor must hold at least this fraction of the candidates
    floor_max_below_fraction: float = 0.05  # at most this fraction of candidates may lie under a floor
    floor_snap: float = 0.1  # extend the box down to the floor when its bottom is this close above it
    ransac_trials: int = 300  # plane hypotheses tried for the floor
    extent_percentile: float = 0.5  # box = [p, 100 - p] percentiles of the cluster (drops stray points)
    box_margin: float = 0.08  # 3D box grows by this fraction of its size on every side
    box_margin_px: float = 3.0  # 2D boxes grow by this many pixels on every side
    max_seeds: int = 400  # at most this many fg and this many bg seeds per frame
    seed: int = 0  # random seed (RANSAC, seed subsampling): same input → same boxes


@dataclass(frozen=True)
class FrameDetection:
    """One frame's box and seeds (pixels); ``box`` is None when the product is not in view."""

    file_path: str
    box: list[float] | None
    score: float
    source: str
    seeds_fg: list[list[float]]
    seeds_bg: list[list[float]]


@dataclass(frozen=True)
class DetectionResult:
    """What a backend returns: per-frame detections plus what it learnt in 3D (if anything)."""

    frames: list[FrameDetection]
    aabb: np.ndarray | None  # (2, 3) product box in the normalised world
    floor_z: float | None
    extra: dict[str, Any]


class Detector(Protocol):
    """A detection backend: cameras (+ an optional text query) → per-frame boxes."""

    def __call__(self, rig: CameraRig, views: Views, settings: Any, query: str) -> DetectionResult: ...


_REGISTRY: dict[str, tuple[type, Detector]] = {}


def register_detector(name: str, settings_type: type) -> Callable[[Detector], Detector]:
    """Decorator: make a backend selectable as ``detector=<name>`` with its settings dataclass."""

    def deco(fn: Detector) -> Detector:
        _REGISTRY[name] = (settings_type, fn)
        return fn

    return deco


def get_detector(name: str) -> tuple[type, Detector]:
    """The ``(settings dataclass, backend)`` registered as ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown detector {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def detector_settings(cfg: Mapping[str, Any]) -> Any:
    """Build the settings dataclass of the backend named by ``cfg['name']`` from a config dict."""
    settings_type, _ = get_detector(str(cfg.get("name", "cv2")))
    return settings_type(**cfg)


def detect_product(
    rig: CameraRig, out_dir: Path, settings: Any, fingerprint: str, query: str = ""
) -> Detections:
    """Run the backend named by ``settings.name`` on every frame and write ``out_dir/boxes.json``."""
    rig.check()
    _, backend = get_detector(settings.name)
    views = load_views(rig.transforms)
    result = backend(rig, views, settings, query)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes = out_dir / "boxes.json"
    used = str(result.extra.get("used", settings.name))
    payload = {
        "detector": used,
        "requested": settings.name,
        "query": query,
        "aabb": None if result.aabb is None else np.asarray(result.aabb).tolist(),
        "floor_z": result.floor_z,
        **{k: v for k, v in result.extra.items() if k != "used"},
        "frames": [asdict(f) for f in result.frames],
    }
    boxes.write_text(json.dumps(payload))
    found = sum(f.box is not None for f in result.frames)
    return Detections(dir=out_dir, boxes=boxes, detector=used, found=found, total=len(result.frames),
                      fingerprint=fingerprint)


# --------------------------------------------------------------------------- the cv2 backend


def load_points(path: Path) -> np.ndarray:
    """The rig's sparse points as ``(N, 3)`` float64 xyz (colour columns dropped)."""
    points = np.load(path)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"{path} must be an (N, 6) array of xyz rgb points, got shape {points.shape}")
    xyz = points[:, :3].astype(np.float64)
    return xyz[np.isfinite(xyz).all(axis=1)]


def fit_floor(points: np.ndarray, settings: DetectorSettings, rng: np.random.Generator) -> tuple[np.ndarray, float] | None:
    """RANSAC a near-horizontal plane that (almost) nothing lies under → ``(normal (3,), offset)``.

    The plane is ``normal · x = offset`` with ``normal`` pointing up (+Z side). Requiring few
    points below tells a floor from a product's flat top. None when no plane qualifies.
    """
    if len(points) < 3:
        return None
    triples = rng.integers(0, len(points), size=(settings.ransac_trials, 3))
    a, b, c = points[triples[:, 0]], points[triples[:, 1]], points[triples[:, 2]]
    normals = np.cross(b - a, c - a)
    norms = np.linalg.norm(normals, axis=1)
    valid = norms > 1e-12
    normals = normals[valid] / norms[valid, None]
    normals *= np.sign(normals[:, 2:3] + 1e-12)  # point every normal up
    offsets = np.einsum("kj,kj->k", normals, a[valid])
    level = normals[:, 2] >= np.cos(np.radians(settings.floor_max_tilt_deg))
    normals, offsets = normals[level], offsets[level]
    if len(normals) == 0:
        return None
    signed = points @ normals.T - offsets  # (N, K) height of every point over every plane
    inliers = (np.abs(signed) <= settings.floor_tolerance).mean(axis=0)
    below = (signed < -settings.floor_tolerance).mean(axis=0)
    score = np.where((inliers >= settings.floor_min_fraction) & (below <= settings.floor_max_below_fraction), inliers, -1)
    best = int(np.argmax(score))
    if score[best] < 0:
        return None
    # Refine on the inliers: least-squares horizontal-ish plane through them (z = mean for a level floor).
    on_plane = np.abs(signed[:, best]) <= settings.floor_tolerance
    centroid = points[on_plane].mean(axis=0)
    _, _, vt = np.linalg.svd(points[on_plane] - centroid, full_matrices=False)
    normal = vt[-1] * np.sign(vt[-1][2] + 1e-12)
    if normal[2] < np.cos(np.radians(settings.floor_max_tilt_deg)):
        normal = normals[best]
    return normal, float(normal @ centroid)


def product_cluster(points: np.ndarray, settings: DetectorSettings, source: str) -> tuple[np.ndarray, float | None]:
    """The product's points ``(M, 3)`` among ``points (N, 3)`` and the floor height under it (or None)."""
    near = points[np.linalg.norm(points, axis=1) <= settings.search_radius]
    hint = (
        f"{source}: found {{n}} points near the centre the cameras look at (need {settings.min_points}). "
        "The product was not reconstructed: film it closer and keep it in the middle of every frame, "
        "or raise detector.search_radius / lower detector.min_points."
    )
    if len(near) < settings.min_points:
        raise ValueError(hint.format(n=len(near)))
    floor_z = None
    rng = np.random.default_rng(settings.seed)
    if settings.floor_removal:
        plane = fit_floor(near, settings, rng)
        if plane is not None:
            normal, offset = plane
            near = near[near @ normal - offset > settings.floor_tolerance]
            floor_z = float(offset / normal[2])  # floor height at the origin
    if len(near) < settings.min_points:
        raise ValueError(hint.format(n=len(near)))
    # Density-adaptive linking: the link length follows the cloud's own spacing.
    tree = cKDTree(near)
    spacing, _ = tree.query(near, k=min(5, len(near)))
    link = settings.link_scale * float(np.median(spacing[:, -1]))
    pairs = tree.query_pairs(link, output_type="ndarray")
    from scipy.sparse import coo_matrix  # noqa: PLC0415

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(near), len(near)))
    _, labels = connected_components(graph, directed=False)
    in_core = np.linalg.norm(near, axis=1) <= settings.core_radius
    votes = np.bincount(labels[in_core], minlength=labels.max() + 1)
    best = int(np.argmax(votes))
    cluster = near[labels == best]
    if votes[best] == 0 or len(cluster) < settings.min_points:
        raise ValueError(hint.format(n=int(votes[best])))
    return cluster, floor_z


def product_box(cluster: np.ndarray, floor_z: float | None, settings: DetectorSettings) -> np.ndarray:
    """``(2, 3)`` box of the product cluster: robust percentiles, snapped to the floor, plus margin."""
    p = settings.extent_percentile
    lo, hi = np.percentile(cluster, p, axis=0), np.percentile(cluster, 100 - p, axis=0)
    if floor_z is not None and 0 <= lo[2] - floor_z <= settings.floor_snap:
        lo[2] = floor_z  # the product stands on the floor: its base points were removed with it
    pad = settings.box_margin * (hi - lo)
    return np.stack([lo - pad, hi + pad])


def _subsample(uv: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return uv if len(uv) <= count else uv[np.sort(rng.choice(len(uv), count, replace=False))]


def frame_detection(
    views: Views, index: int, aabb: np.ndarray, product: np.ndarray, others: np.ndarray,
    settings: DetectorSettings, rng: np.random.Generator,
) -> FrameDetection:
    """Box and seeds of one view from the product box, product points and the other points."""
    w, h = (float(s) for s in views.sizes[index])
    corners_uv, corners_depth = project(views, index, box_corners(aabb))
    if np.any(corners_depth <= 0):
        return FrameDetection(views.file_paths[index], None, 0.0, "cv2-points", [], [])
    m = settings.box_margin_px
    x0, y0 = np.maximum(corners_uv.min(0) - m, 0.0)
    x1, y1 = np.minimum(corners_uv.max(0) + m, [w, h])
    if x1 <= x0 or y1 <= y0:
        return FrameDetection(views.file_paths[index], None, 0.0, "cv2-points", [], [])
    fg, _ = project(views, index, product)
    in_frame = (fg[:, 0] >= 0) & (fg[:, 0] < w) & (fg[:, 1] >= 0) & (fg[:, 1] < h)
    score = float(in_frame.mean())  # share of the product's points that this view sees
    bg, bg_depth = project(views, index, others)
    in_box = (bg[:, 0] >= x0) & (bg[:, 0] < x1) & (bg[:, 1] >= y0) & (bg[:, 1] < y1)
    bg_frame = (bg[:, 0] >= 0) & (bg[:, 0] < w) & (bg[:, 1] >= 0) & (bg[:, 1] < h)
    in_front = bg_depth < corners_depth.min()  # nearer than the whole product box: cannot be product
    bg = bg[bg_frame & (~in_box | in_front)]
    return FrameDetection(
        file_path=views.file_paths[index],
        box=[float(x0), float(y0), float(x1), float(y1)],
        score=score,
        source="cv2-points",
        seeds_fg=np.round(_subsample(fg[in_frame], settings.max_seeds, rng), 2).tolist(),
        seeds_bg=np.round(_subsample(bg, settings.max_seeds, rng), 2).tolist(),
    )


@register_detector("cv2", DetectorSettings)
def detect_geometric(rig: CameraRig, views: Views, settings: DetectorSettings, query: str) -> DetectionResult:
    """The weight-free detector: product = the linked point cluster at the cameras' focus."""
    points = load_points(rig.points)
    cluster, floor_z = product_cluster(points, settings, str(rig.points))
    aabb = product_box(cluster, floor_z, settings)
    outside = ~np.all((points >= aabb[0]) & (points <= aabb[1]), axis=1)
    rng = np.random.default_rng(settings.seed)
    frames = [frame_detection(views, i, aabb, cluster, points[outside], settings, rng) for i in range(len(views))]
    # The lowest observed product point: where the base is when no floor was seen (plain backdrop).
    base_z = float(np.percentile(cluster[:, 2], settings.extent_percentile))
    extra = {"product_points": int(len(cluster)), "base_z": base_z}
    return DetectionResult(frames=frames, aabb=aabb, floor_z=floor_z, extra=extra)


# The model backends register themselves (imported last: they build on the names above).
from tasks import detect_cascade  # noqa: E402,F401
