"""Geometry shared by the detect and segment stages: cameras as arrays, projection, visual hull.

Conventions (see ``tasks.types.CameraRig``): ``c2w`` are ``(N, 4, 4)`` camera-to-world matrices
in OpenGL axes (x right, y up, camera looks along -z) in the normalised product world; pixel
``(u, v)`` has u to the right, v down, pixel centres at half-integers, so pixel ``[row, col]``
covers ``u in [col, col + 1)``. Masks are ``(H, W)`` bool arrays.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import cv2
import numpy as np

T = TypeVar("T")
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
_DISTORTION_KEYS = ("k1", "k2", "p1", "p2")


@dataclass(frozen=True)
class Views:
    """The frames of a ``transforms.json`` as arrays.

    ``intrinsics``: ``(N, 4)`` fl_x, fl_y, cx, cy; ``distortion``: ``(N, 4)`` k1, k2, p1, p2
    (OpenCV model); ``c2w``: ``(N, 4, 4)``; ``sizes``: ``(N, 2)`` width, height in pixels.
    ``images`` are absolute paths, ``file_paths`` the entries as written in the json, ``base``
    the json's folder (what its relative paths start from).
    """

    images: tuple[Path, ...]
    file_paths: tuple[str, ...]
    intrinsics: np.ndarray
    distortion: np.ndarray
    c2w: np.ndarray
    sizes: np.ndarray
    raw: dict
    base: Path = Path(".")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def centers(self) -> np.ndarray:
        """``(N, 3)`` camera centres."""
        return self.c2w[:, :3, 3]


def load_views(transforms: Path) -> Views:
    """Read a nerfstudio ``transforms.json``; per-frame intrinsics override the top-level ones."""
    transforms = Path(transforms)
    if not transforms.is_file():
        raise FileNotFoundError(f"camera transforms {transforms} do not exist: rerun the colmap stage")
    raw = json.loads(transforms.read_text())
    frames = raw.get("frames") or []
    if not frames:
        raise ValueError(f"{transforms} has no frames: the colmap stage registered no cameras")
    rows = []
    for i, frame in enumerate(frames):
        merged = {**raw, **frame}
        missing = [k for k in (*_INTRINSIC_KEYS, "file_path", "transform_matrix") if k not in merged]
        if missing:
            raise ValueError(f"{transforms} frame {i} lacks {', '.join(missing)}; write them from the colmap stage")
        rows.append(merged)
    base = transforms.parent
    return Views(
        images=tuple(base / r["file_path"] for r in rows),
        file_paths=tuple(str(r["file_path"]) for r in rows),
        intrinsics=np.array([[r["fl_x"], r["fl_y"], r["cx"], r["cy"]] for r in rows], dtype=np.float64),
        distortion=np.array([[float(r.get(k, 0.0)) for k in _DISTORTION_KEYS] for r in rows], dtype=np.float64),
        c2w=np.array([r["transform_matrix"] for r in rows], dtype=np.float64),
        sizes=np.array([[int(r["w"]), int(r["h"])] for r in rows], dtype=np.int64),
        raw=raw,
        base=base,
    )


def read_image(path: Path) -> np.ndarray:
    """A frame as ``(H, W, 3)`` uint8 BGR; a clear error when it is missing or unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"frame {path} is missing or not an image: rerun the frames stage")
    return image


def project(views: Views, index: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world ``points (M, 3)`` into view ``index`` → ``uv (M, 2)`` pixels, ``depth (M,)``.

    ``depth`` is the distance along the viewing direction (> 0 in front of the camera);
    points behind the camera get ``uv`` = nan.
    """
    w2c = np.linalg.inv(views.c2w[index]).astype(points.dtype if points.dtype == np.float32 else np.float64)
    # (3, 3) @ (3, M) is far faster than (M, 3) @ (3, 3) in BLAS; float32 stays float32 (voxel grids are big).
    cam_x, cam_y, cam_z = w2c[:3, :3] @ points.T + w2c[:3, 3:4]
    depth = -cam_z  # OpenGL camera looks along -z
    with np.errstate(divide="ignore", invalid="ignore"):
        x = cam_x / depth
        y = -cam_y / depth  # image v grows downwards, camera y upwards
    k1, k2, p1, p2 = (float(v) for v in views.distortion[index])  # Python floats keep float32 arrays float32
    if k1 or k2 or p1 or p2:
        r2 = x * x + y * y
        radial = 1.0 + k1 * r2 + k2 * r2 * r2
        x, y = (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)
    fx, fy, cx, cy = (float(v) for v in views.intrinsics[index])
    uv = np.stack([x * fx + cx, y * fy + cy], axis=1)
    uv[depth <= 0] = np.nan
    return uv, depth


def box_corners(aabb: np.ndarray) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of an axis-aligned box ``aabb (2, 3)`` (min row, max row)."""
    pick = np.indices((2, 2, 2)).reshape(3, -1).T  # (8, 3) of 0/1: min or max per axis
    return np.asarray(aabb, dtype=np.float64)[pick, [0, 1, 2]]


def grid_centers(aabb: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Voxel centres of a grid over ``aabb (2, 3)`` with ``resolution`` voxels along its longest side.

    Returns ``centers (X*Y*Z, 3)`` (C order over x, y, z), the shape ``(X, Y, Z)`` and the voxel edge.
    """
    aabb = np.asarray(aabb, dtype=np.float64)
    extent = aabb[1] - aabb[0]
    if np.any(extent <= 0):
        raise ValueError(f"grid box {aabb.tolist()} is empty")
    voxel = float(extent.max()) / resolution
    shape = tuple(int(max(1, np.ceil(e / voxel - 1e-9))) for e in extent)
    axes = [aabb[0, k] + (np.arange(shape[k]) + 0.5) * voxel for k in range(3)]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1).astype(np.float32), shape, voxel


def spread_order(views: Views, chosen: np.ndarray) -> np.ndarray:
    """``chosen`` view indices reordered farthest-first (each next camera is the one farthest from
    those already taken), so a few views already carve most of the empty space."""
    centers = views.centers[chosen]
    order = [0]
    dist = np.linalg.norm(centers - centers[0], axis=1)
    for _ in range(len(chosen) - 1):
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(centers - centers[nxt], axis=1))
    return chosen[np.array(order)]


def resolve_workers(workers: int) -> int:
    """Threads to use for ``workers`` (a setting): 0 or less means one per CPU core."""
    return int(workers) if workers and workers > 0 else (os.cpu_count() or 1)


def thread_map(fn: Callable[..., T], *iterables: Iterable, workers: int = 1) -> list[T]:
    """``list(map(fn, *iterables))`` on ``workers`` threads (order kept; the first error is raised).

    Worth it for OpenCV and large numpy operations, which release the GIL.
    """
    items = list(zip(*iterables))
    workers = min(resolve_workers(workers), len(items))
    if workers <= 1:
        return [fn(*args) for args in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda args: fn(*args), items))


def _pixel_projection(views: Views, index: int) -> np.ndarray | None:
    """``(3, 4)`` matrix taking homogeneous world points to ``(u·d, v·d, d)`` (d = depth) in view
    ``index``; None when the view has lens distortion (then ``project`` must be used)."""
    if np.any(views.distortion[index]):
        return None
    fx, fy, cx, cy = views.intrinsics[index]
    # OpenGL camera: depth = -z_cam, u = fx * x_cam / depth + cx, v = -fy * y_cam / depth + cy.
    k = np.array([[fx, 0.0, -cx], [0.0, -fy, -cy], [0.0, 0.0, -1.0]])
    return k @ np.linalg.inv(views.c2w[index])[:3]


def _view_misses(views: Views, index: int, mask: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``points (3, M)`` float32: ``inside (M,)`` (projects into the frame, in front of the
    camera) and ``miss (M,)`` (inside, on a background pixel of ``mask``)."""
    h, w = mask.shape
    matrix = _pixel_projection(views, index)
    if matrix is None:
        uv, _ = project(views, index, points.T)
        u, v = uv[:, 0], uv[:, 1]
        inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)  # nan compares False
    else:
        m = matrix.astype(np.float32)
        homog = m[:, :3] @ points
        homog += m[:, 3:4]
        depth = homog[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.divide(homog[0], depth, out=homog[0])
            v = np.divide(homog[1], depth, out=homog[1])
        inside = (depth > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    # Pixel [row, col] covers u in [col, col + 1): truncation is floor for the non-negative inside points.
    with np.errstate(invalid="ignore"):  # outside points may be nan / huge; they are masked off
        flat = np.where(inside, v.astype(np.int32) * np.int32(w) + u.astype(np.int32), 0)
    miss = ~mask.reshape(-1)[flat]
    miss &= inside
    return inside, miss


def _carve_chunk(views: Views, masks: list[np.ndarray], order: np.ndarray, points: np.ndarray,
                 allowed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``carve_votes`` for one chunk of ``points (3, M)``, views in ``order``."""
    m = points.shape[1]
    misses = np.zeros(m, dtype=np.int32)
    last_miss = np.full(m, -1, dtype=np.int32)
    seen = np.zeros(m, dtype=np.int32)
    # Survivors are kept compacted (index, position, counts) so each view only tests them; the
    # compaction is lazy (when a quarter of them is out): a dropped voxel tested a few views more
    # only gains misses, and it already has too many.
    index = np.arange(m)
    alive_misses, alive_last, alive_seen = misses.copy(), last_miss.copy(), seen.copy()
    for i in order:
        if len(index) == 0:
            break
        inside, miss = _view_misses(views, int(i), masks[i], points)
        alive_seen += inside
        alive_misses += miss
        alive_last[miss] = i
        keep = alive_misses <= allowed
        kept = np.count_nonzero(keep)
        if kept < 0.75 * len(index):
            gone = index[~keep]
            misses[gone], last_miss[gone], seen[gone] = alive_misses[~keep], alive_last[~keep], alive_seen[~keep]
            index, points = index[keep], points[:, keep]
            alive_misses, alive_last, alive_seen = alive_misses[keep], alive_last[keep], alive_seen[keep]
    misses[index], last_miss[index], seen[index] = alive_misses, alive_last, alive_seen
    return misses, last_miss, seen


def carve_votes(
    views: Views,
    masks: list[np.ndarray],
    use: np.ndarray,
    centers: np.ndarray,
    max_miss_fraction: float,
    workers: int = 1,
    chunk: int = 65536,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, for voxel ``centers (M, 3)``, the views in ``use`` (``(N,)`` bool) that miss them.

    Returns ``misses (M,)``, ``last_miss (M,)`` (index of the last view that missed it, -1 for
    none) and ``seen (M,)`` (views where it falls inside the frame; the others abstain). A voxel
    is dropped as soon as it has more misses than ``max(1, max_miss_fraction x views)``: later
    views only test the survivors, so a dropped voxel's counts are only known to exceed that
    allowance, while ``misses <= allowance`` (``misses == 1`` with its ``last_miss`` in
    particular) is exact. The voxels are split in chunks of ``chunk`` carved on ``workers``
    threads (the result does not depend on either).
    """
    chosen = np.flatnonzero(use)
    if len(chosen) == 0:
        raise ValueError("no accepted masks to carve a visual hull from")
    allowed = max(1, int(np.floor(max_miss_fraction * len(chosen))))
    order = spread_order(views, chosen)
    points = np.ascontiguousarray(np.asarray(centers, dtype=np.float32).T)  # (3, M): rows stream through BLAS
    bounds = list(range(0, points.shape[1], max(1, int(chunk)))) + [points.shape[1]]
    parts = thread_map(lambda a, b: _carve_chunk(views, masks, order, np.ascontiguousarray(points[:, a:b]), allowed),
                       bounds[:-1], bounds[1:], workers=workers)
    if not parts:
        empty = np.zeros(0, dtype=np.int32)
        return empty, empty.copy(), empty.copy()
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def voted_occupancy(misses: np.ndarray, seen: np.ndarray, max_miss_fraction: float) -> np.ndarray:
    """Voxels missed by at most ``max_miss_fraction`` of the views that saw them (bool, same shape).

    One wrong mask cannot cut a hole in this hull.
    """
    return (seen > 0) & (misses <= np.floor(max_miss_fraction * seen))


def carve(
    views: Views,
    masks: list[np.ndarray],
    use: np.ndarray,
    centers: np.ndarray,
    max_miss_fraction: float,
    workers: int = 1,
    chunk: int = 65536,
) -> np.ndarray:
    """Voting visual hull over voxel ``centers (M, 3)`` → ``(M,)`` bool occupancy (see ``carve_votes``)."""
    misses, _, seen = carve_votes(views, masks, use, centers, max_miss_fraction, workers, chunk)
    return voted_occupancy(misses, seen, max_miss_fraction)


def occupied_box(occupancy: np.ndarray, grid_aabb: np.ndarray, voxel: float) -> np.ndarray | None:
    """``(2, 3)`` box around the occupied voxels (their full cells), or None when empty."""
    idx = np.argwhere(occupancy)
    if len(idx) == 0:
        return None
    lo = np.asarray(grid_aabb)[0] + idx.min(0) * voxel
    hi = np.asarray(grid_aabb)[0] + (idx.max(0) + 1) * voxel
    return np.stack([lo, hi])


def border_contacts(occupancy: np.ndarray) -> np.ndarray:
    """``(2, 3)`` bool: does the occupancy touch the grid's min / max face along x, y, z?"""
    return np.array([
        [occupancy[0].any(), occupancy[:, 0].any(), occupancy[:, :, 0].any()],
        [occupancy[-1].any(), occupancy[:, -1].any(), occupancy[:, :, -1].any()],
    ])


def shell_centers(occupancy: np.ndarray, grid_aabb: np.ndarray, voxel: float) -> np.ndarray:
    """Centres ``(M, 3)`` of the occupied voxels with an empty 26-neighbour: enough for silhouettes."""
    padded = np.pad(occupancy, 1)
    interior = padded.copy()
    for axis in range(3):  # min over the 3x3x3 neighbourhood, one axis at a time (separable erosion)
        interior = np.minimum(np.minimum(np.roll(interior, 1, axis), interior), np.roll(interior, -1, axis))
    shell = occupancy & ~interior[1:-1, 1:-1, 1:-1]
    return (np.asarray(grid_aabb)[0] + (np.argwhere(shell) + 0.5) * voxel).astype(np.float32)


def render_silhouette(views: Views, index: int, centers: np.ndarray, voxel: float) -> np.ndarray:
    """The ``(H, W)`` bool silhouette of voxels with ``centers (M, 3)`` seen from view ``index``.

    Each centre marks its pixel; a closing with the voxel's largest projected size fills the gaps
    between neighbouring voxels without growing the outline.
    """
    w, h = (int(s) for s in views.sizes[index])
    out = np.zeros((h, w), dtype=np.uint8)
    if len(centers) == 0:
        return out.astype(bool)
    uv, depth = project(views, index, centers)
    col, row = np.floor(uv[:, 0]), np.floor(uv[:, 1])
    ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    row, col = row[ok].astype(np.intp), col[ok].astype(np.intp)
    out[row, col] = 1
    front = depth[depth > 0]
    if len(front) and len(row):
        voxel_px = float(views.intrinsics[index, :2].max() * voxel / front.min())
        size = 2 * int(np.ceil(voxel_px)) + 1
        # The closing only changes pixels near the marked ones: run it on their box plus the disc.
        pad = size + 1
        y0, y1 = max(int(row.min()) - pad, 0), min(int(row.max()) + pad + 1, h)
        x0, x1 = max(int(col.min()) - pad, 0), min(int(col.max()) + pad + 1, w)
        out[y0:y1, x0:x1] = cv2.morphologyEx(out[y0:y1, x0:x1], cv2.MORPH_CLOSE,
                                             cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    return out.astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shape bool masks (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def area_and_centroid(mask: np.ndarray) -> tuple[float, np.ndarray]:
    """Area as a fraction of the frame and the centroid ``(2,)`` (u, v) in pixels (nan if empty)."""
    m = cv2.moments(np.asarray(mask, dtype=bool).view(np.uint8), binaryImage=True)
    if m["m00"] == 0:
        return 0.0, np.array([np.nan, np.nan])
    return m["m00"] / mask.size, np.array([m["m10"] / m["m00"] + 0.5, m["m01"] / m["m00"] + 0.5])
