"""The benchmark's helpers: records that survive a move, and the ICP that refines an alignment."""

from pathlib import Path

import numpy as np
import pytest

import trimesh

from bench.quality import precision_by_facing, refine_alignment
from bench.records import load_records, save_records
from bench.run_stages import training_gpu_peak_mb
from tasks.types import CameraRig, FrameSet


def test_records_round_trip_and_survive_a_move(tmp_path):
    run = tmp_path / "run"
    (run / "colmap").mkdir(parents=True)
    frames = tmp_path / "frames"  # outside the run folder, like --frames
    frames.mkdir()
    records = {
        "frames": FrameSet(frames, frames / "frames.json", 3, 64, 48, "f"),
        "colmap": CameraRig(run / "colmap", run / "colmap/transforms.json", run / "colmap/points.npy", 3, 3, 0.4, "c"),
    }
    save_records(run, records)
    assert load_records(run) == records
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (run).rename(moved / "run")
    (frames).rename(moved / "frames")
    again = load_records(moved / "run")
    assert again["colmap"].transforms == (moved / "run/colmap/transforms.json").resolve()
    assert again["frames"].dir == (moved / "frames").resolve()
    assert again["colmap"].reprojection_error_px == 0.4


def test_refine_alignment_recovers_a_small_rigid_offset():
    rng = np.random.default_rng(0)
    # Points on a lumpy sphere: enough structure for ICP to lock on.
    d = rng.normal(size=(4000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    target = d * (1 + 0.2 * np.sin(3 * d[:, :1]) * np.cos(2 * d[:, 1:2]))
    angle = np.radians(2.0)
    R0 = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    source = target[::2] @ R0.T + np.array([0.02, -0.01, 0.015])
    R, t = refine_alignment(source, target, max_dist=0.2)
    assert np.abs(source @ R.T + t - target[::2]).max() < 1e-3


def test_targets_flag_met_missed_and_unmeasured_figures():
    from bench.targets import check_targets

    result = {
        "total_seconds": 130.0,
        "stages": [{"stage": "train", "seconds": 40.0, "peak_gpu_mb": 3000}, {"stage": "mesh", "seconds": 12.0, "peak_gpu_mb": 900}],
        "quality": {"registered": 150, "frames": 150, "rotation_error_deg_median": 0.3, "psnr_holdout_object": None},
    }
    rows = {r["target"]: r for r in check_targets(result, "gpu")}
    assert rows["all stages, s (H100)"]["met"] is False
    assert rows["train, s"]["met"] is True and rows["frames registered"]["met"] is True
    assert rows["held-out PSNR, dB"]["met"] is None  # not measured is not a pass
    assert rows["F-score @ 1 %"]["met"] is None
    assert "all stages, s (2 cores)" not in rows  # the cpu-profile bound is not applied to a gpu run


def test_true_depth_field_renders_distance_along_each_ray():
    """bench.fusion_ceiling renders a mesh's depth for the fusion: distance along each pixel's ray
    (not z-depth), with pixels and principal point in our convention."""
    import pytest

    pytest.importorskip("pyrender")
    import torch
    import trimesh

    from bench.fusion_ceiling import TrueDepthField
    from tasks.nerf.rays import pixel_rays

    field = TrueDepthField(trimesh.creation.icosphere(subdivisions=5, radius=0.5))
    c2w = torch.eye(4)
    c2w[2, 3] = 3.0  # looking down -z at the sphere from 3 units
    k = torch.tensor([60.0, 60.0, 30.0, 20.0])  # principal point off centre on purpose
    out = field.render(c2w, k, 64, 48)
    v, u = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
    origins, dirs = pixel_rays(c2w, k, torch.stack([u.reshape(-1), v.reshape(-1)], -1))
    b = (dirs * origins).sum(-1)
    disc = b**2 - (origins * origins).sum(-1) + 0.25
    hit = disc > 0
    t = (-b - disc.clamp(min=0).sqrt()).reshape(48, 64)
    alpha = out["alpha"] > 0
    assert (alpha == hit.reshape(48, 64)).float().mean() > 0.97
    both = alpha & hit.reshape(48, 64)
    assert (out["depth"][both] - t[both]).abs().median() < 0.005


def test_precision_by_facing_finds_a_raised_top():
    # The truth: a 0.2 m cube. The estimate: the same cube with its top 6 mm too high (3 % of
    # the diagonal would be 10 mm; 1 % is 3.5 mm), so the top misses and every other face is exact.
    truth = trimesh.creation.box(extents=[0.2, 0.2, 0.2])
    true_pts, faces = trimesh.sample.sample_surface(truth, 60_000, seed=0)
    estimate = truth.copy()
    estimate.vertices[estimate.vertices[:, 2] > 0, 2] += 0.006
    est_pts = np.asarray(trimesh.sample.sample_surface(estimate, 20_000, seed=1)[0])
    diag = float(np.linalg.norm(truth.extents))
    figures = precision_by_facing(est_pts, np.asarray(true_pts), np.asarray(truth.face_normals)[faces], diag)
    assert figures["precision_1pct_icp_top"] < 0.05
    assert figures["precision_1pct_icp_bottom"] > 0.99
    assert abs(figures["offset_median_of_diag_top"] - 0.006 / diag) < 0.002 / diag
    assert abs(figures["offset_median_of_diag_bottom"]) < 0.0005 / diag


def test_compare_figure_draws_one_panel_per_figure_and_names_a_bad_run(tmp_path):
    import json

    import pytest

    from bench.compare_figure import draw, load_runs

    for name, f in (("a", 0.8), ("b", 0.97)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"quality": {"fscore_1pct": f, "chamfer_of_diag": 0.005}}))
    runs = load_runs([f"before={tmp_path / 'a.json'}", f"after={tmp_path / 'b.json'}"])
    assert [label for label, _ in runs] == ["before", "after"]
    out = tmp_path / "figure.png"
    draw(runs, ["fscore_1pct", "chamfer_of_diag", "psnr_holdout_object"], "t", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="expected label=path"):
        load_runs([str(tmp_path / "a.json")])


def test_sweep_figure_keeps_one_setting_apart_and_places_the_preset(tmp_path):
    import json

    import pytest

    from bench.sweep_figure import draw, sweep_points

    key = "mesh.fusion.surface_opacity"
    rows = [
        {"variant": "(preset)", "fscore_1pct": 0.73},
        {"variant": f"{key}=0.1", "fscore_1pct": 0.77},
        {"variant": f"{key}=0.1 mesh.smooth_iterations=15", "fscore_1pct": 0.78},  # two settings: left out
        {"variant": "mesh.smooth_iterations=15", "fscore_1pct": 0.74},  # another setting only: left out
    ]
    (tmp_path / "variants.json").write_text(json.dumps(rows))
    (tmp_path / "run.json").write_text(json.dumps({"quality": {"fscore_1pct": 0.75}}))
    label, points = sweep_points(key, f"field={tmp_path / 'variants.json'}@0.3")
    assert label == "field" and [(x, row["fscore_1pct"]) for x, row in points] == [(0.3, 0.73), (0.1, 0.77)]
    _, run = sweep_points(key, f"field={tmp_path / 'run.json'}@0.2")
    assert [(x, row["fscore_1pct"]) for x, row in run] == [(0.2, 0.75)]
    with pytest.raises(ValueError, match="give its value as @preset"):
        sweep_points(key, f"field={tmp_path / 'variants.json'}")
    out = tmp_path / "sweep.png"
    draw({"field": points + run}, key, ["fscore_1pct", "chamfer_of_diag"], "t", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_true_cameras_land_in_the_runs_world(tmp_path):
    import json

    from bench.true_cameras import true_poses_in_run_world, with_true_cameras

    # Truth: 8 cameras on an orbit looking at the origin (metres). The "solved" cameras are the
    # same ones in another world: scaled 3x, turned 40° about z, shifted, each rotation a little off.
    def look_at(center: np.ndarray) -> np.ndarray:
        back = center / np.linalg.norm(center)
        right = np.cross([0.0, 0.0, 1.0], back)
        right /= np.linalg.norm(right)
        c2w = np.eye(4)
        c2w[:3, :3] = np.stack([right, np.cross(back, right), back], axis=1)
        c2w[:3, 3] = center
        return c2w

    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    truth_c2w = np.stack([look_at(np.array([0.5 * np.cos(a), 0.5 * np.sin(a), 0.3])) for a in angles])
    turn = np.array([[np.cos(0.7), -np.sin(0.7), 0], [np.sin(0.7), np.cos(0.7), 0], [0, 0, 1.0]])
    solved = truth_c2w.copy()
    solved[:, :3, :3] = turn @ truth_c2w[:, :3, :3]
    solved[:, :3, 3] = 3.0 * truth_c2w[:, :3, 3] @ turn.T + np.array([0.1, -0.2, 0.05])
    wobble = np.array([[np.cos(0.01), -np.sin(0.01), 0], [np.sin(0.01), np.cos(0.01), 0], [0, 0, 1.0]])
    solved[::2, :3, :3] = solved[::2, :3, :3] @ wobble
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    (truth_dir / "cameras.json").write_text(json.dumps({
        "fl_x": 1200.0, "fl_y": 1200.0, "cx": 960.0, "cy": 540.0, "w": 1920, "h": 1080,
        "frames": [{"index": i, "transform_matrix": c.tolist()} for i, c in enumerate(truth_c2w)],
    }))
    frames_json = tmp_path / "frames" / "frames.json"
    frames_json.parent.mkdir()
    frames_json.write_text(json.dumps({"frames": [{"file": f"images/f{i}.jpg", "source_index": i} for i in range(8)]}))
    transforms = tmp_path / "colmap" / "transforms.json"
    transforms.parent.mkdir()
    transforms.write_text(json.dumps({
        "camera_model": "OPENCV", "fl_x": 700.0, "fl_y": 700.0, "cx": 640.0, "cy": 360.0, "w": 1280, "h": 720,
        "k1": -0.2, "frames": [{"file_path": f"../frames/images/f{i}.jpg", "transform_matrix": c.tolist()} for i, c in enumerate(solved)],
    }))
    poses = true_poses_in_run_world(frames_json, transforms, truth_dir)
    expected = solved.copy()
    expected[::2, :3, :3] = solved[::2, :3, :3] @ wobble.T  # the truth has no wobble
    np.testing.assert_allclose(poses, expected, atol=1e-9)
    out = with_true_cameras(transforms, {f"f{i}.jpg": p for i, p in enumerate(poses)}, truth_dir, tmp_path / "true" / "t.json")
    meta = json.loads(out.read_text())
    assert (meta["camera_model"], meta["fl_x"], meta["cx"], meta["k1"]) == ("PINHOLE", 800.0, 640.0, 0.0)
    assert meta["frames"][3]["file_path"] == str((tmp_path / "frames/images/f3.jpg").resolve())


def test_depth_errors_measure_the_fields_depth_against_the_truth(tmp_path):
    """bench.depth_errors on a tiny field of the ray-cast box: every level is reported, and moving
    the true surface back by 2 % of the diagonal moves the median error forward by exactly that."""
    import json

    import torch

    from bench import depth_errors
    from flows.config import compose_config
    from bench.records import save_records
    from tasks.mesh import MeshSettings
    from tasks.mesh_fusion import fusion_views
    from tasks.nerf.rays import intersect_aabb, pixel_rays
    from tasks.train import train_field
    from tests.test_nerf_ngp import BOX_HALF, TINY, write_scene

    masks = write_scene(tmp_path / "scene")
    field = train_field(masks, tmp_path / "run" / "train", dict(TINY, steps=150), "fp")
    save_records(tmp_path / "run", {"segment": masks, "train": field})
    diag = float(np.linalg.norm(2 * BOX_HALF))
    (tmp_path / "tt" / "truth").mkdir(parents=True)
    (tmp_path / "tt" / "truth" / "meta.json").write_text(json.dumps({"bbox_diagonal_m": diag}))
    overrides = ["profile=cpu", "mesh.fusion.views=6"]
    box = torch.tensor(np.stack([-BOX_HALF, BOX_HALF]), dtype=torch.float32)
    exact = {}
    for view in fusion_views(masks.transforms, MeshSettings(**compose_config(overrides)["mesh"]).fusion):
        cw, ch = view.crop_size
        v, u = torch.meshgrid(torch.arange(ch), torch.arange(cw), indexing="ij")
        origins, directions = pixel_rays(view.c2w, view.crop_k, torch.stack([u.reshape(-1), v.reshape(-1)], -1))
        near, _, hit = intersect_aabb(origins, directions, box)
        exact[f"view_{view.index}"] = torch.where(hit, near, torch.zeros_like(near)).reshape(ch, cw).numpy()

    reports = {}
    for shift in (0.0, 0.02 * diag):
        np.savez(tmp_path / "run" / depth_errors.TRUTH_FILE, world_to_metres=np.float64(1.0),
                 **{k: np.where(d > 0, d + shift, 0.0) for k, d in exact.items()})
        reports[shift] = depth_errors.depth_errors(tmp_path / "run", tmp_path / "tt", overrides, "cpu")
    plain, moved = reports[0.0], reports[0.02 * diag]
    assert plain["views"] == 6 and (tmp_path / "run" / "depth_errors.png").is_file()
    assert [row["depth"] for row in plain["levels"]] == [f"{level:.1f}" for level in depth_errors.LEVELS] + ["mean"]
    for before, after in zip(plain["levels"], moved["levels"]):
        assert before["pixels_fraction"] == after["pixels_fraction"] > 0.5
        assert after["median_mm"] == pytest.approx(before["median_mm"] - 0.02 * diag * 1e3, abs=1e-2)
    # A field trained 150 steps already has its surface near the box's faces somewhere.
    assert max(row["within_1pct"] for row in plain["levels"]) > 0.2


def test_surface_figure_colours_distance_green_yellow_red():
    from bench.surface_figure import distance_colours

    plane = trimesh.creation.box(extents=(0.2, 0.2, 0.0001))  # the z = 0 plane, densely sampled
    points = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.01], [0.0, 0.0, 0.03], [0.0, 0.0, 0.5]])
    colours = distance_colours(points, plane, threshold=0.01, samples=200_000)
    assert colours.shape == (4, 4) and (colours[:, 3] == 255).all()
    assert colours[0, 0] < 30 and colours[0, 1] == 255 and colours[0, 2] == 0  # green on the surface
    assert colours[1, 0] > 230 and colours[1, 1] > 230 and colours[1, 2] == 0  # yellow at the threshold
    assert tuple(colours[2, :3]) == (255, 0, 0) and tuple(colours[3, :3]) == (255, 0, 0)


def test_geometry_quality_splits_recall_of_an_open_products_inside(tmp_path):
    """Truth: a box with an inner lining (walls facing the axis, like a basket's inside); the
    estimate has only the outside. The inward recall says what is missing, the total does not."""
    from bench.quality import geometry_quality

    outer = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    lining = trimesh.creation.box(extents=(0.7, 0.7, 0.9))
    lining.invert()  # normals towards the axis
    trimesh.util.concatenate([outer, lining]).export(tmp_path / "truth.ply")
    figures = geometry_quality(outer, tmp_path / "truth.ply", samples=40_000)
    # The lining's four walls (2.52 m²) of 9.5 m² in all; its floor and ceiling face up and down.
    assert figures["inward_fraction"] == pytest.approx(2.52 / 9.5, abs=0.02)
    assert figures["recall_1pct_icp_inward"] == pytest.approx(0.0, abs=0.01)
    assert figures["recall_1pct_icp"] == pytest.approx(6.0 / 9.5, abs=0.02)  # only the outside is found


def test_visibility_bound_of_a_cube_filmed_from_above():
    """A unit cube on an orbit 30° above it: the bottom (1/6 of the surface) is never seen, so a
    perfect reconstruction of what is seen recalls about 5/6 (plus the bottom's 1 % rim next to
    the seen sides); an orbit below as well sees it all."""
    pytest.importorskip("pyrender")
    from bench.visibility import visibility_bound
    from tests.analytic_field import look_at
    from tests.truth import TruthCameras

    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))

    def orbit(heights):
        eyes = [[4 * np.cos(a), 4 * np.sin(a), z] for z in heights for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
        return TruthCameras(np.array([look_at(np.array(e), np.zeros(3)) for e in eyes]), 80.0, 80.0, 48.0, 48.0, 96, 96, {})

    above = visibility_bound(cube, orbit([2.3]), scale=1.0, samples=20_000)
    assert above["seen_fraction"] == pytest.approx(5 / 6, abs=0.01)
    assert above["seen_fraction_underside"] == 0.0
    assert 5 / 6 < above["recall_bound"] < 5 / 6 + 0.03
    assert above["fscore_bound"] == pytest.approx(2 * above["recall_bound"] / (1 + above["recall_bound"]))
    assert above["fscore_bound_with_underside"] > 0.995
    both = visibility_bound(cube, orbit([2.3, -2.3]), scale=1.0, samples=20_000)
    assert both["seen_fraction_2views"] > 0.99 and both["fscore_bound"] > 0.995


def test_visibility_figure_marks_what_no_camera_sees_red(tmp_path):
    """Cameras on one side of a cube: the figure's orbit shows the far faces red, the near ones green."""
    pytest.importorskip("pyrender")
    from PIL import Image

    from bench.visibility import visibility_figure
    from tests.analytic_field import look_at
    from tests.truth import TruthCameras

    eyes = [[4 * np.cos(a), 4 * np.sin(a), 2.0] for a in np.linspace(0.1, 1.4, 4)]
    cameras = TruthCameras(np.array([look_at(np.array(e), np.zeros(3)) for e in eyes]), 80.0, 80.0, 48.0, 48.0, 96, 96, {})
    out = visibility_figure(trimesh.creation.box(extents=(1.0, 1.0, 1.0)), cameras, tmp_path / "seen.png", scale=1.0, size=64)
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)
    assert Image.open(out).size == (4 * 64, 2 * 64)
    red, green = pixels[:, 0] - pixels[:, 1] > 80, pixels[:, 1] - pixels[:, 0] > 50  # shaded, so only the hue is sure
    assert red.mean() > 0.02 and green.mean() > 0.02


def test_texture_ceiling_compares_the_glbs_texture_with_the_colour_at_each_point(tmp_path):
    """bench.texture_ceiling lifts each rendered pixel to its surface point: a GLB carrying the true
    texture scores high, one carrying the inverted texture low (quantised UVs read back right)."""
    pytest.importorskip("pyrender")
    import io
    import json

    from PIL import Image

    from bench.texture_ceiling import TrueColourField, texture_psnr
    from tasks.mesh_export import Z_UP_TO_Y_UP, glb_bytes

    # A 1 × 1 textured square at z = 0 in the truth's world (= the field's here), 8 × 8 checker.
    vertices = np.array([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    cells = (np.add.outer(np.arange(256) // 32, np.arange(256) // 32) % 2).astype(np.uint8)
    checker = np.stack([cells * 200 + 30, cells * 60 + 100, 230 - cells * 180], -1).astype(np.uint8)
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(checker), baseColorFactor=[255] * 4)
    square = trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False)
    field = TrueColourField(square, np.eye(4), samples=400_000)

    truth = tmp_path / "tt" / "truth"
    truth.mkdir(parents=True)
    pose = np.eye(4)
    pose[2, 3] = 1.5  # looking down -z at the square
    (truth / "cameras.json").write_text(json.dumps({"fl_x": 150.0, "fl_y": 150.0, "cx": 80.0, "cy": 60.0, "w": 160, "h": 120,
                                                    "frames": [{"index": 0, "transform_matrix": pose.tolist()}]}))
    scores = {}
    for name, image in (("true", checker), ("inverted", 255 - checker)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        glb = tmp_path / f"{name}.glb"
        glb.write_bytes(glb_bytes(vertices @ Z_UP_TO_Y_UP.T, np.tile([[0.0, 1.0, 0.0]], (4, 1)), faces, 0.7, uv=uv,
                                  texture=buf.getvalue(), texture_mime="image/png", quantize=True))
        scores[name] = texture_psnr(glb, field, tmp_path / "tt", np.eye(4), views=1, scale=1.0)["texture_psnr"]
    field.close()
    assert scores["true"] > 20.0 > 8.0 > scores["inverted"]


def test_train_gpu_peak_is_not_a_passing_zero_when_an_outside_tool_trained():
    # Our own backend: torch's peak in this process is the training's.
    assert training_gpu_peak_mb({"peak_memory_mb": 2500.0, "extra": {}}, 2510) == 2510
    # nerfstudio trains in a subprocess and reports host RSS: not measured (this process saw 0).
    nerfacto = {"peak_memory_mb": 1172.0, "extra": {"peak_memory_kind": "host RSS of the largest nerfstudio process"}}
    assert training_gpu_peak_mb(nerfacto, 0) is None
    # instant-ngp reports the device's GPU use itself.
    pyngp = {"peak_memory_mb": 6144.4, "extra": {"peak_memory_kind": "GPU used, device-wide, sampled every log_every steps"}}
    assert training_gpu_peak_mb(pyngp, 12) == 6144
