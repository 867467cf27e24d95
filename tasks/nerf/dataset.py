"""Loading a masked capture for training: ``transforms.json`` (nerfstudio / instant-ngp
format, with ``mask_path`` on every frame) and the hull box json.

Images and masks are undistorted with OpenCV when the distortion terms are nonzero, so the
rest of the backend only sees pinhole cameras.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.nerf.rays import camera_to_pixels

_DISTORTION_KEYS = ("k1", "k2", "p1", "p2")
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy")


class CaptureError(ValueError):
    """transforms.json, a frame, a mask or the hull json cannot be used for training."""


@dataclass
class Capture:
    """All frames of a capture, ready for ray sampling (tensors on one device).

    images ``[F, H, W, 3]`` uint8 RGB, masks ``[F, H, W]`` bool (True = product),
    c2w ``[F, 4, 4]`` float32 (OpenGL axes), intrinsics ``[F, 4]`` float32 = fx, fy, cx, cy
    (after undistortion and downscaling), names: each frame's file_path.
    """

    images: Tensor
    masks: Tensor
    c2w: Tensor
    intrinsics: Tensor
    names: list[str]
    train_ids: list[int]
    holdout_ids: list[int]

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])


def load_hull(hull: Path) -> Tensor:
    """The product's box from the hull json. → aabb ``[2, 3]`` float32 (min, max)."""
    try:
        data = json.loads(Path(hull).read_text())
        aabb = torch.tensor(data["aabb"], dtype=torch.float32)
    except FileNotFoundError:
        raise CaptureError(f"hull json {hull} does not exist; run the segment stage first") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise CaptureError(
            f"hull json {hull} must hold {{\"aabb\": [[x0,y0,z0],[x1,y1,z1]]}} ({exc})"
        ) from None
    if aabb.shape != (2, 3) or not bool((aabb[1] > aabb[0]).all()):
        raise CaptureError(f"hull json {hull}: aabb must be [[min xyz], [max xyz]] with max > min, got {aabb.tolist()}")
    return aabb


def holdout_split(n_frames: int, holdout_every: int) -> tuple[list[int], list[int]]:
    """Train and held-out frame indices: every ``holdout_every``-th frame (0, 8, 16, ...) is held out."""
    if holdout_every <= 0:
        return list(range(n_frames)), []
    holdout = [i for i in range(n_frames) if i % holdout_every == 0]
    train = [i for i in range(n_frames) if i % holdout_every != 0]
    if not train:
        raise CaptureError(f"holdout_every={holdout_every} leaves no training frame out of {n_frames}")
    return train, holdout


def _read_rgb(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise CaptureError(f"{what} {path} does not exist; fix file_path/mask_path in transforms.json")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise CaptureError(f"{what} {path} is not a readable image")
    if image.dtype != np.uint8:
        image = (image.astype(np.float32) * (255.0 / np.iinfo(image.dtype).max)).round().astype(np.uint8)
    return image


def _camera_matrix(frame: dict, meta: dict, transforms: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame K [3, 3] and OpenCV distortion [4], frame keys overriding the top level."""
    values = {}
    for key in _INTRINSIC_KEYS:
        value = frame.get(key, meta.get(key))
        if value is None:
            raise CaptureError(f"{transforms}: intrinsic {key!r} is missing (top level or per frame)")
        values[key] = float(value)
    k = np.array([[values["fl_x"], 0, values["cx"]], [0, values["fl_y"], values["cy"]], [0, 0, 1]], np.float64)
    dist = np.array([float(frame.get(key, meta.get(key, 0.0)) or 0.0) for key in _DISTORTION_KEYS], np.float64)
    return k, dist


def _load_frame(
    transforms: Path, meta: dict, downscale: int, i: int, frame: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float], str]:
    """One frame of ``transforms``: RGB ``[H, W, 3]`` uint8, mask ``[H, W]`` bool (undistorted and
    downscaled), camera-to-world ``[4, 4]``, intrinsics (fx, fy, cx, cy) and its name."""
    for key in ("file_path", "mask_path", "transform_matrix"):
        if key not in frame:
            hint = " (run the segment stage, it adds masks)" if key == "mask_path" else ""
            raise CaptureError(f"{transforms}: frame {i} ({frame.get('file_path', '?')}) has no {key!r}{hint}")
    image = _read_rgb(transforms.parent / frame["file_path"], "frame")
    mask = _read_rgb(transforms.parent / frame["mask_path"], "mask")
    image = image[..., :3][..., ::-1] if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
    mask = mask if mask.ndim == 2 else mask[..., 0]
    h, w = image.shape[:2]
    if mask.shape != (h, w):
        raise CaptureError(f"mask {frame['mask_path']} is {mask.shape[1]}x{mask.shape[0]} but its frame is {w}x{h}")
    expected = (int(meta.get("h", h)), int(meta.get("w", w)))
    if (h, w) != expected:
        raise CaptureError(f"frame {frame['file_path']} is {w}x{h} but transforms.json says w={expected[1]}, h={expected[0]}")
    k, dist = _camera_matrix(frame, meta, transforms)
    if np.any(dist != 0):
        # Undistort onto the same pinhole K; masks stay binary with nearest sampling.
        map_x, map_y = cv2.initUndistortRectifyMap(k, dist, None, k, (w, h), cv2.CV_32FC1)
        image = cv2.remap(np.ascontiguousarray(image), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        mask = cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if downscale > 1:
        size = (w // downscale, h // downscale)
        image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_AREA)
    matrix = np.asarray(frame["transform_matrix"], dtype=np.float32)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise CaptureError(f"{transforms}: frame {frame['file_path']} transform_matrix must be a finite 4x4")
    scale = float(downscale)
    intrinsics = [k[0, 0] / scale, k[1, 1] / scale, k[0, 2] / scale, k[1, 2] / scale]
    return np.ascontiguousarray(image), mask > 127, matrix, intrinsics, str(frame["file_path"])


def load_capture(transforms: Path, downscale: int, holdout_every: int, device: torch.device) -> Capture:
    """Read every frame and mask of ``transforms`` (sorted by file_path, so holdout is spread in time)."""
    transforms = Path(transforms)
    if not transforms.is_file():
        raise CaptureError(f"transforms.json {transforms} does not exist; run the colmap and segment stages first")
    meta = json.loads(transforms.read_text())
    model = meta.get("camera_model", "OPENCV")
    if model not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE"):
        raise CaptureError(f"{transforms}: camera_model {model!r} is not supported; use OPENCV or PINHOLE")
    frames = sorted(meta.get("frames", []), key=lambda f: str(f.get("file_path", "")))
    if not frames:
        raise CaptureError(f"{transforms} has no frames")
    if downscale < 1:
        raise CaptureError(f"downscale must be an integer >= 1, got {downscale}")

    # Frames decode in threads (OpenCV lets go of the GIL): on a 16-core GPU host, 150 frames at
    # 1280 x 720 took 3.5 s one by one, a sixth of a whole training run.
    with ThreadPoolExecutor() as pool:
        loaded = list(pool.map(lambda item: _load_frame(transforms, meta, downscale, *item), enumerate(frames)))
    images, masks, c2ws, intrinsics, names = (list(column) for column in zip(*loaded))
    if len({im.shape for im in images}) != 1:
        raise CaptureError(f"{transforms}: frames have different sizes; all frames must share one size")
    train_ids, holdout_ids = holdout_split(len(frames), holdout_every)
    return Capture(
        images=torch.from_numpy(np.stack(images)).to(device),
        masks=torch.from_numpy(np.stack(masks)).to(device),
        c2w=torch.from_numpy(np.stack(c2ws)).to(device),
        intrinsics=torch.tensor(intrinsics, dtype=torch.float32, device=device),
        names=names,
        train_ids=train_ids,
        holdout_ids=holdout_ids,
    )


def grow_mask(mask: Tensor, pixels: int) -> Tensor:
    """A mask ``[H, W]`` bool grown by ``pixels`` in every direction (a square window). → ``[H, W]`` bool."""
    if pixels <= 0:
        return mask
    return F.max_pool2d(mask[None, None].float(), 2 * pixels + 1, stride=1, padding=pixels)[0, 0] > 0


def aabb_pixel_rects(capture: Capture, aabb: Tensor) -> Tensor:
    """Pixel rectangle each frame's view of the box covers. → ``[F, 4]`` int64 (u0, v0, u1, v1), end-exclusive.

    Rays outside it miss the box: their prediction is the background exactly, so sampling
    them teaches nothing. A box corner behind a camera falls back to the whole image.
    """
    corners = torch.stack(torch.meshgrid(*[aabb[:, axis] for axis in range(3)], indexing="ij"), -1).reshape(8, 3)
    w2c = torch.linalg.inv(capture.c2w)  # [F, 4, 4]
    cam = (w2c[:, None, :3, :3] @ corners[None, :, :, None])[..., 0] + w2c[:, None, :3, 3]  # [F, 8, 3]
    u, v, depth = camera_to_pixels(cam, capture.intrinsics[:, None])
    w, h = capture.width, capture.height
    rects = torch.stack(
        [u.amin(1).floor().clamp(0, w), v.amin(1).floor().clamp(0, h), u.amax(1).ceil().clamp(0, w), v.amax(1).ceil().clamp(0, h)],
        dim=-1,
    ).long()
    behind = (depth <= 1e-6).any(1)
    full = torch.tensor([0, 0, w, h], device=rects.device)
    return torch.where(behind[:, None], full, rects)
