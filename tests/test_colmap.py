"""cameras stage: solve rendered turntables and compare with their true cameras.

Turntables: 48 frames per orbit at 320x240, the product on a textured floor in a room
(``background="cluttered"``), orbit at 1.5 bbox diagonals. 24 frames at 160x120 do not
register (20-40 SIFT features per frame), nor does a plain background (a product seen
alone gives planar / symmetric views), so these are the smallest turntables that solve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.colmap import CameraSolveError, ColmapSettings, orbit_pairs, solve_cameras
from tasks.types import FrameSet
from tests.truth import align_similarity, camera_errors, load_truth_cameras

CONF = Path(__file__).resolve().parents[1] / "conf" / "colmap" / "default.yaml"
TURNTABLE = dict(frames=48, width=320, height=240, distance_factor=1.5, background="cluttered")
CASES = [("basket", 20.0), ("basket", 45.0), ("macaroni_and_cheese", 20.0), ("macaroni_and_cheese", 45.0)]
REQUIRED_KEYS = {"camera_model", "fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "p1", "p2", "frames", "korokoro"}


def default_settings(**overrides) -> ColmapSettings:
    return ColmapSettings(**{**yaml.safe_load(CONF.read_text()), **overrides})


def frameset_from_video(video: Path, out_dir: Path) -> FrameSet:
    """Decode every frame of ``video`` to PNG plus frames.json (stands in for the frames stage)."""
    import av
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            rgb = frame.to_ndarray(format="rgb24")
            name = f"frame_{i:05d}.png"
            cv2.imwrite(str(out_dir / name), rgb[:, :, ::-1])
            entries.append({"file": name, "time_s": float(frame.time or 0.0), "sharpness": 1.0,
                            "width": rgb.shape[1], "height": rgb.shape[0]})
    index = out_dir / "frames.json"
    index.write_text(json.dumps({"video": str(video), "frames": entries}))
    return FrameSet(dir=out_dir, index=index, count=len(entries), width=entries[0]["width"],
                    height=entries[0]["height"], fingerprint="test")


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """Render, decode and solve each case once per module; ``solved(case) -> (rig, truth_dir)``."""
    turntable = pytest.importorskip("tools.turntable")
    renders: dict = {}
    cache: dict = {}

    def get(case, **overrides):
        if case not in renders:
            name, elevation = case
            root = tmp_path_factory.mktemp(f"{name}_{int(elevation)}")
            tt = turntable.render_turntable(name, root / "render", elevation_deg=elevation, **TURNTABLE)
            renders[case] = (root, frameset_from_video(tt.video, root / "frames"), tt.cameras.parent)
        key = (case, tuple(sorted(overrides.items())))
        if key not in cache:
            root, frames, truth_dir = renders[case]
            out = root / ("cameras-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) if overrides else "cameras")
            cache[key] = (solve_cameras(frames, out, default_settings(**overrides), "fp-test"), truth_dir)
        return cache[key]

    return get


def estimated_and_true(rig, truth_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Registered frames' estimated c2w ``(R, 4, 4)`` and the matching true c2w ``(R, 4, 4)``."""
    transforms = json.loads(Path(rig.transforms).read_text())
    truth = load_truth_cameras(truth_dir)
    indices = [int(Path(f["file_path"]).stem.split("_")[-1]) for f in transforms["frames"]]
    est = np.array([f["transform_matrix"] for f in transforms["frames"]])
    return est, truth.c2w[indices], transforms


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{int(e)}deg" for n, e in CASES])
def test_turntable_cameras_match_truth(solved, case):
    rig, truth_dir = solved(case)
    est, true, _ = estimated_and_true(rig, truth_dir)
    rot_err_deg, pos_err = camera_errors(est, true)
    meta = json.loads((truth_dir / "meta.json").read_text())
    radius = meta["orbit_radius_m"]
    assert rig.registered / rig.total >= 0.95, f"registered {rig.registered}/{rig.total}"
    assert np.median(rot_err_deg) <= 0.5, f"median rotation error {np.median(rot_err_deg):.3f} deg"
    assert np.median(pos_err) <= 0.01 * radius, f"median position error {100 * np.median(pos_err) / radius:.3f} % of radius"
    assert rig.reprojection_error_px < 1.0


def test_frames_stage_output_solves_within_the_same_bounds(solved, tmp_path):
    """The frames stage's JPEG picks, indexed by ``source_index``, meet the bounds too."""
    from bench.quality import camera_quality
    from tasks.frames import FrameSettings, extract_frames
    from tasks.types import VideoInput

    _, truth_dir = solved(CASES[0])
    video = truth_dir.parent / "video.mp4"
    frames = extract_frames(
        VideoInput("tt", "basket", "others", video, "-", 0, "tt"), tmp_path / "frames",
        FrameSettings(count=TURNTABLE["frames"], long_side=TURNTABLE["width"]), "fp",
    )
    rig = solve_cameras(frames, tmp_path / "cameras", default_settings(), "fp")
    quality = camera_quality(frames.index, rig.transforms, truth_dir)
    assert quality["registered"] / quality["frames"] >= 0.95, quality
    assert quality["rotation_error_deg_median"] <= 0.5 and quality["position_error_of_radius_median"] <= 0.01, quality


def test_normalised_world_is_centred_upright_and_scaled(solved):
    rig, truth_dir = solved(CASES[0])
    est, true, transforms = estimated_and_true(rig, truth_dir)
    meta = json.loads((truth_dir / "meta.json").read_text())
    radius = meta["orbit_radius_m"]
    scale, rot, trans = align_similarity(est[:, :3, 3], true[:, :3, 3])
    # The normalised origin (where the cameras look) lands on the orbit's true look-at point.
    origin_in_truth = trans
    assert np.linalg.norm(origin_in_truth - np.array(meta["look_at_m"])) <= 0.03 * radius
    # Normalised +Z is the true +Z.
    up_in_truth = rot @ np.array([0.0, 0.0, 1.0])
    assert np.degrees(np.arccos(np.clip(up_in_truth[2], -1.0, 1.0))) <= 3.0
    settings = default_settings()
    distances = np.linalg.norm(est[:, :3, 3], axis=1)
    assert np.isclose(distances.mean(), settings.camera_distance, rtol=1e-6)
    # The recorded similarity is a proper scaled rotation.
    sim = np.array(transforms["korokoro"]["normalization"])
    sim_scale = np.cbrt(np.linalg.det(sim[:3, :3]))
    assert sim_scale > 0 and np.allclose(sim[:3, :3] @ sim[:3, :3].T, sim_scale**2 * np.eye(3), atol=1e-6 * sim_scale**2)


def test_transforms_and_points_files(solved):
    rig, _ = solved(CASES[0])
    transforms = json.loads(Path(rig.transforms).read_text())
    assert REQUIRED_KEYS <= transforms.keys()
    assert transforms["w"] == TURNTABLE["width"] and transforms["h"] == TURNTABLE["height"]
    info = transforms["korokoro"]
    assert {"normalization", "registered", "total", "reprojection_error_px", "mapper", "matcher"} <= info.keys()
    assert info["registered"] == len(transforms["frames"]) == rig.registered
    for frame in transforms["frames"]:
        assert (Path(rig.transforms).parent / frame["file_path"]).is_file()
        pose = np.array(frame["transform_matrix"])
        assert pose.shape == (4, 4) and np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-6)
    files = [f["file_path"] for f in transforms["frames"]]
    assert files == sorted(files), "frames keep the video order"
    points = np.load(rig.points)
    assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 6 and len(points) > 100
    assert points[:, 3:].min() >= 0.0 and points[:, 3:].max() <= 1.0
    assert (Path(rig.dir) / "sparse" / "0").is_dir()
    # Which frames saw which point (the training's depth prior): the same points, and every
    # observation in front of its camera, projecting into its frame.
    views = np.load(Path(rig.dir) / info["point_views"])
    np.testing.assert_array_equal(views["xyz"], points[:, :3])
    assert len(views["error"]) == len(points) and list(views["frame_names"]) == [Path(f).name for f in files]
    assert np.bincount(views["view_point"], minlength=len(points)).min() >= 2
    c2w = np.array([f["transform_matrix"] for f in transforms["frames"]])[views["view_frame"]]
    cam = np.einsum("mij,mi->mj", c2w[:, :3, :3], views["xyz"][views["view_point"]] - c2w[:, :3, 3])
    u = transforms["cx"] + transforms["fl_x"] * cam[:, 0] / -cam[:, 2]
    v = transforms["cy"] - transforms["fl_y"] * cam[:, 1] / -cam[:, 2]
    assert np.all(cam[:, 2] < 0)
    assert np.mean((u >= 0) & (u < transforms["w"]) & (v >= 0) & (v < transforms["h"])) >= 0.99


def test_noise_frames_raise_camera_solve_error(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    entries = []
    for i in range(12):
        name = f"noise_{i:02d}.png"
        cv2.imwrite(str(frames_dir / name), rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
        entries.append({"file": name, "time_s": i / 24, "sharpness": 1.0, "width": 160, "height": 120})
    (frames_dir / "frames.json").write_text(json.dumps({"frames": entries}))
    frames = FrameSet(dir=frames_dir, index=frames_dir / "frames.json", count=12, width=160, height=120, fingerprint="x")
    with pytest.raises(CameraSolveError, match=r"of 12 frames.*textured surface"):
        solve_cameras(frames, tmp_path / "cameras", default_settings(), "fp")


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="matcher"):
        default_settings(matcher="vocab_tree")
    frames = FrameSet(dir=tmp_path, index=tmp_path / "frames.json", count=0, width=1, height=1, fingerprint="x")
    with pytest.raises(ValueError, match="frames.json does not exist"):
        solve_cameras(frames, tmp_path / "out", default_settings(), "fp")


def test_orbit_pairs_wrap_around_a_closed_orbit():
    names = [f"f{i}" for i in range(10)]
    pairs = set(orbit_pairs(names, overlap=2, quadratic=False, loop_closure=True))
    assert ("f8", "f9") in pairs and ("f0", "f9") in pairs and ("f1", "f9") in pairs
    assert len(pairs) == 20  # each frame with its 2 successors, no duplicates
    open_pairs = set(orbit_pairs(names, overlap=2, quadratic=False, loop_closure=False))
    assert ("f0", "f9") not in open_pairs and len(open_pairs) == 17


def test_known_focal_length_is_held_fixed(solved):
    """A phone's 35 mm-equivalent focal length fixes the camera's focal (an orbit at one height
    cannot pin it down) and the solve still meets the camera bounds."""
    truth = json.loads((solved(CASES[0])[1] / "cameras.json").read_text())
    focal_35mm = truth["fl_x"] * 43.267 / float(np.hypot(truth["w"], truth["h"]))
    rig, truth_dir = solved(CASES[0], focal_length_35mm=focal_35mm)
    est, true, transforms = estimated_and_true(rig, truth_dir)
    assert transforms["fl_x"] == pytest.approx(truth["fl_x"], rel=1e-4)
    rotation, position = camera_errors(est, true)
    radius = float(np.linalg.norm(true[:, :3, 3] - true[:, :3, 3].mean(0), axis=1).mean())
    assert np.median(rotation) <= 0.5 and np.median(position) / radius <= 0.01
    assert len(est) >= 0.95 * 48


def test_known_camera_params_follow_the_camera_model():
    from tasks.colmap import known_camera_params

    # 26 mm-equivalent (a phone's main camera) on 1920x1080: f = 26 * hypot(1920, 1080) / 43.267 = 1323.77 px.
    assert known_camera_params(default_settings(focal_length_35mm=26.0), 1920, 1080) == "1323.77,960,540,0"
    assert known_camera_params(default_settings(focal_length_35mm=26.0, camera_model="PINHOLE"), 1920, 1080) == "1323.77,1323.77,960,540"
    with pytest.raises(ValueError, match="focal_length_35mm"):
        default_settings(focal_length_35mm=-1.0)
