"""A turntable strip of a GLB for people to look at (reports, contact sheets, PR reviews).

pyrender on Mesa's OSMesa renders it properly (textures, lights); without pyrender a numpy
point splat of coloured surface samples stands in.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

log = logging.getLogger(__name__)

_ELEVATION_DEG = 20.0  # cameras look slightly down at the product, like a shop photo
_YFOV = math.radians(35.0)
_BACKGROUND = (255, 255, 255)


def _orbit_poses(centre: np.ndarray, distance: float, views: int, elevation_deg: float = _ELEVATION_DEG) -> list[np.ndarray]:
    """``views`` 4x4 camera-to-world poses (OpenGL axes) around +Y, looking at ``centre``."""
    poses = []
    elevation = math.radians(elevation_deg)
    for k in range(views):
        azimuth = 2 * math.pi * k / views
        eye = centre + distance * np.array(
            [math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth)]
        )
        back = (eye - centre) / np.linalg.norm(eye - centre)
        right = np.cross([0.0, 1.0, 0.0], back)
        right /= np.linalg.norm(right)
        pose = np.eye(4)
        pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, np.cross(back, right), back, eye
        poses.append(pose)
    return poses


def _render_pyrender(mesh: trimesh.Trimesh, poses: list[np.ndarray], size: int) -> list[np.ndarray]:
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")  # headless: no display, no GPU
    import pyrender

    scene = pyrender.Scene(bg_color=[c / 255 for c in _BACKGROUND] + [1.0], ambient_light=[0.35, 0.35, 0.35])
    scene.add(pyrender.Mesh.from_trimesh(mesh))
    camera = scene.add(pyrender.PerspectiveCamera(yfov=_YFOV, aspectRatio=1.0), pose=poses[0])
    light = scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=3.0), pose=poses[0])
    renderer = pyrender.OffscreenRenderer(size, size)
    try:
        frames = []
        for pose in poses:
            scene.set_pose(camera, pose)
            scene.set_pose(light, pose)  # a headlight: every view evenly lit
            color, _ = renderer.render(scene)
            frames.append(np.asarray(color[..., :3], dtype=np.uint8))
        return frames
    finally:
        renderer.delete()


def _render_points(mesh: trimesh.Trimesh, poses: list[np.ndarray], size: int, samples: int = 200000) -> list[np.ndarray]:
    """Fallback: z-buffered splat of coloured, headlight-shaded surface samples."""
    points, face_index = trimesh.sample.sample_surface(mesh, samples, seed=0)
    # Texture → per-vertex colours (trimesh samples the texture at the UVs); a face's colour is their mean.
    vertex_rgb = np.asarray(mesh.visual.to_color().vertex_colors, dtype=np.float64)[:, :3] / 255.0
    rgb = vertex_rgb[mesh.faces[face_index]].mean(1)
    normals = mesh.face_normals[face_index]
    focal = size / 2 / math.tan(_YFOV / 2)
    frames = []
    for pose in poses:
        cam = (points - pose[:3, 3]) @ pose[:3, :3]
        depth = -cam[:, 2]
        lambert = np.clip(normals @ pose[:3, 2], 0.0, 1.0)  # headlight along the view axis
        shaded = np.clip(rgb * (0.35 + 0.65 * lambert)[:, None], 0, 1)
        u = (focal * cam[:, 0] / np.maximum(depth, 1e-6) + size / 2).astype(int)
        v = (-focal * cam[:, 1] / np.maximum(depth, 1e-6) + size / 2).astype(int)
        ok = (depth > 0) & (u >= 0) & (u < size - 1) & (v >= 0) & (v < size - 1)
        order = np.argsort(-depth[ok])  # far first, so near points are written last and win
        image = np.full((size, size, 3), _BACKGROUND, dtype=np.uint8)
        uu, vv, cc = u[ok][order], v[ok][order], (shaded[ok][order] * 255).astype(np.uint8)
        for du, dv in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2x2 splats close the gaps between samples
            image[vv + dv, uu + du] = cc
        frames.append(image)
    return frames


def load_glb_mesh(glb: Path) -> trimesh.Trimesh:
    """The stage's GLB as one textured (or vertex-coloured) trimesh, +Y up.

    Read with :func:`tasks.mesh_export.read_glb`, not ``trimesh.load``: trimesh 5.2 ignores
    ``normalized`` on integer accessors, so the KHR_mesh_quantization UVs (uint16) and normals
    (int8) would come back as raw integers (positions do decode: they are non-normalised).
    """
    import io

    from tasks.mesh_export import read_glb

    data = read_glb(Path(glb))
    pbr = data["json"]["materials"][0].get("pbrMetallicRoughness", {}) if data["json"].get("materials") else {}
    if data["image"] is not None and data["uv"] is not None:
        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.open(io.BytesIO(data["image"])).convert("RGB"),
            metallicFactor=pbr.get("metallicFactor", 1.0), roughnessFactor=pbr.get("roughnessFactor", 1.0),
        )
        uv = np.stack([data["uv"][:, 0], 1.0 - data["uv"][:, 1]], 1)  # glTF top-left → trimesh bottom-left
        visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    elif data["colors"] is not None:
        visual = trimesh.visual.ColorVisuals(vertex_colors=np.round(np.clip(data["colors"], 0, 1) * 255).astype(np.uint8))
    else:
        visual = None
    return trimesh.Trimesh(data["vertices"], data["faces"], vertex_normals=data["normals"], visual=visual, process=False)


def turntable_preview(glb: Path, out_png: Path, views: int = 8, size: int = 256) -> Path:
    """Render ``glb`` (+Y up) from ``views`` azimuths into one ``[size, views*size]`` PNG strip."""
    if views < 1 or size < 16:
        raise ValueError(f"turntable_preview needs views ≥ 1 and size ≥ 16, got views={views}, size={size}")
    mesh = load_glb_mesh(Path(glb))
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{glb} holds no triangle mesh to preview")
    centre = mesh.bounds.mean(0)
    radius = float(np.linalg.norm(mesh.bounds[1] - mesh.bounds[0])) / 2
    poses = _orbit_poses(centre, radius / math.sin(_YFOV / 2) * 1.05, views)
    try:
        frames = _render_pyrender(mesh, poses, size)
    except Exception as err:  # noqa: BLE001 - no pyrender / no OSMesa: the splat still shows the product
        log.warning("pyrender unavailable (%s); previewing with a point splat", err)
        frames = _render_points(mesh, poses, size)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(frames, axis=1)).save(out_png)
    return out_png


def render_preview_in_subprocess(glb: Path, out_png: Path, timeout_s: float = 300.0) -> Path:
    """``turntable_preview`` in a child process.

    Mesa's software OpenGL exports its LLVM symbols process-wide; a library with its own LLVM
    loaded afterwards (triton, which torch imports on the first optimizer step) then crashes
    while loading. A worker that trains product after product must keep OpenGL out of its
    own process.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tasks.mesh_preview", str(glb), str(out_png)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not Path(out_png).exists():
        raise RuntimeError(f"preview renderer exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return Path(out_png)


if __name__ == "__main__":
    import sys

    turntable_preview(Path(sys.argv[1]), Path(sys.argv[2]))
