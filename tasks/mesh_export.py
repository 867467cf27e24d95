"""Writers for the mesh stage's assets: a binary glTF (GLB) and OBJ + MTL.

Both are written directly (not through trimesh) so that the material is exactly what the
web needs — metallic 0, a chosen roughness, the texture bytes as encoded (trimesh re-encodes
JPEGs at its own quality and leaves metallicFactor at glTF's default 1.0).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np

# The field is +Z up; glTF and three.js are +Y up. A proper rotation (det +1) about +X:
# (x, y, z) → (x, z, -y), so the product's top stays on top and nothing is mirrored.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

_FLOAT, _UBYTE, _USHORT, _UINT = 5126, 5121, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963


def _pad4(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def glb_bytes(
    vertices: np.ndarray,
    normals: np.ndarray,
    faces: np.ndarray,
    roughness: float,
    uv: np.ndarray | None = None,
    texture: bytes | None = None,
    texture_mime: str = "image/jpeg",
    colors_linear: np.ndarray | None = None,
    name: str = "product",
) -> bytes:
    """One-mesh GLB. Arrays are already in glTF axes (+Y up).

    vertices, normals ``[V, 3]``, faces ``[F, 3]``, uv ``[V, 2]`` (v up, OBJ convention; flipped
    here to glTF's top-left origin), colors_linear ``[V, 3]`` 0..1 (used when there is no texture).
    """
    bin_parts: list[bytes] = []
    views: list[dict] = []
    accessors: list[dict] = []

    def add_view(data: bytes, target: int | None) -> int:
        offset = sum(len(p) for p in bin_parts)
        view = {"buffer": 0, "byteOffset": offset, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        views.append(view)
        bin_parts.append(_pad4(data, b"\0"))
        return len(views) - 1

    def add_accessor(array: np.ndarray, component: int, kind: str, target: int, bounds: bool = False, normalized: bool = False) -> int:
        acc = {"bufferView": add_view(array.tobytes(), target), "componentType": component, "count": len(array), "type": kind}
        if bounds:
            acc["min"], acc["max"] = array.min(0).tolist(), array.max(0).tolist()
        if normalized:
            acc["normalized"] = True
        accessors.append(acc)
        return len(accessors) - 1

    attributes = {
        "POSITION": add_accessor(vertices.astype("<f4"), _FLOAT, "VEC3", _ARRAY_BUFFER, bounds=True),
        "NORMAL": add_accessor(normals.astype("<f4"), _FLOAT, "VEC3", _ARRAY_BUFFER),
    }
    pbr: dict = {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": float(roughness)}
    tree: dict = {"asset": {"version": "2.0", "generator": "KoroKoro mesh stage"}}
    if texture is not None and uv is not None:
        gl_uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1)
        attributes["TEXCOORD_0"] = add_accessor(gl_uv.astype("<f4"), _FLOAT, "VEC2", _ARRAY_BUFFER)
        tree["images"] = [{"bufferView": add_view(texture, None), "mimeType": texture_mime}]
        # Linear filtering with mipmaps; clamp so chart borders never wrap to the far side.
        tree["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]
        tree["textures"] = [{"source": 0, "sampler": 0}]
        pbr["baseColorTexture"] = {"index": 0}
    elif colors_linear is not None:
        rgba = np.concatenate([np.round(np.clip(colors_linear, 0, 1) * 255), np.full((len(colors_linear), 1), 255)], 1)
        # VEC4 ubyte keeps every vertex attribute 4-byte aligned, as glTF requires.
        attributes["COLOR_0"] = add_accessor(rgba.astype(np.uint8), _UBYTE, "VEC4", _ARRAY_BUFFER, normalized=True)
    index_type = (np.uint16, _USHORT) if len(vertices) < 65536 else (np.uint32, _UINT)
    indices = add_accessor(faces.reshape(-1).astype(index_type[0]), index_type[1], "SCALAR", _ELEMENT_ARRAY_BUFFER)
    tree.update(
        scene=0,
        scenes=[{"nodes": [0]}],
        nodes=[{"mesh": 0, "name": name}],
        meshes=[{"name": name, "primitives": [{"attributes": attributes, "indices": indices, "material": 0, "mode": 4}]}],
        materials=[{"name": f"{name}_material", "pbrMetallicRoughness": pbr, "doubleSided": False}],
        accessors=accessors,
        bufferViews=views,
    )
    binary = b"".join(bin_parts)
    tree["buffers"] = [{"byteLength": len(binary)}]
    json_chunk = _pad4(json.dumps(tree, separators=(",", ":")).encode(), b" ")
    total = 12 + 8 + len(json_chunk) + 8 + len(binary)
    out = io.BytesIO()
    out.write(struct.pack("<III", 0x46546C67, 2, total))
    out.write(struct.pack("<II", len(json_chunk), 0x4E4F534A) + json_chunk)
    out.write(struct.pack("<II", len(binary), 0x004E4942) + binary)
    return out.getvalue()


def write_obj(
    obj_path: Path,
    vertices: np.ndarray,
    normals: np.ndarray,
    faces: np.ndarray,
    roughness: float,
    uv: np.ndarray | None = None,
    texture_name: str | None = None,
    colors_srgb: np.ndarray | None = None,
) -> Path:
    """``model.obj`` + ``model.mtl`` next to it (the texture file is written by the caller).

    Same arrays as :func:`glb_bytes`. Vertex colours go on ``v`` lines (``v x y z r g b``, read by
    three.js OBJLoader as sRGB) only when there is no texture: OBJLoader multiplies the two.
    """
    mtl_path = obj_path.with_suffix(".mtl")
    lines = [
        "# KoroKoro product mesh (+Y up)\n",
        "newmtl product\n",
        "Ka 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\nNs 10.0\nillum 1\n",
        f"Pm 0.000\nPr {roughness:.3f}\n",
    ]
    if texture_name:
        lines.append(f"map_Kd {texture_name}\n")
    mtl_path.write_text("".join(lines))

    buf = io.StringIO()
    buf.write(f"# KoroKoro product mesh: {len(vertices)} vertices, {len(faces)} triangles, +Y up\n")
    buf.write(f"mtllib {mtl_path.name}\n")
    textured = uv is not None and texture_name is not None
    if colors_srgb is not None and not textured:
        np.savetxt(buf, np.concatenate([vertices, np.clip(colors_srgb, 0, 1)], 1), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
    else:
        np.savetxt(buf, vertices, fmt="v %.6f %.6f %.6f")
    if textured:
        np.savetxt(buf, uv, fmt="vt %.6f %.6f")
    np.savetxt(buf, normals, fmt="vn %.4f %.4f %.4f")
    buf.write("usemtl product\n")
    one_based = faces + 1
    if textured:
        np.savetxt(buf, np.repeat(one_based, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    else:
        np.savetxt(buf, np.repeat(one_based, 2, axis=1), fmt="f %d//%d %d//%d %d//%d")
    obj_path.write_text(buf.getvalue())
    return obj_path
