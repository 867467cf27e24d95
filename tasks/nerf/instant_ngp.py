"""``instant_ngp``: the seed's backend — NVIDIA's instant-ngp, driven through its Python bindings (pyngp).

Availability and licence: pyngp is not on PyPI; it is built from instant-ngp's sources with CUDA
(infra/Dockerfile's optional ``gpu-ngp`` target, or instant-ngp's README), and instant-ngp is under
the NVIDIA Source Code License-NC (non-commercial use only). The backend imports pyngp only when it
trains; without it the error says all of this. ``nerf=ngp`` (the default) is our own, permissively
licensed trainer of the same kind.

Training (``train``):
- the MaskSet's frames become RGBA PNGs, the mask as alpha (tasks/nerf/external.py); instant-ngp
  trains on the alpha with a random background colour (``random_bg_color``), so only the product
  is learned. Held-out frames (every ``holdout_every``-th) go to ``data/transforms_holdout.json``,
  the rest to ``data/transforms_train.json``.
- Scale: instant-ngp's defaults (scale 0.33, offset 0.5) expect colmap2nerf's scenes (cameras at
  ~4 units, aabb_scale up to 128); our world is normalised instead (product near the origin,
  cameras at distance 2, +Z up) and the masks say where the product is. instant-ngp maps a point ``p`` to ``cycle(p * scale + offset)`` with ``cycle(x, y, z) = (y, z, x)``
  (nerf_loader: nerf_matrix_to_ngp), and trains inside the unit cube when ``aabb_scale`` is 1. We
  write ``scale`` / ``offset`` so that the padded hull cube is exactly that unit cube.
- ``testbed.frame()`` runs until ``training_step`` reaches ``n_steps`` (scripts/run.py's loop);
  then ``save_snapshot`` → ``snapshot.msgpack``.
- The mesh stage wants density at arbitrary points; pyngp exposes none (python_api.cu binds
  ``compute_marching_cubes_mesh`` and PNG density slices, not ``get_density_on_grid``). So while
  the testbed is alive, ``compute_marching_cubes_mesh`` (``marching_cubes_res``,
  ``marching_cubes_density_thresh`` = the seed's 256 and 2.5) gives a mesh in instant-ngp's
  coordinates; we undo the cycle, scale and offset and store it as a mesh-backed field
  (tasks/nerf/mesh_field.py), vertex colours turned to sRGB. ``load`` needs neither pyngp nor a GPU.
- Held-out quality: the held-out transforms are loaded as the dataset and each view rendered with
  ``set_camera_to_training_view`` + ``render`` (as run.py's ``--test_transforms``); object PSNR
  and mask IoU are computed against the original frames and masks.

What was run here: nothing of instant-ngp (no GPU, no pyngp on this machine). The tests drive this
module against a stand-in ``pyngp`` (tests/pyngp_standin.py) that implements the documented
coordinate transform and records calls; the API names come from instant-ngp's scripts/run.py and
src/python_api.cu. Not verified: a real build, its timings, its PSNR, whether 2.5 suits densities in
our tighter unit cube, and its mesh colours' space (``mesh_colors``).
"""

from __future__ import annotations

import importlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import cv2
import numpy as np
import torch

from tasks.nerf.base import TrainReport, register_backend
from tasks.nerf.evaluate import background_plate, composite_on_plate
from tasks.nerf.external import (
    MeshBackedBackend, PreparedCapture, padded_box, prepare_rgba_capture, split_settings, warn_ignored, write_transforms,
)
from tasks.mesh_texture import linear_to_srgb
from tasks.nerf.mesh_field import MeshFieldOptions, write_mesh_field
from tasks.nerf.rays import psnr_from_mse

SNAPSHOT = "snapshot.msgpack"


class PyngpMissingError(ImportError):
    """``import pyngp`` failed: nerf=instant_ngp cannot run on this machine."""


def missing_pyngp_message(reason: str) -> str:
    """Why nerf=instant_ngp cannot run, and what to do about it."""
    return (
        f"nerf=instant_ngp needs pyngp, instant-ngp's Python bindings, and `import pyngp` failed ({reason}). "
        "pyngp is not on PyPI: build it from instant-ngp's sources on a CUDA machine — the optional stage of "
        "infra/Dockerfile (`docker build -f infra/Dockerfile --target gpu-ngp .`), or instant-ngp's README "
        "(git clone --recursive https://github.com/NVlabs/instant-ngp; cmake . -B build -DNGP_BUILD_WITH_GUI=OFF; "
        "cmake --build build --config RelWithDebInfo -j) — and put the folder holding pyngp*.so on PYTHONPATH. "
        "Licence: instant-ngp is under the NVIDIA Source Code License-NC, non-commercial use only. "
        "nerf=ngp (the default) is KoroKoro's permissively licensed trainer of the same kind."
    )


def import_pyngp() -> ModuleType:
    """The pyngp module, or :class:`PyngpMissingError` with the full explanation."""
    try:
        return importlib.import_module("pyngp")
    except ImportError as exc:
        raise PyngpMissingError(missing_pyngp_message(f"{type(exc).__name__}: {exc}")) from exc


@dataclass(frozen=True)
class InstantNgpSettings(MeshFieldOptions):
    """Every knob of the instant_ngp backend (conf/nerf/instant_ngp.yaml documents each one)."""

    backend: str = "instant_ngp"
    n_steps: int = 5000
    root_dir: str = ""
    network_config: str = ""
    aabb_padding: float = 0.1
    holdout_every: int = 8
    random_bg_color: bool = True
    near_distance: float = -1.0
    log_every: int = 100
    marching_cubes_res: int = 256
    marching_cubes_density_thresh: float = 2.5
    mesh_colors: str = "linear"
    eval_spp: int = 8
    eval_max_frames: int = 0
    save_previews: bool = True

    def __post_init__(self) -> None:
        if self.mesh_colors not in ("linear", "srgb"):
            raise ValueError(f"nerf.mesh_colors={self.mesh_colors!r}: choose 'linear' or 'srgb' (the space of instant-ngp's vertex colours)")
        if self.n_steps < 1:
            raise ValueError(f"nerf.n_steps={self.n_steps}: train at least one step")


def unit_cube_transform(box: np.ndarray) -> tuple[float, list[float]]:
    """instant-ngp's ``scale`` and ``offset`` that map the cube ``box [2, 3]`` onto its unit cube."""
    scale = 1.0 / float((box[1] - box[0]).max())
    offset = 0.5 - box.mean(0) * scale  # per axis, in our axis order (applied before the cycle)
    return scale, offset.tolist()


def ngp_to_world(points: np.ndarray, scale: float, offset: list[float]) -> np.ndarray:
    """Undo instant-ngp's ``cycle(p * scale + offset)``. ``[N, 3]`` (instant-ngp) → ``[N, 3]`` (world)."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    uncycled = points[:, [2, 0, 1]]  # (y, z, x) → (x, y, z)
    return (uncycled - np.asarray(offset)) / scale


def _gpu_used_mb() -> float | None:
    """Device-wide used GPU memory now (instant-ngp's allocations are invisible to torch's counters)."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def _train_loop(testbed: Any, s: InstantNgpSettings, progress: Callable[[int, int, dict[str, float]], None] | None) -> float | None:
    """``testbed.frame()`` until ``n_steps`` training steps; returns the highest sampled GPU memory (MB)."""
    peak_gpu = _gpu_used_mb()
    last_logged, frames = 0, 0
    while testbed.frame():
        frames += 1
        step = int(testbed.training_step)
        if step >= s.n_steps:
            break
        if frames > 4 * s.n_steps + 1000:
            raise RuntimeError(f"instant-ngp did not advance: {frames} frames, training_step {step} of nerf.n_steps={s.n_steps}")
        if step - last_logged >= s.log_every:
            last_logged = step
            used = _gpu_used_mb()
            peak_gpu = used if peak_gpu is None or (used or 0) > peak_gpu else peak_gpu
            if progress is not None:
                progress(step, s.n_steps, {"loss": float(testbed.loss)})
    if progress is not None:
        progress(int(testbed.training_step), s.n_steps, {"loss": float(testbed.loss)})
    return peak_gpu


def _evaluate_holdout(testbed: Any, prepared: PreparedCapture, holdout_json: Path, s: InstantNgpSettings, out_dir: Path) -> dict[str, Any]:
    """Render every held-out view in instant-ngp; object PSNR and mask IoU against the original frames.

    As tasks/nerf/evaluate.py does for the ngp backend: the rendering is composited over the
    frame's background plate, and the squared error pooled over all object pixels of all held-out
    frames before the log (``psnr_holdout_object_on_black``: the rendering on black instead).
    """
    ids = list(prepared.holdout_ids[: s.eval_max_frames or None])
    if not ids:
        return {"psnr_holdout_object": None, "psnr_holdout_object_on_black": None, "mask_iou_holdout": None, "holdout_frames": 0}
    testbed.shall_train = False
    testbed.background_color = [0.0, 0.0, 0.0, 0.0]
    testbed.snap_to_pixel_centers = True
    testbed.load_training_data(str(holdout_json))
    squared, squared_black, values, inter, union = 0.0, 0.0, 0, 0, 0
    for view, k in enumerate(ids):
        truth = cv2.imread(str(prepared.sources[k][0]), cv2.IMREAD_COLOR)[..., ::-1].astype(np.float64) / 255.0
        mask = cv2.imread(str(prepared.sources[k][1]), cv2.IMREAD_GRAYSCALE) > 127
        testbed.set_camera_to_training_view(view)
        out = testbed.render(truth.shape[1], truth.shape[0], s.eval_spp, False)  # sRGB, premultiplied on black
        rgba = np.asarray(out[0] if isinstance(out, tuple) else out, np.float64)
        composited = composite_on_plate(
            torch.from_numpy(rgba[..., :3]), torch.from_numpy(rgba[..., 3]), background_plate(torch.from_numpy(truth), torch.from_numpy(mask))
        ).numpy()
        squared += float(((composited - truth)[mask] ** 2).sum())
        squared_black += float(((rgba[..., :3] - truth)[mask] ** 2).sum())
        values += int(mask.sum()) * 3
        rendered = rgba[..., 3] > 0.5
        inter += int((rendered & mask).sum())
        union += int((rendered | mask).sum())
        if s.save_previews and view < 4:
            strip = np.concatenate([truth, np.clip(rgba[..., :3], 0, 1), np.repeat(np.clip(rgba[..., 3:], 0, 1), 3, -1)], 1)
            cv2.imwrite(str(out_dir / f"preview_{k:04d}.png"), (strip[..., ::-1] * 255).round().astype(np.uint8))
    psnr = psnr_from_mse(squared / values) if values else None
    psnr_black = psnr_from_mse(squared_black / values) if values else None
    return {"psnr_holdout_object": psnr, "psnr_holdout_object_on_black": psnr_black,
            "mask_iou_holdout": inter / max(union, 1), "holdout_frames": len(ids)}


def train_instant_ngp(
    transforms: Path,
    hull: Path,
    out_dir: Path,
    settings: dict[str, Any],
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainReport:
    """Train instant-ngp on the masked capture; write the snapshot, the mesh-backed field and previews."""
    s, ignored = split_settings(settings, InstantNgpSettings)
    warn_ignored("instant_ngp", ignored)
    ngp = import_pyngp()  # before any work: no pyngp, no files written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_rgba_capture(transforms, out_dir / "data", s.holdout_every)
    box = padded_box(hull, s.aabb_padding, cube=True)
    scale, offset = unit_cube_transform(box)
    placement = {"aabb_scale": 1, "scale": scale, "offset": offset}
    split = {}
    for name, ids in (("train", prepared.train_ids), ("holdout", prepared.holdout_ids)):
        frames = [prepared.frames[k] for k in ids]
        split[name] = write_transforms(prepared.data_dir / f"transforms_{name}.json", prepared.meta, frames, **placement)

    started = time.perf_counter()
    testbed = ngp.Testbed(ngp.TestbedMode.Nerf)
    if s.root_dir:
        testbed.root_dir = s.root_dir
    testbed.load_training_data(str(split["train"]))
    testbed.reload_network_from_file(s.network_config)  # "" = instant-ngp's default (configs/nerf/base.json)
    testbed.nerf.training.random_bg_color = s.random_bg_color
    if s.near_distance >= 0:
        testbed.nerf.training.near_distance = s.near_distance
    testbed.shall_train = True
    peak_gpu = _train_loop(testbed, s, progress)
    train_seconds = time.perf_counter() - started
    testbed.save_snapshot(str(out_dir / SNAPSHOT), False)

    r = s.marching_cubes_res
    mesh = testbed.compute_marching_cubes_mesh(resolution=[r, r, r], thresh=s.marching_cubes_density_thresh)
    vertices, faces = np.asarray(mesh["V"]), np.asarray(mesh["F"])
    if len(vertices) == 0 or len(faces) == 0:
        raise ValueError(
            f"instant-ngp's marching cubes found no surface at nerf.marching_cubes_density_thresh={s.marching_cubes_density_thresh}: "
            "the field learned no product (check the masks) or the threshold is too high"
        )
    colors = np.asarray(mesh["C"], np.float64)
    colors = linear_to_srgb(colors) if s.mesh_colors == "linear" else np.clip(colors, 0, 1)
    write_mesh_field(out_dir, ngp_to_world(vertices, scale, offset), faces, colors, box, s, {
        "tool": "instant-ngp compute_marching_cubes_mesh", "resolution": r,
        "density_thresh": s.marching_cubes_density_thresh, "scale": scale, "offset": offset,
    })
    evaluation = _evaluate_holdout(testbed, prepared, split["holdout"], s, out_dir)
    return TrainReport(
        steps=int(testbed.training_step),
        seconds=train_seconds,
        peak_memory_mb=peak_gpu if peak_gpu is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        device="cuda (instant-ngp)",
        extra={
            **evaluation,
            "peak_memory_kind": "GPU used, device-wide, sampled every log_every steps" if peak_gpu is not None else "host RSS (no CUDA visible to torch)",
            "train_frames": len(prepared.train_ids),
            "loss": float(testbed.loss),
            "mesh_vertices": int(len(vertices)),
            "mesh_faces": int(len(faces)),
            "aabb": box.tolist(),
            "ngp_scale": scale,
            "ngp_offset": offset,
            "snapshot": str(out_dir / SNAPSHOT),
            "reused_rgba_frames": prepared.reused_rgba,
            "ignored_settings": ignored,
            "licence": "instant-ngp: NVIDIA Source Code License-NC (non-commercial)",
        },
    )


# Trains with its tool, loads as a mesh-backed field: ``get_backend("instant_ngp")``.
register_backend("instant_ngp")(lambda: MeshBackedBackend("instant_ngp", InstantNgpSettings, train_instant_ngp))
