"""Shard: cut each asset into byte parts under the storage limit, described by one manifest.

The seed split its OBJ every million lines into ``part{N}.txt`` with no manifest, and the
front end joined them in name order (part10 before part2). Here part names carry zero-padded
indices, the manifest lists them in order with the sha256 of every part and of the whole,
and reassembly refuses a missing or corrupt part.

Part names also end with the first 16 hex digits of the part's sha256, so a part never changes
under its name: re-publishing a different model writes new names beside the old ones, and the
manifest in the store keeps pointing at a complete set until the new manifest replaces it.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
import time
from pathlib import Path
from typing import Any, Sequence

from tasks.types import MeshAsset, ShardSet

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
# What a part or asset name may be: one object-key segment (no '/', no leading '.').
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_TYPES = {
    ".glb": "model/gltf-binary",
    ".gltf": "model/gltf+json",
    ".obj": "model/obj",
    ".mtl": "model/mtl",
    ".usdz": "model/vnd.usdz+zip",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".json": "application/json",
}


class ManifestError(RuntimeError):
    """A manifest or one of its parts is missing, malformed or corrupt."""


def content_type(path: Path) -> str:
    return _CONTENT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def part_name(file_name: str, index: int, total: int, sha256: str | None = None) -> str:
    """``model.glb.part-0003-of-0012.<16 hex of sha256>``: name order is part order for any count
    below 10^4, and the name changes whenever the content does."""
    if total > 9999:
        raise ValueError(f"{file_name} would need {total} parts; raise storage.part_bytes")
    name = f"{file_name}.part-{index:04d}-of-{total:04d}"
    return f"{name}.{sha256[:16]}" if sha256 else name


def split_file(src: Path, out_dir: Path, part_bytes: int) -> dict[str, Any]:
    """Write ``src`` as parts of at most ``part_bytes`` into ``out_dir``; return its manifest entry."""
    if part_bytes <= 0:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    size = src.stat().st_size
    total = max(1, -(-size // part_bytes))  # a 0-byte file is still one (empty) part
    whole = hashlib.sha256()
    parts = []
    with open(src, "rb") as fh:
        for index in range(total):
            block = fh.read(part_bytes)
            whole.update(block)
            digest = hashlib.sha256(block).hexdigest()
            name = part_name(src.name, index, total, digest)
            (out_dir / name).write_bytes(block)
            parts.append({"name": name, "size": len(block), "sha256": digest})
    return {
        "name": src.name,
        "content_type": content_type(src),
        "size": size,
        "sha256": whole.hexdigest(),
        "parts": parts,
    }


def write_manifest(assets: Sequence[dict[str, Any]], unique_id: str, path: Path, extra: dict[str, Any]) -> Path:
    manifest = {
        "version": MANIFEST_VERSION,
        "unique_id": unique_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "assets": list(assets),
        **extra,
    }
    path.write_text(json.dumps(manifest, indent=1))
    return path


def load_manifest(text: str | bytes, source: str) -> dict[str, Any]:
    """Parse and check a manifest (``source`` names it in errors): version, assets, and every
    part's name, size and sha256, so a reader can trust the names as object keys."""
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"manifest {source} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise ManifestError(f"manifest {source} has version {version!r}; this reader knows version {MANIFEST_VERSION}")
    assets = manifest.get("assets")
    if not isinstance(assets, list) or not assets:
        raise ManifestError(f"manifest {source} lists no assets")
    for asset in assets:
        parts = asset.get("parts") if isinstance(asset, dict) else None
        if not isinstance(parts, list) or not parts or not _NAME.match(str(asset.get("name", ""))):
            raise ManifestError(f"manifest {source} has a malformed asset entry")
        for part in parts:
            ok = (
                isinstance(part, dict)
                and _NAME.match(str(part.get("name", "")))
                and isinstance(part.get("size"), int)
                and part["size"] >= 0
                and _SHA256.match(str(part.get("sha256", "")))
            )
            if not ok:
                raise ManifestError(f"manifest {source} has a malformed part entry in {asset['name']}")
    return manifest


def manifest_parts(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every part of every asset, in manifest order."""
    return [part for asset in manifest["assets"] for part in asset["parts"]]


def shard_assets(mesh: MeshAsset, unique_id: str, out_dir: Path, part_bytes: int, fingerprint: str) -> ShardSet:
    """Split the web GLB (role ``web``), the OBJ, its MTL and textures into parts + one manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, Path]] = [("web", Path(mesh.glb)), ("obj", Path(mesh.obj))]
    files += [(role, Path(p)) for role, p in sorted(mesh.extra.items())]
    assets, parts = [], 0
    for role, path in files:
        entry = split_file(path, out_dir, part_bytes)
        entry["role"] = role
        assets.append(entry)
        parts += len(entry["parts"])
    manifest = write_manifest(
        assets, unique_id, out_dir / MANIFEST_NAME, {"part_bytes": part_bytes, "triangles": mesh.triangles}
    )
    return ShardSet(dir=out_dir, manifests=(manifest,), parts=parts, fingerprint=fingerprint)


def reassemble(manifest: dict[str, Any], asset_name: str, read_part: Any, dest: Path) -> Path:
    """Join an asset's parts into ``dest``, verifying each part's and the whole's sha256.

    ``read_part(name) -> bytes`` fetches one part from wherever the parts live.
    """
    entry = next((a for a in manifest.get("assets", []) if a["name"] == asset_name), None)
    if entry is None:
        raise ManifestError(f"manifest of {manifest.get('unique_id')} lists no asset {asset_name!r}")
    whole = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for part in entry["parts"]:
            try:
                block = read_part(part["name"])
            except (FileNotFoundError, KeyError) as exc:
                tmp.unlink(missing_ok=True)
                raise ManifestError(f"part {part['name']} of {asset_name} is missing") from exc
            if hashlib.sha256(block).hexdigest() != part["sha256"] or len(block) != part["size"]:
                tmp.unlink(missing_ok=True)
                raise ManifestError(f"part {part['name']} of {asset_name} is corrupt (sha256 or size mismatch)")
            whole.update(block)
            out.write(block)
    if whole.hexdigest() != entry["sha256"]:
        tmp.unlink(missing_ok=True)
        raise ManifestError(f"{asset_name} reassembled with the wrong sha256")
    tmp.replace(dest)
    return dest
