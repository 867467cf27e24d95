"""What the stages hand each other: small, frozen descriptions of files on disk.

Every stage writes its outputs into its own folder and returns one of these records.
The records are plain data (paths, counts, a fingerprint) so that Prefect can persist
them as task results and a rerun can pick them up without touching the files.

``fingerprint`` is a content key: the hash of the input video chained through the
resolved settings and code version of every stage up to this one (see
``tasks.fingerprint``). Two records with the same fingerprint describe the same work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class StageOutputMissing(RuntimeError):
    """A cached stage result points at files that are no longer on disk."""


def _require(*paths: Path) -> None:
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise StageOutputMissing(
            f"cached stage output is missing on disk: {', '.join(missing)}. "
            "Rerun with refresh_cache=true to rebuild it."
        )


@dataclass(frozen=True)
class Product:
    """One row of the products queue (the seed's `products` table plus our columns)."""

    unique_id: str
    title: str
    category: str = "others"
    video_link: str = ""
    status: str = "IDLE"  # IDLE | PROCESSING | DONE | FAILED
    error: str | None = None
    attempts: int = 0
    model_manifest: str | None = None
    claimed_by: str | None = None
    claimed_at: float | None = None
    created_at: float | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class VideoInput:
    """ingest → the product's video on local disk, hashed."""

    unique_id: str
    title: str
    category: str
    video: Path
    sha256: str
    size_bytes: int
    fingerprint: str

    def check(self) -> None:
        _require(self.video)


@dataclass(frozen=True)
class FrameSet:
    """frames → still images picked from the video plus ``frames.json``.

    ``frames.json``: ``{"video": str, "frames": [{"file": str, "time_s": float,
    "sharpness": float, "width": int, "height": int}], ...}``; files are relative
    to ``dir``.
    """

    dir: Path
    index: Path
    count: int
    width: int
    height: int
    fingerprint: str

    def files(self) -> list[Path]:
        data = json.loads(Path(self.index).read_text())
        return [Path(self.dir) / f["file"] for f in data["frames"]]

    def check(self) -> None:
        _require(self.dir, self.index)


@dataclass(frozen=True)
class CameraRig:
    """colmap → solved cameras in ``transforms.json`` (nerfstudio / instant-ngp convention).

    ``transforms.json`` holds ``camera_model, fl_x, fl_y, cx, cy, w, h, k1, k2, p1, p2``
    and ``frames[]`` with ``file_path`` (relative to the json's folder) and
    ``transform_matrix`` (4x4 camera-to-world, OpenGL axes: x right, y up, z back).
    The world is normalised around the product: origin where the cameras look,
    +Z up, mean camera distance fixed by settings; ``korokoro.normalization`` records
    the 4x4 similarity applied to COLMAP's world.
    ``points`` is an ``(N, 6)`` float32 ``.npy`` of sparse points (xyz, rgb in 0..1)
    in the same normalised world.
    """

    dir: Path
    transforms: Path
    points: Path
    registered: int
    total: int
    reprojection_error_px: float
    fingerprint: str

    @property
    def registered_fraction(self) -> float:
        return self.registered / max(self.total, 1)

    def check(self) -> None:
        _require(self.transforms, self.points)


@dataclass(frozen=True)
class Detections:
    """detect → one box per registered frame in ``boxes.json``.

    ``boxes.json``: ``{"frames": [{"file_path": str, "box": [x0, y0, x1, y1] | null,
    "score": float, "source": str}]}`` in pixel coordinates of the frame.
    """

    dir: Path
    boxes: Path
    detector: str
    found: int
    total: int
    fingerprint: str

    def check(self) -> None:
        _require(self.boxes)


@dataclass(frozen=True)
class MaskSet:
    """segment → per-frame masks and the transforms that reference them.

    ``transforms`` is a copy of the camera transforms with ``mask_path`` set on every
    frame (uint8 PNG, 255 = product). ``hull`` is a json with the product's
    axis-aligned box in the normalised world: ``{"aabb": [[x0,y0,z0],[x1,y1,z1]],
    "grid": str (path of an occupancy .npy, optional)}``.
    """

    dir: Path
    transforms: Path
    hull: Path
    contact_sheet: Path
    stats: Path
    fingerprint: str

    def check(self) -> None:
        _require(self.transforms, self.hull)


@dataclass(frozen=True)
class TrainedField:
    """train → a radiance-field checkpoint folder that its backend can load again."""

    dir: Path
    backend: str
    metrics: Path
    fingerprint: str

    def check(self) -> None:
        _require(self.dir, self.metrics)


@dataclass(frozen=True)
class MeshAsset:
    """mesh → the exported assets (GLB for the web, OBJ + MTL like the seed)."""

    dir: Path
    glb: Path
    obj: Path
    triangles: int
    metrics: Path
    fingerprint: str
    extra: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        _require(self.glb, self.obj)


@dataclass(frozen=True)
class ShardSet:
    """shard → byte parts under the storage limit plus a manifest per asset."""

    dir: Path
    manifests: tuple[Path, ...]
    parts: int
    fingerprint: str

    def check(self) -> None:
        _require(*self.manifests)


@dataclass(frozen=True)
class Publication:
    """upload → where the product's model now lives in the store."""

    unique_id: str
    manifest_key: str
    object_keys: tuple[str, ...]
    fingerprint: str


def to_jsonable(record: Any) -> dict[str, Any]:
    """A record as plain JSON types (paths as strings), for reports."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in asdict(record).items()}
