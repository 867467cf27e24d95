"""The ngp backend on an analytic scene: a coloured box ray-cast in numpy, 24 orbit views.

The scene: a box of half-extents BOX_HALF at the origin (+Z up), each face its own colour
with a coarse checker on it; 24 cameras on an orbit at distance 2, elevation 25 degrees,
OpenGL camera-to-world; a busy background that only the masks tell apart from the box.
Training runs once per test session (module fixture) with tiny CPU settings.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tasks.nerf.base import get_backend
from tasks.nerf.dataset import CaptureError
from tasks.nerf.hashgrid import HashGrid, level_resolutions, spherical_harmonics
from tasks.nerf.rays import composite, intersect_aabb, pixel_rays
from tasks.train import train_field
from tasks.types import MaskSet, TrainedField

BOX_HALF = np.array([0.4, 0.3, 0.25])
WIDTH, HEIGHT, FOCAL = 96, 72, 110.0
FACE_COLORS = np.array(
    [[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.3, 0.9], [0.9, 0.8, 0.2], [0.8, 0.3, 0.8], [0.2, 0.8, 0.8]]
)

# Tiny CPU settings (the recommended CPU profile, scaled to 96x72 frames): one thread,
# because OpenMP threads spin-wait badly on a shared 2-core machine.
TINY = {
    "backend": "ngp",
    "device": "cpu",
    "cpu_threads": 1,
    "seed": 0,
    "steps": 500,
    "rays_per_batch": 512,
    "samples_per_ray": 48,
    "aabb_padding": 0.05,
    "n_levels": 6,
    "features_per_level": 2,
    "log2_hashmap_size": 14,
    "base_resolution": 4,
    "finest_resolution": 64,
    "hidden_dim": 32,
    "color_hidden_dim": 32,
    "lr": 0.02,
    "lr_warmup_steps": 20,
    "lr_final_factor": 0.1,
    "occ_resolution": 32,
    "occ_update_every": 16,
    "occ_warmup_steps": 128,
    "log_every": 50,
    "mixed_precision": False,
    "render_chunk": 4096,
}


def look_at(position: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world [4, 4] at ``position`` looking at the origin, +Z up."""
    back = position / np.linalg.norm(position)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def ray_cast_box(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact image [H, W, 3] float and mask [H, W] bool of the box seen from c2w."""
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    dirs_cam = np.stack([(u - WIDTH / 2) / FOCAL, -(v - HEIGHT / 2) / FOCAL, -np.ones_like(u)], -1)
    dirs = dirs_cam @ c2w[:3, :3].T
    origin = c2w[:3, 3]
    with np.errstate(divide="ignore"):
        t0, t1 = (-BOX_HALF - origin) / dirs, (BOX_HALF - origin) / dirs
    t_near = np.minimum(t0, t1).max(-1)
    hit = np.maximum(t0, t1).min(-1) > t_near
    point = origin + t_near[..., None] * dirs
    scaled = point / BOX_HALF
    axis = np.abs(scaled).argmax(-1)
    face = axis * 2 + (np.take_along_axis(scaled, axis[..., None], -1)[..., 0] > 0)
    # The 0.05 offset keeps face planes (x = ±0.4) off the checker boundaries.
    checker = (np.floor((point + 0.05) / 0.2).astype(int).sum(-1) % 2).astype(float)
    color = FACE_COLORS[face] * (0.55 + 0.45 * checker[..., None])
    background = 0.5 + 0.4 * np.sin(u[..., None] * 0.3 + v[..., None] * 0.2 + np.array([0.0, 2.0, 4.0]))
    return np.where(hit[..., None], color, background), hit


def write_scene(root: Path, n_views: int = 24, elevation_deg: float = 25.0) -> MaskSet:
    """PNG frames + masks, transforms.json and hull.json of the box scene under ``root``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    frames = []
    elevation = math.radians(elevation_deg)
    for i in range(n_views):
        azimuth = 2 * math.pi * i / n_views
        position = 2.0 * np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
        c2w = look_at(position)
        image, mask = ray_cast_box(c2w)
        cv2.imwrite(str(root / f"images/frame_{i:03d}.png"), (image[..., ::-1] * 255).round().astype(np.uint8))
        cv2.imwrite(str(root / f"masks/frame_{i:03d}.png"), mask.astype(np.uint8) * 255)
        frames.append({"file_path": f"images/frame_{i:03d}.png", "mask_path": f"masks/frame_{i:03d}.png", "transform_matrix": c2w.tolist()})
    meta = {
        "camera_model": "OPENCV", "fl_x": FOCAL, "fl_y": FOCAL, "cx": WIDTH / 2, "cy": HEIGHT / 2,
        "w": WIDTH, "h": HEIGHT, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames,
    }
    (root / "transforms.json").write_text(json.dumps(meta))
    # The segment stage's hull is a loose box around the product: 10 % larger here.
    (root / "hull.json").write_text(json.dumps({"aabb": [(-BOX_HALF * 1.1).tolist(), (BOX_HALF * 1.1).tolist()]}))
    return MaskSet(dir=root, transforms=root / "transforms.json", hull=root / "hull.json",
                   contact_sheet=root / "sheet.png", stats=root / "stats.json", fingerprint="scene")


# --------------------------------------------------------------------------- encodings


def test_level_resolutions_grow_geometrically_from_base_to_finest():
    res = level_resolutions(6, 4, 64)
    assert res[0] == 4 and res[-1] == 64
    assert all(b > a for a, b in zip(res, res[1:]))


def test_hash_grid_shapes_dense_levels_and_gradients():
    torch.manual_seed(0)
    grid = HashGrid(n_levels=6, features_per_level=2, log2_hashmap_size=12, base_resolution=4, finest_resolution=64)
    # (res+1)^3 <= 4096 only for res <= 15: the first levels are dense, the rest hashed.
    assert 0 < grid.n_dense_levels < grid.n_levels
    points = torch.rand(500, 3)
    features = grid(points)
    assert features.shape == (500, 12)
    features.square().sum().backward()
    assert grid.table.grad is not None and grid.table.grad.abs().sum() > 0
    # Dense levels index inside their own (res+1)^3 block, without collisions.
    cells = (torch.rand(1, 300, 3) * 4).long().expand(grid.n_levels, 300, 3).clone()
    index = grid.corner_indices(cells)
    level0 = index[0]
    assert int(level0.min()) >= 0 and int(level0.max()) < (grid.resolutions[0] + 1) ** 3
    corners = cells[0][:, None, :] + torch.tensor([[(c & 1), (c >> 1) & 1, (c >> 2) & 1] for c in range(8)])
    unique_corners = torch.unique(corners.reshape(-1, 3), dim=0).shape[0]
    assert torch.unique(level0).numel() == unique_corners
    # Every hashed level stays inside its slice of the table.
    for level in range(grid.n_dense_levels, grid.n_levels):
        start = int(grid.level_offsets[level])
        assert int(index[level].min()) >= start and int(index[level].max()) < start + 4096


def test_hash_grid_interpolation_is_continuous_and_exact_at_vertices():
    torch.manual_seed(0)
    grid = HashGrid(n_levels=4, features_per_level=2, log2_hashmap_size=10, base_resolution=4, finest_resolution=32)
    with torch.no_grad():
        grid.table.normal_()
    # Crossing a cell boundary of every level: no jump bigger than the local slope allows.
    x = torch.linspace(0.2, 0.3, 2001)
    points = torch.stack([x, torch.full_like(x, 0.37), torch.full_like(x, 0.61)], -1)
    with torch.no_grad():
        features = grid(points)
    steps = (features[1:] - features[:-1]).abs().amax()
    assert float(steps) < 0.05
    # At a grid vertex of level 0 the feature is that vertex's table entry.
    vertex = torch.tensor([[1.0, 2.0, 3.0]]) / 4
    corner = torch.tensor([[[1, 2, 3]]])
    index = grid.corner_indices(corner.expand(grid.n_levels, 1, 3))[0, 0, 0]
    assert torch.allclose(grid(vertex)[0, :2], grid.table[index], atol=1e-5)


def test_hash_grid_coarse_levels_are_a_prefix_of_all_levels():
    torch.manual_seed(0)
    grid = HashGrid(n_levels=6, features_per_level=2, log2_hashmap_size=12, base_resolution=4, finest_resolution=64)
    points = torch.rand(300, 3)
    with torch.no_grad():
        every = grid(points)
        for n in (1, grid.n_dense_levels, grid.n_dense_levels + 1, 6):
            assert torch.equal(grid(points, n), every[:, : 2 * n])
    with pytest.raises(ValueError, match="6 levels"):
        grid(points, 7)


def test_geometry_levels_keep_the_finer_levels_out_of_density():
    """With nerf.geometry_levels the density reads only the coarse levels; the fine ones reach colour."""
    from tasks.nerf.field import NgpModel

    torch.manual_seed(0)
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    model = NgpModel(aabb, 6, 2, 12, 4, 64, 16, 7, 16, geometry_levels=3)
    assert model.density_mlp[0].in_features == 6 and model.color_mlp[0].in_features == 7 + 6 + 16
    points = torch.rand(200, 3) * 2 - 1
    dirs = torch.nn.functional.normalize(torch.randn(200, 3), dim=-1)
    with torch.no_grad():
        model.encoding.table.normal_()
        sigma, rgb = model(points, dirs)
        assert torch.allclose(model.density(points), sigma)
        # Scramble the three finest levels' entries: density must not move, colour must.
        fine = int(model.encoding.level_offsets[3])
        model.encoding.table[fine:] = torch.randn_like(model.encoding.table[fine:])
        sigma_after, rgb_after = model(points, dirs)
    assert torch.equal(sigma_after, sigma)
    assert float((rgb_after - rgb).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="geometry_levels=7"):
        NgpModel(aabb, 6, 2, 12, 4, 64, 16, 7, 16, geometry_levels=7)


def test_open_levels_keeps_the_finer_levels_out_until_they_open():
    """Coarse-to-fine: closed levels change nothing; half-way levels fade in; at the end all count."""
    from tasks.nerf.field import NgpModel

    torch.manual_seed(0)
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    model = NgpModel(aabb, 6, 2, 12, 4, 64, 16, 7, 16)
    points = torch.rand(200, 3) * 2 - 1
    dirs = torch.nn.functional.normalize(torch.randn(200, 3), dim=-1)
    with torch.no_grad():
        model.encoding.table.normal_()
        sigma_all, rgb_all = model(points, dirs)
        model.open_levels(0.0, 2)
        assert model.level_weights.tolist() == [1, 1, 0, 0, 0, 0]
        sigma, rgb = model(points, dirs)
        assert float((sigma - sigma_all).abs().max()) > 1e-3
        # Scramble levels 2-5: with them closed neither density nor colour moves.
        fine = int(model.encoding.level_offsets[2])
        model.encoding.table[fine:] = torch.randn_like(model.encoding.table[fine:])
        sigma_after, rgb_after = model(points, dirs)
        assert torch.equal(sigma_after, sigma) and torch.equal(rgb_after, rgb)
        model.open_levels(0.375, 2)  # 2 + 4 * 0.375 = 3.5 levels: the fourth half open
        assert model.level_weights.tolist() == [1, 1, 1, 0.5, 0, 0]
        model.open_levels(1.0, 2)
        assert bool((model.level_weights == 1).all())
        model.encoding.table[fine:] = 0
        opened = model(points, dirs)
        model.levels_scaled = False  # every level open is the unscaled model
        assert all(torch.equal(a, b) for a, b in zip(opened, model(points, dirs)))


def test_coarse_to_fine_training_learns_the_box_and_its_checkpoint_loads(tmp_path):
    from tasks.nerf.ngp import NgpSettings, build_field, load_ngp, train_ngp

    masks = write_scene(tmp_path / "scene")
    settings = {**TINY, "steps": 300, "coarse_to_fine": 0.5, "coarse_to_fine_start_levels": 2}
    extra = train_ngp(Path(masks.transforms), Path(masks.hull), tmp_path / "ckpt", settings).extra
    # A recognisable box on held-out views (the fixture's 500 steps without the schedule reach ~22.6 dB).
    assert extra["psnr_holdout_object"] >= 18.0 and extra["mask_iou_holdout"] >= 0.85, extra
    loaded = load_ngp(tmp_path / "ckpt", "cpu")  # the weights are not part of the checkpoint
    assert not loaded.model.levels_scaled and bool((loaded.model.level_weights == 1).all())
    with pytest.raises(ValueError, match="coarse_to_fine_start_levels=9"):
        build_field(NgpSettings(**{**TINY, "coarse_to_fine": 0.5, "coarse_to_fine_start_levels": 9}),
                    torch.tensor([[-1.0] * 3, [1.0] * 3]), torch.device("cpu"))


def test_checkpoint_keeps_geometry_levels(tmp_path):
    from tasks.nerf.ngp import NgpSettings, build_field, load_ngp, save_checkpoint

    settings = NgpSettings(**{key: value for key, value in TINY.items() if key != "device"}, geometry_levels=4)
    model, occupancy, _ = build_field(settings, torch.tensor([[-1.0] * 3, [1.0] * 3]), torch.device("cpu"))
    with torch.no_grad():
        model.encoding.table.normal_()
    save_checkpoint(tmp_path, model, occupancy, settings)
    loaded = load_ngp(tmp_path, "cpu")
    assert loaded.model.geometry_levels == 4
    points = torch.rand(100, 3) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.model.density(points), model.density(points))


def _spherical_harmonics_written_out(d: torch.Tensor) -> torch.Tensor:
    """The 16 harmonics as instant-ngp writes them (tcnn's SH encoding, degree 4)."""
    x, y, z = d.unbind(-1)
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814), -0.48860251190291987 * y, 0.48860251190291987 * z,
        -0.48860251190291987 * x, 1.0925484305920792 * xy, -1.0925484305920792 * yz,
        0.94617469575755997 * zz - 0.31539156525251999, -1.0925484305920792 * xz,
        0.54627421529603959 * (xx - yy), 0.59004358992664352 * y * (-3.0 * xx + yy), 2.8906114426405538 * xy * z,
        0.45704579946446572 * y * (1.0 - 5.0 * zz), 0.3731763325901154 * z * (5.0 * zz - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * zz), 1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3.0 * yy),
    ], dim=-1)


def test_spherical_harmonics_as_one_matrix_product_match_the_written_out_polynomials():
    dirs = torch.nn.functional.normalize(torch.randn(1000, 3, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(spherical_harmonics(dirs), _spherical_harmonics_written_out(dirs), rtol=0, atol=1e-12)
    dirs32 = dirs.float().requires_grad_(True)
    spherical_harmonics(dirs32).sum().backward()  # differentiable (refined cameras)
    assert dirs32.grad is not None and torch.isfinite(dirs32.grad).all()


def test_spherical_harmonics_band0_constant_and_shape():
    dirs = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    sh = spherical_harmonics(dirs)
    assert sh.shape == (100, 16)
    assert torch.allclose(sh[:, 0], torch.full((100,), 0.28209479177387814))
    # Band 1 is linear in the direction: flipping it flips the sign.
    assert torch.allclose(spherical_harmonics(-dirs)[:, 1:4], -sh[:, 1:4])


def test_rays_hit_box_and_composite_opaque_sample():
    c2w = torch.tensor(look_at(np.array([2.0, 0.0, 0.0])), dtype=torch.float32)
    origins, dirs = pixel_rays(c2w, torch.tensor([100.0, 100.0, 50.0, 50.0]), torch.tensor([[49, 49], [0, 0]]))
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(2))
    t_near, t_far, hit = intersect_aabb(origins, dirs, torch.tensor([[-0.5] * 3, [0.5] * 3]))
    assert bool(hit[0]) and abs(float(t_near[0]) - 1.5) < 0.01 and abs(float(t_far[0]) - 2.5) < 0.01
    sigmas = torch.tensor([[0.0, 1e4, 0.0]])
    colors = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    out = composite(sigmas, colors, torch.tensor([[1.0, 2.0, 3.0]]), step=0.1)
    assert torch.allclose(out["rgb"], torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-4)
    assert abs(float(out["alpha"][0]) - 1.0) < 1e-4 and abs(float(out["depth"][0]) - 2.0) < 1e-3


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ngp")
    masks = write_scene(root / "scene")
    calls = []
    started = time.perf_counter()
    record = train_field(masks, root / "field", dict(TINY), "fp-test", progress=lambda *a: calls.append(a))
    print(f"ngp training on the box scene took {time.perf_counter() - started:.1f} s")
    return masks, record, calls


def mean_colour_psnr(masks: MaskSet) -> float:
    """PSNR on object pixels of the held-out frames when predicting one mean colour: the floor to beat."""
    meta = json.loads(Path(masks.transforms).read_text())
    pixels = []
    for frame in sorted(meta["frames"], key=lambda f: f["file_path"])[::8]:
        image = cv2.imread(str(Path(masks.dir) / frame["file_path"]))[..., ::-1] / 255.0
        mask = cv2.imread(str(Path(masks.dir) / frame["mask_path"]), cv2.IMREAD_GRAYSCALE) > 127
        pixels.append(image[mask])
    pixels = np.concatenate(pixels)
    return float(-10 * np.log10(np.mean((pixels - pixels.mean(0)) ** 2)))


def test_training_reaches_holdout_quality(trained):
    masks, record, calls = trained
    assert isinstance(record, TrainedField) and record.backend == "ngp" and record.fingerprint == "fp-test"
    metrics = json.loads(Path(record.metrics).read_text())
    extra = metrics["extra"]
    assert metrics["steps"] == TINY["steps"] and metrics["device"] == "cpu" and metrics["peak_memory_mb"] > 0
    assert extra["holdout_frames"] == 3 and extra["train_frames"] == 21
    # progress is reported, with finite loss and psnr
    assert calls and calls[-1][0] == TINY["steps"] and math.isfinite(calls[-1][2]["loss"])
    # 20 dB on never-seen views of the object pixels (black background, so missing opacity
    # costs too) is a recognisable, correctly coloured box: a single mean colour scores
    # about 11 dB lower (this run: ~22.6 dB), and the silhouette must match (IoU).
    floor = mean_colour_psnr(masks)
    print(f"ngp metrics: {extra}; mean-colour floor {floor:.1f} dB")
    assert extra["psnr_holdout_object"] >= 20.0, extra
    assert extra["psnr_holdout_object"] >= floor + 6.0, (extra, floor)
    assert extra["mask_iou_holdout"] >= 0.9, extra


def test_density_box_matches_true_box(trained):
    _, record, _ = trained
    field = get_backend("ngp").load(record.dir, "cpu")
    axes = [torch.linspace(float(field.aabb[0, i]), float(field.aabb[1, i]), 48) for i in range(3)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    sigma = field.density(points)
    assert sigma.shape == (points.shape[0],) and bool((sigma >= 0).all())
    # Opaque enough that 0.05 world units of it stop ~60 % of light: a solid surface.
    solid = points[sigma > 20.0]
    size = torch.tensor(2 * BOX_HALF, dtype=torch.float32)
    print(f"solid box {solid.amin(0).tolist()} .. {solid.amax(0).tolist()}")
    error = torch.maximum((solid.amin(0) + size / 2).abs(), (solid.amax(0) - size / 2).abs()) / size
    assert bool((error <= 0.15).all()), (solid.amin(0), solid.amax(0), error)


def test_load_round_trips_and_renders(trained):
    _, record, _ = trained
    first = get_backend("ngp").load(record.dir, "cpu")
    second = get_backend("ngp").load(record.dir, "auto")
    points = torch.rand(200, 3) * 0.8 - 0.4
    assert torch.allclose(first.density(points), second.density(points.to(second.aabb.device)).cpu())
    dirs = torch.nn.functional.normalize(torch.randn(200, 3), dim=-1)
    rgb = first.color(points, dirs)
    assert rgb.shape == (200, 3) and bool(((rgb >= 0) & (rgb <= 1)).all())
    c2w = torch.tensor(look_at(np.array([1.8, 0.6, 0.9])), dtype=torch.float32)
    view = first.render(c2w, torch.tensor([60.0, 60.0, 32.0, 24.0]), 64, 48)
    assert view["rgb"].shape == (48, 64, 3) and view["alpha"].shape == (48, 64) and view["depth"].shape == (48, 64)
    # The box is in the middle of the view, the corners are empty.
    assert float(view["alpha"][24, 32]) > 0.9 and float(view["alpha"][0, 0]) < 0.1


# --------------------------------------------------------------------------- bad input


def _small_scene(tmp_path: Path) -> MaskSet:
    masks = write_scene(tmp_path / "scene", n_views=4)
    return masks


def test_missing_mask_path_names_the_frame(tmp_path):
    masks = _small_scene(tmp_path)
    meta = json.loads(Path(masks.transforms).read_text())
    del meta["frames"][2]["mask_path"]
    Path(masks.transforms).write_text(json.dumps(meta))
    with pytest.raises(CaptureError, match="mask_path.*segment stage"):
        train_field(masks, tmp_path / "out", {**TINY, "steps": 1}, "fp")


def test_missing_image_file_names_the_file(tmp_path):
    masks = _small_scene(tmp_path)
    (Path(masks.dir) / "images/frame_001.png").unlink()
    with pytest.raises(CaptureError, match="frame_001.png does not exist"):
        train_field(masks, tmp_path / "out", {**TINY, "steps": 1}, "fp")


def test_setting_typo_names_the_key(tmp_path):
    masks = _small_scene(tmp_path)
    with pytest.raises(ValueError, match="'stpes'.*did you mean 'steps'"):
        train_field(masks, tmp_path / "out", {**TINY, "stpes": 10}, "fp")
    with pytest.raises(ValueError, match="'steps' must be int"):
        train_field(masks, tmp_path / "out", {**TINY, "steps": "many"}, "fp")
    with pytest.raises(KeyError, match="unknown NeRF backend 'ngpp'"):
        train_field(masks, tmp_path / "out", {**TINY, "backend": "ngpp"}, "fp")


def test_yaml_lists_every_setting_and_builds_them():
    import dataclasses

    import yaml

    from tasks.nerf.ngp import NgpSettings
    from tasks.nerf.settings import settings_from_dict

    config = yaml.safe_load((Path(__file__).parents[1] / "conf/nerf/ngp.yaml").read_text())
    assert set(config) == {f.name for f in dataclasses.fields(NgpSettings)}
    assert settings_from_dict(config, NgpSettings).backend == "ngp"


def test_gather_rows_matches_indexing_and_its_gradient():
    from tasks.nerf.hashgrid import gather_rows

    generator = torch.Generator().manual_seed(0)
    table = torch.randn(50, 2, generator=generator, requires_grad=True)
    index = torch.randint(0, 50, (3, 7, 8), generator=generator)  # repeated rows must accumulate
    weights = torch.randn(3, 7, 8, 2, generator=generator)
    rows = gather_rows(table, index)
    assert torch.equal(rows, table[index])
    (rows * weights).sum().backward()
    ours = table.grad.clone()
    table.grad = None
    (table[index] * weights).sum().backward()
    assert torch.allclose(ours, table.grad, atol=1e-6)
