"""The hash grid's encoding as two Triton kernels: one launch forward, one backward.

Why: the plain-PyTorch encoding (:meth:`tasks.nerf.hashgrid.HashGrid.forward`) is about 30
small kernels forward and 15 backward, and it materialises ``[L, N, 8]`` corner indices and
weights (a gigabyte for a million samples). A training step calls it three times (the early
stop's density pass, the full pass, its backward), and on an H100 the step is paced by the
host launching kernels, not by the GPU. Here each point-level pair computes its 8 corners,
their hash or dense index and trilinear weights in registers, as tiny-cuda-nn does; the
backward recomputes them and adds into the table's gradient atomically.

Same arithmetic as the PyTorch path (indices are identical; features agree to float32
rounding, tested in ``tests/test_hashgrid_triton.py``). The backward also returns the points'
gradient when they need one (camera refinement, ``nerf.pose_lr``), from the same corners.
Needs ``triton`` (it comes with PyTorch's CUDA wheels); ``TRITON_INTERPRET=1`` runs the same
kernels on the CPU, which is how CI tests them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["triton_available", "encode_fused"]


def triton_available(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device``: Triton imports and the device is CUDA
    (or, for tests, Triton's CPU interpreter is on: ``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


_BLOCK = 128


@functools.cache
def _kernels():
    """The kernels module, imported on first use (it imports triton), once."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("the fused hash encoding needs triton (it ships with PyTorch's CUDA wheels)")
    return importlib.import_module("tasks.nerf.hashgrid_kernels")


class _FusedEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points: Tensor, table: Tensor, resolutions: Tensor, sizes: Tensor, offsets: Tensor, n_dense: int) -> Tensor:  # type: ignore[override]
        n_points, n_levels, features = points.shape[0], resolutions.shape[0], table.shape[1]
        out = torch.empty(n_points, n_levels * features, device=points.device, dtype=torch.float32)
        if n_points:
            grid = (-(-n_points // _BLOCK), n_levels)
            _kernels().encode_forward[grid](points, table, out, resolutions, sizes, offsets, n_points, n_dense,
                                  N_LEVELS=n_levels, FEATURES=features, BLOCK=_BLOCK)
        ctx.save_for_backward(points, table, resolutions, sizes, offsets)
        ctx.n_dense = n_dense
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        points, table, resolutions, sizes, offsets = ctx.saved_tensors
        grad_table = torch.zeros_like(table)
        point_grad = bool(ctx.needs_input_grad[0])
        grad_points = torch.zeros_like(points) if point_grad else grad_table  # any pointer when unused
        n_points, n_levels, features = points.shape[0], resolutions.shape[0], table.shape[1]
        if n_points:
            grid = (-(-n_points // _BLOCK), n_levels)
            _kernels().encode_backward[grid](
                points, table, grad_out.float().contiguous(), grad_table, grad_points, resolutions, sizes, offsets,
                n_points, ctx.n_dense, N_LEVELS=n_levels, FEATURES=features, BLOCK=_BLOCK, POINT_GRAD=point_grad,
            )
        return (grad_points if point_grad else None), grad_table, None, None, None, None


def encode_fused(
    unit_points: Tensor, table: Tensor, resolutions: Tensor, sizes: Tensor, offsets: Tensor, n_dense: int
) -> Tensor:
    """The hash encoding of ``unit_points [N, 3]`` (float32, clamped onto the unit cube) with the
    first ``L = len(resolutions)`` levels → features ``[N, L * F]`` (float32), differentiable in
    ``table [T, F]`` (F a power of two) and in the points (zero outside the cube, as the clamp).

    resolutions, sizes, offsets ``[L]`` int64: each level's cells across, table rows and first
    row; levels below ``n_dense`` are indexed densely, the others hashed.
    """
    features = table.shape[1]
    if features & (features - 1):
        raise ValueError(f"the fused hash encoding needs a power-of-two features_per_level, got {features}")
    if table.dtype != torch.float32:
        raise ValueError(f"the fused hash encoding needs a float32 table, got {table.dtype}")
    return _FusedEncode.apply(unit_points.float().contiguous(), table, resolutions, sizes, offsets, n_dense)
