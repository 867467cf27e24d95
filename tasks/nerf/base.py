"""The one small interface every NeRF backend implements, and the registry of backends.

A backend trains from a ``transforms.json`` (with ``mask_path`` on every frame) into a
checkpoint folder, and loads that folder back as a :class:`RadianceField` that the mesh
stage can query. Coordinates are the normalised world of ``transforms.json`` (+Z up).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor


class RadianceField(Protocol):
    """A trained field, queried in the normalised world frame."""

    aabb: Tensor
    """``[2, 3]`` float32: min and max corner of the box the field lives in."""

    def density(self, points: Tensor) -> Tensor:
        """Volume density ``sigma >= 0``. points ``[N, 3]`` → ``[N]``."""

    def color(self, points: Tensor, directions: Tensor) -> Tensor:
        """RGB in 0..1, in the training images' colour space (sRGB), seen along unit ``directions``.

        ``[N, 3], [N, 3]`` → ``[N, 3]``.
        """

    def render(
        self, c2w: Tensor, intrinsics: Tensor, width: int, height: int, surface_opacity: float = 0.5,
        solid_alpha: float = 0.0,
    ) -> dict[str, Tensor]:
        """Render one view.

        c2w ``[4, 4]`` camera-to-world (OpenGL axes), intrinsics ``[4]`` = fx, fy, cx, cy.
        Returns ``rgb [H, W, 3]`` (premultiplied, no background), ``alpha [H, W]``,
        ``depth [H, W]`` (expected distance); a soft field may add ``depth_surface [H, W]``, the
        distance at which each ray's opacity reaches ``surface_opacity`` (0 where it never does),
        counting only samples at least ``solid_alpha`` opaque on their own, as if a thinner haze in
        front of the surface were not there. Opaque renderers (a mesh) may ignore both.
        """


def write_checkpoint(path: Path, fmt: str, settings: Any, payload: dict[str, Any]) -> None:
    """``path`` (a torch file) holds ``payload``, the format tag and the settings dataclass;
    ``settings.json`` beside it is for people."""
    torch.save({"format": fmt, "settings": dataclasses.asdict(settings), **payload}, path)
    (path.parent / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2))


def read_checkpoint(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """The state :func:`write_checkpoint` wrote, on the CPU; clear errors when it is missing
    (train first) or of another format."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} checkpoint at {path}; train the field first (train stage)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} checkpoint (format={state.get('format')!r})")
    return state


@dataclass(frozen=True)
class TrainReport:
    """What a backend reports after training (written to metrics.json by the stage)."""

    steps: int
    seconds: float
    peak_memory_mb: float
    device: str
    extra: dict[str, Any]


class NerfBackend(Protocol):
    """Train a field from disk to disk, and load it back.

    Optional, used by the train stage: ``settings_type`` (the frozen dataclass the settings are
    checked against) or ``validate_settings(settings)`` (the backend's own check). Built in:
    ``ngp`` (ours), ``instant_ngp`` (pyngp) and ``nerfacto`` (nerfstudio's CLI); the last two load
    as a mesh-backed field (tasks/nerf/mesh_field.py), since their tools export meshes.
    """

    name: str

    def train(
        self,
        transforms: Path,
        hull: Path,
        out_dir: Path,
        settings: dict[str, Any],
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> TrainReport: ...

    def load(self, out_dir: Path, device: str | torch.device = "cpu") -> RadianceField: ...


_REGISTRY: dict[str, Callable[[], NerfBackend]] = {}


def register_backend(name: str) -> Callable[[Callable[[], NerfBackend]], Callable[[], NerfBackend]]:
    """Decorator: make a backend factory selectable as ``nerf=<name>``."""

    def deco(factory: Callable[[], NerfBackend]) -> Callable[[], NerfBackend]:
        _REGISTRY[name] = factory
        return factory

    return deco


def get_backend(name: str) -> NerfBackend:
    """The backend registered as ``name``; a clear error lists the known ones."""
    # Importing the package registers the built-in backends.
    import tasks.nerf  # noqa: F401

    if name not in _REGISTRY:
        raise KeyError(f"unknown NeRF backend {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
