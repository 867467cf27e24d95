"""``splat``: 2D Gaussian surfels (2DGS) trained with gsplat's rasteriser and densification.

Why a second representation: the ngp field's surface is where its density happens to rise, and
a plain or finely textured product leaves that loose (bench/RESULTS.md, sessions 6-7). A surfel
is a flat disc with a normal, so the surface is explicit, and 2DGS's normal-consistency loss
makes the rendered normals agree with the rendered depth.

Training follows gsplat's ``simple_trainer_2dgs`` on our capture: the masks as alpha
supervision over a random background colour each step (only the product is learned), the
surfels seeded inside the masks' visual hull, gsplat's ``DefaultStrategy`` to grow and prune
them. Rendering runs gsplat's CUDA kernels (``rasterizer: gsplat``) or a dense plain-PyTorch
version for CPU tests (tasks/nerf/surfels.py). The field it loads as renders depth for the
fusion mesh; density and colour at points come from a voxel grid the surfels are painted into
(tasks/nerf/splat_field.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.nerf.base import TrainReport, read_checkpoint, register_backend, write_checkpoint
from tasks.nerf.dataset import Capture, load_capture, load_hull
from tasks.nerf.depth_prior import read_point_views, reliable_points
from tasks.nerf.evaluate import quality_report, ssim_map
from tasks.nerf.external import split_settings, warn_ignored
from tasks.nerf.ngp import _peak_memory_mb, choose_device, padded_aabb
from tasks.nerf.rays import camera_to_pixels, psnr_from_mse
from tasks.nerf.settings import settings_from_dict
from tasks.nerf.splat_field import SH_C0, SplatRadianceField, activated
from tasks.nerf.surfels import depth_to_normals, rasterize

CHECKPOINT_FORMAT = "korokoro-splat-1"


@dataclass(frozen=True)
class SplatSettings:
    """Every knob of the splat backend (conf/nerf/splat.yaml documents each one)."""

    backend: str = "splat"
    device: str = "auto"
    rasterizer: str = "auto"
    seed: int = 0
    iterations: int = 2000
    downscale: int = 1
    holdout_every: int = 8
    aabb_padding: float = 0.1
    init_from: str = "hull"
    init_max_error_px: float = 1.0
    init_min_views: int = 3
    init_samples: int = 400000
    init_max_surfels: int = 100000
    init_hull_fraction: float = 0.9
    init_min_framed: float = 0.5
    init_opacity: float = 0.1
    sh_degree: int = 3
    sh_degree_every: int = 400
    lr_means: float = 1.6e-4
    lr_means_final_factor: float = 0.01
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 2.5e-3
    lr_shN: float = 1.25e-4
    ssim_weight: float = 0.2
    alpha_loss_weight: float = 1.0
    normal_loss_weight: float = 0.01
    normal_loss_from: float = 0.25
    distortion_loss_weight: float = 0.0
    distortion_loss_from: float = 0.1
    refine_from: int = 500
    refine_until: float = 0.5
    refine_every: int = 100
    reset_opacity_every: int = 3000
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.01
    prune_opacity: float = 0.05
    prune_scale3d: float = 0.1
    max_surfels: int = 2000000
    dense_max_pairs: int = 20000000
    field_grid_resolution: int = 256
    render_rows: int = 32
    cpu_threads: int = 0
    log_every: int = 100
    eval_train_frames: int = 2
    eval_max_frames: int = 0
    save_previews: bool = True


def choose_rasterizer(name: str, device: torch.device) -> str:
    """``auto`` → gsplat on CUDA (it must import), torch elsewhere; gsplat needs CUDA."""
    if name not in ("auto", "torch", "gsplat"):
        raise ValueError(f"nerf.rasterizer={name!r} is not one of auto, torch, gsplat")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    if device.type != "cuda":
        raise RuntimeError("nerf.rasterizer=gsplat needs CUDA; use rasterizer=torch (or auto) on the CPU")
    try:
        import gsplat  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("nerf.rasterizer needs gsplat on CUDA: pip install 'korokoro[gpu]' (gsplat==1.5.3)") from exc
    return "gsplat"


def check_dense_size(surfels: int, width: int, height: int, s: SplatSettings) -> None:
    """The dense rasteriser holds a few pixels × surfels tensors: refuse sizes that would not fit."""
    if surfels * width * height > s.dense_max_pairs:
        raise ValueError(
            f"the dense (CPU) rasteriser would pair {width}x{height} pixels with {surfels} surfels, over "
            f"nerf.dense_max_pairs={s.dense_max_pairs}; train on CUDA (rasterizer=gsplat), or raise "
            f"nerf.downscale (now {s.downscale}) or lower nerf.init_max_surfels (now {s.init_max_surfels})"
        )


def sparse_points(transforms: Path, max_error_px: float, min_views: int) -> Tensor | None:
    """The camera solve's sparse points ``[M, 3]`` seen by ``min_views`` frames within
    ``max_error_px`` (``point_views.npz``, named by transforms.json); None when there are none."""
    data = read_point_views(transforms)
    if data is None:
        return None
    keep = reliable_points(data, max_error_px, min_views)
    return torch.from_numpy(data["xyz"][keep]).float() if keep.any() else None


def hull_colours(points: Tensor, capture: Capture) -> tuple[Tensor, Tensor, Tensor]:
    """For points ``[M, 3]``: the share of the training views that frame each ``[M]``, the share of
    those that see it inside the mask ``[M]`` (0 where none frame it), and the mean colour those
    views show there ``[M, 3]``."""
    inside = torch.zeros(len(points), device=points.device)
    framed = torch.zeros(len(points), device=points.device)
    colour = torch.zeros(len(points), 3, device=points.device)
    height, width = capture.masks.shape[1:]
    for i in capture.train_ids:
        w2c = torch.linalg.inv(capture.c2w[i])
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]
        u, v, depth = camera_to_pixels(cam, capture.intrinsics[i])
        col, row = u.floor().long(), v.floor().long()
        seen = (depth > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
        col, row = col.clamp(0, width - 1), row.clamp(0, height - 1)
        hit = capture.masks[i][row, col] & seen
        framed += seen.float()
        inside += hit.float()
        colour += capture.images[i][row, col].float() / 255.0 * hit[:, None]
    in_mask = torch.where(framed > 0, inside / framed.clamp(min=1), 0.0)
    return framed / len(capture.train_ids), in_mask, colour / inside.clamp(min=1)[:, None]


def seed_surfels(
    capture: Capture, hull_box: Tensor, s: SplatSettings, generator: torch.Generator, points: Tensor | None = None,
) -> dict[str, Tensor]:
    """Raw parameters of the first surfels, coloured by the frames, facing random ways.

    ``points`` (the solve's sparse points, ``init_from: points``) seed on the surface, each disc
    as wide as the mean distance to its three nearest seeds (3DGS's rule); without them, points
    drawn uniformly in the hull box fill the masks' visual hull, each disc as wide as their
    spacing. Either way a seed stays where at least ``init_min_framed`` of the training views
    frame it and ``init_hull_fraction`` of those see the product there.
    """
    device = capture.images.device
    lo, hi = hull_box[0].to(device), hull_box[1].to(device)
    from_points = points is not None
    if points is None:
        points = lo + (hi - lo) * torch.rand(s.init_samples, 3, device=device, generator=generator)
    candidates = len(points)
    framed, in_mask, colour = hull_colours(points.to(device), capture)
    keep = (framed >= s.init_min_framed) & (in_mask >= s.init_hull_fraction)
    if int(keep.sum()) < 16:
        raise RuntimeError(
            f"the masks' visual hull holds {int(keep.sum())} of {candidates} seed points; "
            "check the masks (segment stage) and cameras, or raise nerf.init_samples"
        )
    points, colour = points.to(device)[keep][: s.init_max_surfels], colour[keep][: s.init_max_surfels]
    n = len(points)
    if from_points:
        from scipy.spatial import cKDTree

        distances, _ = cKDTree(points.cpu().numpy()).query(points.cpu().numpy(), k=4)
        log_scale = torch.from_numpy(np.log(np.maximum(distances[:, 1:].mean(1), 1e-6))).float().to(device)
    else:  # the seeds' spacing (points per hull volume), so the discs tile the hull
        spacing = float(((hi - lo).prod() * keep.float().mean() / n) ** (1 / 3))
        log_scale = torch.full((n,), math.log(spacing), device=device)
    coefficients = (s.sh_degree + 1) ** 2
    sh = torch.zeros(n, coefficients, 3, device=device)
    sh[:, 0] = (colour - 0.5) / SH_C0
    return {
        "means": points,
        # [N, 3] as gsplat's splitting expects; the third axis is the disc's unused thickness.
        "scales": log_scale[:, None].expand(n, 3).contiguous(),
        "quats": F.normalize(torch.randn(n, 4, device=device, generator=generator), dim=-1),
        "opacities": torch.full((n,), math.log(s.init_opacity / (1 - s.init_opacity)), device=device),
        "sh0": sh[:, :1].contiguous(),
        "shN": sh[:, 1:].contiguous(),
    }


def scene_scale(capture: Capture) -> float:
    """gsplat's scene scale: 1.1 × the farthest training camera from the cameras' mean."""
    centres = capture.c2w[capture.train_ids, :3, 3]
    return 1.1 * float((centres - centres.mean(0)).norm(dim=-1).max())


def train_splat(
    transforms: Path, hull: Path, out_dir: Path, settings: dict[str, Any],
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainReport:
    """Train the surfels and write the checkpoint folder; returns the report with held-out PSNR and SSIM."""
    s, ignored = split_settings(settings, SplatSettings)
    if s.init_from not in ("hull", "points"):
        raise ValueError(f"nerf.init_from={s.init_from!r} is not one of hull, points")
    warn_ignored("splat", ignored)
    device = choose_device(s.device)
    engine = choose_rasterizer(s.rasterizer, device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and s.cpu_threads > 0:
        torch.set_num_threads(s.cpu_threads)
    try:
        report = _train(s, device, engine, Path(transforms), Path(hull), Path(out_dir), progress)
        return dataclasses.replace(report, extra={**report.extra, "ignored_settings": ignored})
    finally:
        torch.set_num_threads(threads)


def _train(
    s: SplatSettings, device: torch.device, engine: str, transforms: Path, hull: Path, out_dir: Path,
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> TrainReport:
    try:
        from gsplat.strategy import DefaultStrategy
    except ImportError as exc:
        raise RuntimeError(
            "nerf=splat needs gsplat to grow and prune its surfels: pip install 'korokoro[splat]' (gsplat==1.5.3)"
        ) from exc

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    frames = torch.Generator().manual_seed(s.seed)  # on the CPU: picking a frame needs no GPU sync
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    capture = load_capture(transforms, s.downscale, s.holdout_every, device)
    hull_box = load_hull(hull).to(device)
    aabb = padded_aabb(hull_box, s.aabb_padding)
    scale = scene_scale(capture)
    points = sparse_points(transforms, s.init_max_error_px, s.init_min_views) if s.init_from == "points" else None
    if s.init_from == "points" and points is None:
        raise ValueError(
            f"nerf.init_from=points but {transforms} names no sparse points (point_views) to seed from; "
            "rerun the colmap stage, or use nerf.init_from=hull"
        )
    seeds = seed_surfels(capture, hull_box, s, generator, points)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in seeds.items()})
    height, width = capture.masks.shape[1:]
    if engine == "torch":
        check_dense_size(len(params["means"]), width, height, s)
    rates = {"means": s.lr_means * scale, "scales": s.lr_scales, "quats": s.lr_quats,
             "opacities": s.lr_opacities, "sh0": s.lr_sh0, "shN": s.lr_shN}
    optimizers = {k: torch.optim.Adam([{"params": params[k], "lr": lr, "name": k}], eps=1e-15) for k, lr in rates.items()}
    means_decay = s.lr_means_final_factor ** (1.0 / max(1, s.iterations))
    strategy = DefaultStrategy(
        prune_opa=s.prune_opacity, grow_grad2d=s.grow_grad2d, grow_scale3d=s.grow_scale3d,
        prune_scale3d=s.prune_scale3d, refine_start_iter=s.refine_from,
        refine_stop_iter=int(s.refine_until * s.iterations), reset_every=s.reset_opacity_every,
        refine_every=s.refine_every, key_for_gradient="gradient_2dgs",
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=scale)
    train_ids = capture.train_ids
    normal_from, distortion_from = int(s.normal_loss_from * s.iterations), int(s.distortion_loss_from * s.iterations)
    started = time.perf_counter()
    for step in range(s.iterations):
        frame = int(train_ids[int(torch.randint(len(train_ids), (1,), generator=frames))])
        image = capture.images[frame].float() / 255.0
        mask = capture.masks[frame]
        background = torch.rand(3, device=device, generator=generator)
        target = torch.where(mask[..., None], image, background)
        degree = min(s.sh_degree, step // max(1, s.sh_degree_every))
        out = rasterize(activated(params), capture.c2w[frame], capture.intrinsics[frame], width, height, degree,
                        background=background, engine=engine)
        info = {"gradient_2dgs": out["grad2d"], "radii": out["radii"], "width": width, "height": height,
                "n_cameras": 1, "gaussian_ids": None}
        strategy.step_pre_backward(params, optimizers, state, step, info)
        rgb = out["rgb"]
        loss = (1 - s.ssim_weight) * (rgb - target).abs().mean()
        if s.ssim_weight > 0:
            loss = loss + s.ssim_weight * (1 - ssim_map(rgb.permute(2, 0, 1), target.permute(2, 0, 1)).mean())
        if s.alpha_loss_weight > 0:
            loss = loss + s.alpha_loss_weight * (out["alpha"] - mask.float()).abs().mean()
        if s.normal_loss_weight > 0 and step >= normal_from:
            surface = depth_to_normals(out["depth"], capture.c2w[frame], capture.intrinsics[frame])
            agreement = (out["normals"] * surface).sum(-1)
            loss = loss + s.normal_loss_weight * ((1 - agreement) * mask).sum() / mask.sum().clamp(min=1)
        if s.distortion_loss_weight > 0 and step >= distortion_from:
            loss = loss + s.distortion_loss_weight * out["distortion"].mean()
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for group in optimizers["means"].param_groups:
            group["lr"] *= means_decay
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        if engine == "torch":
            check_dense_size(len(params["means"]), width, height, s)
        if len(params["means"]) > s.max_surfels:
            raise RuntimeError(
                f"the surfels grew to {len(params['means'])}, over nerf.max_surfels={s.max_surfels}; "
                "raise nerf.grow_grad2d (fewer splits) or nerf.max_surfels"
            )
        if progress is not None and ((step + 1) % s.log_every == 0 or step + 1 == s.iterations):
            with torch.no_grad():
                mse = float(((rgb - target)[mask] ** 2).mean()) if bool(mask.any()) else float("nan")
            progress(step + 1, s.iterations, {"loss": float(loss.detach()), "psnr": psnr_from_mse(mse),
                                          "surfels": float(len(params["means"]))})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - started
    save_checkpoint(out_dir, params, aabb, s)
    field = make_field(params, aabb, s, engine)
    quality = quality_report(field, capture, s.eval_max_frames, s.eval_train_frames, s.save_previews, out_dir)
    return TrainReport(
        steps=s.iterations, seconds=train_seconds, peak_memory_mb=_peak_memory_mb(device), device=str(device),
        extra={
            **quality,
            "surfels": len(params["means"]),
            "rasterizer": engine,
            "eval_seconds": time.perf_counter() - started - train_seconds,
            "aabb": aabb.tolist(),
        },
    )


def save_checkpoint(out_dir: Path, params: torch.nn.ParameterDict, aabb: Tensor, s: SplatSettings) -> None:
    """``surfels.pt`` holds everything :func:`load_splat` needs; ``settings.json`` is for people."""
    params = {k: v.detach().cpu() for k, v in params.items()}
    write_checkpoint(out_dir / "surfels.pt", CHECKPOINT_FORMAT, s, {"aabb": aabb.cpu(), "params": params})


def load_splat(out_dir: Path, device: str | torch.device = "cpu") -> SplatRadianceField:
    """Load ``out_dir/surfels.pt`` as a :class:`RadianceField` on ``device`` ("auto" allowed)."""
    state = read_checkpoint(Path(out_dir) / "surfels.pt", CHECKPOINT_FORMAT, "splat")
    device = choose_device(device) if isinstance(device, str) else torch.device(device)
    s = settings_from_dict(state["settings"], SplatSettings)
    # A GPU-trained cloud still loads on the CPU: only the rasteriser changes.
    engine = choose_rasterizer("auto" if s.rasterizer == "gsplat" else s.rasterizer, device)
    params = {k: v.to(device) for k, v in state["params"].items()}
    return make_field(params, state["aabb"].to(device), s, engine)


def make_field(
    params: dict[str, Tensor] | torch.nn.ParameterDict, aabb: Tensor, s: SplatSettings, engine: str,
) -> SplatRadianceField:
    """The trained parameters as the field the evaluation and the mesh stage read."""
    return SplatRadianceField(activated(params), aabb, s.sh_degree, engine, s.field_grid_resolution, s.render_rows,
                              s.dense_max_pairs)


@register_backend("splat")
class SplatBackend:
    """2D Gaussian surfels: ``get_backend("splat")``."""

    name = "splat"

    def validate_settings(self, settings: dict[str, Any]) -> None:
        """Its own keys, plus the ngp keys the profiles set (accepted, ignored, listed in metrics.json)."""
        split_settings(settings, SplatSettings)

    def train(
        self, transforms: Path, hull: Path, out_dir: Path, settings: dict[str, Any],
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> TrainReport:
        return train_splat(transforms, hull, out_dir, settings, progress)

    def load(self, out_dir: Path, device: str | torch.device = "cpu") -> SplatRadianceField:
        return load_splat(out_dir, device)
