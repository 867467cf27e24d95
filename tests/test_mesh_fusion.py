"""Surface from fused depth (tasks/mesh_fusion.py): the analytic sphere, hidden space, the base."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
import trimesh

from tasks.mesh import MeshSettings, extract_mesh
from tasks.mesh_fusion import FusionSettings, _surface_depth, fill_hidden
from tasks.nerf.rays import composite
from tests.analytic_field import AnalyticField, SphereSpec, write_analytic_field, write_masks
from tests.test_mesh import FAST, SPHERE, WITH_FLOATER, CENTRE, to_world

FUSED = replace(FAST, surface="depth_fusion", fusion=FusionSettings(views=12, long_side=96))
SPHERE_VOLUME = 4 / 3 * np.pi * SPHERE.radius**3


def fused_mesh(tmp_path, spec: SphereSpec, heights: tuple[float, ...], erode_first_mask_px: int = 0, **settings):
    field = write_analytic_field(tmp_path / "field", spec)
    masks = write_masks(tmp_path / "masks", AnalyticField(spec), views=12, size=96, hull_spec=SPHERE, heights=heights)
    if erode_first_mask_px:
        first = masks.dir / json.loads(masks.transforms.read_text())["frames"][0]["mask_path"]
        image = cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(first), cv2.erode(image, np.ones((2 * erode_first_mask_px + 1,) * 2, np.uint8)))
    fusion = {k: settings.pop(k) for k in list(settings) if k in FusionSettings.__dataclass_fields__}
    asset = extract_mesh(field, masks, tmp_path / "mesh", replace(FUSED, fusion=replace(FUSED.fusion, **fusion), **settings), fingerprint="fp")
    metrics = json.loads(asset.metrics.read_text())
    glb = trimesh.load(asset.glb, force="mesh")
    return to_world(np.asarray(glb.vertices)), glb, metrics


def test_fused_sphere_seen_from_all_round(tmp_path):
    """Cameras above, level and below: the sphere comes back closed, and the floater the masks do
    not show is carved away by them (no density level, no hull cull needed)."""
    verts, glb, metrics = fused_mesh(tmp_path, WITH_FLOATER, heights=(1.5, 0.0, -1.5), close_base=False, hull_cull=False)
    assert metrics["surface"] == "depth_fusion" and metrics["fusion"]["views"] == 12
    to_surface = np.abs(np.linalg.norm(verts - CENTRE, axis=1) - SPHERE.radius)
    assert to_surface.mean() < 0.02 * SPHERE.radius
    np.testing.assert_allclose(verts.min(0), CENTRE - SPHERE.radius, atol=0.04 * SPHERE.radius)
    np.testing.assert_allclose(verts.max(0), CENTRE + SPHERE.radius, atol=0.04 * SPHERE.radius)
    assert np.linalg.norm(verts - np.asarray(WITH_FLOATER.floater_centre), axis=1).min() > 0.2
    assert glb.volume == pytest.approx(SPHERE_VOLUME, rel=0.06)


def test_base_closes_what_no_camera_sees(tmp_path):
    """Cameras only above (a filmed orbit): with close_base the bottom is cut flat at the lowest
    surface seen and the product stays solid; without it the hidden underside opens onto the
    empty space below and only a shell is left, which is why the base is closed."""
    verts, glb, metrics = fused_mesh(tmp_path / "closed", SPHERE, heights=(1.0, 1.5))
    base = metrics["fusion"]["base_z"]
    assert CENTRE[2] - SPHERE.radius < base < CENTRE[2]
    assert verts[:, 2].min() == pytest.approx(base, abs=0.05)
    # A flat base: many vertices lie in the plane at the bottom.
    assert (verts[:, 2] < verts[:, 2].min() + 0.02).sum() > 50
    # The sphere above the cut, within a few per cent.
    h = base - (CENTRE[2] - SPHERE.radius)
    cap = np.pi * h**2 * (3 * SPHERE.radius - h) / 3
    assert glb.volume == pytest.approx(SPHERE_VOLUME - cap, rel=0.08)
    _, open_glb, open_metrics = fused_mesh(tmp_path / "open", SPHERE, heights=(1.0, 1.5), close_base=False)
    assert "base_z" not in open_metrics["fusion"]
    assert open_glb.volume < 0.6 * glb.volume


def test_one_short_mask_does_not_cut_into_the_product(tmp_path):
    """One of 12 masks eroded by 8 px (a shadow at the base, a soft edge): its background votes
    stay under ``mesh.fusion.carve_fraction`` and the sphere keeps its volume; carving on any single
    vote (the visual hull's rule) would cut a groove into it."""
    heights = (1.5, 0.0, -1.5)
    _, glb, _ = fused_mesh(tmp_path / "robust", SPHERE, heights, erode_first_mask_px=8, close_base=False, hull_cull=False)
    assert glb.volume == pytest.approx(SPHERE_VOLUME, rel=0.06)
    _, strict, _ = fused_mesh(tmp_path / "strict", SPHERE, heights, erode_first_mask_px=8, close_base=False,
                              hull_cull=False, carve_fraction=0.0)
    assert strict.volume < 0.9 * glb.volume


def _shell(n: int = 24, lo: int = 6, hi: int = 18) -> tuple[np.ndarray, np.ndarray]:
    """Grids of a cube seen from outside: voxels in [lo, hi)³ minus a 2-voxel band are hidden,
    the band is a seen surface, everything else seen empty."""
    observed = np.ones((n, n, n), bool)
    free = np.ones((n, n, n), bool)
    free[lo:hi, lo:hi, lo:hi] = False
    observed[lo + 2 : hi - 2, lo + 2 : hi - 2, lo + 2 : hi - 2] = False
    return observed, free


def test_hidden_inside_of_a_closed_product_is_solid_despite_a_leak():
    observed, free = _shell()
    free[6, 12, 12] = free[7, 12, 12] = True  # a mask a pixel short marks a path through the wall as empty
    solid = fill_hidden(observed, free, open_fraction=0.05)
    assert solid[8:16, 8:16, 8:16].all() and solid.sum() == 8**3
    # Any contact at all would have hollowed it out.
    assert not fill_hidden(observed, free, open_fraction=0.0).any()


def test_hidden_depths_of_an_open_container_are_empty():
    observed, free = _shell()
    # The top is open: the upper part of the cavity is seen empty, its depths are not.
    observed[8:16, 8:16, 12:18] = True
    free[8:16, 8:16, 12:] = True
    assert not fill_hidden(observed, free, open_fraction=0.05).any()


@pytest.mark.parametrize("level", [0.25, 0.5, 0.75])
def test_surface_depth_is_where_opacity_reaches_the_level(level):
    t = torch.linspace(0.0, 2.0, 201)[None].repeat(2, 1)
    sigmas = torch.zeros(2, 201)
    sigmas[0, 100:] = 50.0  # a wall at t = 1
    sigmas[1, 100:] = 0.1  # a faint haze: never a quarter opaque
    out = composite(sigmas, torch.zeros(2, 201, 3), t, 0.01, surface_opacity=level)
    reached_at = 1.0 - np.log(1.0 - level) / 50.0  # 1 - exp(-50 (t - 1)) = level
    assert out["depth_surface"][0] == pytest.approx(reached_at, abs=0.011)
    assert out["depth_surface"][1] == 0.0 and out["alpha"][1] < level
    assert "depth_surface" not in composite(sigmas, torch.zeros(2, 201, 3), t, 0.01)


def test_solid_alpha_looks_through_a_haze_to_the_wall_behind_it():
    """A haze in front of a wall (a field's fog in a basket's cavity) passes a low surface level
    on its own; with solid_alpha only the wall's samples count."""
    t = torch.linspace(0.0, 2.0, 201)[None].repeat(2, 1)
    sigmas = torch.zeros(2, 201)
    sigmas[:, 20:100] = 2.0  # t 0.2-1.0: haze, 2 % opaque a step, ~80 % opaque over its depth
    sigmas[0, 100:] = 50.0  # a wall at t = 1 behind it...
    out = composite(sigmas, torch.zeros(2, 201, 3), t, 0.01, surface_opacity=0.3)
    assert float(out["depth_surface"][0]) < 0.5  # ...that the plain level never reaches
    solid = composite(sigmas, torch.zeros(2, 201, 3), t, 0.01, surface_opacity=0.3, solid_alpha=0.1)
    # Without the haze the wall's first sample (39 % opaque) crosses 0.3; the haze alone never does.
    assert 1.0 <= float(solid["depth_surface"][0]) <= 1.05
    assert solid["depth_surface"][1] == 0.0 and out["depth_surface"][1] > 0
    fused = _surface_depth({**solid, "alpha": solid["alpha"]}, FusionSettings(min_alpha=0.5, surface_opacity=0.3, solid_alpha=0.1))
    assert 1.0 <= float(fused[0]) <= 1.05 and torch.isnan(fused[1])


def test_fusion_takes_the_depth_at_the_surface_opacity_and_drops_faint_rays():
    out = {"alpha": torch.tensor([0.9, 0.4, 0.7]), "depth": torch.tensor([2.0, 1.0, 1.0]), "depth_surface": torch.tensor([1.5, 0.0, 1.2])}
    depth = _surface_depth(out, FusionSettings(min_alpha=0.5, surface_opacity=0.6))
    assert depth[0] == 1.5 and depth[2] == 1.2 and torch.isnan(depth[1])
    # An opaque renderer's mean depth stands in where no surface depth is rendered.
    opaque = _surface_depth({"alpha": torch.tensor([1.0, 0.0]), "depth": torch.tensor([2.0, 0.0])}, FusionSettings())
    assert opaque[0] == 2.0 and torch.isnan(opaque[1])
    with pytest.raises(ValueError, match="surface_opacity=1.0"):
        FusionSettings(surface_opacity=1.0)


def test_fusion_settings_are_checked():
    with pytest.raises(ValueError, match="mesh.surface"):
        MeshSettings(surface="poisson")
    with pytest.raises(ValueError, match=r"mesh.fusion: views=0"):
        MeshSettings(fusion={"views": 0})
    assert MeshSettings(fusion={"views": 8}).fusion == FusionSettings(views=8)  # Hydra hands a mapping


class _Slab:
    """An opaque slab ``|x| <= half`` filling every view: the depth of the face a camera looks at."""

    def __init__(self, half: float) -> None:
        self.half = half

    def render(self, c2w, intrinsics, width, height, surface_opacity=0.5, solid_alpha=0.0):  # noqa: ANN001
        fx, fy, cx, cy = (float(v) for v in intrinsics)
        v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        dirs = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], -1) @ c2w[:3, :3].T
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        eye_x = float(c2w[0, 3])
        depth = (abs(eye_x) - self.half) / (dirs[..., 0] * -np.sign(eye_x))
        return {"alpha": torch.ones(height, width), "depth": depth.float()}


def _slab_faces(tmp_path, half: float, **fusion) -> tuple[float, float]:
    """Where the fused signed distance of the slab seen from +x and -x changes sign along the x axis."""
    from tasks.mesh_fusion import fuse_depth
    from tests.analytic_field import look_at

    size, focal, frames = 32, 38.4, []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for k, eye in enumerate(([3.0, 0, 0], [-3.0, 0, 0])):
        cv2.imwrite(str(tmp_path / f"mask_{k}.png"), np.full((size, size), 255, np.uint8))
        frames.append({"file_path": f"f{k}.png", "mask_path": f"mask_{k}.png", "transform_matrix": look_at(np.array(eye), np.zeros(3)).tolist()})
    transforms = tmp_path / "transforms.json"
    transforms.write_text(json.dumps({"fl_x": focal, "fl_y": focal, "cx": size / 2, "cy": size / 2, "w": size, "h": size, "frames": frames}))
    box = np.array([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])
    settings = FusionSettings(views=2, long_side=32, close_base=False, **fusion)
    tsdf, record = fuse_depth(_Slab(half), box, 41, transforms, settings)  # voxel 0.025
    line, xs = tsdf[:, 20, 20], np.linspace(-0.5, 0.5, 41)
    inside = np.flatnonzero(line < 0)
    return float(xs[inside[0]]), float(xs[inside[-1]])


def test_a_thin_wall_seen_from_both_sides_keeps_both_faces(tmp_path):
    """A wall 0.1 thick, truncation 0.2: each side's full band behind its face reaches past the
    other face and thickens the wall there (a basket's woven side, seen from outside and through
    its opening). Writing only one voxel behind each face keeps both faces in place."""
    lo, hi = _slab_faces(tmp_path / "symmetric", half=0.05, truncation_voxels=8.0)
    assert hi - lo > 0.2
    lo, hi = _slab_faces(tmp_path / "behind", half=0.05, truncation_voxels=8.0, behind_voxels=1.0)
    assert lo == pytest.approx(-0.05, abs=0.026) and hi == pytest.approx(0.05, abs=0.026)
    with pytest.raises(ValueError, match="behind_voxels=9.0"):
        FusionSettings(truncation_voxels=8.0, behind_voxels=9.0)
