"""mesh stage: a trained radiance field → a light web asset (GLB) and the seed's OBJ + MTL.

Steps: the product's surface (the field's rendered depth fused into a signed distance and
carved by the masks, tasks/mesh_fusion.py; or a density level chosen against the masks) →
marching cubes → keep the product (largest components; the visual-hull cull on a density
surface) → Taubin smoothing → quadric decimation → colours from the field (vertex
colours, and a baked xatlas texture) → GLB (+Y up, PBR metallic 0, KHR_mesh_quantization) and
OBJ + MTL within ``max_glb_bytes``. The triangle budget is planned before unwrapping from a
byte model of the GLB; the texture encoding is then fitted to the real bake, and a second
(last) round runs only if the real file is still over. The surface and its clean-up live in
tasks/mesh_surface.py and tasks/mesh_fusion.py, geometry helpers in
tasks/mesh_geometry.py, colour in tasks/mesh_texture.py, UVs in tasks/mesh_unwrap.py,
writers in tasks/mesh_export.py, the USDZ for Quick Look in tasks/mesh_usdz.py.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path

import cv2
import numpy as np

from tasks import mesh_geometry as geo
from tasks.mesh_fusion import FusionSettings
from tasks.mesh_export import Z_UP_TO_Y_UP, estimate_glb_bytes, glb_bytes, write_obj
from tasks.mesh_surface import clean_surface, meshing_box, product_surface
from tasks.mesh_texture import bake_texture, encode_image, linear_to_srgb, shade, srgb_to_linear
from tasks.mesh_unwrap import unwrap
from tasks.mesh_usdz import export_usdz
from tasks.nerf.base import get_backend
from tasks.nerf.camera_opt import REFINED_TRANSFORMS
from tasks.types import MaskSet, MeshAsset, TrainedField

log = logging.getLogger(__name__)


class MeshBudgetError(ValueError):
    """The GLB cannot fit max_glb_bytes within the floors the settings allow."""


@dataclass(frozen=True)
class MeshSettings:
    """Every tunable of the mesh stage (conf/mesh/*.yaml documents each key)."""

    surface: str = "depth_fusion"
    grid_resolution: int = 256
    grid_box: str = "hull"
    hull_padding: float = 0.05
    chunk_points: int = 262144
    density_threshold: float = 2.5
    iso_levels: tuple[float, ...] = ()
    iso_views: int = 8
    iso_tolerance: float = 0.01
    iso_work_px: int = 160
    keep_component_fraction: float = 0.1
    hull_cull: bool = True
    hull_grid_dilate_voxels: int = 1
    hull_vote_fraction: float = 0.8
    hull_max_views: int = 60
    mask_dilate_px: int = 4
    smooth_iterations: int = 5
    smooth_lambda: float = 0.5
    smooth_mu: float = -0.53
    max_triangles: int = 100000
    color_views: int = 5
    color_cone_deg: float = 30.0
    color_ray_samples: int = 8
    color_ray_half_voxels: float = 1.5
    field_color_space: str = "linear"
    texture_size: int = 2048
    texture_format: str = "jpeg"
    jpeg_quality: int = 90
    texture_padding_px: int = 4
    texture_dilate_px: int = 8
    unwrap_in_subprocess: bool = True
    unwrap_timeout_s: float = 600.0
    raster_chunk_texels: int = 4000000
    roughness: float = 0.7
    max_glb_bytes: int = 3000000
    min_jpeg_quality: int = 70
    min_texture_size: int = 1024
    min_triangles: int = 20000
    budget_max_rounds: int = 2
    budget_gives_way: str = "texture"
    glb_quantize: bool = True
    texture_bits_per_texel: float = 1.5
    color_shared_ray: bool = True
    unwrap_pack_scale: float = 0.5
    unwrap_faces_per_part: int = 750
    usdz: bool = True
    fusion: FusionSettings = dataclass_field(default_factory=FusionSettings)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> None:
            raise ValueError(f"mesh.{key}={getattr(self, key)!r}: {why}")

        if self.surface not in ("depth_fusion", "density"):
            bad("surface", "choose 'depth_fusion' (fused rendered depth, carved by the masks) or 'density' (a density level)")
        if isinstance(self.fusion, dict):  # from Hydra: the yaml's nested mapping
            object.__setattr__(self, "fusion", FusionSettings(**self.fusion))
        if self.grid_box not in ("hull", "field"):
            bad("grid_box", "choose 'hull' (the masks' box, padded) or 'field' (the field's aabb)")
        if self.texture_format not in ("png", "jpeg"):
            bad("texture_format", "choose 'png' or 'jpeg'")
        if self.field_color_space not in ("linear", "srgb"):
            bad("field_color_space", "choose 'linear' or 'srgb' (what the backend's color() returns)")
        if self.grid_resolution < 16:
            bad("grid_resolution", "use at least 16 samples per axis")
        if self.texture_size and (self.texture_size < 64 or self.texture_size & (self.texture_size - 1)):
            bad("texture_size", "use 0 (vertex colours only) or a power of two ≥ 64")
        if self.min_triangles > self.max_triangles:
            bad("min_triangles", f"must not exceed max_triangles={self.max_triangles}")
        if not 0 < self.min_jpeg_quality <= self.jpeg_quality <= 100:
            bad("min_jpeg_quality", f"need 0 < min_jpeg_quality <= jpeg_quality ({self.jpeg_quality}) <= 100")
        if not 0.0 <= self.hull_vote_fraction <= 1.0:
            bad("hull_vote_fraction", "must be within 0..1")
        if self.budget_gives_way not in ("texture", "triangles"):
            bad("budget_gives_way", "choose 'texture' (JPEG quality and size shrink first) or 'triangles'")
        if self.budget_max_rounds not in (1, 2):
            bad("budget_max_rounds", "use 1 or 2 (each round unwraps and bakes once)")
        if self.texture_bits_per_texel <= 0:
            bad("texture_bits_per_texel", "must be positive")
        if self.unwrap_faces_per_part < 0:
            bad("unwrap_faces_per_part", "use 0 (one piece) or a positive face count")
        if not 0.0 < self.unwrap_pack_scale <= 1.0:
            bad("unwrap_pack_scale", "must be within (0, 1]")


def _encode(image_field: np.ndarray, size: int, fmt: str, quality: int, field_space: str) -> bytes:
    """Baked image (field colour space) → encoded sRGB bytes at ``size``²."""
    if image_field.shape[0] != size:
        image_field = cv2.resize(image_field, (size, size), interpolation=cv2.INTER_AREA)
    srgb = linear_to_srgb(image_field) if field_space == "linear" else image_field
    return encode_image(srgb, fmt, quality)


def _colorize(field, vertices, faces, settings: MeshSettings, voxel: float, device: str, timings: dict) -> dict:
    """Normals, vertex colours and (if asked and possible) a baked texture for one geometry."""
    t0 = time.perf_counter()
    normals = geo.vertex_normals(vertices, faces)

    def shade_fn(points, point_normals):
        return shade(
            field, points, point_normals, settings.color_views, settings.color_cone_deg,
            settings.color_ray_samples, settings.color_ray_half_voxels * voxel, settings.chunk_points, device,
            shared_ray=settings.color_shared_ray,
        )

    out = {"vertices": vertices, "faces": faces, "normals": normals, "colors": shade_fn(vertices, normals).cpu().numpy()}
    timings["color"] = timings.get("color", 0.0) + time.perf_counter() - t0
    if settings.texture_size <= 0:
        return out
    t0 = time.perf_counter()
    t1 = t0
    try:
        # Packing at a fraction of the texture's resolution (padding scaled alike) gives the same
        # layout in 0..1 UVs, coarser only by the packer's chart rasterisation, and packs faster.
        pack_size = max(64, int(settings.texture_size * settings.unwrap_pack_scale))
        pack_padding = max(1, round(settings.texture_padding_px * pack_size / settings.texture_size))
        parts = max(1, round(len(faces) / settings.unwrap_faces_per_part)) if settings.unwrap_faces_per_part > 0 else 1
        vmap, uv_faces, uv = unwrap(
            vertices, faces, pack_size, pack_padding, settings.unwrap_in_subprocess, settings.unwrap_timeout_s, parts,
        )
        t1 = time.perf_counter()
        timings["unwrap"] = timings.get("unwrap", 0.0) + t1 - t0
        image, coverage = bake_texture(
            vertices[vmap], normals[vmap], uv_faces, uv, settings.texture_size, shade_fn,
            settings.texture_dilate_px, settings.raster_chunk_texels, device,
        )
        timings["bake"] = timings.get("bake", 0.0) + time.perf_counter() - t1
        out.update(vmap=vmap, uv_faces=uv_faces, uv=uv, image=image, coverage=coverage)
    except Exception as err:  # noqa: BLE001 - any failure falls back to vertex colours, and says so
        log.warning("texture baking failed, exporting vertex colours: %s", err)
        out["texture_error"] = f"{type(err).__name__}: {err}"
    timings["texture"] = timings.get("texture", 0.0) + time.perf_counter() - t0
    return out


def _export_arrays(colored: dict) -> dict:
    """glTF-axis arrays (+Y up) of a colorized geometry; split along UV seams when textured."""
    if "image" in colored:
        vmap = colored["vmap"]
        v, n, f, uv = colored["vertices"][vmap], colored["normals"][vmap], colored["uv_faces"], colored["uv"]
        colors = colored["colors"][vmap]
    else:
        v, n, f, uv, colors = colored["vertices"], colored["normals"], colored["faces"], None, colored["colors"]
    return {"vertices": v @ Z_UP_TO_Y_UP.T, "normals": n @ Z_UP_TO_Y_UP.T, "faces": f, "uv": uv, "colors": colors}


# Planning constants: a closed triangle mesh has about half as many vertices as triangles, and
# xatlas' charts split 1.5-2× that along seams (measured 1.46 on a decimated marching-cubes sphere,
# 2.0 on a wrinkled one).
_VERTICES_PER_TRIANGLE = 0.5
_SEAM_FACTOR = 1.75


def estimate_texture_bytes(settings: MeshSettings, size: int) -> int:
    """Planning estimate of the JPEG texture at ``min_jpeg_quality``: ``texture_bits_per_texel`` × size²."""
    return int(settings.texture_bits_per_texel * size * size / 8)


def plan_triangles(settings: MeshSettings, clean_triangles: int) -> tuple[int, dict]:
    """Triangle target decided before unwrapping: the most (≤ max_triangles) whose estimated GLB
    fits ``max_glb_bytes`` next to the texture at its floor (min_jpeg_quality, min_texture_size;
    an optimistic plan: with ``budget_gives_way=triangles`` a miss is re-planned from the measured
    texture in a second round). Returns (target, a record of the estimate).
    """
    textured = settings.texture_size > 0
    tex_size = min(settings.texture_size, max(settings.min_texture_size, 64)) if textured else 0
    texture = estimate_texture_bytes(settings, tex_size) if textured else 0
    per_vertex = _VERTICES_PER_TRIANGLE * (_SEAM_FACTOR if textured else 1.0)

    def estimate(triangles: int) -> int:
        return estimate_glb_bytes(int(triangles * per_vertex), triangles, textured, texture, settings.glb_quantize)

    target = min(settings.max_triangles, clean_triangles)
    if estimate(target) > settings.max_glb_bytes:
        per_triangle = (estimate(100_000) - estimate(0)) / 100_000
        target = int((settings.max_glb_bytes - estimate(0)) / per_triangle * 0.97)
        target = min(settings.max_triangles, max(target, settings.min_triangles))
    return target, {"triangles": target, "estimated_glb_bytes": estimate(target), "estimated_texture_bytes": texture}


def _fit_texture(arrays: dict, colored: dict, settings: MeshSettings, adjustments: list[str], start: tuple,
                 floor: tuple[int, int]):
    """GLB bytes of one geometry with the best texture encoding that fits the budget.

    Walks down from ``start`` = (format, quality, size) (png → jpeg, quality in steps of 10 to
    ``floor``'s quality, halving to its size) only as far as needed; geometry is fixed.
    Returns (glb, texture bytes or None, format, quality, size).
    """
    min_quality, min_size = floor
    fmt, quality, size = start
    texture = None
    while True:
        if "image" in colored:
            texture = _encode(colored["image"], size, fmt, quality, settings.field_color_space)
            glb = glb_bytes(arrays["vertices"], arrays["normals"], arrays["faces"], settings.roughness,
                            uv=arrays["uv"], texture=texture, texture_mime=f"image/{fmt}", quantize=settings.glb_quantize)
        else:
            colors = arrays["colors"] if settings.field_color_space == "linear" else srgb_to_linear(arrays["colors"])
            glb = glb_bytes(arrays["vertices"], arrays["normals"], arrays["faces"], settings.roughness,
                            colors_linear=colors, quantize=settings.glb_quantize)
        if len(glb) <= settings.max_glb_bytes or texture is None:
            return glb, texture, fmt, quality, size
        if fmt == "png":
            fmt = "jpeg"
            adjustments.append("texture_format png -> jpeg")
        elif quality > min_quality:
            quality = max(min_quality, quality - 10)
            adjustments.append(f"jpeg_quality -> {quality}")
        elif size // 2 >= min_size:
            size //= 2
            adjustments.append(f"texture_size -> {size}")
        else:
            return glb, texture, fmt, quality, size


def extract_mesh(
    field: TrainedField, masks: MaskSet, out_dir: Path, settings: MeshSettings, fingerprint: str, device: str = "cpu"
) -> MeshAsset:
    """Mesh, clean, colour and export the product of a trained field into ``out_dir``.

    Writes ``model.glb`` (+Y up, metallic 0, texture embedded, ≤ ``max_glb_bytes``),
    ``model.obj`` + ``model.mtl`` (+ ``model_texture.jpg|png``; +Y up like the GLB, for three.js
    OBJLoader), ``model.usdz`` (``usdz``: true and usd-core installed) and ``metrics.json``.
    Raises :class:`tasks.mesh_geometry.EmptyFieldError` when the field holds no product and
    :class:`MeshBudgetError` when the budget cannot be met.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    radiance = get_backend(field.backend).load(Path(field.dir), device)
    refined = Path(field.dir) / REFINED_TRANSFORMS
    trained_on_refined = refined.is_file()
    if trained_on_refined:
        # The field was trained on refined cameras: render and carve it from those poses.
        masks = replace(masks, transforms=refined)
    field_aabb = radiance.aabb.detach().float().cpu().numpy().astype(np.float64).reshape(2, 3)
    box = meshing_box(field_aabb, masks, settings)
    voxel = float(np.mean((box[1] - box[0]) / (settings.grid_resolution - 1)))
    vertices, faces, surface = product_surface(radiance, masks, box, settings, device, lap)
    raw_triangles = len(faces)
    # A fused surface was carved by the masks already, with a vote that forgives one short mask;
    # the segment stage's hull grid would also cut away the closed base, which lies on its edge.
    vertices, faces, cleaning = clean_surface(vertices, faces, masks, settings, settings.hull_cull and settings.surface == "density")
    clean_triangles = len(faces)
    lap("cleaning")

    # The budget is decided before the expensive steps (unwrap, bake): triangles are planned from
    # the byte model of the GLB and an estimate of the texture; the texture's encoding is then
    # fitted to the real bake (cheap re-encodes). Only a real file still over budget costs a second
    # round (decimate, unwrap, bake) with triangles from the measured sizes.
    adjustments: list[str] = []
    target, plan = plan_triangles(settings, len(faces))
    if target < settings.max_triangles:
        adjustments.append(f"max_triangles -> {target} (planned)")
    rounds = 0
    fmt, quality, size = settings.texture_format, settings.jpeg_quality, settings.texture_size
    source = (vertices, faces)
    for rounds in range(1, settings.budget_max_rounds + 1):
        clock = time.perf_counter()
        v, f = geo.decimate(*source, target)
        # A second round only trims a few percent: from this round's mesh, not the million-face surface
        # again (the basket's second decimation took ~2 s of host time for that).
        source = (v, f)
        lap("decimation")
        colored = _colorize(radiance, v, f, settings, voxel, device, timings)
        clock = time.perf_counter()
        arrays = _export_arrays(colored)
        # budget_gives_way=triangles: the texture keeps its quality and size while a later round can
        # still cut triangles; otherwise (and in the last round) it gives way first. A second round
        # starts from the first's encoding.
        floor = (settings.min_jpeg_quality, settings.min_texture_size)
        if settings.budget_gives_way == "triangles" and rounds < settings.budget_max_rounds and len(f) > settings.min_triangles:
            floor = (quality, size)
        glb, texture, fmt, quality, size = _fit_texture(arrays, colored, settings, adjustments, (fmt, quality, size), floor)
        lap("export")
        if len(glb) <= settings.max_glb_bytes:
            break
        # Then triangles: geometry bytes scale with the triangle count.
        texture_bytes = len(texture) if texture is not None else 0
        room = settings.max_glb_bytes - texture_bytes - 4096
        new_target = int(len(f) * room / max(len(glb) - texture_bytes, 1) * 0.97)
        if room <= 0 or len(f) <= settings.min_triangles or rounds == settings.budget_max_rounds:
            raise MeshBudgetError(
                f"the GLB needs {len(glb)} bytes with {len(f)} triangles and a {size}px texture (q{quality}) but "
                f"mesh.max_glb_bytes={settings.max_glb_bytes} (after {rounds} of mesh.budget_max_rounds="
                f"{settings.budget_max_rounds} rounds: {'; '.join(adjustments) or 'none'}): raise max_glb_bytes "
                "or lower min_triangles / min_texture_size / min_jpeg_quality"
            )
        target = max(new_target, settings.min_triangles)
        adjustments.append(f"max_triangles -> {target}")
    if settings.budget_gives_way == "texture":
        adjustments.sort(key=lambda step: step.startswith("max_triangles"))  # priority order: texture first

    glb_path = out_dir / "model.glb"
    glb_path.write_bytes(glb)
    obj_path = out_dir / "model.obj"
    extra: dict[str, str] = {"mtl": str(obj_path.with_suffix(".mtl"))}
    texture_name = None
    if texture is not None:
        texture_name = "model_texture." + ("jpg" if fmt == "jpeg" else "png")
        (out_dir / texture_name).write_bytes(texture)
        extra["texture"] = str(out_dir / texture_name)
    obj_colors = arrays["colors"] if settings.field_color_space == "srgb" else linear_to_srgb(arrays["colors"])
    write_obj(obj_path, arrays["vertices"], arrays["normals"], arrays["faces"], settings.roughness,
              uv=arrays["uv"] if texture is not None else None, texture_name=texture_name, colors_srgb=obj_colors)
    lap("export")
    # Optional: off, without usd-core, or if pxr fails, it says why in metrics and the stage goes on.
    usdz_path, usdz = export_usdz(settings.usdz, out_dir / "model.usdz", arrays, texture, fmt,
                                  settings.roughness, settings.field_color_space)
    extra.update({"usdz": str(usdz_path)} if usdz_path else {})
    lap("usdz")

    metrics = {
        "triangles": int(len(arrays["faces"])),
        "vertices": int(len(arrays["vertices"])),
        "glb_bytes": len(glb),
        "obj_bytes": obj_path.stat().st_size,
        **usdz,
        "texture_size": size if texture is not None else 0,
        "texture_format": fmt if texture is not None else None,
        "jpeg_quality": quality if texture is not None and fmt == "jpeg" else None,
        "texture_coverage": colored.get("coverage"),
        "texture_error": colored.get("texture_error"),
        "bbox_world_zup": {"min": colored["vertices"].min(0).tolist(), "max": colored["vertices"].max(0).tolist()},
        "meshing_box": box.tolist(),
        "cameras": "refined by training" if trained_on_refined else "solved",
        **surface,
        "triangles_marching_cubes": raw_triangles,
        "triangles_culled_by_hull": cleaning["triangles_culled_by_hull"],
        "hull_cull": cleaning["hull_cull"],
        "components_dropped": cleaning["components_dropped"],
        "triangles_clean": clean_triangles,
        "budget_adjustments": adjustments,
        "budget_plan": plan,
        "budget_rounds": rounds,
        "glb_quantized": settings.glb_quantize,
        "axes": "GLB and OBJ are +Y up: world (x, y, z) -> (x, z, -y)",
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "settings": asdict(settings),
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return MeshAsset(dir=out_dir, glb=glb_path, obj=obj_path, triangles=metrics["triangles"],
                     metrics=metrics_path, fingerprint=fingerprint, extra=extra)
