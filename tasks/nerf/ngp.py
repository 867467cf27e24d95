"""``ngp``: KoroKoro's own instant-NGP-style trainer in plain PyTorch (CPU and CUDA).

Trains a hash-grid radiance field of the product inside the hull box, supervised by the
masked frames: the target colour is ``rgb * mask + bg * (1 - mask)`` with a random
background per ray and the prediction is ``rgb + (1 - alpha) * bg``, so the field learns
the product and emptiness around it. Every ``holdout_every``-th frame is held out and only
used for the reported PSNR.

Checkpoint folder: ``field.pt`` (weights, occupancy grid, aabb, settings) and
``settings.json`` (the same settings, readable).
"""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from tasks.nerf.base import TrainReport, read_checkpoint, register_backend, write_checkpoint
from tasks.nerf.camera_opt import REFINED_TRANSFORMS, CameraCorrections, rotation_degrees, write_refined_transforms
from tasks.nerf.dataset import aabb_pixel_rects, load_capture, load_hull
from tasks.nerf.depth_prior import load_sparse_depth
from tasks.nerf.evaluate import quality_report
from tasks.nerf.field import GridSampler, NgpModel, NgpRadianceField, make_sampler
from tasks.nerf.graphed import CapturedStep, SampleCapacity
from tasks.nerf.ngp_step import NgpStep
from tasks.nerf.occupancy import OccupancyGrid
from tasks.nerf.optimizer import learning_rate_factor, make_optimizer, set_learning_rate
from tasks.nerf.pixels import training_pixels
from tasks.nerf.rays import psnr_from_mse
from tasks.nerf.settings import settings_from_dict
from tasks.nerf.smoothness import check_smoothness_settings

CHECKPOINT_FORMAT = "korokoro-ngp/1"


@dataclass(frozen=True)
class NgpSettings:
    """Every knob of the ngp backend (conf/nerf/ngp.yaml documents each one)."""

    backend: str = "ngp"
    device: str = "auto"
    seed: int = 0
    steps: int = 4000
    rays_per_batch: int = 4096
    samples_per_ray: int = 256
    sampler: str = "auto"
    encoding_kernel: str = "auto"
    early_stop_eps: float = 1e-4
    aabb_padding: float = 0.1
    downscale: int = 1
    pixel_jitter: bool = False
    object_ray_fraction: float = 0.0
    object_ray_margin_px: int = 2
    holdout_every: int = 8
    n_levels: int = 16
    features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    finest_resolution: int = 2048
    geometry_levels: int = 0
    coarse_to_fine: float = 0.0
    coarse_to_fine_start_levels: int = 4
    hidden_dim: int = 64
    geo_feat_dim: int = 15
    color_hidden_dim: int = 64
    lr: float = 0.01
    lr_final_factor: float = 0.03
    lr_warmup_steps: int = 100
    adam_eps: float = 1e-15
    weight_decay: float = 1e-6
    occ_resolution: int = 128
    occ_update_every: int = 16
    occ_warmup_steps: int = 256
    occ_update_fraction: float = 0.25
    occ_decay: float = 0.95
    occ_threshold: float = 0.01
    carve_tolerance: float = 0.1
    cpu_threads: int = 0
    alpha_loss_weight: float = 0.0
    distortion_loss_weight: float = 0.01
    depth_loss_weight: float = 0.0
    depth_loss_until: float = 1.0
    depth_rays_per_batch: int = 2048
    depth_margin: float = 0.005
    depth_max_error_px: float = 1.0
    depth_min_views: int = 3
    depth_smooth_weight: float = 0.0
    depth_smooth_stencils: int = 1024
    depth_smooth_stride_px: int = 4
    depth_smooth_robust: float = 0.01
    depth_smooth_from: float = 0.1
    pose_lr: float = 0.0
    pose_rotation_penalty: float = 1e-3
    pose_translation_penalty: float = 1e-2
    pose_max_rotation_deg: float = 2.0
    mixed_precision: bool = False
    cuda_graph: str = "auto"
    cuda_graph_after: int = 32
    cuda_graph_margin: float = 1.25
    render_chunk: int = 16384
    log_every: int = 50
    eval_train_frames: int = 2
    eval_max_frames: int = 0
    save_previews: bool = True


def choose_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"nerf.device={name!r} but CUDA is not available here; use device=auto or cpu")
    return device


def padded_aabb(hull_aabb: Tensor, padding: float) -> Tensor:
    """Hull box grown by ``padding`` times its size on every side. ``[2, 3]`` → ``[2, 3]``."""
    margin = (hull_aabb[1] - hull_aabb[0]) * padding
    return torch.stack([hull_aabb[0] - margin, hull_aabb[1] + margin])


def build_field(s: NgpSettings, aabb: Tensor, device: torch.device) -> tuple[NgpModel, OccupancyGrid, float]:
    """A fresh model, its occupancy grid and the render step (box diagonal / samples_per_ray)."""
    if not (0.0 <= s.coarse_to_fine <= 1.0 and 1 <= s.coarse_to_fine_start_levels <= s.n_levels):
        raise ValueError(f"nerf.coarse_to_fine={s.coarse_to_fine} must be a share of the steps in [0, 1] and "
                         f"nerf.coarse_to_fine_start_levels={s.coarse_to_fine_start_levels} in 1..n_levels={s.n_levels}")
    model = NgpModel(
        aabb, s.n_levels, s.features_per_level, s.log2_hashmap_size, s.base_resolution,
        s.finest_resolution, s.hidden_dim, s.geo_feat_dim, s.color_hidden_dim, s.geometry_levels,
    ).to(device)
    model.encoding.use_kernel(s.encoding_kernel)
    step = float((aabb[1] - aabb[0]).norm()) / s.samples_per_ray
    occupancy = OccupancyGrid(aabb.to(device), s.occ_resolution, step, s.occ_threshold, s.occ_decay)
    return model, occupancy, step


def cuda_graph_start(s: NgpSettings, device: torch.device) -> int:
    """The first step replayed from a captured CUDA graph (``s.steps``: none). ``auto`` captures on
    CUDA after ``cuda_graph_after`` eager steps; mixed precision (its loss scaling decides on the
    host) keeps every step eager."""
    if s.cuda_graph not in ("auto", "off"):
        raise ValueError(f"nerf.cuda_graph={s.cuda_graph!r} is not one of auto, off")
    if s.cuda_graph == "off" or device.type != "cuda" or s.mixed_precision:
        return s.steps
    return min(max(s.cuda_graph_after, 1), s.steps)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_ngp(
    transforms: Path,
    hull: Path,
    out_dir: Path,
    settings: dict[str, Any],
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainReport:
    """Train the field and write the checkpoint folder; returns the report with held-out PSNR and SSIM."""
    s = settings_from_dict(settings, NgpSettings)
    device = choose_device(s.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and s.cpu_threads > 0:
        torch.set_num_threads(s.cpu_threads)
    try:
        return _train(s, device, transforms, hull, out_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    s: NgpSettings,
    device: torch.device,
    transforms: Path,
    hull: Path,
    out_dir: Path,
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> TrainReport:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REFINED_TRANSFORMS).unlink(missing_ok=True)  # an earlier run's poses must not outlive it
    torch.manual_seed(s.seed)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()

    aabb = padded_aabb(load_hull(hull), s.aabb_padding).to(device)
    capture = load_capture(transforms, s.downscale, s.holdout_every, device)
    train_ids = torch.tensor(capture.train_ids, device=device)
    rects = aabb_pixel_rects(capture, aabb)[train_ids]
    visible = (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])
    if not bool(visible.any()):
        raise ValueError(f"the hull box {aabb.tolist()} from {hull} is not in view of any training frame; check the hull json")
    train_ids, rects = train_ids[visible], rects[visible]
    check_smoothness_settings(s.depth_smooth_weight, s.depth_smooth_stencils, s.depth_smooth_stride_px, s.depth_smooth_robust)
    # The smoothness prior centres its stencils on product pixels, so it needs their pool too.
    pixels = training_pixels(capture, train_ids, rects, s.object_ray_fraction, s.object_ray_margin_px,
                             keep_object_pixels=s.depth_smooth_weight > 0)
    sparse = None
    if s.depth_loss_weight > 0:
        sparse = load_sparse_depth(transforms, capture, train_ids.tolist(), s.depth_max_error_px, s.depth_min_views)

    model, occupancy, step_size = build_field(s, aabb, device)
    if s.carve_tolerance < 1.0:
        ids = torch.tensor(capture.train_ids, device=device)
        occupancy.carve(capture.c2w[ids], capture.intrinsics[ids], capture.masks[ids], s.carve_tolerance)
        if bool(occupancy.carved.all()):
            raise ValueError(f"the masks of {transforms} leave nothing of the hull box {aabb.tolist()}; check masks and hull")
    sampler = make_sampler(aabb, step_size, occupancy, s.sampler)
    diagonal = float((aabb[1] - aabb[0]).norm())
    cameras = CameraCorrections(len(capture.names), train_ids.tolist()).to(device) if s.pose_lr > 0 else None
    graph_from = cuda_graph_start(s, device)
    optimizer = make_optimizer(model, cameras, s, capturable=graph_from < s.steps)
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    use_amp = s.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    batch = NgpStep(s, model, sampler, GridSampler(aabb, step_size, occupancy), capture, pixels, generator, diagonal,
                    sparse, cameras)

    model.train()
    loss_value, psnr_value = float("nan"), float("nan")
    prior_steps = smooth_steps = 0
    captured: CapturedStep | None = None
    graph_started = started
    recent_counts: list[tuple[int, int]] = []  # the last eager steps' sample counts size the graph's batches
    graph_priors = (False, False)
    loop_started = time.perf_counter()
    for step in range(s.steps):
        if step % s.occ_update_every == 0:
            fraction = 1.0 if step < s.occ_warmup_steps else s.occ_update_fraction
            occupancy.update(model.density, fraction, s.render_chunk * 8, generator)
            if captured is not None:
                captured.check(step)
        set_learning_rate(optimizer, base_lrs, learning_rate_factor(step, s))
        if s.coarse_to_fine > 0:
            model.open_levels(step / (s.coarse_to_fine * s.steps), s.coarse_to_fine_start_levels)
        use_prior = sparse is not None and step < s.depth_loss_until * s.steps
        prior_steps += use_prior
        # The smoothness prior waits for a surface to smooth: on the first steps' haze, where rays
        # stop is noise, and the prior's pull on it emptied the basket (session 13).
        use_smooth = s.depth_smooth_weight > 0 and step >= s.depth_smooth_from * s.steps
        smooth_steps += use_smooth
        if step >= graph_from:
            step_losses = functools.partial(batch.fixed_losses, use_prior=use_prior, use_smooth=use_smooth)
            if captured is None:
                graph_started = time.perf_counter()
                marched, visible = (max(column) for column in zip(*recent_counts))
                first_capacity = SampleCapacity.covering(marched, visible, s.cuda_graph_margin)
                captured = CapturedStep(step_losses, optimizer, first_capacity, s.cuda_graph_margin, generator)
            elif (use_prior, use_smooth) != graph_priors:  # a prior's steps began or ended: its rays come or go
                captured.retarget(step_losses)
            graph_priors = (use_prior, use_smooth)
            loss, color_loss = captured()
        else:
            loss, color_loss, counts = batch.eager_losses(use_prior, use_amp, use_smooth)
            recent_counts = [*recent_counts[-7:], counts]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # Nothing may keep this step's autograd graph alive: a captured step's warm-up runs on
            # another stream, and PyTorch warns (and may wait) when old gradient nodes are reused there.
            loss, color_loss = loss.detach(), color_loss.detach()
        if progress is not None and (step % s.log_every == 0 or step == s.steps - 1):
            loss_value = loss.item()
            psnr_value = psnr_from_mse(color_loss.item())
            progress(step + 1, s.steps, {"loss": loss_value, "psnr": psnr_value, "occupied": occupancy.occupied_fraction})
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # replayed steps run behind the host; time them to their end
    if captured is not None:
        captured.check(s.steps)  # the last refresh's steps, so the report says whether any batch overflowed
        captured.graph = None  # its memory goes back before evaluation
    train_seconds = time.perf_counter() - started

    model.eval()
    pose_report: dict[str, Any] = {}
    if cameras is not None:
        # Every frame, held-out ones included (from their neighbours), is evaluated and meshed
        # from the refined poses; the mesh stage finds them in refined_transforms.json.
        delta = cameras.filled()
        learned = delta[cameras.trained]
        pose_report = {"pose_rotation_deg_median": float(rotation_degrees(learned).median()),
                       "pose_translation_median": float(learned[:, 3:].norm(dim=-1).median())}
        if pose_report["pose_rotation_deg_median"] > s.pose_max_rotation_deg:
            # A solve is off by tenths of a degree; corrections of degrees mean field and cameras
            # drifted together (the basket at pose_lr=3e-3: 10°, 9.7 dB), and the mesh would be noise.
            raise RuntimeError(
                f"camera refinement diverged: the training frames' corrections are "
                f"{pose_report['pose_rotation_deg_median']:.1f}° (median), over nerf.pose_max_rotation_deg="
                f"{s.pose_max_rotation_deg}; lower nerf.pose_lr={s.pose_lr} (1e-3 was measured) or set it to 0"
            )
        capture.c2w = cameras.apply(capture.c2w, delta).detach()
        write_refined_transforms(transforms, capture.names, capture.c2w, out_dir / REFINED_TRANSFORMS)
    save_checkpoint(out_dir, model, occupancy, s)
    field = NgpRadianceField(model, sampler, s.render_chunk, s.early_stop_eps)
    quality = quality_report(field, capture, s.eval_max_frames, s.eval_train_frames, s.save_previews, out_dir)
    return TrainReport(
        steps=s.steps,
        seconds=train_seconds,
        peak_memory_mb=_peak_memory_mb(device),
        device=str(device),
        extra={
            **quality,
            "occupied_fraction": occupancy.occupied_fraction,
            "depth_prior_observations": 0 if sparse is None else len(sparse),
            "depth_prior_steps": prior_steps,
            "depth_smooth_steps": smooth_steps,
            **pose_report,
            "setup_seconds": loop_started - started,
            "cuda_graph_from_step": graph_from if captured is not None else None,
            "cuda_graph_seconds": train_seconds - (graph_started - started) if captured is not None else 0.0,
            "cuda_graph_captures": 0 if captured is None else captured.captures,
            "cuda_graph_overflows": 0 if captured is None else captured.overflows,
            # [step, marched, visible] of each capacity the step ran with (the first from the eager steps).
            "cuda_graph_capacities": [] if captured is None else [[graph_from, first_capacity.marched, first_capacity.visible],
                                                                  *map(list, captured.history)],
            "eval_seconds": time.perf_counter() - started - train_seconds,
            "aabb": aabb.tolist(),
        },
    )


def save_checkpoint(out_dir: Path, model: NgpModel, occupancy: OccupancyGrid, s: NgpSettings) -> None:
    """``field.pt`` holds everything :func:`load_ngp` needs; ``settings.json`` is for people."""
    payload = {"aabb": model.aabb.cpu(), "model": {k: v.cpu() for k, v in model.state_dict().items()},
               "occupancy": occupancy.state_dict()}
    write_checkpoint(out_dir / "field.pt", CHECKPOINT_FORMAT, s, payload)


def load_ngp(out_dir: Path, device: str | torch.device = "cpu") -> NgpRadianceField:
    """Load ``out_dir/field.pt`` as a :class:`RadianceField` on ``device`` ("auto" allowed)."""
    state = read_checkpoint(Path(out_dir) / "field.pt", CHECKPOINT_FORMAT, "ngp")
    device = choose_device(device) if isinstance(device, str) else torch.device(device)
    s = settings_from_dict(state["settings"], NgpSettings)
    aabb = state["aabb"].to(device)
    model, _, step_size = build_field(s, aabb, device)
    model.load_state_dict(state["model"])
    occupancy = OccupancyGrid.from_state(aabb, state["occupancy"])
    # The sampler only changes speed: a GPU-trained field still loads for meshing on the CPU.
    sampler = make_sampler(aabb, step_size, occupancy, s.sampler if device.type == "cuda" else "torch")
    return NgpRadianceField(model, sampler, s.render_chunk, s.early_stop_eps)


@register_backend("ngp")
class NgpBackend:
    """The default backend: ``get_backend("ngp")``."""

    name = "ngp"
    settings_type = NgpSettings

    def train(
        self,
        transforms: Path,
        hull: Path,
        out_dir: Path,
        settings: dict[str, Any],
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> TrainReport:
        return train_ngp(transforms, hull, out_dir, settings, progress)

    def load(self, out_dir: Path, device: str | torch.device = "cpu") -> NgpRadianceField:
        return load_ngp(out_dir, device)
