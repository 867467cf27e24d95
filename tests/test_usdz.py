"""model.usdz for Apple Quick Look (tasks/mesh_usdz.py): a sound package that reads back as written.

usd-core (the ``usdz`` extra, part of ``test``) is needed by the tests that write packages; the
skip / failure paths of the mesh stage's step run without it.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

import tasks.mesh_usdz as usdz
from tasks.shard import reassemble, shard_assets
from tasks.types import MeshAsset

needs_pxr = pytest.mark.skipif(not usdz.usd_available(), reason="usd-core (the usdz extra) is not installed")


def textured_sphere(subdivisions: int, texture_px: int) -> tuple[trimesh.Trimesh, np.ndarray, bytes]:
    """An icosphere (+Y up), uv from longitude / latitude (v up), and a JPEG texture with a gradient."""
    sphere = trimesh.creation.icosphere(subdivisions)
    v = sphere.vertices
    uv = np.stack([np.arctan2(v[:, 0], v[:, 2]) / (2 * np.pi) + 0.5, np.arccos(np.clip(-v[:, 1], -1, 1)) / np.pi], 1)
    ramp = np.linspace(0, 255, texture_px, dtype=np.uint8)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((texture_px, texture_px), 90, np.uint8)), -1)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=85)
    return sphere, uv, buf.getvalue()


@needs_pxr
def test_textured_package_is_sound_and_reads_back(tmp_path):
    sphere, uv, jpeg = textured_sphere(3, 256)
    path = usdz.write_usdz(tmp_path / "model.usdz", sphere.vertices, sphere.vertex_normals, sphere.faces, 0.65,
                           uv=uv, texture=jpeg, texture_format="jpeg")
    assert usdz.usdz_problems(path) == []
    names = [info.filename for info in zipfile.ZipFile(path).infolist()]
    assert names == ["model.usdc", "model_texture.jpg"]  # the layer first, the texture inside the package
    back = usdz.read_usdz(path)
    assert len(back["faces"]) == len(sphere.faces) and len(back["points"]) == len(sphere.vertices)
    np.testing.assert_array_equal(back["faces"], sphere.faces)
    np.testing.assert_allclose(back["points"], sphere.vertices, atol=1e-6)
    np.testing.assert_allclose(back["normals"], sphere.vertex_normals, atol=1e-6)
    np.testing.assert_allclose(back["uv"], uv, atol=1e-6)
    assert back["texture"] == jpeg and back["texture_file"] == "./model_texture.jpg"
    assert back["up_axis"] == "Y" and back["meters_per_unit"] == 1.0
    assert back["metallic"] == 0.0 and back["roughness"] == pytest.approx(0.65)


@needs_pxr
def test_vertex_colour_package(tmp_path):
    from pxr import Usd, UsdGeom

    sphere = trimesh.creation.icosphere(2)
    colours = np.clip(sphere.vertices * 0.5 + 0.5, 0, 1)
    path = usdz.write_usdz(tmp_path / "model.usdz", sphere.vertices, sphere.vertex_normals, sphere.faces, 0.7,
                           colors_linear=colours)
    assert usdz.usdz_problems(path) == []
    assert [i.filename for i in zipfile.ZipFile(path).infolist()] == ["model.usdc"]
    back = usdz.read_usdz(path)
    assert back["texture"] is None and back["uv"] is None
    stage = Usd.Stage.Open(str(path))  # kept: prims die with their stage
    mesh = UsdGeom.Mesh(stage.GetPrimAtPath("/product/mesh"))
    np.testing.assert_allclose(np.asarray(mesh.GetDisplayColorPrimvar().Get()), colours, atol=1e-6)


@needs_pxr
def test_checks_find_broken_packages(tmp_path):
    from pxr import Sdf, Usd, UsdGeom, UsdShade, UsdUtils

    sphere, uv, jpeg = textured_sphere(1, 64)
    good = usdz.write_usdz(tmp_path / "good.usdz", sphere.vertices, sphere.vertex_normals, sphere.faces, 0.7,
                           uv=uv, texture=jpeg)
    # Zipped by a plain zip tool: deflated, unaligned, texture first.
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "zipped.usdz", "w", zipfile.ZIP_DEFLATED) as out:
        for info in reversed(src.infolist()):
            out.writestr(info.filename, src.read(info.filename))
    problems = " | ".join(usdz.zip_layout_problems(tmp_path / "zipped.usdz"))
    assert "first entry is good_texture.jpg" in problems and "compressed" in problems and "multiple of 64" in problems
    assert "cannot open" in usdz.validator_problems(tmp_path / "zipped.usdz")[0]

    # Well packaged, but no stage metadata and a shader Quick Look does not render.
    stage = Usd.Stage.CreateNew(str(tmp_path / "plain.usda"))
    UsdGeom.Mesh.Define(stage, "/mesh")
    UsdShade.Shader.Define(stage, "/mesh/look").CreateIdAttr("ND_standard_surface_surfaceshader")
    stage.GetRootLayer().Save()
    assert UsdUtils.CreateNewUsdzPackage(Sdf.AssetPath(str(tmp_path / "plain.usda")), str(tmp_path / "plain.usdz"))
    assert usdz.zip_layout_problems(tmp_path / "plain.usdz") == []
    problems = " | ".join(usdz.validator_problems(tmp_path / "plain.usdz"))
    assert "upAxis" in problems and "metersPerUnit" in problems and "defaultPrim" in problems
    assert "not one Quick Look renders" in problems


@needs_pxr
def test_pipeline_sized_mesh_converts(tmp_path):
    """Web-preset scale: ~82k triangles and a 2048² texture (speed is measured in bench/, not here)."""
    sphere, uv, jpeg = textured_sphere(6, 2048)
    arrays = {"vertices": sphere.vertices, "normals": sphere.vertex_normals, "faces": sphere.faces, "uv": uv, "colors": None}
    path, metrics = usdz.export_usdz(True, tmp_path / "model.usdz", arrays, jpeg, "jpeg", 0.7, "srgb")
    assert metrics == {"usdz": "written", "usdz_bytes": path.stat().st_size}
    back = usdz.read_usdz(path)
    assert len(back["faces"]) == len(sphere.faces) == 81920 and len(back["points"]) == len(sphere.vertices)
    assert Image.open(io.BytesIO(back["texture"])).size == (2048, 2048)
    assert usdz.usdz_problems(path) == []


def test_export_is_skipped_with_a_log_line_without_usd_core(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pxr", None)  # `import pxr.Usd` now fails as if usd-core were absent
    assert not usdz.usd_available()
    sphere = trimesh.creation.icosphere(1)
    arrays = {"vertices": sphere.vertices, "normals": sphere.vertex_normals, "faces": sphere.faces, "uv": None,
              "colors": np.full((len(sphere.vertices), 3), 0.5)}
    with caplog.at_level(logging.INFO, logger="tasks.mesh_usdz"):
        path, metrics = usdz.export_usdz(True, tmp_path / "model.usdz", arrays, None, "jpeg", 0.7, "srgb")
    assert path is None and metrics["usdz_bytes"] is None and metrics["usdz"].startswith("skipped: usd-core is not installed")
    assert "pip install 'korokoro[usdz]'" in caplog.text
    assert not (tmp_path / "model.usdz").exists()
    assert usdz.export_usdz(False, tmp_path / "model.usdz", arrays, None, "jpeg", 0.7, "srgb") == (
        None, {"usdz": "off (mesh.usdz=false)", "usdz_bytes": None})


@needs_pxr
def test_a_pxr_failure_costs_only_the_usdz(tmp_path, monkeypatch, caplog):
    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"half a package")
        raise RuntimeError("simulated pxr error")

    monkeypatch.setattr(usdz, "write_usdz", broken)
    sphere = trimesh.creation.icosphere(1)
    arrays = {"vertices": sphere.vertices, "normals": sphere.vertex_normals, "faces": sphere.faces, "uv": None, "colors": None}
    path, metrics = usdz.export_usdz(True, tmp_path / "model.usdz", arrays, None, "jpeg", 0.7, "linear")
    assert path is None and metrics["usdz"] == "failed: RuntimeError: simulated pxr error"
    assert not (tmp_path / "model.usdz").exists()  # nothing half-written is left to be published
    assert "model.usdz was not written" in caplog.text


@needs_pxr
def test_shard_publishes_the_usdz_with_its_role(tmp_path):
    """The manifest entry the viewer looks for (viewer/src/shards.js usdzAsset: role "usdz")."""
    sphere, uv, jpeg = textured_sphere(2, 64)
    path = usdz.write_usdz(tmp_path / "model.usdz", sphere.vertices, sphere.vertex_normals, sphere.faces, 0.7,
                           uv=uv, texture=jpeg)
    (tmp_path / "model.glb").write_bytes(b"glb")
    (tmp_path / "model.obj").write_text("o\n")
    (tmp_path / "metrics.json").write_text("{}")
    asset = MeshAsset(dir=tmp_path, glb=tmp_path / "model.glb", obj=tmp_path / "model.obj", triangles=len(sphere.faces),
                      metrics=tmp_path / "metrics.json", fingerprint="f", extra={"usdz": str(path)})
    shards = shard_assets(asset, "u1", tmp_path / "shard", part_bytes=4096, fingerprint="s")
    manifest = json.loads(shards.manifests[0].read_text())
    entry = next(a for a in manifest["assets"] if a["role"] == "usdz")
    assert entry["name"] == "model.usdz" and entry["content_type"] == "model/vnd.usdz+zip" and len(entry["parts"]) > 1
    back = reassemble(manifest, "model.usdz", lambda n: (tmp_path / "shard" / n).read_bytes(), tmp_path / "back.usdz")
    assert back.read_bytes() == path.read_bytes() and usdz.usdz_problems(back) == []
