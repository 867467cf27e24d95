"""Geometry half of the mesh stage: density grid → marching cubes → clean → smooth → decimate.

Small functions on plain arrays: ``vertices [V, 3] float``, ``faces [F, 3] int`` (counter-
clockwise seen from outside, so normals point out of the product), world = the field's
normalised frame (+Z up).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.sparse
import torch
from PIL import Image
from scipy.sparse.csgraph import connected_components
from skimage.measure import marching_cubes


class EmptyFieldError(ValueError):
    """No density above the threshold anywhere in the grid."""


def sample_density_grid(field, box: np.ndarray, resolution: int, chunk_points: int, device: str) -> np.ndarray:
    """Density at the centres of a ``resolution``³ grid spanning ``box``.

    box ``[2, 3]`` (min, max corner) → ``[R, R, R]`` float32 indexed (x, y, z).
    Queried one x-slab at a time so memory stays at ``chunk_points`` points.
    """
    axes = [np.linspace(box[0, k], box[1, k], resolution, dtype=np.float32) for k in range(3)]
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    yz = np.stack(np.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)
    slabs = max(1, chunk_points // len(yz))  # x-slices per query
    with torch.no_grad():
        for x0 in range(0, resolution, slabs):
            xs = axes[0][x0 : x0 + slabs]
            pts = np.concatenate([np.repeat(xs, len(yz))[:, None], np.tile(yz, (len(xs), 1))], 1)
            sigma = field.density(torch.from_numpy(pts).to(device)).float().cpu().numpy()
            grid[x0 : x0 + len(xs)] = sigma.reshape(len(xs), resolution, resolution)
    return grid


def grid_to_mesh(grid: np.ndarray, box: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of ``grid >= threshold`` mapped back to world coordinates.

    grid ``[R, R, R]`` sampled at ``linspace(box[0], box[1], R)`` per axis.
    The grid is padded with one empty voxel so a product touching the box still gives a closed surface.
    """
    peak = float(np.nanmax(grid))
    if not np.isfinite(peak) or peak < threshold:
        raise EmptyFieldError(
            f"the NeRF learned no product: peak density {peak:.3g} < density_threshold {threshold:.3g} "
            "in the meshing box; check the masks / lower mesh.density_threshold"
        )
    if float(np.nanmin(grid)) >= threshold:
        raise EmptyFieldError(
            f"density is above density_threshold {threshold:.3g} everywhere in the meshing box "
            "(the field is a solid block): raise mesh.density_threshold or check the training"
        )
    padded = np.pad(np.nan_to_num(grid, nan=0.0), 1, constant_values=min(0.0, float(grid.min())))
    verts, faces, _, _ = marching_cubes(padded, level=threshold, gradient_direction="descent")
    spacing = (box[1] - box[0]) / (np.array(grid.shape) - 1)
    verts = box[0] + (verts - 1.0) * spacing  # undo the padding, then voxel → world
    # skimage winds 'descent' triangles so that their normals face increasing values: flip to face out.
    return verts.astype(np.float64), np.ascontiguousarray(faces[:, ::-1]).astype(np.int64)


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[F]`` triangle areas."""
    tri = vertices[faces]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def drop_unused_vertices(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep only referenced vertices (in their order); faces re-indexed."""
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.ravel()] = True  # a sort-free np.unique: a million-face mesh's cleaning is host time
    new_index = np.cumsum(used) - 1
    return vertices[used], new_index[faces]


def keep_main_components(vertices: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop floaters: keep connected pieces whose area is ≥ ``min_fraction`` of the largest's.

    Returns (vertices, faces, number of components dropped).
    """
    if len(faces) == 0:
        return vertices, faces, 0
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    adjacency = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(vertices),) * 2)
    count, vertex_label = connected_components(adjacency, directed=False)
    face_label = vertex_label[faces[:, 0]]
    area = np.bincount(face_label, weights=face_areas(vertices, faces), minlength=count)
    keep_label = area >= min_fraction * area.max()
    vertices, faces = drop_unused_vertices(vertices, faces[keep_label[face_label]])
    present = np.bincount(face_label, minlength=count) > 0
    return vertices, faces, int((present & ~keep_label).sum())


def load_hull(hull_json: Path) -> dict:
    """The hull json with the grid (if any) loaded as ``grid`` ``[X, Y, Z] bool`` and boxes as arrays."""
    data = json.loads(Path(hull_json).read_text())
    if "aabb" not in data:
        raise ValueError(f"hull file {hull_json} has no 'aabb': the segment stage must write [[x0,y0,z0],[x1,y1,z1]]")
    out = {"aabb": np.asarray(data["aabb"], dtype=np.float64)}
    if data.get("grid"):
        path = Path(data["grid"])
        path = path if path.is_absolute() else Path(hull_json).parent / path
        out["grid"] = np.load(path).astype(bool)
        out["grid_aabb"] = np.asarray(data.get("grid_aabb", data["aabb"]), dtype=np.float64)
    return out


def inside_hull_grid(points: np.ndarray, grid: np.ndarray, grid_aabb: np.ndarray, dilate_voxels: int) -> np.ndarray:
    """``[N]`` bool: the point's cell of the occupancy grid (cell-centred over grid_aabb) is occupied.

    The grid is dilated by ``dilate_voxels`` first: a surface point sits on the hull's boundary.
    """
    if dilate_voxels > 0:
        grid = scipy.ndimage.binary_dilation(grid, iterations=dilate_voxels)
    shape = np.array(grid.shape)
    cell = np.floor((points - grid_aabb[0]) / (grid_aabb[1] - grid_aabb[0]) * shape).astype(np.int64)
    valid = np.all((cell >= 0) & (cell < shape), axis=1)
    out = np.zeros(len(points), dtype=bool)
    out[valid] = grid[tuple(cell[valid].T)]
    return out


def mask_votes(points: np.ndarray, transforms_json: Path, max_views: int, dilate_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Project points into every mask: ``(inside [N], seen [N])`` counts of views.

    ``seen`` counts views where the point lands in the image in front of the camera,
    ``inside`` those where it also lands on the (dilated) product mask.
    """
    meta = json.loads(Path(transforms_json).read_text())
    frames = [f for f in meta.get("frames", []) if f.get("mask_path")]
    if not frames:
        raise ValueError(f"{transforms_json} has no frames with mask_path: run the segment stage, or set mesh.hull_cull=false")
    picked = np.unique(np.linspace(0, len(frames) - 1, min(max_views, len(frames))).round().astype(int))
    inside = np.zeros(len(points), dtype=np.int32)
    seen = np.zeros(len(points), dtype=np.int32)
    for frame in (frames[i] for i in picked):
        fx, fy = frame.get("fl_x", meta["fl_x"]), frame.get("fl_y", meta["fl_y"])
        cx, cy = frame.get("cx", meta["cx"]), frame.get("cy", meta["cy"])
        width, height = frame.get("w", meta["w"]), frame.get("h", meta["h"])
        mask = np.asarray(Image.open(Path(transforms_json).parent / frame["mask_path"]).convert("L")) > 127
        if dilate_px > 0:
            mask = scipy.ndimage.binary_dilation(mask, iterations=dilate_px)
        c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        cam = (points - c2w[:3, 3]) @ c2w[:3, :3]  # world → camera (OpenGL: looking down -z)
        depth = -cam[:, 2]
        front = depth > 1e-6
        safe = np.where(front, depth, 1.0)
        # Masks may be stored at another resolution than the intrinsics: scale pixel coordinates.
        u = (fx * cam[:, 0] / safe + cx) * mask.shape[1] / width
        v = (-fy * cam[:, 1] / safe + cy) * mask.shape[0] / height
        in_image = front & (u >= 0) & (u < mask.shape[1]) & (v >= 0) & (v < mask.shape[0])
        hit = np.zeros(len(points), dtype=bool)
        hit[in_image] = mask[v[in_image].astype(np.int64), u[in_image].astype(np.int64)]
        seen += in_image
        inside += hit
    return inside, seen


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int, lamb: float, mu: float) -> np.ndarray:
    """Taubin λ|μ smoothing (shrink-free Laplacian): ``[V, 3]`` → ``[V, 3]``."""
    if iterations <= 0 or len(faces) == 0:
        return vertices
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    n = len(vertices)
    adjacency = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    adjacency = ((adjacency + adjacency.T) > 0).astype(np.float64)
    degree = np.maximum(np.asarray(adjacency.sum(1)).ravel(), 1.0)
    mean_of_neighbours = scipy.sparse.diags(1.0 / degree) @ adjacency
    out = vertices.copy()
    for _ in range(iterations):
        out = out + lamb * (mean_of_neighbours @ out - out)
        out = out + mu * (mean_of_neighbours @ out - out)
    return out


def decimate(vertices: np.ndarray, faces: np.ndarray, max_triangles: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (fast_simplification) down to at most ``max_triangles``.

    One pass on one core. Decimating a million-face mesh in pieces on every core (cut edges
    fixed, welded, a last pass) was measured on an H100 host and saved under 0.3 s of its 4.7 s
    (bench/RESULTS.md, session 11), so it is not done.
    """
    import fast_simplification

    if len(faces) <= max_triangles:
        return vertices, faces
    # fast_simplification lands near, not exactly on, the target: retry a little lower if over.
    reduction = 1.0 - max_triangles / len(faces)
    for _ in range(5):
        v, f = fast_simplification.simplify(vertices.astype(np.float32), faces.astype(np.int64), target_reduction=reduction)
        if len(f) <= max_triangles:
            return v.astype(np.float64), f.astype(np.int64)
        reduction = 1.0 - (1.0 - reduction) * max_triangles / len(f) * 0.99
    raise RuntimeError(f"decimation could not reach {max_triangles} triangles (got {len(f)})")


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals ``[V, 3]``."""
    tri = vertices[faces]
    face_normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 × area
    normals = np.zeros_like(vertices)
    for corner in range(3):
        normals += np.stack([np.bincount(faces[:, corner], face_normal[:, k], len(vertices)) for k in range(3)], 1)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 0, normals / np.maximum(length, 1e-12), np.array([0.0, 0.0, 1.0]))
