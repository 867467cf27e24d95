"""Writers (and a reader) for the mesh stage's assets: a binary glTF (GLB) and OBJ + MTL.

Both are written directly (not through trimesh) so that the material is exactly what the
web needs — metallic 0, a chosen roughness, the texture bytes as encoded (trimesh re-encodes
JPEGs at its own quality and leaves metallicFactor at glTF's default 1.0).

Geometry is written with KHR_mesh_quantization by default (16 bytes a vertex instead of 32):
positions as unsigned 16-bit integers dequantised by the node's uniform scale + translation
(non-normalised, as gltfpack writes them, so that readers which ignore ``normalized`` such as
trimesh still decode them right), normals as normalised int8, UVs as normalised uint16. A mesh
of more than 65535 vertices is split into primitives of at most 65535 so that every index is
16-bit. :func:`read_glb` decodes any of this back to float arrays.
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

_BYTE, _UBYTE, _SHORT, _USHORT, _UINT, _FLOAT = 5120, 5121, 5122, 5123, 5125, 5126
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_DTYPES = {_BYTE: "<i1", _UBYTE: "<u1", _SHORT: "<i2", _USHORT: "<u2", _UINT: "<u4", _FLOAT: "<f4"}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
_NORM_DIV = {_BYTE: 127.0, _UBYTE: 255.0, _SHORT: 32767.0, _USHORT: 65535.0}
QUANTIZATION = "KHR_mesh_quantization"
_MAX_U16_VERTICES = 65535  # index 65535 is the primitive-restart value: keep it out
_GLB_OVERHEAD = 4096  # header + JSON chunk, a generous bound (the JSON is ~1.5 kB)


def _pad4(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def reorder_by_first_use(faces: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Renumber vertices in the order the faces first use them (vertex-fetch locality, smaller
    compressed files, and the split into 16-bit primitives becomes a prefix scan).

    faces ``[F, 3]``, arrays ``[V, ...]`` each → (faces, *arrays) renumbered; unused vertices dropped.
    """
    flat = faces.reshape(-1)
    order = np.unique(flat, return_index=True)[1]  # first position of each used vertex
    used = np.unique(flat)[np.argsort(order)]  # used vertices, by first use
    new_index = np.empty(int(flat.max()) + 1 if len(flat) else 0, dtype=np.int64)
    new_index[used] = np.arange(len(used))
    return (new_index[faces],) + tuple(None if a is None else a[used] for a in arrays)


def split_for_u16(faces: np.ndarray, limit: int = _MAX_U16_VERTICES) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive runs of faces that each use at most ``limit`` vertices (so 16-bit indices do).

    faces ``[F, 3]`` → ``[(vertex_ids [v], local_faces [f, 3]), ...]``; one run when it all fits.
    Faces ordered by locality (marching cubes, then decimation and xatlas keep it) give few
    runs that share few vertices.
    """
    out = []
    start = 0
    while start < len(faces):
        flat = faces[start:].reshape(-1)
        ids, first, local = np.unique(flat, return_index=True, return_inverse=True)
        if len(ids) <= limit:
            out.append((ids, local.reshape(-1, 3)))
            break
        # The (limit+1)-th distinct vertex first appears at flat position p: faces before p // 3 fit.
        end = max(1, int(np.sort(first)[limit]) // 3)
        ids, local = np.unique(flat[: 3 * end], return_inverse=True)
        out.append((ids, local.reshape(-1, 3)))
        start += end
    return out


def quantized_bytes_per_vertex(textured: bool, colours: bool) -> int:
    """Bytes a vertex takes in a quantised GLB: position 8, normal 4, uv 4, colour 4."""
    return 8 + 4 + (4 if textured else 0) + (4 if colours else 0)


def estimate_glb_bytes(vertices: int, triangles: int, textured: bool, texture_bytes: int = 0, quantize: bool = True) -> int:
    """Size of :func:`glb_bytes`' output for these counts, within a few hundred bytes (an upper bound).

    With ``quantize`` a mesh of more than 65535 vertices is split into 16-bit primitives, which
    duplicates the few vertices the runs share; counted here as 1 % extra.
    """
    if quantize:
        per_vertex = quantized_bytes_per_vertex(textured, not textured)
        if vertices > _MAX_U16_VERTICES:
            vertices = int(vertices * 1.01) + 64
        index_bytes = 2
    else:
        per_vertex = 12 + 12 + (8 if textured else 4)
        index_bytes = 2 if vertices < 65536 else 4
    geometry = vertices * per_vertex + triangles * 3 * index_bytes + 16
    return int(geometry + texture_bytes + _GLB_OVERHEAD)


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
    quantize: bool = True,
) -> bytes:
    """One-mesh GLB. Arrays are already in glTF axes (+Y up).

    vertices, normals ``[V, 3]``, faces ``[F, 3]``, uv ``[V, 2]`` (v up, OBJ convention; flipped
    here to glTF's top-left origin), colors_linear ``[V, 3]`` 0..1 (used when there is no texture).
    ``quantize``: KHR_mesh_quantization (see the module docstring); else float32 attributes.
    """
    bin_parts: list[bytes] = []
    views: list[dict] = []
    accessors: list[dict] = []
    textured = texture is not None and uv is not None

    def add_view(data: bytes, target: int | None, stride: int | None = None) -> int:
        offset = sum(len(p) for p in bin_parts)
        view = {"buffer": 0, "byteOffset": offset, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        if stride is not None:
            view["byteStride"] = stride
        views.append(view)
        bin_parts.append(_pad4(data, b"\0"))
        return len(views) - 1

    def add_accessor(array: np.ndarray, component: int, kind: str, target: int, bounds: bool = False,
                     normalized: bool = False, pad_to: int | None = None) -> int:
        """``pad_to`` columns: vertex elements padded to 4-byte strides (VEC3 of 1- or 2-byte types)."""
        stride = None
        data = array
        if pad_to is not None and array.shape[1] != pad_to:
            data = np.zeros((len(array), pad_to), dtype=array.dtype)
            data[:, : array.shape[1]] = array
            stride = data.itemsize * pad_to
        acc = {"bufferView": add_view(np.ascontiguousarray(data).tobytes(), target, stride),
               "componentType": component, "count": len(array), "type": kind}
        if bounds:
            acc["min"], acc["max"] = array.min(0).tolist(), array.max(0).tolist()
        if normalized:
            acc["normalized"] = True
        accessors.append(acc)
        return len(accessors) - 1

    gl_uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1) if textured else None
    rgba = None
    if not textured and colors_linear is not None:
        rgba = np.concatenate([np.round(np.clip(colors_linear, 0, 1) * 255), np.full((len(colors_linear), 1), 255)], 1).astype(np.uint8)

    node: dict = {"mesh": 0, "name": name}
    if quantize:
        faces, vertices, normals, gl_uv, rgba = reorder_by_first_use(faces, vertices, normals, gl_uv, rgba)
        origin = vertices.min(0)
        extent = float((vertices.max(0) - origin).max())
        step = extent / 65535.0 if extent > 0 else 1.0  # one uniform step: normals stay undistorted
        q_pos = np.clip(np.round((vertices - origin) / step), 0, 65535).astype("<u2")
        q_nrm = np.clip(np.round(normals * 127.0), -127, 127).astype("<i1")
        q_uv = None if gl_uv is None else np.clip(np.round(gl_uv * 65535.0), 0, 65535).astype("<u2")
        node["translation"] = origin.astype(np.float64).tolist()
        node["scale"] = [step] * 3
        runs = split_for_u16(faces)
    else:
        runs = [(np.arange(len(vertices)), faces)]

    primitives = []
    for ids, local in runs:
        if quantize:
            attributes = {
                "POSITION": add_accessor(q_pos[ids], _USHORT, "VEC3", _ARRAY_BUFFER, bounds=True, pad_to=4),
                "NORMAL": add_accessor(q_nrm[ids], _BYTE, "VEC3", _ARRAY_BUFFER, normalized=True, pad_to=4),
            }
            if q_uv is not None:
                attributes["TEXCOORD_0"] = add_accessor(q_uv[ids], _USHORT, "VEC2", _ARRAY_BUFFER, normalized=True)
        else:
            attributes = {
                "POSITION": add_accessor(vertices[ids].astype("<f4"), _FLOAT, "VEC3", _ARRAY_BUFFER, bounds=True),
                "NORMAL": add_accessor(normals[ids].astype("<f4"), _FLOAT, "VEC3", _ARRAY_BUFFER),
            }
            if gl_uv is not None:
                attributes["TEXCOORD_0"] = add_accessor(gl_uv[ids].astype("<f4"), _FLOAT, "VEC2", _ARRAY_BUFFER)
        if rgba is not None:
            # VEC4 ubyte keeps every vertex attribute 4-byte aligned, as glTF requires.
            attributes["COLOR_0"] = add_accessor(rgba[ids], _UBYTE, "VEC4", _ARRAY_BUFFER, normalized=True)
        index_type = (np.uint16, _USHORT) if len(ids) <= _MAX_U16_VERTICES else (np.uint32, _UINT)
        indices = add_accessor(local.reshape(-1).astype(index_type[0]), index_type[1], "SCALAR", _ELEMENT_ARRAY_BUFFER)
        primitives.append({"attributes": attributes, "indices": indices, "material": 0, "mode": 4})

    pbr: dict = {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": float(roughness)}
    tree: dict = {"asset": {"version": "2.0", "generator": "KoroKoro mesh stage"}}
    if quantize:
        tree["extensionsUsed"] = [QUANTIZATION]
        tree["extensionsRequired"] = [QUANTIZATION]
    if textured:
        tree["images"] = [{"bufferView": add_view(texture, None), "mimeType": texture_mime}]
        # Linear filtering with mipmaps; clamp so chart borders never wrap to the far side.
        tree["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]
        tree["textures"] = [{"source": 0, "sampler": 0}]
        pbr["baseColorTexture"] = {"index": 0}
    tree.update(
        scene=0,
        scenes=[{"nodes": [0]}],
        nodes=[node],
        meshes=[{"name": name, "primitives": primitives}],
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


def read_glb(data: bytes | Path) -> dict:
    """Decode a one-mesh GLB as written by :func:`glb_bytes` (either layout) into float arrays.

    Honours ``byteStride``, ``normalized`` integer accessors and the node's translation / scale
    (KHR_mesh_quantization); primitives are concatenated. Returns ``vertices [V, 3]`` (+Y up, the
    node transform applied), ``normals [V, 3]``, ``faces [F, 3]``, ``uv [V, 2]`` (glTF's top-left
    origin) or None, ``colors [V, 4]`` 0..1 or None, ``image`` bytes or None, and the ``json``.
    """
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
    magic, version, _total = struct.unpack_from("<III", raw, 0)
    if magic != 0x46546C67 or version != 2:
        raise ValueError("not a glTF 2.0 binary")
    json_len, _ = struct.unpack_from("<II", raw, 12)
    tree = json.loads(raw[20 : 20 + json_len])
    bin_start = 20 + json_len + 8
    binary = raw[bin_start:]

    def accessor(index: int) -> np.ndarray:
        acc = tree["accessors"][index]
        view = tree["bufferViews"][acc["bufferView"]]
        dtype = np.dtype(_DTYPES[acc["componentType"]])
        width = _WIDTH[acc["type"]]
        stride = view.get("byteStride", dtype.itemsize * width)
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        rows = np.frombuffer(binary, dtype=np.uint8, count=stride * acc["count"], offset=start).reshape(acc["count"], stride)
        values = rows[:, : dtype.itemsize * width].copy().view(dtype).reshape(acc["count"], width).astype(np.float64)
        if acc.get("normalized"):
            values = np.maximum(values / _NORM_DIV[acc["componentType"]], -1.0)
        return values[:, 0] if acc["type"] == "SCALAR" else values

    node = tree["nodes"][0]
    scale = np.asarray(node.get("scale", [1.0, 1.0, 1.0]))
    translation = np.asarray(node.get("translation", [0.0, 0.0, 0.0]))
    if "rotation" in node or "matrix" in node:
        raise ValueError("read_glb handles translation and scale only")
    parts: dict[str, list] = {"vertices": [], "normals": [], "faces": [], "uv": [], "colors": []}
    offset = 0
    for prim in tree["meshes"][node["mesh"]]["primitives"]:
        attrs = prim["attributes"]
        pos = accessor(attrs["POSITION"]) * scale + translation
        parts["vertices"].append(pos)
        nrm = accessor(attrs["NORMAL"])
        parts["normals"].append(nrm / np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12))
        parts["faces"].append(accessor(prim["indices"]).astype(np.int64).reshape(-1, 3) + offset)
        if "TEXCOORD_0" in attrs:
            parts["uv"].append(accessor(attrs["TEXCOORD_0"]))
        if "COLOR_0" in attrs:
            parts["colors"].append(accessor(attrs["COLOR_0"]))
        offset += len(pos)
    image = None
    if tree.get("images"):
        view = tree["bufferViews"][tree["images"][0]["bufferView"]]
        image = binary[view.get("byteOffset", 0) : view.get("byteOffset", 0) + view["byteLength"]]
    return {
        "vertices": np.concatenate(parts["vertices"]),
        "normals": np.concatenate(parts["normals"]),
        "faces": np.concatenate(parts["faces"]),
        "uv": np.concatenate(parts["uv"]) if parts["uv"] else None,
        "colors": np.concatenate(parts["colors"]) if parts["colors"] else None,
        "image": image,
        "json": tree,
    }


def _rows(fmt: str, array: np.ndarray) -> str:
    """``fmt`` applied to every row of ``array`` ``[N, K]``, one line each (what ``np.savetxt``
    writes, in one %-format call: several times faster on the 100k-triangle web asset)."""
    if len(array) == 0:
        return ""
    return ((fmt + "\n") * len(array)) % tuple(array.ravel().tolist())


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
        buf.write(_rows("v %.6f %.6f %.6f %.4f %.4f %.4f", np.concatenate([vertices, np.clip(colors_srgb, 0, 1)], 1)))
    else:
        buf.write(_rows("v %.6f %.6f %.6f", vertices))
    if textured:
        buf.write(_rows("vt %.6f %.6f", uv))
    buf.write(_rows("vn %.4f %.4f %.4f", normals))
    buf.write("usemtl product\n")
    one_based = faces.astype(np.int64) + 1
    if textured:
        buf.write(_rows("f %d/%d/%d %d/%d/%d %d/%d/%d", np.repeat(one_based, 3, axis=1)))
    else:
        buf.write(_rows("f %d//%d %d//%d %d//%d", np.repeat(one_based, 2, axis=1)))
    obj_path.write_text(buf.getvalue())
    return obj_path
