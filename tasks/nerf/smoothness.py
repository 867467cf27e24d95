"""A depth-smoothness prior on the product's pixels: rendered depth should curve, not jump.

Where colour cannot place a surface (a basket's plain inner liner, seen only through its
opening) photometric training leaves solid false surfaces floating in front of the true one
(bench/RESULTS.md, session 7), and on a fine weave it carves bands deeper than the weave's
relief. RegNeRF regularises such depth with patches of rays whose depths must vary smoothly.
Here each patch is a plus-shaped stencil of five pixels ``stride`` apart on a training frame's
product, and the loss is a robust (Cauchy) penalty on the second difference of its rendered depth (where the
rays stop) across and down the stencil: zero on any plane (to first order), so slanted walls cost
nothing, while a step (a false surface's edge, a groove) costs a bounded amount. Stencils with a pixel off the product's mask are left
out, so the silhouette's depth jump to the background is never smoothed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks.nerf.pixels import TrainingPixels

# Offsets of a stencil's pixels, in strides: centre, left, right, up, down.
STENCIL = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
# Opacity below which a ray's depth is not divided further (its stopping depth is noise anyway).
ALPHA_FLOOR = 0.1


def check_smoothness_settings(weight: float, stencils: int, stride_px: int, robust: float) -> None:
    """Raise a ValueError naming the setting when the prior is on with settings it cannot use."""
    if weight > 0 and (stencils < 1 or stride_px < 1 or robust <= 0):
        raise ValueError(f"nerf.depth_smooth_stencils ({stencils}) and nerf.depth_smooth_stride_px ({stride_px}) "
                         f"must be >= 1 and nerf.depth_smooth_robust ({robust}) > 0 while nerf.depth_smooth_weight is set")


def pick_stencils(
    pixels: TrainingPixels, masks: Tensor, n_stencils: int, stride: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n_stencils`` stencils centred on random product pixels of the training frames.

    pixels: its ``object_pixels`` pool holds the centres; masks ``[F, H, W]`` bool.
    → frame ``[S, 5]``, u ``[S, 5]``, v ``[S, 5]`` (int64, clamped into the image) and
    valid ``[S]`` float: 1 where all five pixels are on the product's (ungrown) mask.
    Nothing here waits for the GPU, so a captured CUDA graph may replay it.
    """
    if pixels.object_pixels.numel() == 0:
        raise ValueError("the depth-smoothness prior needs product pixels to centre its stencils on; "
                         "the training frames' masks hold none inside the box's view")
    _, height, width = masks.shape
    frame, u0, v0 = pixels.pick_object_pixels(n_stencils, width, height, generator)
    # STENCIL's offsets made on the device: a captured graph may copy nothing from the host.
    arm = torch.arange(len(STENCIL), device=u0.device)
    du = ((arm == 2).long() - (arm == 1).long()) * stride
    dv = ((arm == 4).long() - (arm == 3).long()) * stride
    u = (u0[:, None] + du).clamp(0, width - 1)
    v = (v0[:, None] + dv).clamp(0, height - 1)
    frame = frame[:, None].expand(-1, len(STENCIL))
    valid = masks[frame, v, u].all(dim=-1).float()
    return frame, u, v, valid


def second_difference_loss(depth: Tensor, alpha: Tensor, valid: Tensor, scale: float, robust: float) -> Tensor:
    """Mean over the valid stencils of a robust penalty on the second differences of the depth
    where rays stop.

    depth ``[S, 5]`` rendered (expected) depth at each stencil's pixels (order of ``STENCIL``),
    alpha ``[S, 5]`` their accumulated opacity, valid ``[S]``; scale: the length depths are
    measured in (the box's diagonal); robust: the second difference, in ``scale`` units, where
    the penalty turns from quadratic to logarithmic → 0-d loss.

    Per stencil ``ρ(left + right - 2 centre) + ρ(up + down - 2 centre)`` with the Cauchy penalty
    ``ρ(r) = log(1 + (r / robust)²)``. Quadratic near a plane; past ``robust`` its gradient falls,
    so a true step (a rim over the cavity behind it) costs a bounded amount, as does the edge of a
    false surface: the prior then charges false surfaces by their outline and removes small ones.
    The depth is divided by the opacity (where a ray stops, given that it does): on the expected
    depth itself a fading surface would flatten every stencil towards 0, and training learned to
    empty the product instead of smoothing it (session 13: weight 10 left nothing opaque).
    """
    d = depth / alpha.clamp_min(ALPHA_FLOOR) / scale
    across = (d[:, 1] + d[:, 2] - 2 * d[:, 0]) / robust
    down = (d[:, 3] + d[:, 4] - 2 * d[:, 0]) / robust
    penalty = torch.log1p(across**2) + torch.log1p(down**2)
    return (penalty * valid).sum() / valid.sum().clamp_min(1.0)
