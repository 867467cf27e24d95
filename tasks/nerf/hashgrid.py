"""Encodings of the ngp field in plain PyTorch: the multiresolution hash grid, spherical
harmonics for view directions, and the truncated exponential used for density.

Everything here is vectorised over points and levels (no per-sample Python loops) and runs
the same on CPU and CUDA; on CUDA the encoding can instead run as two fused Triton kernels
(``tasks/nerf/hashgrid_triton.py``, ``nerf.encoding_kernel``). The hash follows instant-ngp
(Müller et al. 2022): corner ``(x, y, z)`` of a level goes to
``(x * 1 ^ y * 2654435761 ^ z * 805459861) mod T``; coarse levels whose ``(res + 1)^3`` corners
fit in ``T`` entries are indexed densely instead (no collisions there).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from tasks.nerf import hashgrid_triton

# instant-ngp's spatial hash primes (the first is 1 so that x keeps its coherence).
HASH_PRIMES = (1, 2654435761, 805459861)
ENCODING_KERNELS = ("auto", "torch", "triton")


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
        # "torch" (below) or "triton" (tasks/nerf/hashgrid_triton.py); use_kernel() sets it.
        self.kernel = "torch"

    def use_kernel(self, kind: str = "auto") -> str:
        """Pick how :meth:`forward` runs: ``torch`` (anywhere), ``triton`` (two fused kernels;
        CUDA, or Triton's CPU interpreter in tests) or ``auto`` (triton on CUDA when it imports and
        compiles, torch otherwise). Call after moving the grid to its device; returns the choice."""
        if kind not in ENCODING_KERNELS:
            raise ValueError(f"nerf.encoding_kernel={kind!r} is not one of {', '.join(ENCODING_KERNELS)}")
        device = self.table.device
        if kind == "torch" or (kind == "auto" and device.type != "cuda"):
            self.kernel = "torch"
            return self.kernel
        try:
            if not hashgrid_triton.triton_available(device):
                raise RuntimeError(f"triton is not importable or {device} is not a CUDA device")
            # Triton compiles on first use: do it now, so a broken toolchain shows here.
            with torch.no_grad():
                self._encode_triton(torch.full((1, 3), 0.5, device=device), self.n_levels)
            self.kernel = "triton"
        except Exception as error:
            if kind == "triton":
                raise RuntimeError(
                    f"nerf.encoding_kernel=triton but the fused hash encoding cannot run here ({error}); "
                    "install triton (it comes with PyTorch's CUDA wheels) or use nerf.encoding_kernel=torch"
                ) from error
            warnings.warn(f"fused hash encoding unavailable ({error}); encoding in plain torch (slower)", stacklevel=2)
            self.kernel = "torch"
        return self.kernel

    def _encode_triton(self, unit_points: Tensor, n_levels: int) -> Tensor:
        return hashgrid_triton.encode_fused(
            unit_points, self.table, self.resolutions[:n_levels], self.level_sizes[:n_levels],
            self.level_offsets[:n_levels], self.n_dense_levels,
        )

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
        if self.kernel == "triton":
            return self._encode_triton(unit_points, n_levels)
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


# Each real spherical harmonic up to band 3 as a polynomial in the direction (x, y, z): terms
# (coefficient, (i, j, k)), the monomial being f_i * f_j * f_k of the factors f = (1, x, y, z).
# Constants as in instant-ngp / nerfstudio.
_SH_TERMS: tuple[tuple[tuple[float, tuple[int, int, int]], ...], ...] = (
    ((0.28209479177387814, (0, 0, 0)),),
    ((-0.48860251190291987, (2, 0, 0)),),
    ((0.48860251190291987, (3, 0, 0)),),
    ((-0.48860251190291987, (1, 0, 0)),),
    ((1.0925484305920792, (1, 2, 0)),),
    ((-1.0925484305920792, (2, 3, 0)),),
    ((0.94617469575755997, (3, 3, 0)), (-0.31539156525251999, (0, 0, 0))),
    ((-1.0925484305920792, (1, 3, 0)),),
    ((0.54627421529603959, (1, 1, 0)), (-0.54627421529603959, (2, 2, 0))),
    ((-3.0 * 0.59004358992664352, (1, 1, 2)), (0.59004358992664352, (2, 2, 2))),  # y (-3xx + yy)
    ((2.8906114426405538, (1, 2, 3)),),
    ((0.45704579946446572, (2, 0, 0)), (-5.0 * 0.45704579946446572, (2, 3, 3))),  # y (1 - 5zz)
    ((5.0 * 0.3731763325901154, (3, 3, 3)), (-3.0 * 0.3731763325901154, (3, 0, 0))),  # z (5zz - 3)
    ((0.45704579946446572, (1, 0, 0)), (-5.0 * 0.45704579946446572, (1, 3, 3))),  # x (1 - 5zz)
    ((1.4453057213202769, (1, 1, 3)), (-1.4453057213202769, (2, 2, 3))),  # z (xx - yy)
    ((-0.59004358992664352, (1, 1, 1)), (3.0 * 0.59004358992664352, (1, 2, 2))),  # x (-xx + 3yy)
)
_SH_MATRICES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _sh_matrix(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[64, 16]``: column ``c`` holds harmonic ``c``'s coefficients over the monomials
    ``f_i f_j f_k`` (row ``16 i + 4 j + k``); cached per device and dtype."""
    key = (device, dtype)
    if key not in _SH_MATRICES:
        matrix = torch.zeros(64, 16, dtype=torch.float64)
        for column, terms in enumerate(_SH_TERMS):
            for coefficient, (i, j, k) in terms:
                matrix[16 * i + 4 * j + k, column] += coefficient
        _SH_MATRICES[key] = matrix.to(device, dtype)
    return _SH_MATRICES[key]


def spherical_harmonics(directions: Tensor) -> Tensor:
    """Real spherical harmonics up to band 3 (16 coefficients, tcnn's "degree 4").

    directions ``[N, 3]`` unit vectors → ``[N, 16]``. Every harmonic is a polynomial of degree at
    most 3, so this is the 64 products of (1, x, y, z) taken three at a time times one constant
    matrix: four kernels instead of the ~45 that writing the 16 polynomials out costs (a training
    step evaluates them for every sample, and is paced by launching kernels).
    """
    factors = torch.cat([directions.new_ones(directions.shape[0], 1), directions], dim=-1)  # [N, 4]
    monomials = (factors[:, :, None, None] * factors[:, None, :, None] * factors[:, None, None, :]).reshape(-1, 64)
    return monomials @ _sh_matrix(directions.device, directions.dtype)


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
