"""Mesh stage against an analytic field (tests/analytic_field.py): shape, cleaning, colour, export."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml
from PIL import Image
from scipy.spatial import cKDTree

import tasks.mesh as mesh_stage
import tasks.mesh_preview as preview
from tasks.mesh import MeshBudgetError, MeshSettings, extract_mesh
from tasks.mesh_export import Z_UP_TO_Y_UP
from tasks.mesh_geometry import EmptyFieldError
from tasks.mesh_texture import srgb_to_linear
from tasks.mesh_unwrap import UnwrapError
from tests.analytic_field import AnalyticField, SphereSpec, quadrant_color, write_analytic_field, write_masks

SPHERE = SphereSpec()
WITH_FLOATER = replace(SPHERE, floater_centre=(0.75, 0.7, -0.7))
CENTRE = np.asarray(SPHERE.centre)
# Small and fast: the analytic sphere's iso-surface at sigma_max / 2 is exactly the sphere.
FAST = MeshSettings(
    grid_resolution=64, density_threshold=SPHERE.sigma_max / 2, max_triangles=3000, min_triangles=500,
    texture_size=256, min_texture_size=128, max_glb_bytes=400_000, color_views=3, color_ray_samples=4,
    unwrap_in_subprocess=True,
)


def to_world(points_y_up: np.ndarray) -> np.ndarray:
    """GLB/OBJ axes (+Y up) back to the field's world (+Z up)."""
    return points_y_up @ Z_UP_TO_Y_UP


def off_boundaries(points: np.ndarray, margin: float = 0.08) -> np.ndarray:
    """Points away from the colour pattern's quadrant edges (where averaging blurs colours)."""
    rel = points - CENTRE
    return (np.abs(rel[:, 0]) > margin) & (np.abs(rel[:, 2]) > margin)


def run(tmp: Path, spec: SphereSpec, settings: MeshSettings, mask_spec: SphereSpec | None = None, grid: int | None = None):
    field = write_analytic_field(tmp / "field", spec)
    masks = write_masks(tmp / "masks", AnalyticField(spec), views=8, size=64, grid=grid, hull_spec=mask_spec)
    return extract_mesh(field, masks, tmp / "mesh", settings, fingerprint="fp-test")


@pytest.fixture(scope="module")
def web_run(tmp_path_factory):
    """Field with a floater that the masks do not show; the main textured export."""
    tmp = tmp_path_factory.mktemp("web")
    asset = run(tmp, WITH_FLOATER, FAST, mask_spec=SPHERE)
    return asset, json.loads(asset.metrics.read_text())


def test_recovers_the_sphere(web_run):
    asset, metrics = web_run
    glb = trimesh.load(asset.glb, force="mesh")
    verts = to_world(glb.vertices)
    lo, hi = CENTRE - SPHERE.radius, CENTRE + SPHERE.radius
    np.testing.assert_allclose(verts.min(0), lo, atol=0.03 * 2 * SPHERE.radius)
    np.testing.assert_allclose(verts.max(0), hi, atol=0.03 * 2 * SPHERE.radius)
    np.testing.assert_allclose(metrics["bbox_world_zup"]["min"], verts.min(0), atol=1e-5)
    # Chamfer both ways against the analytic surface.
    to_surface = np.abs(np.linalg.norm(verts - CENTRE, axis=1) - SPHERE.radius)
    golden = np.pi * (3 - np.sqrt(5)) * np.arange(4000)
    z = 1 - 2 * (np.arange(4000) + 0.5) / 4000
    truth = CENTRE + SPHERE.radius * np.stack([np.sqrt(1 - z**2) * np.cos(golden), np.sqrt(1 - z**2) * np.sin(golden), z], 1)
    from_surface, _ = cKDTree(verts).query(truth)
    assert to_surface.mean() < 0.01 * SPHERE.radius
    assert from_surface.mean() < 0.05 * SPHERE.radius
    assert glb.volume > 0  # outward-facing triangles (signed volume)
    assert glb.volume == pytest.approx(4 / 3 * np.pi * SPHERE.radius**3, rel=0.05)


def test_floater_is_culled_by_the_mask_hull(web_run):
    asset, metrics = web_run
    verts = to_world(trimesh.load(asset.glb, force="mesh").vertices)
    assert np.linalg.norm(verts - np.asarray(WITH_FLOATER.floater_centre), axis=1).min() > 0.2
    assert metrics["hull_cull"] == "mask_votes"
    assert metrics["triangles_culled_by_hull"] > 0


def test_budget_and_material(web_run):
    asset, metrics = web_run
    assert asset.fingerprint == "fp-test" and asset.triangles == metrics["triangles"]
    assert metrics["triangles_clean"] > FAST.max_triangles >= metrics["triangles"]
    assert asset.glb.stat().st_size == metrics["glb_bytes"] <= FAST.max_glb_bytes
    glb = trimesh.load(asset.glb, force="mesh")
    assert len(glb.faces) == metrics["triangles"]
    material = glb.visual.material
    assert material.metallicFactor == 0.0
    assert material.roughnessFactor == pytest.approx(FAST.roughness)
    assert material.baseColorTexture.size == (FAST.texture_size, FAST.texture_size)
    assert set(metrics["seconds"]) >= {"grid", "marching_cubes", "cleaning", "decimation", "texture", "export"}


def test_glb_is_y_up(web_run):
    asset, _ = web_run
    bounds = trimesh.load(asset.glb, force="mesh").bounds
    # The sphere sits at world z = 0.2 (up) and world y = -0.05 (→ glTF z = +0.05).
    assert bounds.mean(0)[1] == pytest.approx(SPHERE.centre[2], abs=0.02)
    assert bounds.mean(0)[2] == pytest.approx(-SPHERE.centre[1], abs=0.02)


def test_texture_has_the_pattern(web_run):
    asset, metrics = web_run
    glb = trimesh.load(asset.glb, force="mesh")
    image = np.asarray(glb.visual.material.baseColorTexture.convert("RGB"), dtype=np.float64) / 255
    size = image.shape[0]
    face_uv = glb.visual.uv[glb.faces].mean(1)
    face_pos = to_world(glb.vertices[glb.faces].mean(1))
    rows = np.clip(((1 - face_uv[:, 1]) * size).astype(int), 0, size - 1)
    cols = np.clip((face_uv[:, 0] * size).astype(int), 0, size - 1)
    keep = off_boundaries(face_pos)
    error = np.abs(srgb_to_linear(image[rows, cols]) - quadrant_color(face_pos, CENTRE)).max(1)[keep]
    assert np.mean(error < 0.08) > 0.95
    assert metrics["texture_coverage"] > 0.2


def test_obj_and_mtl_load_back(web_run):
    asset, metrics = web_run
    mtl = Path(asset.extra["mtl"]).read_text()
    assert "map_Kd model_texture.jpg" in mtl
    obj = trimesh.load(asset.obj, force="mesh")
    glb = trimesh.load(asset.glb, force="mesh")
    assert len(obj.faces) == metrics["triangles"]
    np.testing.assert_allclose(obj.bounds, glb.bounds, atol=1e-4)
    assert obj.visual.material.image.size == (FAST.texture_size, FAST.texture_size)


@pytest.mark.parametrize("how", ["texture_size_0", "unwrap_crashes"])
def test_vertex_colours_fallback(tmp_path, monkeypatch, how):
    settings = replace(FAST, grid_resolution=48)
    if how == "texture_size_0":
        settings = replace(settings, texture_size=0)
    else:
        def crash(*args, **kwargs):
            raise UnwrapError("simulated xatlas crash")

        monkeypatch.setattr(mesh_stage, "unwrap", crash)
    asset = run(tmp_path, SPHERE, settings)
    metrics = json.loads(asset.metrics.read_text())
    assert (metrics["texture_error"] is not None) == (how == "unwrap_crashes")
    (glb,) = trimesh.load(asset.glb, process=False).geometry.values()  # force="mesh" drops COLOR_0
    # trimesh keeps COLOR_0 (linear) as a vertex attribute when the primitive also has a material.
    colours = np.asarray(glb.visual.vertex_attributes["color"])[:, :3]
    colours = colours / 255 if colours.dtype.kind in "ui" else colours
    pos = to_world(glb.vertices)
    keep = off_boundaries(pos)
    error = np.abs(colours - quadrant_color(pos, CENTRE)).max(1)[keep]
    assert np.mean(error < 0.05) > 0.95
    assert glb.visual.material.metallicFactor == 0.0
    obj = trimesh.load(asset.obj, force="mesh")
    assert len(obj.faces) == len(glb.faces)
    # OBJ vertex colours ("v x y z r g b", sRGB as three.js OBJLoader reads them).
    rows = np.array([line.split()[1:] for line in asset.obj.read_text().splitlines() if line.startswith("v ")], dtype=float)
    assert rows.shape == (len(glb.vertices), 6)
    obj_pos = to_world(rows[:, :3])
    error = np.abs(srgb_to_linear(rows[:, 3:]) - quadrant_color(obj_pos, CENTRE)).max(1)[off_boundaries(obj_pos)]
    assert np.mean(error < 0.05) > 0.95


def test_components_drop_floater_without_hull(tmp_path):
    settings = replace(FAST, grid_resolution=48, texture_size=0, hull_cull=False)
    asset = run(tmp_path, WITH_FLOATER, settings)
    metrics = json.loads(asset.metrics.read_text())
    verts = to_world(trimesh.load(asset.glb, force="mesh").vertices)
    assert metrics["components_dropped"] == 1 and metrics["hull_cull"] == "off"
    assert np.linalg.norm(verts - np.asarray(WITH_FLOATER.floater_centre), axis=1).min() > 0.2


def test_hull_grid_culls_floater(tmp_path):
    settings = replace(FAST, grid_resolution=48, texture_size=0, keep_component_fraction=0.0)
    asset = run(tmp_path, WITH_FLOATER, settings, mask_spec=SPHERE, grid=32)
    metrics = json.loads(asset.metrics.read_text())
    verts = to_world(trimesh.load(asset.glb, force="mesh").vertices)
    assert metrics["hull_cull"] == "hull_grid" and metrics["triangles_culled_by_hull"] > 0
    assert np.linalg.norm(verts - np.asarray(WITH_FLOATER.floater_centre), axis=1).min() > 0.2
    assert np.abs(np.linalg.norm(verts - CENTRE, axis=1) - SPHERE.radius).max() < 0.05


def test_empty_field_has_a_clear_error(tmp_path):
    with pytest.raises(EmptyFieldError, match="learned no product.*density_threshold"):
        run(tmp_path, replace(SPHERE, empty=True), replace(FAST, grid_resolution=32))


def test_glb_budget_lowers_texture_then_triangles(tmp_path):
    settings = replace(FAST, texture_format="png", max_glb_bytes=45_000, unwrap_in_subprocess=False)
    asset = run(tmp_path, SPHERE, settings)
    metrics = json.loads(asset.metrics.read_text())
    steps = metrics["budget_adjustments"]
    assert steps[0] == "texture_format png -> jpeg"
    assert any(s.startswith("texture_size") for s in steps)
    assert any(s.startswith("max_triangles") for s in steps)
    # texture adjustments come before the first triangle cut
    assert max(i for i, s in enumerate(steps) if s.startswith("texture")) < min(i for i, s in enumerate(steps) if s.startswith("max_tri"))
    assert asset.glb.stat().st_size <= settings.max_glb_bytes
    assert metrics["triangles"] < settings.max_triangles and metrics["texture_format"] == "jpeg"


def test_impossible_budget_has_a_clear_error(tmp_path):
    settings = replace(FAST, grid_resolution=32, texture_size=0, max_glb_bytes=2_000, min_triangles=1000)
    with pytest.raises(MeshBudgetError, match="max_glb_bytes"):
        run(tmp_path, SPHERE, settings)


def test_turntable_preview(web_run, tmp_path, monkeypatch):
    asset, _ = web_run
    for name in ("pyrender", "splat"):
        if name == "splat":
            monkeypatch.setattr(preview, "_render_pyrender", lambda *a: (_ for _ in ()).throw(ImportError("no pyrender")))
        out = preview.turntable_preview(asset.glb, tmp_path / f"{name}.png", views=3, size=64)
        strip = np.asarray(Image.open(out).convert("RGB"), dtype=np.int32)
        assert strip.shape == (64, 3 * 64, 3)
        frames = strip.reshape(64, 3, 64, 3).transpose(1, 0, 2, 3)
        product = np.abs(frames - 255).sum(-1) > 30  # not background
        assert all(0.05 < p.mean() < 0.9 for p in product), name
        red = (frames[..., 0] > 150) & (frames[..., 1] < 100) & (frames[..., 2] < 100)
        assert red.any(), f"{name}: the red quadrant should show in some view"


@pytest.mark.parametrize("preset", ["preview", "web", "full"])
def test_presets_load_and_are_commented(preset):
    path = Path(__file__).resolve().parents[1] / "conf" / "mesh" / f"{preset}.yaml"
    settings = MeshSettings(**yaml.safe_load(path.read_text()))
    limits = {"preview": (25_000, 1024), "web": (100_000, 2048), "full": (250_000, 4096)}[preset]
    assert settings.max_triangles <= limits[0] and settings.texture_size == limits[1]
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, f"{path.name}: key without a comment: {line}"


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="mesh.texture_format"):
        replace(FAST, texture_format="webp")
    with pytest.raises(ValueError, match="mesh.min_triangles"):
        replace(FAST, min_triangles=10 * FAST.max_triangles)
