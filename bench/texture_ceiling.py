"""How much of a product's look the mesh stage's texture keeps, with the true mesh's own colours.

    PYOPENGL_PLATFORM=osmesa python -m bench.texture_ceiling --run RUN --turntable TT \\
        [--variant "mesh overrides"]... [--views 10] [--scale 1.0]

``--run`` is a ``bench.run_stages`` folder (a run stopped after segment will do). The true scan,
moved into the run's normalised world through the solved cameras, stands in for the trained
field: the fusion renders its depth (as in ``bench.fusion_ceiling``), and its colour at a point is
the true texture's at the nearest of a dense set of true-surface samples. Every ``--variant``
(space-separated Hydra overrides on ``profile=<--profile>``) runs the whole mesh stage: surface,
cleaning, budget, unwrap, bake and export. ``mesh.color_ray_samples=1 mesh.color_views=1`` are
added: this field has no density to composite along a ray and no view dependence. The GLB is then
rendered unlit from the true cameras; each pixel it covers is lifted to its surface point and
compared with the true colour there. The PSNR says what the atlas keeps of the colours it was
baked from (texel size, filtering, seams, JPEG), with camera and geometry errors left out.
Needs pyrender and OSMesa (the ``render`` extra) and the scans (the ``assets`` extra).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from bench import quality
from bench.fusion_ceiling import TrueDepthField
from bench.records import load_records, run_parser
from flows.config import compose_config
from tasks.mesh import MeshSettings, extract_mesh
from tasks.mesh_export import read_glb
from tasks.nerf.base import register_backend
from tasks.types import TrainedField
from tests.truth import load_truth_cameras
from tools.scans import load_scan

_SAMPLES = 6_000_000  # true-surface colour samples: ~0.2 mm apart on the basket, finer than a 2K texel
# The field has no density to composite along a ray and no view dependence: one colour query a texel.
_NO_DENSITY = ("mesh.color_ray_samples=1", "mesh.color_views=1")


def _textured(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, image: Image.Image) -> trimesh.Trimesh:
    """A trimesh with ``image`` as its base colour (``uv`` with trimesh's bottom-left origin). A PBR
    material with a white factor: trimesh's default simple material would darken the texture."""
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image.convert("RGB"), baseColorFactor=[255, 255, 255, 255])
    return trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False)


def textured_scan(turntable: Path) -> trimesh.Trimesh:
    """The turntable's true scan with its texture, in the truth's metric +Z-up world."""
    meta = json.loads((turntable / "truth" / "meta.json").read_text())
    scan = load_scan(meta["object"])
    return _textured(np.asarray(scan.vertices, dtype=np.float64), np.asarray(scan.faces), scan.uv, Image.open(scan.texture_path))


def textured_glb(glb: Path) -> trimesh.Trimesh:
    """Our GLB as a textured trimesh (+Y up). Read with ``read_glb``: trimesh 4 reads
    KHR_mesh_quantization's normalised uint16 UVs as raw integers and flips them in uint16."""
    data = read_glb(glb)
    if data["uv"] is None or data["image"] is None:
        raise ValueError(f"{glb} has no texture to measure (vertex colours only?)")
    uv = np.stack([data["uv"][:, 0], 1.0 - data["uv"][:, 1]], 1)  # glTF's top-left origin → trimesh's bottom-left
    return _textured(data["vertices"], data["faces"], uv, Image.open(io.BytesIO(data["image"])))


class TrueColourField(TrueDepthField):
    """The true scan as a field: rendered depth for the fusion, the nearest sample's texture colour."""

    def __init__(self, scan: trimesh.Trimesh, to_field: np.ndarray, samples: int = _SAMPLES) -> None:
        mesh = scan.copy()
        mesh.apply_transform(to_field)
        super().__init__(trimesh.Trimesh(mesh.vertices, mesh.faces, process=False))
        points, face = trimesh.sample.sample_surface(mesh, samples, seed=0)
        bary = trimesh.triangles.points_to_barycentric(mesh.triangles[face], points)
        uv = np.einsum("nk,nkc->nc", bary, np.asarray(mesh.visual.uv)[mesh.faces[face]])
        texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), dtype=np.float32) / 255.0
        h, w = texture.shape[:2]
        rows = np.clip(((1.0 - uv[:, 1] % 1.0) * h).astype(np.int64), 0, h - 1)
        cols = np.clip(((uv[:, 0] % 1.0) * w).astype(np.int64), 0, w - 1)
        self._colours = texture[rows, cols]  # sRGB, as the frames hold it
        self._tree = cKDTree(points)

    def colour_at(self, points: np.ndarray) -> np.ndarray:
        """``[N, 3]`` sRGB 0..1 of the nearest true-surface sample to each of ``points [N, 3]``."""
        _, nearest = self._tree.query(points, workers=-1)
        return self._colours[nearest]

    def color(self, points: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.colour_at(points.detach().cpu().double().numpy())).to(points.device)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the true-colour field has no density: run with mesh.color_ray_samples=1")


_FIELDS: dict[str, TrueColourField] = {}


class TrueColourBackend:
    """A ``nerf`` backend whose checkpoint folder names a field built in this process."""

    name = "true_colour"

    def load(self, out_dir: Path, device: str = "cpu") -> TrueColourField:
        return _FIELDS[(Path(out_dir) / "field.txt").read_text()]


register_backend("true_colour")(TrueColourBackend)


def render_unlit(mesh: trimesh.Trimesh, c2w: list[np.ndarray], intrinsics: tuple[float, ...], size: tuple[int, int]):
    """Base-colour renders (no lights): ``[H, W, 3]`` uint8 and depth ``[H, W]`` (0 off the mesh) per pose."""
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    import pyrender

    fx, fy, cx, cy = intrinsics
    scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0])
    scene.add(pyrender.Mesh.from_trimesh(mesh))
    camera = scene.add(pyrender.IntrinsicsCamera(fx, fy, cx, cy, znear=1e-3, zfar=1e3), pose=c2w[0])
    renderer = pyrender.OffscreenRenderer(*size)
    try:
        out = []
        for pose in c2w:
            scene.set_pose(camera, pose)
            colour, depth = renderer.render(scene, flags=pyrender.RenderFlags.FLAT)
            out.append((np.asarray(colour)[..., :3], np.asarray(depth)))
        return out
    finally:
        renderer.delete()


def texture_psnr(glb: Path, field: TrueColourField, turntable: Path, to_truth: np.ndarray, views: int, scale: float) -> dict[str, float]:
    """PSNR of the GLB's unlit render against the colour it was baked from, at the same surface points.

    Each pixel the GLB covers is lifted to its 3D point (the render's depth) and compared with the
    true colour there (the field's nearest sample). Registration and geometry errors drop out;
    what is left is what the atlas loses: texel size, filtering, seams and JPEG.
    """
    estimate = textured_glb(glb)
    y_up_to_field = np.eye(4)
    y_up_to_field[:3, :3] = quality.Y_UP_TO_Z_UP
    estimate.apply_transform(to_truth @ y_up_to_field)  # rendered from the true cameras, in the truth's world
    cams = load_truth_cameras(turntable / "truth")
    picked = [cams.c2w[i] for i in np.linspace(0, len(cams.c2w) - 1, views).round().astype(int)]
    w, h = round(cams.w * scale), round(cams.h * scale)
    fx, fy, cx, cy = cams.fl_x * scale, cams.fl_y * scale, cams.cx * scale, cams.cy * scale
    truth_to_field = np.linalg.inv(to_truth)
    squared, count = 0.0, 0
    for pose, (colour, depth) in zip(picked, render_unlit(estimate, picked, (fx, fy, cx, cy), (w, h))):
        v, u = np.nonzero(depth > 0)
        z = depth[v, u]
        camera_points = np.stack([(u + 0.5 - cx) / fx * z, -(v + 0.5 - cy) / fy * z, -z, np.ones_like(z)], 1)
        field_points = (truth_to_field @ pose @ camera_points.T).T[:, :3]
        expected = field.colour_at(field_points)
        diff = colour[v, u].astype(np.float64) / 255.0 - expected
        squared += float((diff**2).sum())
        count += diff.size
    mse = squared / max(count, 1)
    return {"texture_psnr": round(float(-10 * np.log10(max(mse, 1e-12))), 3), "views": views, "render_scale": scale}


def run_variants(run: Path, turntable: Path, profile: str, variants: list[str], views: int, scale: float) -> list[dict[str, Any]]:
    records = load_records(run)
    stills, rig, masks = records["frames"], records["colmap"], records["segment"]
    s, R, t = quality.world_to_truth(stills.index, rig.transforms, turntable / "truth")
    to_truth = np.eye(4)
    to_truth[:3, :3], to_truth[:3, 3] = s * R, t
    field = _FIELDS[str(run)] = TrueColourField(textured_scan(turntable), np.linalg.inv(to_truth))
    rows = []
    for i, variant in enumerate(variants):
        out = run / f"texture-v{i}"
        field_dir = out / "field"
        field_dir.mkdir(parents=True, exist_ok=True)
        (field_dir / "field.txt").write_text(str(run))
        record = TrainedField(dir=field_dir, backend="true_colour", metrics=field_dir / "field.txt", fingerprint=f"t{i}")
        settings = MeshSettings(**compose_config([f"profile={profile}", *variant.split(), *_NO_DENSITY])["mesh"])
        started = time.perf_counter()
        asset = extract_mesh(record, masks, out, settings, f"t{i}", device="cpu")
        metrics = json.loads(Path(asset.metrics).read_text())
        row: dict[str, Any] = {"variant": variant or "(preset)", "seconds": round(time.perf_counter() - started, 2),
                               "triangles": asset.triangles, "glb_bytes": metrics["glb_bytes"],
                               "texture_coverage": metrics["texture_coverage"], "stage_seconds": metrics["seconds"],
                               "budget_rounds": metrics["budget_rounds"], "jpeg_quality": metrics["jpeg_quality"]}
        row.update(texture_psnr(asset.glb, field, turntable, to_truth, views, scale))
        estimate = quality.glb_in_truth_frame(asset.glb, stills.index, rig.transforms, turntable / "truth")
        geometry = quality.rounded_geometry(estimate, turntable / "truth" / "mesh.ply")
        row.update({k: geometry[k] for k in ("fscore_1pct", "chamfer_of_diag")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    field.close()
    return rows


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--variant", action="append", default=[], help="space-separated overrides (repeatable)")
    parser.add_argument("--views", type=int, default=10, help="true cameras rendered, evenly picked")
    parser.add_argument("--scale", type=float, default=1.0, help="render size as a fraction of the true frames'")
    parser.add_argument("--name", default="texture_ceiling", help="results file name (without .json)")
    args = parser.parse_args()
    rows = run_variants(args.run, args.turntable, args.profile, args.variant or [""], args.views, args.scale)
    (args.run / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print(quality.markdown_table(rows, ("variant", "seconds", "triangles", "budget_rounds", "jpeg_quality", "glb_bytes",
                                        "texture_coverage", "texture_psnr", "fscore_1pct", "chamfer_of_diag")))


if __name__ == "__main__":
    main()
