"""An analytic radiance field (a coloured sphere, optionally with a floater) for mesh tests.

The sphere's density is a smooth step across its surface, so the iso-surface at half the
peak density is exactly the sphere. Its colour is piecewise constant by quadrant of
(x, z) around the centre, so a baked texture can be checked against a known answer.
Importing this module registers the backend ``"analytic"``; a checkpoint is a folder
with ``field.json`` (the spec), written by :func:`write_analytic_field`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tasks.nerf.base import TrainReport, register_backend
from tasks.types import MaskSet, TrainedField

# Linear RGB of the four (x, z) quadrants around the centre: (+x+z, -x+z, +x-z, -x-z).
QUADRANT_RGB = ((0.80, 0.10, 0.10), (0.10, 0.70, 0.20), (0.10, 0.20, 0.80), (0.90, 0.80, 0.10))


@dataclass(frozen=True)
class SphereSpec:
    centre: tuple[float, float, float] = (0.1, -0.05, 0.2)
    radius: float = 0.5
    sigma_max: float = 50.0  # the iso-surface at sigma_max / 2 is the sphere itself
    softness: float = 0.02  # width of the density step, world units
    floater_centre: tuple[float, float, float] | None = None
    floater_radius: float = 0.08
    empty: bool = False  # density 0 everywhere


def quadrant_color(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Analytic linear RGB at world points. ``[N, 3]`` → ``[N, 3]``."""
    rel = points - centre
    index = (rel[:, 0] < 0).astype(int) + 2 * (rel[:, 2] < 0).astype(int)
    return np.asarray(QUADRANT_RGB)[index]


class AnalyticField:
    """Implements :class:`tasks.nerf.base.RadianceField` in closed form."""

    def __init__(self, spec: SphereSpec, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], device=self.device)
        self._spheres = [(spec.centre, spec.radius)]
        if spec.floater_centre is not None:
            self._spheres.append((spec.floater_centre, spec.floater_radius))

    def _signed_distance(self, points: Tensor) -> Tensor:
        """Distance outside the nearest sphere (negative inside). ``[N, 3]`` → ``[N]``."""
        dists = [torch.linalg.norm(points - torch.tensor(c, device=points.device), dim=-1) - r for c, r in self._spheres]
        return torch.stack(dists, 0).min(0).values

    def density(self, points: Tensor) -> Tensor:
        if self.spec.empty:
            return torch.zeros(points.shape[0], device=points.device)
        return self.spec.sigma_max * torch.sigmoid(-self._signed_distance(points) / self.spec.softness)

    def color(self, points: Tensor, directions: Tensor) -> Tensor:
        rgb = quadrant_color(points.detach().cpu().numpy().astype(np.float64), np.asarray(self.spec.centre))
        return torch.as_tensor(rgb, dtype=torch.float32, device=points.device)

    def render(
        self, c2w: Tensor, intrinsics: Tensor, width: int, height: int, surface_opacity: float = 0.5, solid_alpha: float = 0.0
    ) -> dict[str, Tensor]:
        """Exact ray-sphere intersection (the floater included); alpha is 0 or 1, so every
        ``surface_opacity`` and ``solid_alpha`` gives the same depth."""
        fx, fy, cx, cy = intrinsics.tolist()
        j, i = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        dirs_cam = torch.stack([(i - cx) / fx, -(j - cy) / fy, -torch.ones_like(i)], -1)
        dirs = torch.nn.functional.normalize(dirs_cam @ c2w[:3, :3].T, dim=-1)
        origin = c2w[:3, 3]
        depth = torch.full((height, width), math.inf)
        if not self.spec.empty:
            for centre, radius in self._spheres:
                oc = origin - torch.tensor(centre)
                b = (dirs * oc).sum(-1)
                disc = b**2 - (oc @ oc - radius**2)
                t = -b - torch.sqrt(disc.clamp(min=0))
                depth = torch.where((disc > 0) & (t > 0) & (t < depth), t, depth)
        alpha = torch.isfinite(depth).float()
        hit = origin + dirs * torch.nan_to_num(depth, posinf=0.0)[..., None]
        rgb = self.color(hit.reshape(-1, 3), dirs.reshape(-1, 3)).reshape(height, width, 3) * alpha[..., None]
        return {"rgb": rgb, "alpha": alpha, "depth": torch.nan_to_num(depth, posinf=0.0)}


class AnalyticBackend:
    name = "analytic"

    def train(self, transforms, hull, out_dir, settings, progress=None) -> TrainReport:  # noqa: ANN001
        raise NotImplementedError("the analytic backend is written by tests, not trained")

    def load(self, out_dir: Path, device: str | torch.device = "cpu") -> AnalyticField:
        raw = json.loads((Path(out_dir) / "field.json").read_text())
        return AnalyticField(SphereSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}), device)


@register_backend("analytic")
def _analytic_factory() -> AnalyticBackend:
    return AnalyticBackend()


def write_analytic_field(out_dir: Path, spec: SphereSpec, fingerprint: str = "test") -> TrainedField:
    """A checkpoint folder for ``spec`` and its TrainedField record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "field.json").write_text(json.dumps(asdict(spec)))
    (out_dir / "metrics.json").write_text("{}")
    return TrainedField(dir=out_dir, backend="analytic", metrics=out_dir / "metrics.json", fingerprint=fingerprint)


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """4x4 camera-to-world (OpenGL axes, +Z world up) looking from eye at target."""
    back = eye - target
    back = back / np.linalg.norm(back)
    right = np.cross([0.0, 0.0, 1.0], back)
    right = right / np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, eye
    return c2w


def write_masks(
    out_dir: Path, field: AnalyticField, views: int = 12, size: int = 96, grid: int | None = None,
    hull_spec: SphereSpec | None = None, heights: tuple[float, ...] = (1.0, 1.5),
) -> MaskSet:
    """Masks rendered from a ring of cameras (plus a hull json, with an occupancy grid if ``grid``).

    ``hull_spec`` (default: the field's own spec) says what the masks show, so a test can leave
    the floater out of the masks and check that the visual hull removes it. Camera ``k`` stands
    at height ``heights[k % len(heights)]`` (the default: above the product, as a filmed orbit).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_field = AnalyticField(hull_spec or field.spec)
    focal = size * 1.2
    frames = []
    for k in range(views):
        azimuth = 2 * math.pi * k / views
        eye = np.array([3.0 * math.cos(azimuth), 3.0 * math.sin(azimuth), heights[k % len(heights)]])
        c2w = look_at(eye, np.zeros(3))
        out = mask_field.render(torch.tensor(c2w, dtype=torch.float32), torch.tensor([focal, focal, size / 2, size / 2]), size, size)
        name = f"mask_{k:03d}.png"
        Image.fromarray((out["alpha"].numpy() * 255).astype(np.uint8)).save(out_dir / name)
        frames.append({"file_path": f"frame_{k:03d}.png", "mask_path": name, "transform_matrix": c2w.tolist()})
    transforms = {"fl_x": focal, "fl_y": focal, "cx": size / 2, "cy": size / 2, "w": size, "h": size, "frames": frames}
    (out_dir / "transforms.json").write_text(json.dumps(transforms))
    hull: dict = {"aabb": [[-1, -1, -1], [1, 1, 1]]}
    if grid:
        axis = (np.arange(grid) + 0.5) / grid * 2 - 1
        pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        occupied = mask_field.density(torch.tensor(pts, dtype=torch.float32)).numpy() > mask_field.spec.sigma_max / 2
        np.save(out_dir / "hull_grid.npy", occupied.reshape(grid, grid, grid))
        hull.update(grid="hull_grid.npy", grid_aabb=[[-1, -1, -1], [1, 1, 1]])
    (out_dir / "hull.json").write_text(json.dumps(hull))
    return MaskSet(
        dir=out_dir, transforms=out_dir / "transforms.json", hull=out_dir / "hull.json",
        contact_sheet=out_dir / "hull.json", stats=out_dir / "hull.json", fingerprint="test",
    )
