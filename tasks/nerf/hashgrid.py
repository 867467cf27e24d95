"""Encodings of the ngp field in plain PyTorch: the multiresolution hash grid, spherical
harmonics for view directions, and the truncated exponential used for density.

Everything here is vectorised over points and levels (no per-sample Python loops) and runs
the same on CPU and CUDA. The hash follows instant-ngp (Müller et al. 2022): corner
``(x, y, z)`` of a level goes to ``(x * 1 ^ y * 2654435761 ^ z * 805459861) mod T``; coarse
levels whose ``(res + 1)^3`` corners fit in ``T`` entries are indexed densely instead (no
collisions there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# instant-ngp's spatial hash primes (the first is 1 so that x keeps its coherence).
HASH_PRIMES = (1, 2654435761, 805459861)


def level_resolutions(n_levels: int, base_resolution: int, finest_resolution: int) -> list[int]:
    """Grid resolution of each level: geometric from base to finest (instant-ngp's growth factor b)."""
    if n_levels < 1 or base_resolution < 1 or finest_resolution < base_resolution:
        raise ValueError(
            f"hash grid needs n_levels >= 1 and 1 <= base_resolution <= finest_resolution, got "
            f"n_levels={n_levels}, base_resolution={base_resolution}, finest_resolution={finest_resolution}"
        )
    if n_levels == 1:
        return [base_resolution]
    growth = math.exp((math.log(finest_resolution) - math.log(base_resolution)) / (n_levels - 1))
    return [int(math.floor(base_resolution * growth**level + 1e-6)) for level in range(n_levels)]


class HashGrid(nn.Module):
    """Multiresolution hash encoding of points in the unit cube.

    All levels share one flat parameter ``table [sum of level sizes, features_per_level]``;
    ``level_offsets[l]`` is where level ``l`` starts. A level stores ``min((res+1)^3, 2^log2_size)``
    entries: dense indexing when the grid fits, the spatial hash otherwise.
    """

    def __init__(
        self,
        n_levels: int,
        features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        finest_resolution: int,
        init_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        resolutions = level_resolutions(n_levels, base_resolution, finest_resolution)
        table_size = 2**log2_hashmap_size
        sizes = [min((res + 1) ** 3, table_size) for res in resolutions]
        dense = [(res + 1) ** 3 <= table_size for res in resolutions]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.n_levels = n_levels
        self.features_per_level = features_per_level
        self.output_dim = n_levels * features_per_level
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.int64), persistent=False)
        self.register_buffer("level_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("level_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        # Resolutions grow with the level, so the dense levels are the first ones.
        self.n_dense_levels = sum(dense)
        self.register_buffer("primes", torch.tensor(HASH_PRIMES, dtype=torch.int64), persistent=False)
        # instant-ngp initialises the table uniformly in ±1e-4: near zero, but not symmetric.
        self.table = nn.Parameter(torch.empty(sum(sizes), features_per_level).uniform_(-init_scale, init_scale))

    def corner_indices(self, cells: Tensor) -> Tensor:
        """Table rows of the 8 corners of each cell. cells ``[L, N, 3]`` int64 (the first ``L`` levels)
        → ``[L, N, 8]`` int64.

        Corners are ordered z-major (corner ``4 * dz + 2 * dy + dx``). Built per axis as
        ``[L, N, 2]`` and combined by broadcasting, which is far cheaper than ``[L, N, 8, 3]``.
        """
        n_levels = cells.shape[0]
        n_dense = min(self.n_dense_levels, n_levels)
        ends = cells[..., None] + torch.arange(2, device=cells.device)  # [L, N, 3, 2]: cell, cell + 1
        parts = []
        if n_dense > 0:
            dense = ends[:n_dense]
            stride = (self.resolutions[:n_dense] + 1)[:, None, None]  # [Ld, 1, 1]
            x, y, z = dense[:, :, 0], dense[:, :, 1] * stride, dense[:, :, 2] * stride * stride
            parts.append((z[..., :, None, None] + y[..., None, :, None] + x[..., None, None, :]).flatten(2))
        if n_dense < n_levels:
            # int64 products cannot overflow here (coords < 2^20); the power-of-two modulus below
            # keeps the same low bits as instant-ngp's wrapping uint32 arithmetic.
            hashed = ends[n_dense:] * self.primes[:, None]
            x, y, z = hashed[:, :, 0], hashed[:, :, 1], hashed[:, :, 2]
            parts.append((z[..., :, None, None] ^ y[..., None, :, None] ^ x[..., None, None, :]).flatten(2))
        index = torch.cat(parts) if len(parts) > 1 else parts[0]
        return index % self.level_sizes[:n_levels, None, None] + self.level_offsets[:n_levels, None, None]

    def forward(self, unit_points: Tensor, n_levels: int | None = None) -> Tensor:
        """Encode points of the unit cube. unit_points ``[N, 3]`` in [0, 1] → features ``[N, L * F]``,
        of all levels or of the coarsest ``n_levels`` only (``L = n_levels``).

        Trilinear interpolation of the 8 corner features at every level; points outside the
        cube are clamped onto it.
        """
        if unit_points.ndim != 2 or unit_points.shape[-1] != 3:
            raise ValueError(f"HashGrid expects points [N, 3], got {tuple(unit_points.shape)}")
        n_levels = self.n_levels if n_levels is None else n_levels
        if not 1 <= n_levels <= self.n_levels:
            raise ValueError(f"HashGrid has {self.n_levels} levels, asked for the first {n_levels}")
        n_points = unit_points.shape[0]
        res = self.resolutions[:n_levels].to(torch.float32)[:, None, None]  # [L, 1, 1]
        scaled = unit_points.float().clamp(0.0, 1.0)[None] * res  # [L, N, 3]
        # The last cell is closed on the right so that x = 1 stays inside the grid.
        cells = torch.minimum(scaled.floor(), res - 1)
        frac = scaled - cells  # [L, N, 3] in [0, 1]
        index = self.corner_indices(cells.long())  # [L, N, 8]
        axis_weights = torch.stack([1 - frac, frac], dim=-1)  # [L, N, 3, 2]
        wx, wy, wz = axis_weights.unbind(2)
        weights = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).flatten(2)  # [L, N, 8]
        corner_features = gather_rows(self.table, index)  # [L, N, 8, F]
        features = (corner_features * weights[..., None]).sum(2)  # [L, N, F]
        return features.permute(1, 0, 2).reshape(n_points, n_levels * self.features_per_level)


class _GatherRows(torch.autograd.Function):
    """``table[index]`` whose backward scatters with ``index_add_`` (atomic adds on CUDA).

    Why: autograd's own backward of advanced indexing sorts the indices to accumulate
    deterministically; on an H100 that sort was over half of a training step's GPU time.
    The atomic sum is the same up to float rounding order.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.table_shape = table.shape
        return table.index_select(0, index.reshape(-1)).reshape(*index.shape, table.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        grad_table = grad.new_zeros(ctx.table_shape)
        grad_table.index_add_(0, index.reshape(-1), grad.reshape(-1, ctx.table_shape[-1]))
        return grad_table, None


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """Rows of ``table [T, F]`` at ``index [...]`` (int64) → ``[..., F]``, differentiable in ``table``."""
    return _GatherRows.apply(table, index)


def spherical_harmonics(directions: Tensor) -> Tensor:
    """Real spherical harmonics up to band 3 (16 coefficients, tcnn's "degree 4").

    directions ``[N, 3]`` unit vectors → ``[N, 16]``. Constants as in instant-ngp / nerfstudio.
    """
    x, y, z = directions.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    return torch.stack(
        [
            torch.full_like(x, 0.28209479177387814),
            -0.48860251190291987 * y,
            0.48860251190291987 * z,
            -0.48860251190291987 * x,
            1.0925484305920792 * xy,
            -1.0925484305920792 * yz,
            0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * xz,
            0.54627421529603959 * (xx - yy),
            0.59004358992664352 * y * (-3.0 * xx + yy),
            2.8906114426405538 * xy * z,
            0.45704579946446572 * y * (1.0 - 5.0 * zz),
            0.3731763325901154 * z * (5.0 * zz - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * zz),
            1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (-xx + 3.0 * yy),
        ],
        dim=-1,
    )


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient is clamped at exp(15): density logits can't blow up the step."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """Density activation of instant-ngp: exp forward, gradient clamped. ``[...]`` → ``[...]``."""
    return _TruncExp.apply(x)
