"""The texture bake's parts, each against a brute-force or closed-form answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.mesh_texture import bake_texture, dilate_texture, rasterize_uv, shade, view_directions


def _brute_force_texels(uv: np.ndarray, faces: np.ndarray, size: int) -> set[tuple[int, int, int]]:
    """(row, col, face) of every texel centre inside a triangle, by testing every texel."""
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    centre = np.stack([cols + 0.5, rows + 0.5], -1).reshape(-1, 2)
    found = set()
    for index, face in enumerate(faces):
        tri = np.stack([uv[face, 0] * size, (1 - uv[face, 1]) * size], 1)
        signs = []
        for i in range(3):
            a, b = tri[i], tri[(i + 1) % 3]
            signs.append((b[0] - a[0]) * (centre[:, 1] - a[1]) - (b[1] - a[1]) * (centre[:, 0] - a[0]))
        signs = np.stack(signs, 1)
        inside = (signs >= -1e-9).all(1) | (signs <= 1e-9).all(1)
        for flat in np.flatnonzero(inside):
            found.add((int(flat // size), int(flat % size), index))
    return found


@pytest.mark.parametrize("chunk", [7, 4_000_000])
def test_rasterize_uv_finds_exactly_the_texels_inside(chunk):
    rng = np.random.default_rng(3)
    uv = rng.uniform(0.02, 0.98, (30, 2))
    faces = rng.integers(0, 30, (12, 3))
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    size = 24
    rows, cols, face, bary = rasterize_uv(torch.as_tensor(uv), torch.as_tensor(faces), size, chunk)
    assert set(zip(rows.tolist(), cols.tolist(), face.tolist())) == _brute_force_texels(uv, faces, size)
    # The barycentric weights put each texel's centre back where it is.
    corners = torch.as_tensor(uv)[torch.as_tensor(faces)[face]]  # [T, 3, 2]
    at = (bary[..., None] * corners).sum(1)
    np.testing.assert_allclose(at[:, 0] * size, cols + 0.5, atol=1e-9)
    np.testing.assert_allclose((1 - at[:, 1]) * size, rows + 0.5, atol=1e-9)
    assert torch.all(bary >= -1e-6) and torch.allclose(bary.sum(1), torch.ones(len(bary), dtype=bary.dtype))


def test_rasterize_uv_covers_a_square_of_two_triangles_once():
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rows, cols, _, _ = rasterize_uv(uv, faces, 16, 1000)
    texels = set(zip(rows.tolist(), cols.tolist()))
    assert len(texels) == 16 * 16
    # Only centres exactly on the shared diagonal are claimed by both triangles.
    assert len(rows) - len(texels) == 16


def test_dilate_texture_grows_charts_by_the_given_pixels_and_fills_the_rest():
    image = torch.zeros(32, 32, 3)
    filled = torch.zeros(32, 32, dtype=torch.bool)
    image[10, 10] = torch.tensor([0.2, 0.4, 0.6])
    filled[10, 10] = True
    image[25, 25] = torch.tensor([1.0, 0.0, 0.0])
    filled[25, 25] = True
    out = dilate_texture(image, filled, 2)
    assert out.shape == (32, 32, 3) and out.dtype == torch.float32
    # Two passes reach 2 texels (a 5×5 square) around each filled texel, with its colour.
    assert torch.allclose(out[8:13, 8:13], torch.tensor([0.2, 0.4, 0.6]).expand(5, 5, 3))
    assert torch.allclose(out[23:28, 23:28], torch.tensor([1.0, 0.0, 0.0]).expand(5, 5, 3))
    # Beyond the grown charts: the mean of the charts (25 texels of each).
    assert torch.allclose(out[0, 0], torch.tensor([0.6, 0.2, 0.3]), atol=1e-6)


def test_dilate_texture_averages_where_charts_meet():
    image = torch.zeros(3, 5, 3)
    filled = torch.zeros(3, 5, dtype=torch.bool)
    image[:, 0], filled[:, 0] = torch.tensor([1.0, 0.0, 0.0]), True
    image[:, 4], filled[:, 4] = torch.tensor([0.0, 0.0, 1.0]), True
    out = dilate_texture(image, filled, 1)
    assert torch.allclose(out[:, 1], torch.tensor([1.0, 0.0, 0.0]).expand(3, 3))
    assert torch.allclose(out[:, 2], torch.tensor([0.5, 0.0, 0.5]), atol=1e-6)  # unreached: the mean of the grown charts
    assert torch.equal(out[:, 0], image[:, 0])  # charts keep their colours


def test_view_directions_are_the_inverted_normal_and_a_ring_at_the_cone_angle():
    normals = torch.nn.functional.normalize(torch.randn(50, 3, dtype=torch.float64), dim=1)
    dirs = view_directions(normals, 5, 30.0)
    assert dirs.shape == (50, 5, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(50, 5, dtype=torch.float64))
    assert torch.allclose(dirs[:, 0], -normals)
    cos_to_inward = (dirs[:, 1:] * -normals[:, None]).sum(-1)
    assert torch.allclose(cos_to_inward, torch.full_like(cos_to_inward, math.cos(math.radians(30.0))))
    assert torch.allclose(dirs[:, 1:].sum(1) / 4, -normals * math.cos(math.radians(30.0)), atol=1e-12)  # a balanced ring


class ShellField:
    """A thin opaque spherical shell of radius 0.5: red outside 0.49, blue inside it."""

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return torch.where((points.norm(dim=1) - 0.5).abs() < 0.01, 500.0, 0.0)

    def color(self, points: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        red = (points.norm(dim=1, keepdim=True) > 0.49).float()
        return torch.cat([red, torch.zeros_like(red), 1 - red], 1)


@pytest.mark.parametrize("shared_ray", [False, True])
def test_shade_finds_the_colour_where_the_density_is(shared_ray):
    # Surface points 2 % off the shell, outside: the short ray through them reaches the shell's red.
    normals = torch.nn.functional.normalize(torch.randn(200, 3), dim=1)
    points = normals * 0.51
    rgb = shade(ShellField(), points, normals, views=5, cone_deg=20.0, ray_samples=16, ray_half_length=0.03,
                chunk_points=1000, device="cpu", shared_ray=shared_ray)
    assert rgb.shape == (200, 3)
    assert torch.all(rgb[:, 0] > 0.95) and torch.all(rgb[:, 2] < 0.05)


def test_bake_texture_paints_each_triangle_with_its_colour():
    # Two triangles far apart in space, each with its own colour, side by side in UV.
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [10, 0, 0], [11, 0, 0], [10, 1, 0]], dtype=np.float64)
    normals = np.tile([[0.0, 0.0, 1.0]], (6, 1))
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    uv = np.array([[0.05, 0.05], [0.45, 0.05], [0.05, 0.9], [0.55, 0.05], [0.95, 0.05], [0.55, 0.9]])

    def by_side(points: torch.Tensor, point_normals: torch.Tensor) -> torch.Tensor:
        right = (points[:, :1] > 5).float()
        return torch.cat([1 - right, right, torch.zeros_like(right)], 1)

    image, coverage = bake_texture(vertices, normals, faces, uv, 64, by_side, dilate_px=2, chunk_texels=100)
    assert image.shape == (64, 64, 3) and 0.3 < coverage < 0.45
    assert np.allclose(image[50, 8], [1, 0, 0]) and np.allclose(image[50, 40], [0, 1, 0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bake_on_the_gpu_matches_the_cpu():
    # A 6×6 grid of quads in UV over a bumpy sheet: neighbours share edges, so every texel has one colour.
    rng = np.random.default_rng(5)
    u, v = np.meshgrid(np.linspace(0.02, 0.98, 7), np.linspace(0.02, 0.98, 7))
    uv = np.stack([u.ravel(), v.ravel()], 1)
    vertices = np.concatenate([uv, rng.normal(scale=0.1, size=(49, 1))], 1)
    normals = np.tile([[0.0, 0.0, 1.0]], (49, 1))
    quads = np.array([[r * 7 + c, r * 7 + c + 1, (r + 1) * 7 + c + 1, (r + 1) * 7 + c] for r in range(6) for c in range(6)])
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])

    def colour(points: torch.Tensor, point_normals: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(5 * points + point_normals)

    on_cpu, covered_cpu = bake_texture(vertices, normals, faces, uv, 128, colour, 4, 5000, "cpu")
    on_gpu, covered_gpu = bake_texture(vertices, normals, faces, uv, 128, colour, 4, 5000, "cuda")
    assert covered_gpu == covered_cpu
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-5)
