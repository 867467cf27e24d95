"""The fused Triton hash encoding against the plain-PyTorch one.

On a machine without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``); ``-m gpu`` runs them compiled on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from tasks.nerf import hashgrid_triton  # noqa: E402
from tasks.nerf.hashgrid import HashGrid  # noqa: E402


interpreted = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA and Triton's interpreter is off",
)


def _grid(device: str = "cpu") -> HashGrid:
    # 16 levels from 4 to 512 cells in a 2^12-row table: the first levels are dense, the rest hashed.
    grid = HashGrid(n_levels=16, features_per_level=2, log2_hashmap_size=12, base_resolution=4, finest_resolution=512)
    torch.nn.init.normal_(grid.table)
    return grid.to(device)


def _points(n: int, device: str = "cpu") -> torch.Tensor:
    points = torch.rand(n, 3, generator=torch.Generator().manual_seed(1))
    points[0] = 1.0  # the closed right end of the last cell
    points[1] = 0.0
    points[2] = torch.tensor([1.3, -0.2, 0.5])  # outside: clamped onto the cube
    return points.to(device)


def _fused(grid: HashGrid, points: torch.Tensor, n_levels: int) -> torch.Tensor:
    return hashgrid_triton.encode_fused(points, grid.table, grid.resolutions[:n_levels], grid.level_sizes[:n_levels],
                                        grid.level_offsets[:n_levels], grid.n_dense_levels)


def _check_against_torch(grid: HashGrid, points: torch.Tensor) -> None:
    assert 0 < grid.n_dense_levels < grid.n_levels  # both index kinds are exercised
    # Compiled, Triton contracts ``p * res - floor(p * res)`` into one fused multiply-add, so a
    # point's position in a 2048-cell level moves by up to a float32 ulp of 2048 (~1e-4) against
    # torch's rounded product; the interpreter computes exactly as torch does. A wrong corner or
    # hash is off by the table's values (~1).
    forward_atol, grad_atol = (1e-5, 1e-5) if points.device.type == "cpu" else (5e-4, 5e-3)
    for n_levels in (grid.n_levels, 5):
        expected = grid(points, n_levels)  # grid.kernel is "torch" here
        got = _fused(grid, points, n_levels)
        assert got.shape == expected.shape == (points.shape[0], 2 * n_levels)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=forward_atol)
        upstream = torch.randn_like(expected)
        (expected * upstream).sum().backward()
        want = grid.table.grad.clone()
        grid.table.grad = None
        (got * upstream).sum().backward()
        torch.testing.assert_close(grid.table.grad, want, rtol=1e-3, atol=grad_atol)
        assert want.abs().sum() > 0
        grid.table.grad = None


@interpreted
def test_fused_encoding_matches_torch_forward_and_table_gradient():
    _check_against_torch(_grid(), _points(200))


@interpreted
def test_fused_encoding_of_no_points_is_empty():
    grid = _grid()
    assert _fused(grid, torch.zeros(0, 3), grid.n_levels).shape == (0, 32)


def _check_point_gradients(grid: HashGrid, points: torch.Tensor, rtol: float) -> None:
    upstream = torch.randn(points.shape[0], 2 * grid.n_levels, device=points.device)
    grads = []
    for kernel in ("torch", "triton"):
        grid.kernel = kernel
        moving = points.clone().requires_grad_(True)
        (grid(moving) * upstream).sum().backward()
        grads.append(moving.grad)
    grid.kernel = "torch"
    want, got = grads
    assert want.abs().amax() > 1.0  # a real gradient (res * table values), not zeros on both sides
    assert got[2, 0] == 0 and got[2, 1] == 0  # outside the cube along x and y: clamped, no gradient
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().amax()))


@interpreted
def test_use_kernel_triton_encodes_fused_with_point_gradients():
    grid = _grid()
    assert grid.use_kernel("triton") == "triton"
    points = _points(64)
    torch.testing.assert_close(grid(points), _fused(grid, points, grid.n_levels))
    # Refined cameras differentiate the sample points: the fused backward gives their gradient too.
    _check_point_gradients(grid, points, rtol=1e-4)


def test_use_kernel_choices_and_errors(monkeypatch):
    grid = _grid()
    assert grid.use_kernel("auto") == "torch"  # CPU: auto keeps plain torch
    assert grid.use_kernel("torch") == "torch"
    with pytest.raises(ValueError, match="encoding_kernel='cuda'"):
        grid.use_kernel("cuda")
    monkeypatch.setattr(hashgrid_triton, "triton_available", lambda device: False)
    with pytest.raises(RuntimeError, match="encoding_kernel=torch"):
        grid.use_kernel("triton")
    assert grid.kernel == "torch"


def test_fused_encoding_rejects_tables_it_cannot_index():
    table = torch.zeros(10, 3)
    levels = torch.ones(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="power-of-two features_per_level"):
        hashgrid_triton.encode_fused(torch.zeros(1, 3), table, levels, levels, levels, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_encoding_matches_torch_on_cuda():
    grid = _grid("cuda")
    _check_against_torch(grid, _points(100_000, "cuda"))
    # Compiled, a point's position in a fine level differs by ~1e-4 of a cell (fused multiply-add).
    # torch's clamp passes a gradient at exactly 0 and 1 on CUDA but not on the CPU; the kernel
    # never does, so the CUDA comparison keeps its points off the cube's faces.
    points = _points(10_000, "cuda")
    points[:2] = torch.tensor([[0.25, 0.5, 0.75], [0.75, 0.5, 0.25]], device="cuda")
    _check_point_gradients(grid, points, rtol=2e-3)
    assert grid.use_kernel("auto") == "triton"
