"""segment stage: one product mask per frame, made to agree across views through a visual hull.

Pipeline (``segment_product``):

1. first pass by the backend named ``settings.name``: ``cv2`` = GrabCut started from the
   detector's box and seed points; ``sam`` = Segment Anything prompted with the box and a few seed
   points, batched (``tasks.segment_sam``; a frame SAM is unsure of gets GrabCut's mask);
   ``auto`` = ``sam`` when its checkpoint is in the weights folder, else ``cv2``;
2. consistency (``reconcile_masks``): masks whose area or centroid jump against their neighbours
   are rejected; a voxel visual hull is carved from the accepted masks by voting (a voxel
   survives when at most ``hull_max_miss_fraction`` of the views miss it, so one bad mask cannot
   cut it); masks that leak out of it, or miss what all other views agree on, are rejected too
   and the hull is carved again;
3. refine: every frame is segmented again with the hull's projection as a trimap (GrabCut only
   decides a thin band around the hull's outline); rejected frames get the hull alone as prior;
   openings that show the background (a handle's; the hull cannot carve them) are cut out
   (``segment_checks.see_through``), and a result that still misses what all the other views
   agree on elsewhere is merged with it;
4. outputs (``tasks.isolation_outputs``): masks, rgba, transforms.json with mask_path, hull.json +
   hull.npy, contact_sheet.jpg, stats.json.

The GrabCut helpers live in ``tasks.segment_grabcut``, the per-frame checks in
``tasks.segment_checks``. Per-frame work (reading, both GrabCut passes, silhouettes, PNGs) and the
carving (by chunks of voxels) run on ``settings.workers`` threads; the results do not depend on
the thread count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from scipy import ndimage

from tasks import isolation_geometry as geo
from tasks.isolation_geometry import read_image
from tasks.isolation_outputs import write_outputs
from tasks.segment_checks import first_pass_outliers, hull_disagreement, missing_blobs, see_through
from tasks.segment_grabcut import grabcut_first_pass, hull_trimap, run_grabcut
from tasks.types import CameraRig, Detections, MaskSet


@dataclass(frozen=True)
class SegmenterSettings:
    """Settings of the ``cv2`` segmenter and of the cross-view consistency (conf/segmenter/cv2.yaml)."""

    name: str = "cv2"
    # speed
    workers: int = 0  # threads for the per-frame work and the carving (0 = one per CPU core); results do not depend on it
    carve_chunk_voxels: int = 65536  # voxels per carving task (a thread carves one chunk through all views)
    seed: int = 0  # GrabCut's k-means seed, reset for every frame: same frames → same masks, whatever the threads
    png_compression: int = 1  # zlib level of the mask / rgba PNGs (0-9: higher = slightly smaller files, slower)
    # first pass (GrabCut)
    first_pass_object_px: int = 120  # first-pass GrabCut runs on a crop resampled so the box spans this many px
    refine_object_px: int = 200  # the refine pass resamples so the hull's outline spans this many px (sub-pixel edges)
    min_work_scale: float = 0.25  # never shrink the crop more than this (keeps thin parts)
    max_work_scale: float = 3.0  # never enlarge the crop more than this (speed)
    crop_margin: float = 0.3  # the crop adds this fraction of the product's size around it (colour models)
    grabcut_iterations: int = 5  # GrabCut iterations of the first pass
    seed_radius_px: int = 1  # radius of the disc each seed point marks as certain fg / bg
    seed_edge_px: float = 3.0  # fg seeds nearer than this to the seeds' outline stay only "probable"
    keep_component_fraction: float = 0.15  # drop blobs smaller than this fraction of the largest one
    # consistency across views
    neighbour_window: int = 2  # frames on each side a mask's area and centroid are compared with
    max_area_ratio: float = 2.5  # reject a mask whose area is off the neighbours' median by this factor
    min_seed_coverage: float = 0.85  # reject a mask covering less than this fraction of its fg seed points
    max_centroid_jump: float = 0.5  # reject when the centroid moves more than this × sqrt(median area)
    min_area_fraction: float = 0.0005  # reject masks smaller than this fraction of the frame
    max_leak_fraction: float = 0.1  # reject a first-pass mask with more than this fraction outside the voted hull
    max_missing_fraction: float = 0.05  # reject a first-pass mask lacking more of the other views' consensus
    hole_min_radius_px: int = 4  # consensus parts a mask lacks count (and get filled) when this thick
    see_through_margin: float = 2.0  # cut out thick mask parts this much likelier background (nats; 0 = off)
    see_through_min_radius_px: int = 2  # ... when at least this thick (an opening's radius)
    # visual hull
    coarse_resolution: int = 40  # voxels along the longest side of the search box (finds the bounds)
    hull_resolution: int = 96  # voxels along the longest side of the final hull box
    hull_max_miss_fraction: float = 0.1  # a voxel survives when at most this fraction of views miss it
    hull_margin: float = 0.15  # the search box is the detector's 3D box grown by this fraction per side
    clip_below_floor: bool = True  # carve nothing under the detector's floor plane (the product stands on it)
    base_from_points: bool = True  # no floor seen: treat the lowest product point as the base (cameras above cannot bound it)
    hull_grow_steps: int = 3  # times the search box doubles when the hull touches its border
    fallback_half_extent: float = 1.0  # search box half-size around the origin without a detector box
    # refine with the hull
    band_px: int = 3  # GrabCut decides only within this many pixels of the hull's outline
    refine_iterations: int = 2  # GrabCut iterations of the refine pass (the band is thin: it settles fast)
    refine_crop_margin: float = 0.3  # the refine crop adds this fraction of the hull's size around it (colour models)
    # contact sheet
    sheet_columns: int = 6  # thumbnails per row
    sheet_thumb_width: int = 160  # thumbnail width in pixels (height keeps the frame's aspect)
    sheet_tint: float = 0.35  # opacity of the mask tint on the thumbnails


@dataclass(frozen=True)
class FirstPass:
    """A first-pass backend's output: per-frame ``(H, W)`` bool ``masks`` and what made each (``sources``)."""

    masks: list[np.ndarray]
    sources: list[str]


class Segmenter(Protocol):
    """A first-pass backend: all frames ``(H, W, 3)`` BGR + their boxes.json entries → :class:`FirstPass`.

    It gets every frame at once so that a model can batch them; per-frame work may use
    ``settings.workers`` threads.
    """

    def __call__(self, images: list[np.ndarray], detections: list[Mapping[str, Any]], settings: Any) -> FirstPass: ...


_REGISTRY: dict[str, tuple[type, Segmenter]] = {}


def register_segmenter(name: str, settings_type: type) -> Callable[[Segmenter], Segmenter]:
    """Decorator: make a first-pass backend selectable as ``segmenter=<name>``."""

    def deco(fn: Segmenter) -> Segmenter:
        _REGISTRY[name] = (settings_type, fn)
        return fn

    return deco


def get_segmenter(name: str) -> tuple[type, Segmenter]:
    """The ``(settings dataclass, backend)`` registered as ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown segmenter {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def segmenter_settings(cfg: Mapping[str, Any]) -> Any:
    """Build the settings dataclass of the backend named by ``cfg['name']`` from a config dict."""
    settings_type, _ = get_segmenter(str(cfg.get("name", "cv2")))
    return settings_type(**cfg)


# --------------------------------------------------------------------------- GrabCut (tasks.segment_grabcut)

@register_segmenter("cv2", SegmenterSettings)
def grabcut_frames(images: list[np.ndarray], detections: list[Mapping[str, Any]], settings: Any) -> FirstPass:
    """The weight-free first pass: GrabCut from each frame's box and seeds, on ``settings.workers`` threads."""
    masks = geo.thread_map(lambda image, det: grabcut_first_pass(image, det, settings), images, detections,
                           workers=settings.workers)
    return FirstPass(masks, ["grabcut"] * len(masks))


# --------------------------------------------------------------------------- consistency


@dataclass(frozen=True)
class Reconciled:
    """Masks after the consistency step plus the hull they agree with.

    ``masks``: per-frame ``(H, W)`` bool; ``status``: per frame "accepted" | "refined-from-hull" |
    "merged-with-hull"; ``occupancy (X, Y, Z)`` bool over ``grid_aabb (2, 3)``; ``hull_iou``: IoU of
    each final mask with the hull's projection; ``first_flags``: why a first-pass mask was rejected.
    """

    masks: list[np.ndarray]
    status: list[str]
    first_flags: list[str]
    hull_iou: list[float]
    occupancy: np.ndarray
    grid_aabb: np.ndarray
    voxel: float
    hull_aabb: np.ndarray


def carve_hull(views: geo.Views, masks: list[np.ndarray], use: np.ndarray, search_aabb: np.ndarray,
               floor_z: float | None, settings: SegmenterSettings) -> "Hull":
    """Coarse-to-fine voting hull (see :class:`Hull`).

    A coarse carve over ``search_aabb`` finds where the product is (the box doubles while the
    hull touches a side other than the floor); the fine carve covers that region plus one coarse
    voxel and only tests fine voxels whose coarse cell (or a neighbour) survived. Nothing is
    carved under ``floor_z`` (the product stands on it; an orbit above cannot bound it from below).
    """
    box = np.asarray(search_aabb, dtype=np.float64).copy()
    if floor_z is not None and settings.clip_below_floor:
        box[0, 2] = max(box[0, 2], floor_z)
    for _ in range(settings.hull_grow_steps + 1):
        centers, shape, coarse_voxel = geo.grid_centers(box, settings.coarse_resolution)
        coarse = geo.carve(views, masks, use, centers, settings.hull_max_miss_fraction, settings.workers,
                           settings.carve_chunk_voxels).reshape(shape)
        contacts = geo.border_contacts(coarse)
        if floor_z is not None and settings.clip_below_floor:
            contacts[0, 2] = False  # lying on the floor is expected
        if not contacts.any():
            break
        half = box[1] - box[0]
        box = np.stack([box[0] - half * contacts[0], box[1] + half * contacts[1]])
    found = geo.occupied_box(coarse, box, coarse_voxel)
    if found is None:
        raise ValueError("the masks agree on no common volume: check the cameras (transforms.json) and the boxes")
    grid_aabb = np.stack([np.maximum(found[0] - coarse_voxel, box[0]), found[1] + coarse_voxel])
    centers, shape, voxel = geo.grid_centers(grid_aabb, settings.hull_resolution)
    near = ndimage.binary_dilation(coarse, structure=np.ones((3, 3, 3), bool))
    cell = np.clip(np.floor((centers - box[0]) / coarse_voxel).astype(np.intp), 0, np.array(near.shape) - 1)
    candidate = near[cell[:, 0], cell[:, 1], cell[:, 2]]
    misses = np.full(len(centers), len(views), dtype=np.int32)  # never tested = missed by all
    last_miss = np.full(len(centers), -1, dtype=np.int32)
    seen = np.zeros(len(centers), dtype=np.int32)
    misses[candidate], last_miss[candidate], seen[candidate] = geo.carve_votes(
        views, masks, use, centers[candidate], settings.hull_max_miss_fraction, settings.workers,
        settings.carve_chunk_voxels)
    occupancy = geo.voted_occupancy(misses, seen, settings.hull_max_miss_fraction)
    return Hull(occupancy.reshape(shape), misses.reshape(shape), last_miss.reshape(shape), grid_aabb, voxel)


@dataclass(frozen=True)
class Hull:
    """A carved hull: voted ``occupancy (X, Y, Z)`` bool over ``grid_aabb (2, 3)``, plus per voxel the
    number of views that ``misses`` it and the view that missed it last (``last_miss``, -1 for none)."""

    occupancy: np.ndarray
    misses: np.ndarray
    last_miss: np.ndarray
    grid_aabb: np.ndarray
    voxel: float


def hull_silhouettes(views: geo.Views, hull: Hull, workers: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per view ``(H, W)`` bool: the voted hull's projection and the other views' consensus.

    The voted hull survives any single bad mask but is loose (a thin product seen edge-on looks
    fat). The consensus of view i projects the voxels that every other view keeps: tight, and
    independent of view i's own mask, so it tells whether mask i misses parts the others agree on.
    """
    voted = geo.shell_centers(hull.occupancy, hull.grid_aabb, hull.voxel)
    strict = hull.occupancy & (hull.misses == 0)
    strict_shell = geo.shell_centers(strict, hull.grid_aabb, hull.voxel)
    lo = np.asarray(hull.grid_aabb)[0]
    single = np.argwhere(hull.misses == 1)  # voxels only one view rejects, grouped by that view
    single_view = hull.last_miss[tuple(single.T)]

    def render(i: int) -> tuple[np.ndarray, np.ndarray]:
        extra = (lo + (single[single_view == i] + 0.5) * hull.voxel).astype(np.float32)
        return (geo.render_silhouette(views, i, voted, hull.voxel),
                geo.render_silhouette(views, i, np.concatenate([strict_shell, extra]), hull.voxel))

    pairs = geo.thread_map(render, range(len(views)), workers=workers)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def reconcile_masks(
    views: geo.Views,
    images: list[np.ndarray],
    first: list[np.ndarray],
    detections: list[Mapping[str, Any]],
    search_aabb: np.ndarray,
    floor_z: float | None,
    settings: SegmenterSettings,
) -> Reconciled:
    """Make first-pass masks agree across views; see the module doc (steps 2-3).

    ``images``: per-frame ``(H, W, 3)`` BGR; ``first``: per-frame ``(H, W)`` bool first-pass masks;
    ``detections``: per-frame entries of boxes.json (their ``seeds_fg`` check the masks);
    ``search_aabb (2, 3)``: where to look for the product in the normalised world; ``floor_z``: the
    floor's height under it (None when unknown).
    """
    order = np.argsort(np.array(views.file_paths), kind="stable")
    flags = first_pass_outliers(first, detections, order, settings)
    use = np.array([f == "" for f in flags])
    if use.sum() < 2:
        raise ValueError(
            f"only {int(use.sum())} of {len(first)} first-pass masks look consistent; the detector's boxes "
            "are probably wrong: look at boxes.json and the contact sheet"
        )
    hull = carve_hull(views, first, use, search_aabb, floor_z, settings)
    workers = settings.workers
    loose, consensus = hull_silhouettes(views, hull, workers)
    why = geo.thread_map(lambda i: hull_disagreement(first[i], loose[i], consensus[i], settings) if use[i] else "",
                         range(len(first)), workers=workers)
    if any(why) and use.sum() - sum(map(bool, why)) >= 2:
        for i in np.flatnonzero(why):
            flags[i] = why[i]
        use &= ~np.array([bool(w) for w in why])
        hull = carve_hull(views, first, use, search_aabb, floor_z, settings)
        loose, consensus = hull_silhouettes(views, hull, workers)

    def refine(i: int) -> tuple[np.ndarray, str, float]:
        trusted = first[i] if use[i] else None
        refined = run_grabcut(images[i], hull_trimap(loose[i], trusted, settings), settings.refine_object_px, settings,
                              iterations=settings.refine_iterations, crop_margin=settings.refine_crop_margin)
        # Openings that show the background (a handle's) are cut out and must not be filled back in.
        shows_background = see_through(images[i], refined, settings)
        refined = refined & ~shows_background
        holes = missing_blobs(refined, consensus[i], settings) & ~shows_background
        if holes.any():
            # Fill in what every other view agrees on: one bad frame cannot cut a hole.
            refined, state = refined | holes, "merged-with-hull"
        else:
            state = "accepted" if use[i] else "refined-from-hull"
        return refined, state, geo.mask_iou(refined, loose[i])

    done = geo.thread_map(refine, range(len(images)), workers=workers)
    masks, status, ious = [d[0] for d in done], [d[1] for d in done], [d[2] for d in done]
    # The published hull is carved again from the final masks (tighter than the first-pass one).
    hull = carve_hull(views, masks, np.ones(len(masks), bool), search_aabb, floor_z, settings)
    hull_aabb = geo.occupied_box(hull.occupancy, hull.grid_aabb, hull.voxel)
    return Reconciled(masks, status, flags, ious, hull.occupancy, hull.grid_aabb, hull.voxel, hull_aabb)


# --------------------------------------------------------------------------- the stage


def segment_product(
    rig: CameraRig, detections: Detections, out_dir: Path, settings: Any, fingerprint: str
) -> MaskSet:
    """Segment every frame of ``rig`` with the backend named by ``settings.name``; write the MaskSet."""
    rig.check()
    detections.check()
    _, backend = get_segmenter(settings.name)
    views = geo.load_views(rig.transforms)
    boxes = json.loads(Path(detections.boxes).read_text())
    by_path = {f["file_path"]: f for f in boxes.get("frames", [])}
    missing = [p for p in views.file_paths if p not in by_path]
    if missing:
        raise ValueError(f"{detections.boxes} has no entry for {len(missing)} frames (e.g. {missing[0]}): "
                         "rerun the detect stage on this CameraRig")
    workers = getattr(settings, "workers", 1)
    images = geo.thread_map(read_image, views.images, workers=workers)
    for path, image, (w, h) in zip(views.images, images, views.sizes):
        if image.shape[:2] != (h, w):
            raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]} but transforms.json says {w}x{h}")
    detections_of = [by_path[p] for p in views.file_paths]
    first = backend(images, detections_of, settings)
    if boxes.get("aabb") is not None:
        aabb = np.asarray(boxes["aabb"], dtype=np.float64)
        pad = settings.hull_margin * (aabb[1] - aabb[0])
        search = np.stack([aabb[0] - pad, aabb[1] + pad])
    else:
        search = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]) * settings.fallback_half_extent
    floor_z = boxes.get("floor_z")
    if floor_z is None and settings.base_from_points:
        # An orbit from above never sees under the product; without a floor plane, its lowest
        # observed surface point is the best bound for the base.
        floor_z = boxes.get("base_z")
    result = reconcile_masks(views, images, first.masks, detections_of, search, floor_z, settings)
    out_dir = Path(out_dir)
    paths = write_outputs(out_dir, views, images, result, settings, first.sources)
    return MaskSet(dir=out_dir, fingerprint=fingerprint, **paths)


# The SAM and auto backends register themselves (imported last: they build on the names above).
from tasks import segment_sam  # noqa: E402,F401
