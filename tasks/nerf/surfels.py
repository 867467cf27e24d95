"""Rasterising 2D Gaussian surfels (2DGS, Huang et al. 2024) into one view.

Two engines compute the same image: ``gsplat`` (gsplat 1.5.3's tiled CUDA kernels,
``rasterization_2dgs``) and ``torch`` (a dense plain-PyTorch version: every surfel against every
pixel, for CPU tests and the demo's tiny scenes). Both follow gsplat's conventions so a CPU-trained
cloud renders the same on CUDA: a surfel's weight at a pixel is the smaller of its ray-surfel
Gaussian and a half-pixel screen-space filter, alpha = min(0.999, opacity * weight), transparent
hits (alpha < 1/255) are skipped, surfels composite front to back by the depth of their centres,
and depth is the camera's z of those centres (``median``: the centre depth where transmittance
crosses 0.5). gsplat stops a pixel once its transmittance falls below 1e-4; the dense engine does
not, which changes nothing visible.

Cameras here are OpenGL camera-to-world ``c2w [4, 4]`` and ``intrinsics [4]`` = fx, fy, cx, cy, as
in the rest of the NeRF package; gsplat's world-to-camera matrices are OpenCV's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.nerf.hashgrid import spherical_harmonics

ALPHA_MIN = 1.0 / 255.0  # gsplat's ALPHA_THRESHOLD
FILTER_INV_SQUARE = 2.0  # gsplat's FILTER_INV_SQUARE_2DGS: a screen-space Gaussian of 1/sqrt(2) px
OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class Surfels:
    """Activated surfel parameters (N surfels), ready to rasterise.

    means ``[N, 3]`` centres, quats ``[N, 4]`` unit rotations (w, x, y, z; the first two columns of
    the rotation span the surfel's plane), scales ``[N, 2]`` standard deviations along them,
    opacities ``[N]`` in 0..1, sh ``[N, K, 3]`` colour spherical harmonics (K = (degree + 1)²,
    3DGS's convention: colour = 0.5 + SH · basis, clamped at 0).
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    sh: Tensor


def quat_to_rotation(quats: Tensor) -> Tensor:
    """Unit quaternions (w, x, y, z) ``[N, 4]`` → rotation matrices ``[N, 3, 3]``."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)


def view_matrix(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world ``[4, 4]`` → OpenCV world-to-camera ``[4, 4]`` (gsplat's viewmat)."""
    return torch.linalg.inv(c2w @ OPENGL_TO_OPENCV.to(c2w))


def camera_matrix(intrinsics: Tensor) -> Tensor:
    """fx, fy, cx, cy ``[4]`` → K ``[3, 3]``."""
    fx, fy, cx, cy = intrinsics.unbind(-1)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx, zero, cx, zero, fy, cy, zero, zero, one]).reshape(3, 3)


def surfel_colors(surfels: Surfels, camera_origin: Tensor, degree: int) -> Tensor:
    """View-dependent colour of each surfel seen from ``camera_origin [3]`` → ``[N, 3]`` (>= 0)."""
    coefficients = (degree + 1) ** 2
    directions = F.normalize(surfels.means - camera_origin, dim=-1)
    basis = spherical_harmonics(directions)[:, :coefficients]  # [N, K]
    return ((basis[:, :, None] * surfels.sh[:, :coefficients]).sum(1) + 0.5).clamp(min=0.0)


def ray_distance_scale(intrinsics: Tensor, width: int, height: int) -> Tensor:
    """Per pixel, distance along the ray per unit of camera z: ``|K⁻¹ (u, v, 1)|`` → ``[H, W]``."""
    fx, fy, cx, cy = intrinsics.tolist()
    device = intrinsics.device
    v, u = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    x, y = (u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy
    return torch.sqrt(1.0 + x * x + y * y)


def depth_to_normals(depth: Tensor, c2w: Tensor, intrinsics: Tensor) -> Tensor:
    """World normals of the surface a z-depth map ``[H, W]`` describes → ``[H, W, 3]`` (zero on the border).

    Central differences of the back-projected points, crossed so they face the camera (gsplat's
    ``depth_to_normal``), in world axes to compare with the rasterised surfel normals.
    """
    height, width = depth.shape
    fx, fy, cx, cy = intrinsics.unbind(-1)
    v, u = torch.meshgrid(torch.arange(height, device=depth.device), torch.arange(width, device=depth.device), indexing="ij")
    cam = torch.stack([(u + 0.5 - cx) / fx * depth, (v + 0.5 - cy) / fy * depth, depth], -1)  # OpenCV camera
    world = cam @ (c2w @ OPENGL_TO_OPENCV.to(c2w))[:3, :3].T
    down = world[2:, 1:-1] - world[:-2, 1:-1]
    right = world[1:-1, 2:] - world[1:-1, :-2]
    normals = F.normalize(torch.cross(down, right, dim=-1), dim=-1)
    return F.pad(normals.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)


def rasterize(
    surfels: Surfels, c2w: Tensor, intrinsics: Tensor, width: int, height: int, sh_degree: int,
    background: Tensor | None = None, engine: str = "torch", near: float = 0.01,
) -> dict[str, Tensor]:
    """Render one view of the surfels.

    Returns ``rgb [H, W, 3]`` (composited over ``background [3]``, premultiplied when it is None),
    ``alpha [H, W]``, ``depth [H, W]`` (expected camera z of the surfel centres, 0 where empty),
    ``median [H, W]`` (camera z where transmittance crosses 0.5, 0 where the pixel is less opaque),
    ``normals [H, W, 3]`` (opacity-weighted surfel normals, world axes, facing the camera),
    ``distortion [H, W]`` (mip-NeRF 360's L1 distortion of the centre depths), ``grad2d
    [1, N, 2]``, a zero tensor whose gradient after ``backward`` is each surfel's screen-space
    positional gradient in pixels (the densification signal), and ``radii [1, N, 2]`` (> 0 where a
    surfel touches the view; the dense engine reports 1, not a size).
    """
    if engine == "gsplat":
        return _rasterize_gsplat(surfels, c2w, intrinsics, width, height, sh_degree, background, near)
    if engine != "torch":
        raise ValueError(f"unknown surfel rasterizer {engine!r}; choose torch or gsplat")
    return _rasterize_dense(surfels, c2w, intrinsics, width, height, sh_degree, background, near)


def _rasterize_gsplat(
    surfels: Surfels, c2w: Tensor, intrinsics: Tensor, width: int, height: int, sh_degree: int,
    background: Tensor | None, near: float,
) -> dict[str, Tensor]:
    from gsplat import rasterization_2dgs

    colors = surfel_colors(surfels, c2w[:3, 3], sh_degree)
    scales3 = torch.cat([surfels.scales, surfels.scales[:, :1]], -1)  # the third axis is ignored by 2DGS
    rgbd, alpha, normals, _, distortion, median, meta = rasterization_2dgs(
        surfels.means, surfels.quats, scales3, surfels.opacities, colors[None],
        view_matrix(c2w)[None], camera_matrix(intrinsics)[None], width, height, near_plane=near,
        backgrounds=None if background is None else background[None], render_mode="RGB+ED", distloss=True,
    )
    alpha = alpha[0, ..., 0]
    opaque = alpha >= 0.5
    return {
        "rgb": rgbd[0, ..., :3],
        "alpha": alpha,
        "depth": rgbd[0, ..., 3] * (alpha > 1e-6),
        "median": median[0, ..., 0] * opaque,
        "normals": normals[0],
        "distortion": distortion[0, ..., 0],
        "grad2d": meta["gradient_2dgs"],
        "radii": meta["radii"],
    }


def _rasterize_dense(
    surfels: Surfels, c2w: Tensor, intrinsics: Tensor, width: int, height: int, sh_degree: int,
    background: Tensor | None, near: float,
) -> dict[str, Tensor]:
    """:func:`rasterize` with every surfel against every pixel: ``[P, N]`` tensors throughout."""
    viewmat = view_matrix(c2w)
    means = surfels.means @ viewmat[:3, :3].T + viewmat[:3, 3]  # [N, 3] OpenCV camera
    order = torch.argsort(means[:, 2])
    means = means[order]
    axes = viewmat[:3, :3] @ quat_to_rotation(surfels.quats[order])  # [N, 3, 3] camera axes
    scales = surfels.scales[order]
    tangent_u, tangent_v = axes[:, :, 0] * scales[:, :1], axes[:, :, 1] * scales[:, 1:]
    normal = axes[:, :, 2]
    normal = torch.where(((normal * means).sum(-1, keepdim=True) > 0), -normal, normal)  # face the camera
    fx, fy, cx, cy = intrinsics.unbind(-1)
    v, u = torch.meshgrid(
        torch.arange(height, device=means.device, dtype=means.dtype),
        torch.arange(width, device=means.device, dtype=means.dtype), indexing="ij",
    )
    px, py = u.reshape(-1, 1) + 0.5, v.reshape(-1, 1) + 0.5  # [P, 1]
    # grad2d is zero: it moves every surfel across the screen by nothing, so that its gradient is
    # the surfel's screen-space positional gradient (the densification signal, gsplat's
    # "gradient_2dgs"). Shifting a surfel by s is seeing it from pixels shifted by -s.
    grad2d = torch.zeros(1, means.shape[0], 2, device=means.device, dtype=means.dtype, requires_grad=True)
    shift = grad2d[0][order]
    ray_x = (px - shift[:, 0] - cx) / fx  # [P, N]: the ray through each pixel is (ray_x, ray_y, 1)
    ray_y = (py - shift[:, 1] - cy) / fy

    def along_ray(vector: Tensor) -> Tensor:  # ray · vector, [P, N]
        return ray_x * vector[:, 0] + ray_y * vector[:, 1] + vector[:, 2]

    # The ray t·r meets the surfel's plane at t = (m·n) / (r·n); the hit's offset from the centre,
    # in units of the surfel's two standard deviations, is (t·r - m)·T / |T|².
    r_dot_n = along_ray(normal)
    t = (means * normal).sum(-1) / torch.where(r_dot_n.abs() < 1e-10, torch.full_like(r_dot_n, 1e-10), r_dot_n)
    su = (t * along_ray(tangent_u) - (means * tangent_u).sum(-1)) / (tangent_u * tangent_u).sum(-1)
    sv = (t * along_ray(tangent_v) - (means * tangent_v).sum(-1)) / (tangent_v * tangent_v).sum(-1)
    centre = _screen_centres(tangent_u, tangent_v, means, camera_matrix(intrinsics))
    offset_u = px - shift[:, 0] - centre[:, 0]
    offset_v = py - shift[:, 1] - centre[:, 1]
    screen = FILTER_INV_SQUARE * (offset_u * offset_u + offset_v * offset_v)
    sigma = 0.5 * torch.minimum(su * su + sv * sv, screen)
    alpha = (surfels.opacities[order] * torch.exp(-sigma)).clamp(max=0.999)
    alpha = alpha * ((alpha >= ALPHA_MIN) & (means[:, 2] > near))
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], 1), 1)
    weights = alpha * transmittance  # [P, N]
    opacity = weights.sum(1)
    colors = surfel_colors(surfels, c2w[:3, 3], sh_degree)[order]
    rgb = weights @ colors
    if background is not None:
        rgb = rgb + (1.0 - opacity)[:, None] * background
    depth_sum = weights @ means[:, 2]
    # mip-NeRF 360's distortion as gsplat accumulates it: 2 Σ_i w_i (z_i Σ_{j<i} w_j - Σ_{j<i} w_j z_j).
    weight_before = torch.cumsum(weights, 1) - weights
    weighted_depth_before = torch.cumsum(weights * means[:, 2], 1) - weights * means[:, 2]
    distortion = 2.0 * (weights * (means[:, 2] * weight_before - weighted_depth_before)).sum(1)
    crossing = (transmittance > 0.5) & (alpha > 0)
    last = torch.where(crossing, torch.arange(alpha.shape[1], device=alpha.device), -1).amax(1)
    median = torch.where(last >= 0, means[:, 2][last.clamp(min=0)], torch.zeros_like(opacity))
    normals_world = (weights @ normal) @ viewmat[:3, :3]
    shape = (height, width)
    return {
        "rgb": rgb.reshape(height, width, 3),
        "alpha": opacity.reshape(shape),
        "depth": (depth_sum / opacity.clamp(min=1e-10) * (opacity > 1e-6)).reshape(shape),
        "median": (median * (opacity >= 0.5)).reshape(shape),
        "normals": normals_world.reshape(height, width, 3),
        "distortion": distortion.reshape(shape),
        "grad2d": grad2d,
        "radii": (alpha > 0).any(0)[order.argsort()].float()[None, :, None].expand(1, -1, 2),
    }


def _screen_centres(tangent_u: Tensor, tangent_v: Tensor, means: Tensor, k: Tensor) -> Tensor:
    """Each surfel's screen centre as gsplat's 2DGS projection defines it ``[N, 2]``: the centre of
    the box around its projected 3-sigma ellipse (the projected centre when it faces the camera)."""
    t_sl = k @ torch.stack([tangent_u, tangent_v, means], -1)  # [N, 3, 3]: rows x, y, w of the splat's homography
    test = torch.tensor([1.0, 1.0, -1.0], device=means.device, dtype=means.dtype)
    w_row = t_sl[:, 2]
    d = (w_row * w_row * test).sum(-1, keepdim=True)
    d = torch.where(d.abs() > 1e-12, d, torch.full_like(d, 1e-12))
    return (t_sl[:, :2] * (w_row * test)[:, None, :]).sum(-1) / d
