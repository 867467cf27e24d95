"""``detector=auto|yolo|owlvit``: the seed's cascade, run on a few frames and carried to all through the cameras.

``auto`` tries YOLOv8 (only when the product's category or name is a COCO class), then OWL-ViT
(queried with the product's name), then the weight-free ``cv2`` detector; a backend whose weights
are absent is passed over (one log line says so), as is one that finds nothing. ``yolo`` and
``owlvit`` force one model: missing weights or nothing found is then an error.

A model looks at ``detect_frames`` frames spread around the orbit. In each, the box kept is the
best-scoring one that contains the point all cameras look at (the normalised world's origin: the
product), else the best-scoring one. The cameras are known, so the kept boxes carve a voxel hull
(each box's frustum, by vote); boxes that disagree with it are dropped and it is carved again
from the rest; its projection is then the box in every frame (``<model>-propagated``), the
agreeing frames keep the model's own box. Seed points (for SAM and GrabCut) come from the
weight-free detector when it works: projections of the product's sparse points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tasks import isolation_geometry as geo
from tasks.detect import DetectionResult, DetectorSettings, FrameDetection, detect_geometric, register_detector
from tasks.detect_models import FINDERS, Candidates, Skipped
from tasks.isolation_weights import MissingWeights, owlvit_weights, require, weights_folder, yolo_weights
from tasks.types import CameraRig

log = logging.getLogger(__name__)
WEIGHTS = {"yolo": yolo_weights, "owlvit": owlvit_weights}


@dataclass(frozen=True)
class ModelDetectorSettings(DetectorSettings):
    """Settings of ``detector=auto|yolo|owlvit`` (conf/detector/auto.yaml); the cv2 fields drive the fallback and seeds."""

    weights_dir: str = "~/.cache/korokoro/weights"  # the weights folder (conf: ${weights_dir})
    device: str = "auto"  # torch device for the models; auto = cuda when available
    detect_frames: int = 8  # frames the models look at, spread evenly over the capture order
    batch_size: int = 8  # frames per model forward
    min_detected_frames: int = 3  # fewer frames whose box agrees with the others = the model found nothing
    # YOLOv8 (ultralytics)
    yolo_weights: str = "yolov8x.pt"
    yolo_url: str = "https://github.com/ultralytics/assets/releases/download/v8.4.0/yolov8x.pt"
    yolo_confidence: float = 0.25  # keep boxes scoring at least this
    yolo_iou: float = 0.7  # non-maximum suppression IoU
    yolo_image_size: int = 640  # the model's input size (long side)
    yolo_max_detections: int = 50
    # OWL-ViT (transformers)
    owlvit_weights: str = "owlvit-base-patch32"  # snapshot folder in the weights folder
    owlvit_hub_id: str = "google/owlvit-base-patch32"
    owlvit_threshold: float = 0.1  # keep boxes scoring above this
    # carrying boxes to every frame
    propagation_resolution: int = 48  # voxels along the search cube's side (cube half-size = search_radius)
    propagation_max_miss_fraction: float = 0.2  # a voxel survives when at most this fraction of the boxes miss it
    min_agreement_iou: float = 0.5  # a model box agrees when its IoU with the hull's projection reaches this


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of boxes ``a (N, 4)`` and ``b (N, 4)`` (xyxy)."""
    lo, hi = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def subset_indices(views: geo.Views, count: int) -> np.ndarray:
    """``count`` view indices spread evenly over the capture order (file names sorted)."""
    order = np.argsort(np.array(views.file_paths), kind="stable")
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(count, len(order)))).astype(np.intp))
    return order[picks]


def pick_box(candidates: Candidates, centre_uv: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The best-scoring box containing ``centre_uv (2,)`` (the product's image position), else the best one."""
    if len(candidates.scores) == 0:
        return None
    b = candidates.boxes
    with np.errstate(invalid="ignore"):
        holds = (b[:, 0] <= centre_uv[0]) & (centre_uv[0] <= b[:, 2]) & (b[:, 1] <= centre_uv[1]) & (centre_uv[1] <= b[:, 3])
    k = int(np.flatnonzero(holds)[0]) if holds.any() else 0  # scores are sorted best first
    return candidates.boxes[k], float(candidates.scores[k])


def projected_boxes(views: geo.Views, region: np.ndarray, voxel: float) -> np.ndarray:
    """``(N, 4)`` xyxy box of the voxels centred at ``region (M, 3)`` in every view (nan where behind)."""
    corners = (region[:, None, :] + (np.indices((2, 2, 2)).reshape(3, -1).T - 0.5) * voxel).reshape(-1, 3)
    out = np.full((len(views), 4), np.nan)
    for i in range(len(views)):
        uv, depth = geo.project(views, i, corners)
        if np.all(depth > 0):
            w, h = views.sizes[i]
            out[i] = np.clip(np.concatenate([uv.min(0), uv.max(0)]), 0, [w, h, w, h])
    return out


def carve_boxes(views: geo.Views, boxes: dict[int, np.ndarray], settings: ModelDetectorSettings,
                max_miss_fraction: float) -> tuple[np.ndarray, float]:
    """Voxel centres ``(M, 3)`` inside the frusta of ``boxes`` (view index → xyxy) but for at most
    ``max_miss_fraction`` of them, and the voxel edge.

    The search cube spans ``search_radius`` around the origin. Unlike a mask hull, a voxel outside
    a frame counts as a miss there: the product's box is inside the frame.
    """
    half = settings.search_radius
    centers, _, voxel = geo.grid_centers(np.array([[-half] * 3, [half] * 3]), settings.propagation_resolution)
    misses = np.zeros(len(centers), dtype=np.int32)
    for i, box in boxes.items():
        uv, depth = geo.project(views, i, centers)
        with np.errstate(invalid="ignore"):  # nan (behind the camera) compares False: a miss
            inside = (depth > 0) & (uv[:, 0] >= box[0]) & (uv[:, 0] <= box[2]) & (uv[:, 1] >= box[1]) & (uv[:, 1] <= box[3])
        misses += ~inside
    allowed = int(np.floor(max_miss_fraction * len(boxes)))
    return centers[misses <= allowed].astype(np.float64), voxel


@dataclass(frozen=True)
class Propagated:
    """What a model's boxes on the subset tell about every frame."""

    boxes: np.ndarray  # (N, 4) xyxy per view, nan where the product is behind the camera
    agree: dict[int, np.ndarray]  # view index → the model's own box, for the boxes that agree
    aabb: np.ndarray  # (2, 3) the hull's box in the normalised world
    scores: dict[int, float]


def propagate(views: geo.Views, picked: dict[int, tuple[np.ndarray, float]], settings: ModelDetectorSettings) -> Propagated | str:
    """Carry boxes found on a few views to every view; a reason string when they do not agree.

    A voting carve (``propagation_max_miss_fraction`` of the boxes may miss a voxel) finds the
    boxes that disagree with the rest; the agreeing ones are then carved strictly (the tightest hull).
    """
    boxes = {i: b for i, (b, _) in picked.items()}
    region, voxel = carve_boxes(views, boxes, settings, settings.propagation_max_miss_fraction)
    if len(region) == 0:
        return "the boxes' frusta share no volume"
    keys = np.array(sorted(boxes))
    iou = box_iou(np.array([boxes[i] for i in keys]), np.nan_to_num(projected_boxes(views, region, voxel)[keys]))
    agreeing = {int(i): boxes[int(i)] for i in keys[iou >= settings.min_agreement_iou]}
    if len(agreeing) < settings.min_detected_frames:
        return f"only {len(agreeing)} of {len(picked)} boxes agree with the others (need {settings.min_detected_frames})"
    region, voxel = carve_boxes(views, agreeing, settings, 0.0)
    if len(region) == 0:
        return "the agreeing boxes' frusta share no volume"
    projected = projected_boxes(views, region, voxel)
    aabb = np.stack([region.min(0) - voxel / 2, region.max(0) + voxel / 2])
    return Propagated(projected, agreeing, aabb, {i: picked[i][1] for i in agreeing})


def detect_by_model(name: str, views: geo.Views, settings: ModelDetectorSettings, query: str,
                    geometric: DetectionResult | None, forced: bool) -> tuple[DetectionResult | None, dict[str, Any]]:
    """Run model ``name`` on the subset and propagate; ``(None, attempt)`` when it found nothing usable."""
    subset = subset_indices(views, settings.detect_frames)
    images = [geo.read_image(views.images[i]) for i in subset]
    candidates = FINDERS[name](images, settings, query, forced)
    centre = np.stack([geo.project(views, int(i), np.zeros((1, 3)))[0][0] for i in subset])
    picked = {int(i): p for i, c, uv in zip(subset, candidates, centre) if (p := pick_box(c, uv)) is not None}
    attempt = {"detector": name, "frames": len(subset), "frames_with_box": len(picked),
               "candidates": int(sum(len(c.scores) for c in candidates))}
    if len(picked) < settings.min_detected_frames:
        return None, {**attempt, "outcome": f"boxes in {len(picked)} of {len(subset)} frames (need {settings.min_detected_frames})"}
    carried = propagate(views, picked, settings)
    if isinstance(carried, str):
        return None, {**attempt, "outcome": carried}
    frames = []
    median_score = float(np.median(list(carried.scores.values())))
    for i in range(len(views)):
        own = carried.agree.get(i)
        box = own if own is not None else carried.boxes[i]
        seeds_fg, seeds_bg = ([], []) if geometric is None else (geometric.frames[i].seeds_fg, geometric.frames[i].seeds_bg)
        if np.isnan(box).any():
            frames.append(FrameDetection(views.file_paths[i], None, 0.0, name, [], []))
            continue
        w, h = (float(s) for s in views.sizes[i])
        m = settings.box_margin_px
        x0, y0, x1, y1 = np.clip(np.asarray(box) + [-m, -m, m, m], 0, [w, h, w, h])
        fg = np.asarray(seeds_fg, dtype=np.float64).reshape(-1, 2)
        fg = fg[(fg[:, 0] >= x0) & (fg[:, 0] < x1) & (fg[:, 1] >= y0) & (fg[:, 1] < y1)]
        frames.append(FrameDetection(
            views.file_paths[i], [float(x0), float(y0), float(x1), float(y1)],
            carried.scores.get(i, median_score), name if own is not None else f"{name}-propagated",
            fg.tolist(), list(seeds_bg)))
    floor_z = None if geometric is None else geometric.floor_z
    extra = {} if geometric is None else {k: v for k, v in geometric.extra.items() if k == "base_z"}
    attempt = {**attempt, "frames_agreeing": len(carried.agree), "outcome": "used"}
    return DetectionResult(frames, carried.aabb, floor_z, extra), attempt


def detect_cascade(rig: CameraRig, views: geo.Views, settings: ModelDetectorSettings, query: str) -> DetectionResult:
    """``detector=auto|yolo|owlvit`` (see the module doc)."""
    forced = settings.name != "auto"
    geometric, geometric_error = None, ""
    try:
        geometric = detect_geometric(rig, views, settings, query)
    except ValueError as exc:  # no product cluster: the models may still find it; seeds are then absent
        geometric_error = str(exc)
    attempts: list[dict[str, Any]] = []
    for name in ([settings.name] if forced else ["yolo", "owlvit"]):
        try:
            require(WEIGHTS[name](settings), settings.weights_dir)  # before reading any frame
            result, attempt = detect_by_model(name, views, settings, query, geometric, forced)
        except MissingWeights as exc:
            if forced:
                raise
            attempts.append({"detector": name, "outcome": "no weights", "error": str(exc)})
            continue
        except Skipped as exc:
            attempts.append({"detector": name, "outcome": f"skipped: {exc}"})
            continue
        attempts.append(attempt)
        if result is not None:
            return replace(result, extra={**result.extra, "used": name, "attempts": attempts})
        if forced:
            threshold = {"yolo": "yolo_confidence", "owlvit": "owlvit_threshold"}[name]
            raise ValueError(f"detector={name} did not find the product ({attempt['outcome']}): try detector=auto "
                             f"or a lower detector.{threshold}")
    if all(a["outcome"] == "no weights" for a in attempts):
        folder = weights_folder(settings.weights_dir)
        names = f"{yolo_weights(settings).name}, {owlvit_weights(settings).name}/"
        log.warning("detector=auto: no model weights in %s (%s): using the weight-free cv2 detector "
                    "(`korokoro weights` lists what to fetch)", folder, names)
    else:
        log.warning("detector=auto: %s; using the weight-free cv2 detector",
                    "; ".join(f"{a['detector']}: {a['outcome']}" for a in attempts))
    if geometric is None:
        raise ValueError(geometric_error)
    return replace(geometric, extra={**geometric.extra, "used": "cv2", "attempts": attempts})


for _name in ("auto", "yolo", "owlvit"):
    register_detector(_name, ModelDetectorSettings)(detect_cascade)
