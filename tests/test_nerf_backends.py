"""The instant_ngp (pyngp) and nerfacto (nerfstudio CLI) backends, without a GPU, pyngp or nerfstudio.

What these tests prove and what they cannot:
- the error texts when pyngp / the nerfstudio environment are missing, and that nothing is written then;
- the RGBA capture both tools get (mask as alpha, our frame order, our held-out frames);
- instant_ngp's wiring against a STAND-IN pyngp (tests/pyngp_standin.py): it records the calls
  scripts/run.py makes, places a known ellipsoid mesh in instant-ngp's coordinates with the
  transform documented in its nerf_loader (``cycle(p * scale + offset)``), and renders held-out
  views of the captured sphere. So the backend's coordinate inversion, held-out evaluation and
  mesh-backed field are checked; instant-ngp's own training and output are not;
- nerfacto's exact command lines, timeouts (the whole process group is killed) and failures, and an
  end-to-end run against STAND-IN ``ns-train`` / ``ns-export`` / ``ns-eval`` scripts that write
  nerfstudio 1.1.5's output layout (runs/<exp>/<method>/<timestamp>/config.yml,
  nerfstudio_models/step-*.ckpt, dataparser_transforms.json; export/poisson_mesh.ply, mesh.obj,
  material_0.*; ns-eval's json; tests/nerfstudio_standin.py). They use a NON-identity dataparser
  transform on purpose, so the inverse mapping back to our world is exercised;
- that the mesh stage (tasks/mesh.py) turns such a mesh-backed field into a model of the right size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import trimesh
import yaml

from tests.analytic_field import AnalyticField, SphereSpec, look_at, quadrant_color
from tests.pyngp_standin import fake_pyngp_module
from flows.config import compose_config
from tasks import mesh_geometry as geo
from tasks.mesh import MeshSettings, extract_mesh
from tasks.mesh_texture import linear_to_srgb
from tasks.nerf.base import get_backend
from tasks.nerf.dataset import CaptureError
from tasks.nerf.external import crop_to_product, prepare_rgba_capture
from tasks.nerf.instant_ngp import InstantNgpSettings, PyngpMissingError, ngp_to_world
from tasks.nerf.mesh_field import MeshField, inside_mesh_grid
from tasks.nerf.nerfacto import NerfactoSettings, NerfstudioError, from_nerfstudio, ns_export_command, ns_train_command, to_nerfstudio
from tasks.train import train_field, validate_nerf_settings
from tasks.types import MaskSet

REPO = Path(__file__).resolve().parent.parent
SPEC = SphereSpec()  # sphere of radius 0.5 at (0.1, -0.05, 0.2): off-centre, so a wrong axis order shows
SIZE, VIEWS, HOLDOUT_EVERY = 48, 10, 4
SPHERE_BOX = np.array([np.array(SPEC.centre) - SPEC.radius, np.array(SPEC.centre) + SPEC.radius])
ELLIPSOID_RADII = np.array([0.45, 0.3, 0.2])
ELLIPSOID_BOX = np.array([np.array(SPEC.centre) - ELLIPSOID_RADII, np.array(SPEC.centre) + ELLIPSOID_RADII])


def camera(k: int) -> tuple[np.ndarray, list[float]]:
    azimuth = 2 * math.pi * k / VIEWS
    eye = np.array([3.0 * math.cos(azimuth), 3.0 * math.sin(azimuth), 1.0 + 0.3 * (k % 3)])
    return look_at(eye, np.zeros(3)), [SIZE * 1.2, SIZE * 1.2, SIZE / 2, SIZE / 2]


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> MaskSet:
    """A segment-stage-like folder: frames/ (lossless), seg/masks/, seg/rgba/ (for even frames only),
    seg/transforms.json with mask_path, seg/hull.json (the sphere's box)."""
    root = tmp_path_factory.mktemp("capture")
    seg = root / "seg"
    for folder in (root / "frames", seg / "masks", seg / "rgba"):
        folder.mkdir(parents=True)
    field, frames = AnalyticField(SPEC), []
    for k in range(VIEWS):
        c2w, intr = camera(k)
        out = field.render(torch.tensor(c2w, dtype=torch.float32), torch.tensor(intr), SIZE, SIZE)
        alpha = out["alpha"].numpy()[..., None]
        image = np.round((out["rgb"].numpy() + (1 - alpha) * 0.5) * 255).astype(np.uint8)[..., ::-1]
        mask = (alpha[..., 0] * 255).astype(np.uint8)
        stem = f"{k:05d}_frame_{k:03d}"
        cv2.imwrite(str(root / "frames" / f"frame_{k:03d}.png"), image)
        cv2.imwrite(str(seg / "masks" / f"{stem}.png"), mask)
        if k % 2 == 0:
            cv2.imwrite(str(seg / "rgba" / f"{stem}.png"), np.dstack([image, mask]))
        frames.append({"file_path": f"../frames/frame_{k:03d}.png", "mask_path": f"masks/{stem}.png", "transform_matrix": c2w.tolist()})
    camera_keys = {"camera_model": "OPENCV", "fl_x": SIZE * 1.2, "fl_y": SIZE * 1.2, "cx": SIZE / 2, "cy": SIZE / 2, "w": SIZE, "h": SIZE}
    frames.reverse()  # the backends sort by file_path themselves
    (seg / "transforms.json").write_text(json.dumps({**camera_keys, "korokoro": {"note": "provenance"}, "frames": frames}))
    (seg / "hull.json").write_text(json.dumps({"aabb": SPHERE_BOX.tolist()}))
    return MaskSet(dir=seg, transforms=seg / "transforms.json", hull=seg / "hull.json",
                   contact_sheet=seg / "hull.json", stats=seg / "hull.json", fingerprint="test")


def nerf_settings(*overrides: str) -> dict:
    """The composed nerf group, as the flow hands it to the train stage (default profile=cpu)."""
    return compose_config(list(overrides))["nerf"]


# --- shared: settings and the RGBA capture ----------------------------------------------------


def test_yaml_lists_every_setting_of_each_backend():
    for name, cls in (("instant_ngp", InstantNgpSettings), ("nerfacto", NerfactoSettings)):
        config = yaml.safe_load((REPO / f"conf/nerf/{name}.yaml").read_text())
        assert set(config) == {f.name for f in dataclasses.fields(cls)} and cls(**config).backend == name


def test_backends_compose_with_every_profile_and_reject_typos():
    for overrides in (["nerf=instant_ngp"], ["nerf=instant_ngp", "profile=gpu"], ["nerf=nerfacto"], ["nerf=nerfacto", "profile=gpu"]):
        assert validate_nerf_settings(nerf_settings(*overrides)) == overrides[0].split("=")[1]
    with pytest.raises(ValueError, match=r"'n_stepz' \(did you mean 'n_steps'\?\)"):
        validate_nerf_settings(nerf_settings("nerf=instant_ngp", "+nerf.n_stepz=3"))
    with pytest.raises(ValueError, match="nerf.export_method='marching'"):
        validate_nerf_settings(nerf_settings("nerf=nerfacto", "nerf.export_method=marching"))


def test_rgba_capture_keeps_our_frame_order_holdout_and_masks_as_alpha(masks, tmp_path):
    prepared = prepare_rgba_capture(masks.transforms, tmp_path / "data", HOLDOUT_EVERY)
    assert prepared.reused_rgba == VIEWS // 2  # the segment stage's cut-outs for even frames, composed for odd
    assert prepared.holdout_ids == (0, 4, 8) and prepared.train_ids == (1, 2, 3, 5, 6, 7, 9)
    written = json.loads(prepared.transforms.read_text())
    assert "korokoro" not in written and written["fl_x"] == SIZE * 1.2 and written["camera_model"] == "OPENCV"
    for k, frame in enumerate(written["frames"]):
        assert frame["file_path"] == f"images/{k:05d}.png" and "mask_path" not in frame
        assert np.allclose(frame["transform_matrix"], camera(k)[0])  # sorted back into frame order
        rgba = cv2.imread(str(prepared.data_dir / frame["file_path"]), cv2.IMREAD_UNCHANGED)
        source, mask = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in prepared.sources[k])
        assert rgba.shape == (SIZE, SIZE, 4)
        assert np.array_equal(rgba[..., 3], mask) and np.array_equal(rgba[..., :3], source)


# --- instant_ngp ------------------------------------------------------------------------------


def test_missing_pyngp_says_not_on_pypi_how_to_build_and_the_licence(masks, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyngp", None)  # `import pyngp` raises ImportError
    with pytest.raises(PyngpMissingError) as err:
        train_field(masks, tmp_path / "train", nerf_settings("nerf=instant_ngp"), "fp")
    text = str(err.value)
    for needed in ("not on PyPI", "infra/Dockerfile", "--target gpu-ngp", "NVlabs/instant-ngp", "PYTHONPATH",
                   "non-commercial", "License-NC", "nerf=ngp"):
        assert needed in text, needed
    assert not (tmp_path / "train" / "data").exists()  # failed before any work


@pytest.fixture
def fake_pyngp(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setitem(sys.modules, "pyngp", fake_pyngp_module(calls, SPEC, ELLIPSOID_RADII))
    return calls


def test_instant_ngp_trains_through_pyngp_and_loads_as_a_mesh_field_in_our_world(masks, tmp_path, fake_pyngp, caplog):
    settings = nerf_settings("nerf=instant_ngp", "nerf.n_steps=40", "nerf.log_every=10", f"nerf.holdout_every={HOLDOUT_EVERY}",
                             "nerf.mesh_field_resolution=64", "nerf.eval_spp=1")
    seen = []
    trained = train_field(masks, tmp_path / "train", settings, "fp", progress=lambda step, total, logs: seen.append((step, total)))
    out = tmp_path / "train"
    names = [c[0] for c in fake_pyngp]
    assert names == ["Testbed", "load_training_data", "reload_network_from_file", "save_snapshot",
                     "compute_marching_cubes_mesh", "load_training_data"]
    _, train_json, n_train, channels, aabb_scale = fake_pyngp[1]
    assert (train_json, n_train, channels, aabb_scale) == ("transforms_train.json", 7, {4}, 1)
    assert fake_pyngp[2] == ("reload_network_from_file", "")  # instant-ngp's default network
    assert fake_pyngp[3] == ("save_snapshot", "snapshot.msgpack", 40) and (out / "snapshot.msgpack").is_file()
    assert fake_pyngp[4] == ("compute_marching_cubes_mesh", [256, 256, 256], 2.5)
    assert fake_pyngp[5][1:3] == ("transforms_holdout.json", 3)
    assert seen[-1] == (40, 40) and len(seen) >= 4

    metrics = json.loads(trained.metrics.read_text())
    extra = metrics["extra"]
    assert metrics["backend"] == "instant_ngp" and metrics["steps"] == 40
    # The stand-in renders the exact sphere the frames show: only 8-bit rounding separates them, so a
    # high PSNR means every held-out view was rendered from its own camera, compared to its own frame.
    assert extra["holdout_frames"] == 3 and extra["psnr_holdout_object"] > 40 and extra["mask_iou_holdout"] > 0.97
    assert extra["ignored_settings"]["steps"] == 2000  # profile=cpu's ngp keys, ignored and reported
    assert "nerf=instant_ngp ignores these settings of the ngp backend" in caplog.text and "rays_per_batch" in caplog.text
    assert len(list(out.glob("preview_*.png"))) == 3

    field = get_backend("instant_ngp").load(out)
    ply = trimesh.load(out / "field_mesh.ply", process=False)
    assert np.allclose(ply.vertices.min(0), ELLIPSOID_BOX[0], atol=0.01) and np.allclose(ply.vertices.max(0), ELLIPSOID_BOX[1], atol=0.01)
    # The mesh stage's own density sampling and marching cubes find the ellipsoid in our world.
    box = field.aabb.numpy().astype(np.float64)
    grid = geo.sample_density_grid(field, box, 48, 65536, "cpu")
    vertices, _ = geo.grid_to_mesh(grid, box, 20.0)
    voxel = float((box[1] - box[0]).max()) / 47
    assert np.allclose(vertices.min(0), ELLIPSOID_BOX[0], atol=2 * voxel) and np.allclose(vertices.max(0), ELLIPSOID_BOX[1], atol=2 * voxel)
    # Colours: instant-ngp's linear vertex colours, turned to sRGB (the RadianceField protocol).
    point = torch.tensor([[SPEC.centre[0] + 0.3, SPEC.centre[1], SPEC.centre[2] + 0.12]])
    expected = linear_to_srgb(quadrant_color(point.numpy().astype(np.float64), np.array(SPEC.centre)))
    assert np.allclose(field.color(point, torch.tensor([[0.0, 0.0, -1.0]])).numpy(), expected, atol=0.01)


def test_ngp_to_world_inverts_instant_ngps_placement():
    rng = np.random.default_rng(0)
    world, scale, offset = rng.normal(size=(20, 3)), 0.37, [0.2, 0.55, 0.61]
    ngp = (world * scale + np.array(offset))[:, [1, 2, 0]]
    assert np.allclose(ngp_to_world(ngp, scale, offset), world)


# --- the mesh-backed field --------------------------------------------------------------------


def test_mesh_field_density_colour_and_render_follow_the_mesh():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    box = np.array([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])
    inside = inside_mesh_grid(sphere.vertices, sphere.faces, box, 50)
    assert abs(inside.mean() - 4 / 3 * math.pi * 0.4**3) < 0.01  # the ball's volume fraction of the box
    open_mesh = trimesh.Trimesh(sphere.vertices, sphere.faces[10:], process=False)  # a few holes
    assert (inside_mesh_grid(open_mesh.vertices, open_mesh.faces, box, 50) != inside).mean() < 0.002
    colors = (sphere.vertices[:, 2:3] > 0) * np.array([[0.9, 0.1, 0.1]]) + (sphere.vertices[:, 2:3] <= 0) * np.array([[0.1, 0.1, 0.9]])
    field = MeshField(sphere.vertices, sphere.faces, colors, box, 64, 1000.0, 128)
    density = field.density(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.45], [0.0, 0.0, 0.9]])).numpy()
    assert density[0] == pytest.approx(1000.0) and density[1] == 0 and density[2] == 0
    top = field.color(torch.tensor([[0.0, 0.05, 0.41]]), torch.tensor([[0.0, 0.0, -1.0]])).numpy()[0]
    assert np.allclose(top, [0.9, 0.1, 0.1], atol=1e-6)
    c2w = look_at(np.array([0.0, -2.0, 0.0]), np.zeros(3))
    view = field.render(torch.tensor(c2w, dtype=torch.float32), torch.tensor([40.0, 40.0, 16.0, 16.0]), 32, 32)
    v, u = np.mgrid[0:32, 0:32] + 0.5
    disc = np.hypot(u - 16, v - 16) < 40 * 0.4 / math.sqrt(2.0**2 - 0.4**2)  # the ball's silhouette
    assert ((view["alpha"].numpy() > 0.5) == disc).mean() > 0.97
    rgb = view["rgb"].numpy()
    assert rgb[10:14, 14:18, 0].min() > 0.8 and rgb[18:22, 14:18, 2].min() > 0.8  # red top (+z), blue bottom


def test_mesh_field_render_colours_only_the_samples_that_show(monkeypatch):
    # A solid ball: a ray through it has ~60 dense samples, of which only the first few carry weight.
    # Colouring the hidden ones (a nearest-vertex query each) made a 0.9M-face TSDF mesh take minutes a view.
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    box = np.array([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])
    field = MeshField(sphere.vertices, sphere.faces, np.full((len(sphere.vertices), 3), 0.7), box, 64, 1000.0, 128)
    c2w = torch.tensor(look_at(np.array([0.0, -2.0, 0.0]), np.zeros(3)), dtype=torch.float32)
    intrinsics = torch.tensor([40.0, 40.0, 16.0, 16.0])
    coloured: list[int] = []
    dense: list[int] = []
    lookup, density = field.color, field.density

    def counted_density(points: torch.Tensor) -> torch.Tensor:
        sigma = density(points)
        dense.append(int((sigma > 0).sum()))
        return sigma

    monkeypatch.setattr(field, "color", lambda p, d: coloured.append(len(p)) or lookup(p, d))
    monkeypatch.setattr(field, "density", counted_density)
    view = field.render(c2w, intrinsics, 32, 32)
    hit = int((view["alpha"] > 0.5).sum())
    assert hit > 100 and sum(dense) > 20 * hit  # the ball is solid: many dense samples behind each hit
    assert sum(coloured) <= 4 * hit  # only the shell's first samples are looked up
    # and the picture is the same as colouring every sample: the ball's grey, alpha-weighted
    assert np.allclose(view["rgb"].numpy(), 0.7 * view["alpha"].numpy()[..., None], atol=1e-4)



# --- nerfacto ---------------------------------------------------------------------------------

@pytest.fixture
def ns_env(tmp_path) -> Path:
    """A fake nerfstudio environment: bin/ns-train, bin/ns-export, bin/ns-eval (this Python)."""
    bin_dir = tmp_path / "ns-env" / "bin"
    bin_dir.mkdir(parents=True)
    standin = (Path(__file__).parent / "nerfstudio_standin.py").read_text()
    for tool in ("ns-train", "ns-export", "ns-eval"):
        script = bin_dir / tool
        script.write_text(f"#!{sys.executable}\n" + standin)
        script.chmod(0o755)
    return bin_dir


def calls(bin_dir: Path) -> list[list[str]]:
    return [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()]


def test_nerfacto_command_lines_are_exact():
    s = NerfactoSettings(env_path="/env/bin", max_num_iterations=5000, train_num_rays_per_batch=8192, seed=7,
                         extra_train_args="--pipeline.model.predict-normals True", holdout_every=8)
    assert ns_train_command(s, Path("/env/bin"), Path("/ck/data/transforms.json"), Path("/ck/runs")) == [
        "/env/bin/ns-train", "nerfacto", "--output-dir", "/ck/runs", "--experiment-name", "korokoro", "--timestamp", "train",
        "--max-num-iterations", "5000", "--save-only-latest-checkpoint", "True", "--vis", "tensorboard",
        "--machine.seed", "7", "--pipeline.datamanager.train-num-rays-per-batch", "8192",
        "--pipeline.model.background-color", "random", "--pipeline.model.disable-scene-contraction", "False",
        "--pipeline.model.implementation", "tcnn", "--pipeline.model.predict-normals", "True",
        "nerfstudio-data", "--data", "/ck/data/transforms.json", "--downscale-factor", "1", "--orientation-method", "none",
        "--center-method", "none", "--auto-scale-poses", "False", "--scene-scale", "1.0", "--eval-mode", "interval",
        "--eval-interval", "8",
    ]
    box = np.array([[-0.5, -0.25, 0.0], [0.5, 0.25, 0.75]])
    assert ns_export_command(s, Path("/env/bin"), Path("/ck/config.yml"), Path("/ck/export"), box) == [
        "/env/bin/ns-export", "poisson", "--load-config", "/ck/config.yml", "--output-dir", "/ck/export",
        "--use-bounding-box", "True", "--bounding-box-min", "-0.5", "-0.25", "0", "--bounding-box-max", "0.5", "0.25", "0.75",
        "--target-num-faces", "50000", "--num-pixels-per-side", "2048", "--texture-method", "nerf",
        "--obb-center", "0", "0", "0.375", "--obb-rotation", "0", "0", "0", "--obb-scale", "1", "0.5", "0.75",
        "--num-points", "1000000", "--remove-outliers", "True", "--normal-method", "open3d",
    ]
    tsdf = ns_export_command(NerfactoSettings(export_method="tsdf", tsdf_resolution=192), Path("/b"), Path("/c.yml"), Path("/e"), box)
    assert tsdf[1:2] + tsdf[-4:] == ["tsdf", "--texture-method", "nerf", "--resolution", "192"]
    # Without the texture bake each method keeps its own colours (nerfstudio's names differ).
    for method, colours in (("tsdf", "tsdf"), ("poisson", "point_cloud")):
        command = ns_export_command(NerfactoSettings(export_method=method, export_texture=False), Path("/b"), Path("/c.yml"), Path("/e"), box)
        assert command[command.index("--texture-method") + 1] == colours


@pytest.mark.parametrize("env_path", ["", "missing-folder"])
def test_nerfacto_without_its_environment_names_the_setting_and_the_script(masks, tmp_path, env_path):
    settings = nerf_settings("nerf=nerfacto", f"nerf.env_path={env_path and str(tmp_path / env_path)}")
    with pytest.raises(NerfstudioError) as err:
        train_field(masks, tmp_path / "train", settings, "fp")
    assert "nerf.env_path" in str(err.value) and "infra/nerfstudio/setup_env.sh" in str(err.value)
    assert not (tmp_path / "train" / "data").exists()


def test_nerfacto_end_to_end_against_stand_in_tools(masks, tmp_path, ns_env):
    # Whole frames (crop_to_product off): the crop's own round is test_nerfacto_trains_on_frames_cropped_to_the_product.
    settings = nerf_settings("nerf=nerfacto", f"nerf.env_path={ns_env.parent}", "nerf.max_num_iterations=30", "nerf.crop_to_product=false",
                             f"nerf.holdout_every={HOLDOUT_EVERY}", "nerf.mesh_field_resolution=64")
    trained = train_field(masks, tmp_path / "train", settings, "fp")
    out = tmp_path / "train"
    train_argv, export_argv, eval_argv = calls(ns_env)
    assert train_argv[:2] == ["nerfacto", "--output-dir"] and train_argv[train_argv.index("--eval-interval") + 1] == str(HOLDOUT_EVERY)
    assert export_argv[:3] == ["poisson", "--load-config", str(out / "runs/korokoro/nerfacto/train/config.yml")]
    assert eval_argv == ["--load-config", str(out / "runs/korokoro/nerfacto/train/config.yml"), "--output-path", str(out / "eval.json"),
                         "--render-output-path", str(out / "eval_renders")]
    # The export box is our padded hull box carried into nerfstudio's coordinates.
    transform = np.array([[0.0, -1.0, 0.0, 0.1], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -0.2]])
    metrics = json.loads(trained.metrics.read_text())
    box = np.array(metrics["extra"]["aabb"])
    corners = to_nerfstudio(np.stack(np.meshgrid(*box.T, indexing="ij"), -1).reshape(-1, 3), transform, 0.8)
    i = export_argv.index("--bounding-box-min")
    assert np.allclose([float(v) for v in export_argv[i + 1:i + 4]], corners.min(0), atol=1e-5)
    assert np.allclose(from_nerfstudio(corners, transform, 0.8), np.stack(np.meshgrid(*box.T, indexing="ij"), -1).reshape(-1, 3))

    extra = metrics["extra"]
    assert metrics["backend"] == "nerfacto" and metrics["steps"] == 30
    assert extra["psnr_holdout_nerfstudio"] == 31.5 and extra["nerfstudio_eval"]["ssim"] == 0.95
    assert extra["psnr_holdout_object"] is None and extra["holdout_frames"] == 3 and extra["train_frames"] == 7
    # Our object PSNR from ns-eval's renders: the stand-in renders each held-out frame's object
    # pixels RENDER_OFFSET brighter (clipped at 255), so the error is known per pixel.
    squared, count = 0.0, 0
    for k in (0, HOLDOUT_EVERY, 2 * HOLDOUT_EVERY):
        rgba = cv2.imread(str(out / f"data/images/{k:05d}.png"), cv2.IMREAD_UNCHANGED).astype(np.float64)
        rgb, on_object = rgba[..., :3], rgba[..., 3] > 127
        squared += float((((np.minimum(rgb + 16, 255) - rgb) / 255.0)[on_object] ** 2).sum())
        count += 3 * int(on_object.sum())
    assert count > 0 and extra["psnr_holdout_object_on_black"] == pytest.approx(-10 * math.log10(squared / count), abs=0.01)
    assert extra["checkpoint"].endswith("nerfstudio_models/step-000000029.ckpt") and extra["textured_obj"].endswith("export/mesh.obj")
    assert {p.name for p in (out / "logs").iterdir()} == {"ns-train.log", "ns-export.log", "ns-eval.log"}
    assert (out / "logs/ns-train.log").read_text().startswith(f"$ {ns_env / 'ns-train'} nerfacto")

    field = get_backend("nerfacto").load(out)
    ply = trimesh.load(out / "field_mesh.ply", process=False)  # back in our world, despite the transform
    assert np.allclose(ply.vertices.min(0), SPHERE_BOX[0], atol=0.01) and np.allclose(ply.vertices.max(0), SPHERE_BOX[1], atol=0.01)
    assert field.density(torch.tensor([list(SPEC.centre)])).item() == pytest.approx(1000.0)
    assert np.allclose(field.color(torch.tensor([[0.1, -0.05, 0.7]]), torch.zeros(1, 3)).numpy(), [[200 / 255, 30 / 255, 30 / 255]])


def test_mesh_stage_meshes_a_nerfacto_field(masks, tmp_path, ns_env):
    settings = nerf_settings("nerf=nerfacto", f"nerf.env_path={ns_env}", "nerf.max_num_iterations=30", "nerf.mesh_field_resolution=96")
    trained = train_field(masks, tmp_path / "train", settings, "fp")
    mesh_settings = MeshSettings(surface="density", grid_resolution=48, texture_size=0, max_triangles=4000,
                                 min_triangles=1000, iso_levels=(5.0, 85.0, 288.0))
    asset = extract_mesh(trained, masks, tmp_path / "mesh", mesh_settings, "fp")
    bbox = json.loads(asset.metrics.read_text())["bbox_world_zup"]
    # The low iso-level the stage picks sits up to a voxel outside the mesh: 1.2 / 48 here.
    assert np.allclose(bbox["min"], SPHERE_BOX[0], atol=0.03) and np.allclose(bbox["max"], SPHERE_BOX[1], atol=0.03)
    assert asset.glb.stat().st_size > 0
    # The fused surface works on a mesh-backed field too (it renders depth); the cameras look
    # down on the sphere, so its unseen underside is closed flat above the true bottom.
    fused = extract_mesh(trained, masks, tmp_path / "fused", replace(mesh_settings, surface="depth_fusion",
                                                                       fusion={"views": 8, "long_side": 64}), "fp")
    metrics = json.loads(fused.metrics.read_text())
    lo, hi = np.array(metrics["bbox_world_zup"]["min"]), np.array(metrics["bbox_world_zup"]["max"])
    assert np.allclose(lo[:2], SPHERE_BOX[0][:2], atol=0.03) and np.allclose(hi, SPHERE_BOX[1], atol=0.03)
    assert SPHERE_BOX[0][2] < metrics["fusion"]["base_z"] <= lo[2] + 0.03


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_nerfacto_timeout_stops_the_tool_and_its_children(masks, tmp_path, ns_env, monkeypatch):
    monkeypatch.setenv("FAKE_NS_MODE", "hang")
    settings = nerf_settings("nerf=nerfacto", f"nerf.env_path={ns_env}", "nerf.train_timeout_s=3")
    started = time.monotonic()
    with pytest.raises(NerfstudioError, match=r"ns-train ran past nerf.train_timeout_s=3 s and was stopped; its log: .*ns-train.log"):
        train_field(masks, tmp_path / "train", settings, "fp")
    assert time.monotonic() - started < 30
    grandchild = int((ns_env / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert "training..." in (tmp_path / "train/logs/ns-train.log").read_text()


def test_nerfacto_refuses_held_out_renders_in_another_order(masks, tmp_path, ns_env, monkeypatch):
    monkeypatch.setenv("FAKE_NS_MODE", "shuffled")
    settings = nerf_settings("nerf=nerfacto", f"nerf.env_path={ns_env}", f"nerf.holdout_every={HOLDOUT_EVERY}")
    with pytest.raises(NerfstudioError, match=r"eval_img_0000.png does not show held-out frame 0 .*ns-eval's order differs"):
        train_field(masks, tmp_path / "train", settings, "fp")


def test_nerfacto_failure_quotes_the_end_of_the_log(masks, tmp_path, ns_env, monkeypatch):
    monkeypatch.setenv("FAKE_NS_MODE", "fail")
    settings = nerf_settings("nerf=nerfacto", f"nerf.env_path={ns_env}")
    with pytest.raises(NerfstudioError, match=r"(?s)ns-train failed with exit status 3.*no kernel image is available"):
        train_field(masks, tmp_path / "train", settings, "fp")


def test_setup_env_script_prints_the_override(tmp_path):
    result = subprocess.run(["bash", str(REPO / "infra/nerfstudio/setup_env.sh"), str(tmp_path / "env")],
                            env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert f"+ python3 -m venv {tmp_path / 'env'}" in lines
    assert any("nerfstudio==1.1.5" in line for line in lines) and any("torch==2.1.2" in line for line in lines)
    assert lines[-1] == f"nerf=nerfacto nerf.env_path={tmp_path / 'env'}/bin"
    assert any("alexnet" in line for line in lines)  # LPIPS' backbone, fetched while there is internet
    refused = subprocess.run(["bash", str(REPO / "infra/nerfstudio/setup_env.sh"), str(tmp_path / "env")],
                             env={**os.environ, "DRY_RUN": "1", "TORCH_VERSION": "2.6.0"}, capture_output=True, text=True)
    assert refused.returncode == 2 and "need torch < 2.6" in refused.stderr and "+ " not in refused.stdout


def _load_shim(name: str):
    import importlib.util

    path = REPO / "bench/nerfstudio_offline/shims" / name / "__init__.py"
    spec = importlib.util.spec_from_file_location(f"shim_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_pymeshlab_shim_writes_the_tsdf_mesh_nerfstudio_hands_it(tmp_path):
    # What nerfstudio 1.1.5's TSDF.export_mesh passes: float64 vertices / normals, int32 faces, RGBA in 0..1.
    from tasks.nerf.mesh_field import read_mesh

    pymeshlab = _load_shim("pymeshlab")
    sphere = trimesh.creation.icosphere(subdivisions=2)
    rgba = np.concatenate([np.linspace(0, 1, len(sphere.vertices))[:, None].repeat(3, 1), np.ones((len(sphere.vertices), 1))], 1)
    mesh = pymeshlab.Mesh(vertex_matrix=sphere.vertices.astype("float64"), face_matrix=sphere.faces.astype("int32"),
                          v_normals_matrix=sphere.vertex_normals.astype("float64"), v_color_matrix=rgba)
    meshes = pymeshlab.MeshSet()
    meshes.add_mesh(mesh, "mesh")
    meshes.save_current_mesh(str(tmp_path / "tsdf_mesh.ply"))
    vertices, faces, colors = read_mesh(tmp_path / "tsdf_mesh.ply")
    assert np.allclose(vertices, sphere.vertices, atol=1e-6) and np.array_equal(faces, sphere.faces)
    assert np.allclose(colors, np.round(rgba[:, :3] * 255) / 255, atol=1e-6)
    with pytest.raises(NotImplementedError, match="meshing_decimation_quadric_edge_collapse"):
        meshes.meshing_decimation_quadric_edge_collapse(targetfacenum=100)


def test_offline_open3d_shim_imports_but_refuses_use():
    open3d = _load_shim("open3d")
    with pytest.raises(ImportError, match="open3d.geometry: .*use nerf.export_method=tsdf"):
        open3d.geometry.PointCloud()


def test_rgba_capture_cropped_to_the_product_keeps_every_pixel_where_its_camera_sees_it(masks, tmp_path):
    whole = prepare_rgba_capture(masks.transforms, tmp_path / "whole", HOLDOUT_EVERY)
    cropped = prepare_rgba_capture(masks.transforms, tmp_path / "cropped", HOLDOUT_EVERY, crop_margin=0.1)
    full, crop = json.loads(whole.transforms.read_text()), json.loads(cropped.transforms.read_text())
    w, h = crop["w"], crop["h"]
    assert w < full["w"] and h < full["h"] and "cx" not in crop and "cy" not in crop
    assert crop["fl_x"] == full["fl_x"] and crop["camera_model"] == full["camera_model"]  # focal and model unchanged
    for k, frame in enumerate(crop["frames"]):
        big = cv2.imread(str(whole.data_dir / full["frames"][k]["file_path"]), cv2.IMREAD_UNCHANGED)
        small = cv2.imread(str(cropped.data_dir / frame["file_path"]), cv2.IMREAD_UNCHANGED)
        x0, y0 = full["cx"] - frame["cx"], full["cy"] - frame["cy"]
        assert small.shape == (h, w, 4) and float(x0).is_integer() and float(y0).is_integer()
        # The principal point moved by the crop's corner, so each pixel keeps its ray...
        assert np.array_equal(small, big[int(y0):int(y0) + h, int(x0):int(x0) + w])
        # ...and nothing of the product is cut off.
        assert int((small[..., 3] > 0).sum()) == int((big[..., 3] > 0).sum()) > 0


def test_crop_keeps_a_frame_without_the_product_and_refuses_a_capture_without_any(tmp_path):
    paths = [tmp_path / f"{k}.png" for k in range(3)]
    for path, corner in zip(paths, [(10, 20), None, (60, 40)]):
        image = np.zeros((100, 120, 4), np.uint8)
        image[..., :3] = 90  # the background's colour stays under alpha 0
        if corner is not None:
            image[corner[1]:corner[1] + 30, corner[0]:corner[0] + 20] = 255  # a 20x30 product
        cv2.imwrite(str(path), image)
    frames = [{"file_path": p.name} for p in paths]
    camera = {"cx": 60.0, "cy": 50.0, "w": 120, "h": 100}
    crop_to_product(paths, frames, camera, 0.5)  # the empty frame (1) is no error
    assert (camera["w"], camera["h"]) == (40, 60)  # the products' size grown by half of it on each side
    empty = cv2.imread(str(paths[1]), cv2.IMREAD_UNCHANGED)
    assert empty.shape == (60, 40, 4) and empty[..., 3].max() == 0  # all background, and still trained on
    assert (frames[1]["cx"], frames[1]["cy"]) == (20.0, 30.0)  # cut around the frame's centre
    assert [int((cv2.imread(str(p), cv2.IMREAD_UNCHANGED)[..., 3] > 0).sum()) for p in paths] == [600, 0, 600]
    blank = tmp_path / "blank"
    blank.mkdir()
    cv2.imwrite(str(blank / "0.png"), np.zeros((50, 50, 4), np.uint8))
    with pytest.raises(CaptureError, match="every mask of .*blank is empty"):
        crop_to_product([blank / "0.png"], [{}], {"cx": 25.0, "cy": 25.0}, 0.1)


def test_nerfacto_trains_on_frames_cropped_to_the_product(masks, tmp_path, ns_env):
    settings = nerf_settings("nerf=nerfacto", f"nerf.env_path={ns_env}", "nerf.crop_margin=0.1",  # crop_to_product: the default
                             f"nerf.holdout_every={HOLDOUT_EVERY}", "nerf.mesh_field_resolution=64")
    trained = train_field(masks, tmp_path / "train", settings, "fp")
    data = json.loads((tmp_path / "train/data/transforms.json").read_text())
    assert data["w"] < SIZE and all("cx" in frame for frame in data["frames"])
    assert calls(ns_env)[0][calls(ns_env)[0].index("--data") + 1] == str(tmp_path / "train/data/transforms.json")
    # The held-out renders pair with the cropped frames (a crop of another size would be refused).
    assert json.loads(trained.metrics.read_text())["extra"]["psnr_holdout_object_on_black"] > 20
