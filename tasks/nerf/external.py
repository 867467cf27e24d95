"""Shared by the backends that train with an outside tool (``instant_ngp``: pyngp, ``nerfacto``: nerfstudio).

- Settings: a backend's own keys, plus the keys the profiles (conf/profile/*.yaml) set for the
  default ``ngp`` backend — ``nerf.steps``, ``nerf.rays_per_batch``, ... — accepted and ignored, so
  ``nerf=<backend>`` composes with every profile; what was ignored goes into metrics.json. A key
  that belongs to neither backend is still an error naming the key.
- The capture handed to the tool: every masked frame as an RGBA PNG (the mask as alpha, reusing the
  segment stage's ``rgba/`` cut-outs when they exist) under ``<data>/images/<index>.png``, and a
  ``transforms.json`` (nerfstudio / instant-ngp format) listing them in our frame order, so both
  tools' held-out split (every ``holdout_every``-th frame after sorting by file name) is ours.
- The box the tool's mesh is cut to: the masks' hull box, padded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import cv2
import numpy as np

from tasks.nerf.base import TrainReport
from tasks.nerf.dataset import CaptureError, holdout_split, load_hull
from tasks.nerf.mesh_field import MeshField, load_mesh_field
from tasks.nerf.ngp import NgpSettings
from tasks.nerf.settings import settings_from_dict

T = TypeVar("T")
log = logging.getLogger(__name__)

# Keys of the default backend that profiles set; other backends accept and ignore them.
NGP_KEYS = frozenset(f.name for f in dataclasses.fields(NgpSettings))


def split_settings(settings: dict[str, Any], cls: type[T]) -> tuple[T, dict[str, Any]]:
    """``(cls(**own keys), {ignored ngp key: value})``; an unknown key raises naming it."""
    own = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    ignored = {k: v for k, v in settings.items() if k not in own and k in NGP_KEYS}
    return settings_from_dict({k: v for k, v in settings.items() if k not in ignored}, cls), ignored


def warn_ignored(backend: str, ignored: dict[str, Any]) -> None:
    """One log line naming the ngp keys a backend does not use (a profile's, or a habit's: nerf.steps)."""
    if ignored:
        log.warning("nerf=%s ignores these settings of the ngp backend (set by the profile or an override): %s; "
                    "its own keys are in conf/nerf/%s.yaml", backend, ", ".join(sorted(ignored)), backend)


@dataclass(frozen=True)
class PreparedCapture:
    """The RGBA capture written for an outside tool.

    ``transforms``: ``<data>/transforms.json`` (all frames); ``frames``: its frame dicts in order
    (file_path ``images/<k>.png``); ``meta``: its top-level keys (camera); ``sources``: per frame the
    original frame and mask paths (for evaluation); ``train_ids`` / ``holdout_ids`` index ``frames``.
    """

    data_dir: Path
    transforms: Path
    frames: tuple[dict[str, Any], ...]
    meta: dict[str, Any]
    sources: tuple[tuple[Path, Path], ...]
    train_ids: tuple[int, ...]
    holdout_ids: tuple[int, ...]
    reused_rgba: int


def write_transforms(path: Path, meta: dict[str, Any], frames: list[dict[str, Any]], **extra: Any) -> Path:
    """A transforms.json at ``path``: ``meta`` (camera keys) + ``extra`` top-level keys + ``frames``."""
    path.write_text(json.dumps({**meta, **extra, "frames": frames}, indent=1))
    return path


def _rgba_frame(frame_path: Path, mask_path: Path, cutout: Path, out: Path) -> bool:
    """Write ``out`` (RGBA PNG, mask as alpha); copies the segment stage's cut-out when present. True = copied."""
    if cutout.is_file():
        shutil.copyfile(cutout, out)
        return True
    image = cv2.imread(str(frame_path), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if image is None or mask is None:
        missing = frame_path if image is None else mask_path
        raise CaptureError(f"{missing} is missing or not an image; rerun the frames / segment stages")
    if mask.shape != image.shape[:2]:
        raise CaptureError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its frame {frame_path} is {image.shape[1]}x{image.shape[0]}")
    rgba = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = mask
    if not cv2.imwrite(str(out), rgba):
        raise OSError(f"could not write {out}")
    return False


def crop_to_product(images: list[Path], frames: list[dict[str, Any]], camera: dict[str, Any], margin: float) -> None:
    """Crop every RGBA image in place to one size around its product; move each principal point.

    One ``w x h`` for all frames (the largest alpha box grown by ``margin`` of its size on every
    side, at most the frame), centred on each frame's own box and kept inside the frame. The crop
    only shifts pixel coordinates, so ``cx, cy`` become per-frame (``cx - x0``, ``cy - y0``) and
    ``camera``'s ``w``, ``h`` the crop's; focal lengths and distortion stay (distortion is about the
    principal point, which does not move on the sensor). Why: a tool that samples whole frames
    uniformly (nerfstudio) spends most rays on background when the product is small in the frame.
    A frame whose mask is empty (the product out of view) is cropped at its centre: all of it is
    background, which is still true supervision.
    """
    rgba = [cv2.imread(str(path), cv2.IMREAD_UNCHANGED) for path in images]
    frame_h, frame_w = rgba[0].shape[:2]
    boxes, seen = [], []
    for image in rgba:
        ys, xs = np.nonzero(image[..., 3] > 0)
        seen.append(len(xs) > 0)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (frame_w // 2, frame_h // 2) * 2)
    if not any(seen):
        raise CaptureError(f"every mask of {images[0].parent} is empty: nothing to crop to; check the segment stage's contact sheet")
    box = np.array([b for b, product in zip(boxes, seen) if product])
    w = min(frame_w, int(np.ceil((box[:, 2] - box[:, 0]).max() * (1 + 2 * margin))))
    h = min(frame_h, int(np.ceil((box[:, 3] - box[:, 1]).max() * (1 + 2 * margin))))
    for path, image, frame, (u0, v0, u1, v1) in zip(images, rgba, frames, boxes):
        x0 = int(np.clip(round((u0 + u1 - w) / 2), 0, frame_w - w))
        y0 = int(np.clip(round((v0 + v1 - h) / 2), 0, frame_h - h))
        cv2.imwrite(str(path), image[y0:y0 + h, x0:x0 + w])
        frame["cx"] = float(frame.get("cx", camera["cx"])) - x0
        frame["cy"] = float(frame.get("cy", camera["cy"])) - y0
        frame["w"], frame["h"] = w, h
    for key in ("cx", "cy"):
        camera.pop(key, None)
    camera["w"], camera["h"] = w, h


def prepare_rgba_capture(transforms: Path, data_dir: Path, holdout_every: int, crop_margin: float | None = None) -> PreparedCapture:
    """Write ``data_dir/images/<k>.png`` (RGBA) and ``data_dir/transforms.json`` from a MaskSet's transforms.

    Frames are sorted by their original file_path (as the ngp backend does), so ``holdout_every``
    picks the same held-out frames in every backend; camera keys are passed through untouched
    (both tools undistort OPENCV k1, k2, p1, p2 themselves). ``mask_path`` is dropped: the alpha
    channel carries the mask, and nerfstudio would read a mask_path as "ignore these pixels".
    ``crop_margin`` (not None): frames cropped around the product (:func:`crop_to_product`).
    """
    transforms = Path(transforms)
    if not transforms.is_file():
        raise CaptureError(f"transforms.json {transforms} does not exist; run the colmap and segment stages first")
    meta = json.loads(transforms.read_text())
    frames = sorted(meta.get("frames", []), key=lambda f: str(f.get("file_path", "")))
    if not frames:
        raise CaptureError(f"{transforms} has no frames")
    data_dir = Path(data_dir)
    if data_dir.exists():
        shutil.rmtree(data_dir)  # a rerun starts from scratch
    (data_dir / "images").mkdir(parents=True)
    root = transforms.parent
    written, sources, reused = [], [], 0
    for k, frame in enumerate(frames):
        for key in ("file_path", "mask_path", "transform_matrix"):
            if key not in frame:
                raise CaptureError(f"{transforms}: frame {k} ({frame.get('file_path', '?')}) has no {key!r}; run the segment stage")
        frame_path, mask_path = root / frame["file_path"], root / frame["mask_path"]
        cutout = mask_path.parent.parent / "rgba" / mask_path.name  # segment stage: masks/<stem>.png ↔ rgba/<stem>.png
        name = f"images/{k:05d}.png"
        reused += _rgba_frame(frame_path, mask_path, cutout, data_dir / name)
        written.append({**{key: v for key, v in frame.items() if key not in ("file_path", "mask_path")}, "file_path": name})
        sources.append((frame_path, mask_path))
    camera = {key: v for key, v in meta.items() if key not in ("frames", "korokoro")}
    if crop_margin is not None:
        crop_to_product([data_dir / f["file_path"] for f in written], written, camera, crop_margin)
    path = write_transforms(data_dir / "transforms.json", camera, written)
    train_ids, holdout_ids = holdout_split(len(frames), holdout_every)
    return PreparedCapture(
        data_dir=data_dir, transforms=path, frames=tuple(written), meta=camera, sources=tuple(sources),
        train_ids=tuple(train_ids), holdout_ids=tuple(holdout_ids), reused_rgba=reused,
    )


def padded_box(hull: Path, padding: float, cube: bool = False) -> np.ndarray:
    """The hull json's box grown by ``padding`` × its size on every side → ``[2, 3]`` float64.

    ``cube``: a cube of the largest side around the same centre (instant-ngp's unit cube).
    """
    aabb = load_hull(hull).double().numpy()
    centre, half = aabb.mean(0), (aabb[1] - aabb[0]) / 2 * (1 + 2 * padding)
    if cube:
        half = np.full(3, half.max())
    return np.stack([centre - half, centre + half])


@dataclass(frozen=True)
class MeshBackedBackend:
    """A backend whose own tool trains and exports a mesh (``instant_ngp``, ``nerfacto``).

    ``train_fn(transforms, hull, out_dir, settings, progress)`` runs the tool; :meth:`load` reads
    what it exported as a :class:`~tasks.nerf.mesh_field.MeshField`, which needs neither the tool
    nor a GPU.
    """

    name: str
    settings_type: type
    train_fn: Callable[..., TrainReport]

    def validate_settings(self, settings: dict[str, Any]) -> None:
        split_settings(settings, self.settings_type)

    def train(
        self,
        transforms: Path,
        hull: Path,
        out_dir: Path,
        settings: dict[str, Any],
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> TrainReport:
        return self.train_fn(transforms, hull, out_dir, settings, progress)

    def load(self, out_dir: Path, device: Any = "cpu") -> MeshField:
        return load_mesh_field(out_dir, self.name, device)
