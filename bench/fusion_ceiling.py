"""What the fused surface would be with perfect depth: the true mesh's depth, our cameras and masks.

    python -m bench.fusion_ceiling --run bench-out/gpu --turntable .benchdata/mac1080 [mesh overrides]

``--run`` is a ``bench.run_stages`` output folder (its ``records.json``; only the frames, colmap
and segment records are used, so a run stopped after segment will do). The true mesh is moved
into the run's normalised world through the solved cameras and rendered (pyrender, exact depth)
in place of the trained field; the mesh stage's fusion, base and cleaning then run as usual and
the result is measured against the truth. Against a real run's figures this separates what the
NeRF's depth costs from what the cameras, masks and the fusion itself cost. Needs pyrender
(the ``render`` extra) and an OpenGL context (``PYOPENGL_PLATFORM=osmesa`` headless).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from torch import Tensor

from bench import quality
from bench.records import load_records, run_parser
from flows.config import compose_config
from tasks import mesh_geometry as geo
from tasks.mesh import MeshSettings
from tasks.mesh_surface import clean_surface, meshing_box
from tasks.mesh_fusion import fuse_depth


class TrueDepthField:
    """The parts of :class:`tasks.nerf.base.RadianceField` fusion uses, rendered from a mesh."""

    def __init__(self, mesh: trimesh.Trimesh) -> None:
        import pyrender

        self._pyrender = pyrender
        self.scene = pyrender.Scene()
        self.scene.add(pyrender.Mesh.from_trimesh(mesh, smooth=False))
        self.camera = None
        self._renderer = None
        self.aabb = torch.tensor(mesh.bounds, dtype=torch.float32)

    def z_depth(self, c2w: np.ndarray, intrinsics: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
        """``[H, W]`` depth along the camera's -Z axis (0 where no surface) from ``c2w [4, 4]`` (OpenGL)."""
        fx, fy, cx, cy = intrinsics
        if self.camera is not None:
            self.scene.remove_node(self.camera)
        self.camera = self.scene.add(self._pyrender.IntrinsicsCamera(fx, fy, cx, cy, znear=1e-3, zfar=1e3), pose=c2w)
        if self._renderer is None or (self._renderer.viewport_width, self._renderer.viewport_height) != (width, height):
            self.close()
            self._renderer = self._pyrender.OffscreenRenderer(width, height)
        return self._renderer.render(self.scene, flags=self._pyrender.RenderFlags.DEPTH_ONLY)

    def close(self) -> None:
        """Free the OpenGL renderer (a later render makes a new one)."""
        if self._renderer is not None:
            self._renderer.delete()
            self._renderer = None

    def render(
        self, c2w: Tensor, intrinsics: Tensor, width: int, height: int, surface_opacity: float = 0.5, solid_alpha: float = 0.0
    ) -> dict[str, Tensor]:
        """``alpha [H, W]`` (0 or 1) and ``depth [H, W]`` (distance along each pixel's ray; opaque,
        so ``surface_opacity`` and ``solid_alpha`` change nothing)."""
        fx, fy, cx, cy = (float(v) for v in intrinsics)
        z = self.z_depth(c2w.double().numpy(), (fx, fy, cx, cy), width, height)
        u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        along_ray = np.sqrt(((u - cx) / fx) ** 2 + ((v - cy) / fy) ** 2 + 1.0)  # z-depth → ray length
        return {"alpha": torch.from_numpy((z > 0).astype(np.float32)), "depth": torch.from_numpy((z * along_ray).astype(np.float32))}


def ceiling(run: Path, turntable: Path, overrides: list[str]) -> dict[str, Any]:
    records = load_records(run)
    stills, rig, masks = records["frames"], records["colmap"], records["segment"]
    settings = MeshSettings(**compose_config(overrides)["mesh"])
    s, R, t = quality.world_to_truth(stills.index, rig.transforms, turntable / "truth")
    truth = trimesh.load(turntable / "truth" / "mesh.ply", force="mesh")
    normalised = trimesh.Trimesh((np.asarray(truth.vertices) - t) @ R / s, truth.faces, process=False)
    field = TrueDepthField(normalised)
    box = meshing_box(normalised.bounds + np.array([[-1.0], [1.0]]) * 0.2 * normalised.extents, masks, settings)
    started = time.perf_counter()
    try:
        tsdf, record = fuse_depth(field, box, settings.grid_resolution, Path(masks.transforms), settings.fusion, "cpu")
    finally:
        field.close()
    vertices, faces = geo.grid_to_mesh(-tsdf, box, 0.0)
    vertices, faces, _ = clean_surface(vertices, faces, masks, settings, hull_cull=False)
    estimate = trimesh.Trimesh(vertices=s * vertices @ R.T + t, faces=faces, process=False)
    figures = quality.geometry_quality(estimate, turntable / "truth" / "mesh.ply")
    return {"run": str(run), "overrides": overrides, "seconds": round(time.perf_counter() - started, 1),
            "fusion": record, "quality": figures}


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the mesh stage, e.g. mesh.fusion.views=32")
    args = parser.parse_args()
    result = ceiling(args.run, args.turntable, [f"profile={args.profile}", *args.overrides])
    (args.run / "fusion_ceiling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result["quality"].items()}, indent=1))


if __name__ == "__main__":
    main()
