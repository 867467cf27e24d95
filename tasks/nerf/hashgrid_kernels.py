"""Triton kernels of the fused hash encoding (``tasks/nerf/hashgrid_triton.py`` wraps them).

Imported only when the fused encoding is first used, so processes that never use it never load
Triton (and its LLVM, which clashes with Mesa's once Mesa is loaded: see tests/conftest.py).
"""

import triton
import triton.language as tl


@triton.jit
def _corner(ix, iy, iz, fx, fy, fz, corner: tl.constexpr, stride, dense, size, offset):
    """Table row and the three axis weights of one corner (``corner = 4 dz + 2 dy + dx``) of each
    cell; its trilinear weight is ``wz * wy * wx``."""
    dx: tl.constexpr = corner & 1
    dy: tl.constexpr = (corner >> 1) & 1
    dz: tl.constexpr = (corner >> 2) & 1
    x = ix + dx
    y = iy + dy
    z = iz + dz
    dense_index = x + y * stride + z * stride * stride
    # instant-ngp's primes; int64 products cannot overflow (coordinates < 2^20), and the
    # power-of-two modulus keeps the low bits of its wrapping uint32 arithmetic.
    hashed = x ^ (y * 2654435761) ^ (z * 805459861)
    index = tl.where(dense, dense_index, hashed) % size + offset
    wx = fx if dx == 1 else 1.0 - fx
    wy = fy if dy == 1 else 1.0 - fy
    wz = fz if dz == 1 else 1.0 - fz
    return index, wx, wy, wz


@triton.jit
def _level_cells(points_ptr, resolutions_ptr, sizes_ptr, offsets_ptr, n_points, n_dense, BLOCK: tl.constexpr):
    """This program's points and level: rows (int64), their mask, the level, each point's cell
    corner (int64) and position inside the cell (float32) per axis, the level's dense-index stride,
    table size and first row, and whether it is indexed densely."""
    level = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    valid = rows < n_points
    res = tl.load(resolutions_ptr + level)
    res_f = res.to(tl.float32)
    px = tl.minimum(tl.maximum(tl.load(points_ptr + rows * 3 + 0, mask=valid, other=0.0), 0.0), 1.0) * res_f
    py = tl.minimum(tl.maximum(tl.load(points_ptr + rows * 3 + 1, mask=valid, other=0.0), 0.0), 1.0) * res_f
    pz = tl.minimum(tl.maximum(tl.load(points_ptr + rows * 3 + 2, mask=valid, other=0.0), 0.0), 1.0) * res_f
    # The last cell is closed on the right so that x = 1 stays inside the grid.
    cx = tl.minimum(tl.floor(px), res_f - 1.0)
    cy = tl.minimum(tl.floor(py), res_f - 1.0)
    cz = tl.minimum(tl.floor(pz), res_f - 1.0)
    size = tl.load(sizes_ptr + level)
    offset = tl.load(offsets_ptr + level)
    return (rows, valid, level, cx.to(tl.int64), cy.to(tl.int64), cz.to(tl.int64), px - cx, py - cy, pz - cz,
            res + 1, size, offset, level < n_dense)


@triton.jit
def encode_forward(
    points_ptr, table_ptr, out_ptr, resolutions_ptr, sizes_ptr, offsets_ptr, n_points, n_dense,
    N_LEVELS: tl.constexpr, FEATURES: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, valid, level, ix, iy, iz, fx, fy, fz, stride, size, offset, dense = _level_cells(
        points_ptr, resolutions_ptr, sizes_ptr, offsets_ptr, n_points, n_dense, BLOCK)
    columns = tl.arange(0, FEATURES)
    acc = tl.zeros((BLOCK, FEATURES), dtype=tl.float32)
    for corner in tl.static_range(8):
        index, wx, wy, wz = _corner(ix, iy, iz, fx, fy, fz, corner, stride, dense, size, offset)
        rows_features = tl.load(table_ptr + index[:, None] * FEATURES + columns[None, :], mask=valid[:, None], other=0.0)
        acc += (wz * wy * wx)[:, None] * rows_features
    out = out_ptr + rows[:, None] * (N_LEVELS * FEATURES) + level * FEATURES + columns[None, :]
    tl.store(out, acc, mask=valid[:, None])


@triton.jit
def encode_backward(
    points_ptr, table_ptr, grad_out_ptr, grad_table_ptr, grad_points_ptr, resolutions_ptr, sizes_ptr, offsets_ptr,
    n_points, n_dense, N_LEVELS: tl.constexpr, FEATURES: tl.constexpr, BLOCK: tl.constexpr, POINT_GRAD: tl.constexpr,
):
    """The table's gradient (atomic adds into ``grad_table``) and, with ``POINT_GRAD``, the points'
    (added into ``grad_points [N, 3]`` over the levels)."""
    rows, valid, level, ix, iy, iz, fx, fy, fz, stride, size, offset, dense = _level_cells(
        points_ptr, resolutions_ptr, sizes_ptr, offsets_ptr, n_points, n_dense, BLOCK)
    columns = tl.arange(0, FEATURES)
    grad = tl.load(grad_out_ptr + rows[:, None] * (N_LEVELS * FEATURES) + level * FEATURES + columns[None, :],
                   mask=valid[:, None], other=0.0)
    # Points with no gradient add nothing, so they skip the atomics: a fixed-size batch's padding
    # (tasks/nerf/graphed.py) sits at one point, and its adds of zero would all queue on the same rows.
    live = valid & (tl.sum(tl.abs(grad), axis=1) > 0.0)
    grad_fx = tl.zeros((BLOCK,), dtype=tl.float32)
    grad_fy = tl.zeros((BLOCK,), dtype=tl.float32)
    grad_fz = tl.zeros((BLOCK,), dtype=tl.float32)
    for corner in tl.static_range(8):
        index, wx, wy, wz = _corner(ix, iy, iz, fx, fy, fz, corner, stride, dense, size, offset)
        tl.atomic_add(grad_table_ptr + index[:, None] * FEATURES + columns[None, :], (wz * wy * wx)[:, None] * grad,
                      mask=live[:, None])
        if POINT_GRAD:
            # d weight / d f_axis is ±(the other two axis weights): + for the far corner, - for the near.
            along = tl.sum(tl.load(table_ptr + index[:, None] * FEATURES + columns[None, :], mask=valid[:, None], other=0.0) * grad, axis=1)
            grad_fx += along * (wy * wz if (corner & 1) == 1 else -(wy * wz))
            grad_fy += along * (wx * wz if ((corner >> 1) & 1) == 1 else -(wx * wz))
            grad_fz += along * (wx * wy if ((corner >> 2) & 1) == 1 else -(wx * wy))
    if POINT_GRAD:
        # f = clamp(p, 0, 1) * res - cell: d f / d p = res strictly inside the cube, else 0 (as torch.clamp).
        res_f = tl.load(resolutions_ptr + level).to(tl.float32)
        px = tl.load(points_ptr + rows * 3 + 0, mask=valid, other=0.0)
        py = tl.load(points_ptr + rows * 3 + 1, mask=valid, other=0.0)
        pz = tl.load(points_ptr + rows * 3 + 2, mask=valid, other=0.0)
        tl.atomic_add(grad_points_ptr + rows * 3 + 0, tl.where((px > 0.0) & (px < 1.0), grad_fx * res_f, 0.0), mask=valid)
        tl.atomic_add(grad_points_ptr + rows * 3 + 1, tl.where((py > 0.0) & (py < 1.0), grad_fy * res_f, 0.0), mask=valid)
        tl.atomic_add(grad_points_ptr + rows * 3 + 2, tl.where((pz > 0.0) & (pz < 1.0), grad_fz * res_f, 0.0), mask=valid)
