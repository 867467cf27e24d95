"""A radiance field backed by a triangle mesh: what backends that hand back a mesh give the mesh stage.

instant-ngp's Python bindings and nerfstudio's command line both export a mesh, not a density
query at arbitrary points (pyngp binds ``compute_marching_cubes_mesh`` but keeps its
``get_density_on_grid`` in C++; nerfstudio's checkpoint only loads inside nerfstudio's own
environment). The mesh stage asks a :class:`~tasks.nerf.base.RadianceField` for density and
colour, so those backends store their mesh here and :class:`MeshField` answers from it:

- ``density(points)``: ``peak_density`` × the trilinearly interpolated inside/outside grid of the
  mesh (a voxel is inside when a ray through its centre crosses the mesh an odd number of times
  along at least two of the three axes, so a small hole in the mesh does not empty a column).
  Marching cubes at iso-level L puts the surface between the last inside and the first outside
  voxel centre, L / peak_density of the way from the outside one: any level up to
  ``peak_density`` finds the product within one voxel of the mesh, outward at low levels (the mesh
  stage picks the lowest level that fits the masks). What the mesh stage re-meshes is the exported
  mesh: its detail is capped by the tool's export and by ``resolution``.
- ``color(points, directions)``: the sRGB colour of the nearest mesh vertex (no view dependence).
- ``render(...)``: volume rendering of that density and colour through the box.

Checkpoint files: ``field_mesh.ply`` (world coordinates, +Z up, 8-bit sRGB vertex colours) and
``field.json`` (format, box, grid resolution, peak density, render samples, where the mesh came from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree
from torch import Tensor

from tasks.nerf.rays import composite, intersect_aabb, pixel_rays, stratified_samples

FORMAT = "korokoro-mesh-field/1"
MESH_FILE = "field_mesh.ply"
# A sample whose compositing weight is at most this adds nothing visible to a pixel: it is not coloured.
VISIBLE_WEIGHT = 1e-6


@dataclass(frozen=True)
class MeshFieldOptions:
    """Settings of the mesh-backed field, shared by the backends that use it (documented in their yaml)."""

    mesh_field_resolution: int = 256
    mesh_field_density: float = 1000.0
    mesh_field_render_samples: int = 256


def _column_crossings(tri: np.ndarray, axis: int, lo: np.ndarray, size: np.ndarray, res: int) -> np.ndarray:
    """Inside/outside parity of voxel centres from rays along ``axis`` through every column.

    tri ``[F, 3, 3]`` triangle corners (world), lo ``[3]`` box minimum, size ``[3]`` voxel size →
    ``[R, R, R]`` bool indexed (x, y, z): an odd number of crossings below the voxel centre.
    """
    u, v = [k for k in range(3) if k != axis]
    pu, pv, pa = tri[..., u], tri[..., v], tri[..., axis]
    # Columns whose centre lies within each triangle's projected bounding box.
    i0 = np.clip(np.ceil((pu.min(1) - lo[u]) / size[u] - 0.5), 0, res).astype(np.int64)
    i1 = np.clip(np.floor((pu.max(1) - lo[u]) / size[u] - 0.5), -1, res - 1).astype(np.int64)
    j0 = np.clip(np.ceil((pv.min(1) - lo[v]) / size[v] - 0.5), 0, res).astype(np.int64)
    j1 = np.clip(np.floor((pv.max(1) - lo[v]) / size[v] - 0.5), -1, res - 1).astype(np.int64)
    nu, nv = np.maximum(i1 - i0 + 1, 0), np.maximum(j1 - j0 + 1, 0)
    count = nu * nv
    owner = np.repeat(np.arange(len(tri)), count)  # one entry per (triangle, candidate column)
    local = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
    cu = i0[owner] + local // nv[owner]
    cv = j0[owner] + local % nv[owner]
    qu, qv = lo[u] + (cu + 0.5) * size[u], lo[v] + (cv + 0.5) * size[v]
    au, av = pu[owner] - qu[:, None], pv[owner] - qv[:, None]  # corners relative to the column, [P, 3]
    # Edge functions: each corner's weight is the signed area opposite it.
    w = np.stack([au[:, (k + 1) % 3] * av[:, (k + 2) % 3] - au[:, (k + 2) % 3] * av[:, (k + 1) % 3] for k in range(3)], 1)
    hit = (w > 0).all(1) | (w < 0).all(1)
    depth = (w[hit] * pa[owner[hit]]).sum(1) / w[hit].sum(1)
    # Every voxel whose centre lies above the crossing sees one more crossing below it.
    first = np.clip(np.floor((depth - lo[axis]) / size[axis] - 0.5).astype(np.int64) + 1, 0, res)
    keep = first < res
    index = np.zeros((3, int(keep.sum())), np.int64)
    index[u], index[v], index[axis] = cu[hit][keep], cv[hit][keep], first[keep]
    steps = np.zeros((res, res, res), np.uint8)
    np.add.at(steps, tuple(index), 1)
    # uint8 wraps at 256, an even number: the parity of the running count survives.
    return np.cumsum(steps, axis=axis, dtype=np.uint8) % 2 == 1


def inside_mesh_grid(vertices: np.ndarray, faces: np.ndarray, aabb: np.ndarray, resolution: int) -> np.ndarray:
    """Which voxel centres of a ``resolution``³ grid over ``aabb`` lie inside the mesh.

    vertices ``[V, 3]``, faces ``[F, 3]``, aabb ``[2, 3]`` → ``[R, R, R]`` bool indexed (x, y, z),
    voxel ``i`` centred at ``aabb[0] + (i + 0.5) * size``. Majority of the three axes' parities.
    """
    aabb = np.asarray(aabb, np.float64)
    size = (aabb[1] - aabb[0]) / resolution
    tri = np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)]
    votes = np.zeros((resolution,) * 3, np.uint8)
    for axis in range(3):
        votes += _column_crossings(tri, axis, aabb[0], size, resolution)
    return votes >= 2


class MeshField:
    """A mesh behind the :class:`tasks.nerf.base.RadianceField` interface (inference only)."""

    def __init__(
        self,
        vertices: np.ndarray,
        faces: np.ndarray,
        colors_srgb: np.ndarray,
        aabb: np.ndarray,
        resolution: int,
        peak_density: float,
        render_samples: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.aabb = torch.as_tensor(np.asarray(aabb, np.float32), device=self.device)
        self.peak_density = float(peak_density)
        self.render_samples = int(render_samples)
        inside = inside_mesh_grid(vertices, faces, aabb, resolution)
        self.grid = torch.from_numpy(inside.astype(np.float32))[None, None].to(self.device)  # [1, 1, X, Y, Z]
        self._tree = cKDTree(np.asarray(vertices, np.float64))
        self._colors = torch.as_tensor(np.asarray(colors_srgb, np.float32), device=self.device)

    @torch.no_grad()
    def density(self, points: Tensor) -> Tensor:
        """points ``[N, 3]`` → density ``[N]``: peak_density × interpolated inside fraction, 0 outside the box."""
        points = points.to(self.device, torch.float32)
        unit = (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0]) * 2 - 1  # -1..1 spans the outer voxel faces
        # grid_sample reads the last coordinate as the input's last axis: (x, y, z) grid → (z, y, x) coordinates.
        coords = unit.flip(-1).reshape(1, -1, 1, 1, 3)
        sampled = torch.nn.functional.grid_sample(self.grid, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
        return sampled.reshape(-1) * self.peak_density

    @torch.no_grad()
    def color(self, points: Tensor, directions: Tensor) -> Tensor:
        """points ``[N, 3]`` (directions ignored) → sRGB ``[N, 3]`` of the nearest mesh vertex."""
        _, nearest = self._tree.query(points.detach().cpu().numpy().astype(np.float64), workers=-1)
        return self._colors[torch.as_tensor(nearest, device=self.device)]

    @torch.no_grad()
    def render(
        self, c2w: Tensor, intrinsics: Tensor, width: int, height: int, surface_opacity: float = 0.5,
        solid_alpha: float = 0.0, chunk: int = 4096,
    ) -> dict[str, Tensor]:
        """One view: c2w ``[4, 4]`` (OpenGL), intrinsics ``[4]`` → ``rgb [H, W, 3]`` (premultiplied),
        ``alpha [H, W]``, ``depth [H, W]``; ``render_samples`` steps across the box diagonal.
        ``surface_opacity`` and ``solid_alpha`` are ignored: the mesh's shell is nearly opaque, its mean
        depth is its surface."""
        c2w, intrinsics = c2w.to(self.device, torch.float32), intrinsics.to(self.device, torch.float32)
        v, u = torch.meshgrid(torch.arange(height, device=self.device), torch.arange(width, device=self.device), indexing="ij")
        pixels = torch.stack([u.reshape(-1), v.reshape(-1)], -1)
        step = float((self.aabb[1] - self.aabb[0]).norm()) / self.render_samples
        outs: dict[str, list[Tensor]] = {"rgb": [], "alpha": [], "depth": []}
        for part in pixels.split(chunk):
            origins, directions = pixel_rays(c2w, intrinsics, part)
            t_near, t_far, hit = intersect_aabb(origins, directions, self.aabb)
            t_mid, valid = stratified_samples(t_near, t_far, step, self.render_samples + 1, jitter=False)
            points = origins[:, None] + t_mid[..., None] * directions[:, None]
            sigma = self.density(points.reshape(-1, 3)).reshape(t_mid.shape) * (valid & hit[:, None])
            rgb = torch.zeros(*t_mid.shape, 3, device=self.device)
            out = composite(sigma, rgb, t_mid, step)
            # Colour only the samples that show: behind the shell's first few samples the weights
            # vanish, and the nearest-vertex lookup of every sample inside the solid is what made a
            # 0.9M-face TSDF mesh take minutes a view. The skipped ones together weigh at most
            # render_samples × VISIBLE_WEIGHT.
            seen = out["weights"] > VISIBLE_WEIGHT
            if bool(seen.any()):
                rgb[seen] = self.color(points[seen], directions[:, None].expand_as(points)[seen])
                out["rgb"] = (out["weights"][..., None] * rgb).sum(-2)
            for key in outs:
                outs[key].append(out[key])
        return {
            "rgb": torch.cat(outs["rgb"]).reshape(height, width, 3),
            "alpha": torch.cat(outs["alpha"]).reshape(height, width),
            "depth": torch.cat(outs["depth"]).reshape(height, width),
        }


def write_mesh_field(
    out_dir: Path,
    vertices: np.ndarray,
    faces: np.ndarray,
    colors_srgb: np.ndarray | None,
    aabb: np.ndarray,
    options: MeshFieldOptions,
    source: dict[str, Any],
) -> Path:
    """Write ``field_mesh.ply`` + ``field.json`` into ``out_dir``; returns the PLY path.

    vertices ``[V, 3]`` world, faces ``[F, 3]``, colors_srgb ``[V, 3]`` in 0..1 (None = mid grey),
    aabb ``[2, 3]`` the box the field lives in. ``source`` says where the mesh came from (kept in field.json).
    """
    vertices = np.asarray(vertices, np.float64).reshape(-1, 3)
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise ValueError(f"the exported mesh has no triangles ({source}); the field learned no product")
    colors = np.full((len(vertices), 3), 0.5) if colors_srgb is None else np.clip(np.asarray(colors_srgb, np.float64), 0, 1)
    rgba = np.concatenate([np.round(colors * 255), np.full((len(vertices), 1), 255)], 1).astype(np.uint8)
    out_dir = Path(out_dir)
    ply = out_dir / MESH_FILE
    trimesh.Trimesh(vertices, faces, vertex_colors=rgba, process=False).export(ply)
    (out_dir / "field.json").write_text(json.dumps({
        "format": FORMAT,
        "aabb": np.asarray(aabb, np.float64).tolist(),
        "resolution": options.mesh_field_resolution,
        "peak_density": options.mesh_field_density,
        "render_samples": options.mesh_field_render_samples,
        "vertices": len(vertices),
        "faces": len(faces),
        "vertex_colors": colors_srgb is not None,
        "source": source,
    }, indent=2))
    return ply


def read_mesh(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A PLY / OBJ mesh → vertices ``[V, 3]``, faces ``[F, 3]``, sRGB vertex colours ``[V, 3]`` or None."""
    mesh = trimesh.load(Path(path), process=False, force="mesh")
    colors = None
    if mesh.visual.kind == "vertex":
        colors = np.asarray(mesh.visual.vertex_colors, np.float64)[:, :3] / 255.0
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64), colors


def load_mesh_field(out_dir: Path, backend: str, device: str | torch.device = "cpu") -> MeshField:
    """Load ``out_dir``'s ``field.json`` + ``field_mesh.ply`` written by :func:`write_mesh_field`."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "field.json"
    if not meta_path.is_file() or not (out_dir / MESH_FILE).is_file():
        raise FileNotFoundError(f"no {backend} checkpoint (field.json + {MESH_FILE}) in {out_dir}; train the field first (train stage)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a {FORMAT} checkpoint (format={meta.get('format')!r})")
    vertices, faces, colors = read_mesh(out_dir / MESH_FILE)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return MeshField(
        vertices, faces, colors if colors is not None else np.full((len(vertices), 3), 0.5),
        np.asarray(meta["aabb"]), int(meta["resolution"]), float(meta["peak_density"]), int(meta["render_samples"]), device,
    )
