"""USDZ for Apple Quick Look, written with Pixar's ``usd-core`` (the ``pxr`` modules).

``usd-core`` is optional (``pip install 'korokoro[usdz]'``): without it :func:`export_usdz`
logs one line and the mesh stage goes on with GLB + OBJ (the viewer then lets model-viewer
convert the GLB for Quick Look itself).

The package holds one binary layer ``model.usdc`` (first in the zip, as the USDZ spec asks)
and the baked texture exactly as encoded for the GLB (JPEG or PNG, the two formats Quick Look
reads); ``UsdUtils.CreateNewUsdzPackage`` stores both uncompressed and 64-byte aligned. The
layer:

- stage metadata ``upAxis = "Y"``, ``metersPerUnit`` (1: a unit is a metre, as glTF reads the
  GLB — the capture has no absolute scale, so both assets show the normalised world, the
  cameras 2 units from the product), ``defaultPrim = "product"``;
- ``/product`` (Xform, kind ``component``) with ``/product/mesh`` (triangles,
  ``subdivisionScheme = "none"`` so Quick Look shows the faces as they are, vertex normals,
  ``primvars:st`` texture coordinates) bound to ``/product/Materials/product_material``: a
  ``UsdPreviewSurface`` (metallic 0, the GLB's roughness) whose ``diffuseColor`` reads the
  texture through ``UsdUVTexture`` (sRGB, clamped) and ``UsdPrimvarReader_float2`` ("st").
  Without a texture the vertex colours go to ``primvars:displayColor`` (linear) and
  ``diffuseColor`` reads them through ``UsdPrimvarReader_float3``.

Arrays come in the GLB's axes (+Y up), uv with v up (the OBJ and USD convention alike).
"""

from __future__ import annotations

import logging
import shutil
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tasks.mesh_texture import srgb_to_linear

log = logging.getLogger(__name__)

USD_MISSING = "usd-core is not installed (pip install 'korokoro[usdz]'): model.usdz is not written"
USDZ_ALIGNMENT = 64  # the USDZ spec: every file's data starts at a multiple of 64 bytes
# Validators of usd-core's UsdValidation framework that concern a single-asset USDZ (the
# python ComplianceChecker of older releases is gone from 26.x).
VALIDATOR_KEYWORDS = ("UsdzValidators", "UsdCoreValidators", "UsdGeomValidators", "UsdShadeValidators")
_QUICK_LOOK_IMAGES = (".png", ".jpg", ".jpeg")
_QUICK_LOOK_SHADERS = ("UsdPreviewSurface", "UsdUVTexture", "UsdPrimvarReader_float2", "UsdPrimvarReader_float3")


def usd_available() -> bool:
    """Whether ``pxr`` (usd-core) can be imported."""
    try:
        import pxr.Usd  # noqa: F401
    except ImportError:
        return False
    return True


def _author_stage(
    layer_path: Path,
    vertices: np.ndarray,
    normals: np.ndarray,
    faces: np.ndarray,
    roughness: float,
    uv: np.ndarray | None,
    texture_name: str | None,
    colors_linear: np.ndarray | None,
    meters_per_unit: float,
    name: str,
) -> None:
    from pxr import Gf, Kind, Sdf, Usd, UsdGeom, UsdShade, Vt

    stage = Usd.Stage.CreateNew(str(layer_path))
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
    UsdGeom.SetStageMetersPerUnit(stage, float(meters_per_unit))
    root = UsdGeom.Xform.Define(stage, f"/{name}")
    Usd.ModelAPI(root.GetPrim()).SetKind(Kind.Tokens.component)
    stage.SetDefaultPrim(root.GetPrim())

    mesh = UsdGeom.Mesh.Define(stage, f"/{name}/mesh")
    points = np.ascontiguousarray(vertices, dtype=np.float32)
    mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
    mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(faces), 3, dtype=np.int32)))
    mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(np.ascontiguousarray(faces, dtype=np.int32).reshape(-1)))
    mesh.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(normals, dtype=np.float32)))
    mesh.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
    mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
    mesh.CreateOrientationAttr(UsdGeom.Tokens.rightHanded)  # counter-clockwise faces, as in the GLB
    mesh.CreateDoubleSidedAttr(False)
    mesh.CreateExtentAttr(Vt.Vec3fArray([Gf.Vec3f(*map(float, points.min(0))), Gf.Vec3f(*map(float, points.max(0)))]))
    primvars = UsdGeom.PrimvarsAPI(mesh.GetPrim())

    material = UsdShade.Material.Define(stage, f"/{name}/Materials/{name}_material")
    surface = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("surface"))
    surface.CreateIdAttr("UsdPreviewSurface")
    surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
    surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(float(roughness))
    diffuse = surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f)
    material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")

    if texture_name is not None and uv is not None:
        st = primvars.CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex)
        st.Set(Vt.Vec2fArray.FromNumpy(np.ascontiguousarray(uv, dtype=np.float32)))
        reader = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("st_reader"))
        reader.CreateIdAttr("UsdPrimvarReader_float2")
        reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
        texture = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("base_color"))
        texture.CreateIdAttr("UsdUVTexture")
        texture.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(Sdf.AssetPath(f"./{texture_name}"))
        texture.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
        texture.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
        # Clamp, as the GLB's sampler: chart borders never wrap to the far side of the atlas.
        texture.CreateInput("wrapS", Sdf.ValueTypeNames.Token).Set("clamp")
        texture.CreateInput("wrapT", Sdf.ValueTypeNames.Token).Set("clamp")
        diffuse.ConnectToSource(texture.ConnectableAPI(), "rgb")
        texture.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
    elif colors_linear is not None:
        display = primvars.CreatePrimvar("displayColor", Sdf.ValueTypeNames.Color3fArray, UsdGeom.Tokens.vertex)
        display.Set(Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(np.clip(colors_linear, 0, 1), dtype=np.float32)))
        reader = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("color_reader"))
        reader.CreateIdAttr("UsdPrimvarReader_float3")
        reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("displayColor")
        diffuse.ConnectToSource(reader.ConnectableAPI(), "result")
    else:
        diffuse.Set(Gf.Vec3f(0.8, 0.8, 0.8))
    UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)
    stage.GetRootLayer().Save()


def write_usdz(
    path: Path,
    vertices: np.ndarray,
    normals: np.ndarray,
    faces: np.ndarray,
    roughness: float,
    uv: np.ndarray | None = None,
    texture: bytes | None = None,
    texture_format: str = "jpeg",
    colors_linear: np.ndarray | None = None,
    meters_per_unit: float = 1.0,
    name: str = "product",
) -> Path:
    """Write a one-mesh USDZ package at ``path`` (see the module docstring for its layout).

    vertices, normals ``[V, 3]`` (+Y up), faces ``[F, 3]`` counter-clockwise, uv ``[V, 2]``
    (v up) with ``texture`` the encoded image bytes (``texture_format`` "jpeg" or "png"), or
    colors_linear ``[V, 3]`` 0..1 when there is no texture. Raises ImportError without usd-core.
    """
    from pxr import Sdf, UsdUtils

    path = Path(path)
    if texture_format not in ("jpeg", "png"):
        raise ValueError(f"texture_format={texture_format!r}: Quick Look reads 'jpeg' or 'png' textures")
    with tempfile.TemporaryDirectory(prefix="usdz-") as tmp:
        work = Path(tmp)
        texture_name = None
        if texture is not None and uv is not None:
            texture_name = f"{path.stem}_texture." + ("jpg" if texture_format == "jpeg" else "png")
            (work / texture_name).write_bytes(texture)
        layer = work / f"{path.stem}.usdc"
        _author_stage(layer, vertices, normals, faces, roughness, uv, texture_name, colors_linear, meters_per_unit, name)
        package = work / path.name
        if not UsdUtils.CreateNewUsdzPackage(Sdf.AssetPath(str(layer)), str(package)):
            raise RuntimeError(f"UsdUtils.CreateNewUsdzPackage could not package {layer} into {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(package), str(path))
    return path


def zip_layout_problems(path: Path) -> list[str]:
    """What breaks the USDZ spec's zip rules: the first entry a USD layer, entries stored
    (no compression, no encryption), every entry's data 64-byte aligned, images Quick Look reads."""
    problems = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        entries = archive.infolist()
        if not entries:
            return [f"{path.name} is an empty zip"]
        if Path(entries[0].filename).suffix not in (".usdc", ".usda", ".usd"):
            problems.append(f"the first entry is {entries[0].filename}, not a USD layer")
        for info in entries:
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                problems.append(f"{info.filename} is compressed or encrypted")
            raw.seek(info.header_offset)
            header = raw.read(30)
            name_len, extra_len = struct.unpack_from("<HH", header, 26)
            data_offset = info.header_offset + 30 + name_len + extra_len
            if data_offset % USDZ_ALIGNMENT:
                problems.append(f"{info.filename}'s data starts at byte {data_offset}, not a multiple of {USDZ_ALIGNMENT}")
            suffix = Path(info.filename).suffix.lower()
            if suffix not in (".usdc", ".usda", ".usd") and suffix not in _QUICK_LOOK_IMAGES:
                problems.append(f"{info.filename}: Quick Look reads only USD layers and PNG / JPEG images")
    return problems


def validator_problems(path: Path) -> list[str]:
    """Errors of usd-core's validators (:data:`VALIDATOR_KEYWORDS`) on the package's stage, and
    shaders other than the UsdPreviewSurface family (all that Quick Look renders)."""
    from pxr import Usd, UsdShade, UsdValidation

    registry = UsdValidation.ValidationRegistry()
    validators = registry.GetOrLoadValidatorsByName(
        sorted({m.name for k in VALIDATOR_KEYWORDS for m in registry.GetValidatorMetadataForKeyword(k)})
    )
    try:
        stage = Usd.Stage.Open(str(path))
    except Exception as err:  # noqa: BLE001 - pxr raises Tf.ErrorException: the answer is "unreadable"
        return [f"usd-core cannot open {Path(path).name}: {str(err).strip()}"]
    errors = UsdValidation.ValidationContext(validators).Validate(stage)
    problems = [f"{e.GetName()}: {e.GetMessage()}" for e in errors if e.GetType() == UsdValidation.ValidationErrorType.Error]
    for prim in stage.Traverse():
        shader = UsdShade.Shader(prim)
        if shader and shader.GetIdAttr().Get() not in _QUICK_LOOK_SHADERS:
            problems.append(f"{prim.GetPath()}: shader {shader.GetIdAttr().Get()!r} is not one Quick Look renders")
    return problems


def usdz_problems(path: Path) -> list[str]:
    """Everything :func:`zip_layout_problems` and :func:`validator_problems` find; [] = a sound package."""
    return zip_layout_problems(path) + validator_problems(path)


def read_usdz(path: Path) -> dict[str, Any]:
    """Open a package written by :func:`write_usdz` with pxr: ``points [V, 3]``, ``normals [V, 3]``,
    ``faces [F, 3]``, ``uv [V, 2]`` or None, ``texture`` bytes or None (read through the package),
    ``texture_file`` (its asset path), ``up_axis``, ``meters_per_unit``, ``roughness``, ``metallic``."""
    from pxr import Ar, Usd, UsdGeom, UsdShade

    stage = Usd.Stage.Open(str(path))
    root = stage.GetDefaultPrim()
    mesh = next(UsdGeom.Mesh(p) for p in Usd.PrimRange(root) if p.IsA(UsdGeom.Mesh))
    counts = np.asarray(mesh.GetFaceVertexCountsAttr().Get())
    if not np.all(counts == 3):
        raise ValueError(f"{path}: the mesh has faces that are not triangles")
    st = UsdGeom.PrimvarsAPI(mesh.GetPrim()).GetPrimvar("st")
    material = UsdShade.MaterialBindingAPI(mesh.GetPrim()).ComputeBoundMaterial()[0]
    surface = material.ComputeSurfaceSource()[0]
    texture_bytes, texture_file = None, None
    for prim in Usd.PrimRange(material.GetPrim()):
        shader = UsdShade.Shader(prim)
        if shader and shader.GetIdAttr().Get() == "UsdUVTexture":
            asset = shader.GetInput("file").Get()
            texture_file = asset.path
            texture_bytes = bytes(Ar.GetResolver().OpenAsset(Ar.ResolvedPath(asset.resolvedPath)).GetBuffer())
    return {
        "points": np.asarray(mesh.GetPointsAttr().Get(), dtype=np.float64),
        "normals": np.asarray(mesh.GetNormalsAttr().Get(), dtype=np.float64),
        "faces": np.asarray(mesh.GetFaceVertexIndicesAttr().Get(), dtype=np.int64).reshape(-1, 3),
        "uv": np.asarray(st.Get(), dtype=np.float64) if st and st.HasValue() else None,
        "texture": texture_bytes,
        "texture_file": texture_file,
        "up_axis": str(UsdGeom.GetStageUpAxis(stage)),
        "meters_per_unit": float(UsdGeom.GetStageMetersPerUnit(stage)),
        "roughness": float(surface.GetInput("roughness").Get()),
        "metallic": float(surface.GetInput("metallic").Get()),
    }


def export_usdz(
    enabled: bool,
    path: Path,
    arrays: dict[str, np.ndarray | None],
    texture: bytes | None,
    texture_format: str,
    roughness: float,
    field_color_space: str,
) -> tuple[Path | None, dict[str, Any]]:
    """The mesh stage's USDZ step (setting ``mesh.usdz``): write ``path`` from the GLB's export
    arrays, never failing the stage.

    ``arrays``: ``vertices``, ``normals``, ``faces``, ``uv``, ``colors`` (in ``field_color_space``,
    used without a texture) as for the GLB. Returns (the path or None, metrics: ``usdz`` =
    "written" | "off …" | "skipped: <why>" | "failed: <error>", ``usdz_bytes``). Without usd-core,
    or when pxr fails, it logs why and returns None: the GLB and OBJ are the product, and the
    viewer's model-viewer can still convert the GLB for Quick Look.
    """
    if not enabled:
        return None, {"usdz": "off (mesh.usdz=false)", "usdz_bytes": None}
    if not usd_available():
        log.info(USD_MISSING)
        return None, {"usdz": f"skipped: {USD_MISSING}", "usdz_bytes": None}
    colors = arrays.get("colors")
    if colors is not None and field_color_space == "srgb":
        colors = srgb_to_linear(colors)
    start = time.perf_counter()
    try:
        write_usdz(path, arrays["vertices"], arrays["normals"], arrays["faces"], roughness,
                   uv=arrays["uv"] if texture is not None else None, texture=texture,
                   texture_format=texture_format, colors_linear=colors)
    except Exception as err:  # noqa: BLE001 - an optional asset: say why, keep GLB + OBJ
        log.warning("model.usdz was not written: %s: %s", type(err).__name__, err)
        Path(path).unlink(missing_ok=True)
        return None, {"usdz": f"failed: {type(err).__name__}: {err}", "usdz_bytes": None}
    size = Path(path).stat().st_size
    log.info("wrote %s for Quick Look (%d bytes, %.2f s)", Path(path).name, size, time.perf_counter() - start)
    return Path(path), {"usdz": "written", "usdz_bytes": size}
