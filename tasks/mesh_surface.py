"""The mesh stage's surface: where to mesh, which surface (fused depth or a density level), and
the clean-up that keeps the product (tasks/mesh.py runs it; bench tools reuse the pieces).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from tasks import mesh_geometry as geo
from tasks.mesh_fusion import fuse_depth
from tasks.mesh_iso import choose_iso_level, silhouette_iou
from tasks.types import MaskSet

if TYPE_CHECKING:
    from tasks.mesh import MeshSettings


def meshing_box(field_aabb: np.ndarray, masks: MaskSet, settings: MeshSettings) -> np.ndarray:
    """``[2, 3]`` box to sample: the hull's aabb padded by ``hull_padding`` × its size, inside the field's aabb."""
    if settings.grid_box == "field":
        return field_aabb
    hull = np.asarray(geo.load_hull(masks.hull)["aabb"])
    pad = (hull[1] - hull[0]) * settings.hull_padding
    box = np.stack([np.maximum(hull[0] - pad, field_aabb[0]), np.minimum(hull[1] + pad, field_aabb[1])])
    if np.any(box[1] <= box[0]):
        raise ValueError(
            f"the hull box {hull.tolist()} in {masks.hull} does not overlap the field's aabb {field_aabb.tolist()}: "
            "the segment and train stages disagree on the world; set mesh.grid_box=field to mesh the whole field"
        )
    return box


def cull_outside_hull(vertices: np.ndarray, faces: np.ndarray, masks: MaskSet, settings: MeshSettings) -> tuple[np.ndarray, np.ndarray, str]:
    """Drop faces whose centroid is outside the masks' visual hull; returns the method used."""
    centroids = vertices[faces].mean(1)
    hull = geo.load_hull(masks.hull)
    if "grid" in hull:
        keep = geo.inside_hull_grid(centroids, hull["grid"], hull["grid_aabb"], settings.hull_grid_dilate_voxels)
        method = "hull_grid"
    else:
        inside, seen = geo.mask_votes(centroids, masks.transforms, settings.hull_max_views, settings.mask_dilate_px)
        keep = (seen == 0) | (inside >= settings.hull_vote_fraction * seen)
        method = "mask_votes"
    if not keep.any():
        raise ValueError(
            f"every face lies outside the visual hull ({method}): the masks and the field disagree "
            "(check the cameras in the MaskSet's transforms.json), or set mesh.hull_cull=false"
        )
    v, f = geo.drop_unused_vertices(vertices, faces[keep])
    return v, f, method


def clean_surface(
    vertices: np.ndarray, faces: np.ndarray, masks: MaskSet, settings: MeshSettings, hull_cull: bool | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Marching cubes' raw surface → the product: hull cull, main components, Taubin smoothing.

    ``hull_cull`` defaults to ``settings.hull_cull``. Returns the cleaned ``vertices [V, 3]``,
    ``faces [F, 3]`` and what each step removed.
    """
    raw_triangles = len(faces)
    cull_method = "off"
    if settings.hull_cull if hull_cull is None else hull_cull:
        vertices, faces, cull_method = cull_outside_hull(vertices, faces, masks, settings)
    culled = raw_triangles - len(faces)
    vertices, faces, dropped = geo.keep_main_components(vertices, faces, settings.keep_component_fraction)
    vertices = geo.taubin_smooth(vertices, faces, settings.smooth_iterations, settings.smooth_lambda, settings.smooth_mu)
    return vertices, faces, {"hull_cull": cull_method, "triangles_culled_by_hull": culled, "components_dropped": dropped}


def product_surface(
    radiance, masks: MaskSet, box: np.ndarray, settings: MeshSettings, device: str, lap: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Marching cubes of the product in ``box``: of the fused depth (``surface: depth_fusion``) or
    of a density level chosen against the masks (``surface: density``). Returns vertices, faces
    and a record for metrics.json."""
    if settings.surface == "depth_fusion":
        tsdf, record = fuse_depth(radiance, box, settings.grid_resolution, Path(masks.transforms), settings.fusion, device)
        lap("fusion")
        if not (tsdf < 0).any() or not (tsdf > 0).any():
            raise geo.EmptyFieldError(
                f"the fused depth of {masks.transforms} holds no surface in the meshing box ({record}): the field "
                "renders nothing opaque where the masks show the product; check training, or try mesh.surface=density"
            )
        vertices, faces = geo.grid_to_mesh(-tsdf, box, 0.0)
        lap("marching_cubes")
        return vertices, faces, {"surface": "depth_fusion", "fusion": record}
    grid = geo.sample_density_grid(radiance, box, settings.grid_resolution, settings.chunk_points, device)
    lap("grid")
    level, iso_scores = settings.density_threshold, {}
    if settings.iso_levels:
        axes = [np.linspace(box[0, k], box[1, k], settings.grid_resolution) for k in range(3)]
        iso_scores = silhouette_iou(
            grid, axes, Path(masks.transforms), settings.iso_levels, settings.iso_views, settings.iso_work_px
        )
        level = choose_iso_level(iso_scores, settings.iso_tolerance)
    lap("iso_level")
    vertices, faces = geo.grid_to_mesh(grid, box, level)
    lap("marching_cubes")
    return vertices, faces, {"surface": "density", "iso_level": level,
                             "iso_silhouette_iou": {str(k): round(v, 4) for k, v in iso_scores.items()}}
