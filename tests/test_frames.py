"""Frame extraction: picks, upright output, phone formats, pauses, and clear errors for bad uploads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.frames import BadVideoError, FrameSettings, extract_frames, feature_motion, pick_frames
from tasks.types import VideoInput
from tests import bad_inputs


def _video_input(path: Path) -> VideoInput:
    return VideoInput("p1", "thing", "others", path, "0" * 64, path.stat().st_size, "fp")


SMALL = FrameSettings(count=8, long_side=120, min_frames=4)


def test_pick_frames_spreads_and_prefers_sharp() -> None:
    times = np.arange(100) / 25.0
    sharpness = np.ones(100)
    sharpness[[5, 30, 55, 80]] = 10.0  # one sharp frame near each quarter's centre (12.5, 37.5, ...)
    picks = pick_frames(times, sharpness, 4, search_fraction=0.8)
    assert picks.tolist() == [5, 30, 55, 80]
    even = pick_frames(times, np.ones(100), 4, search_fraction=0.0)
    assert np.all(np.diff(even) == 25)
    assert len(pick_frames(times[:5], np.ones(5), 10, 0.5)) == 5  # never more picks than frames


def test_pick_frames_follow_timestamps_not_frame_indices() -> None:
    # Variable frame rate: 60 frames in the first second, then 10 frames over the next 3 s.
    times = np.concatenate([np.arange(60) / 60.0, 1.0 + np.arange(10) * 0.3])
    picks = pick_frames(times, np.ones(len(times)), 8, search_fraction=0.5)
    assert len(picks) == 8
    gaps = np.diff(times[picks])
    assert gaps.max() < 2.0 * (times[-1] - times[0]) / 8, times[picks]  # spread over the 4 s, not 60 frames
    assert (times[picks] < 1.0).sum() == 2  # a quarter of the time, a quarter of the picks


def test_feature_motion_sees_shifts_not_noise() -> None:
    pan = bad_inputs.textured_frames(8, 160, 120)[..., 0]  # 4 px per frame
    assert feature_motion(pan[0], pan[1]) == pytest.approx(4.0, abs=0.3)
    rng = np.random.default_rng(0)
    still = np.clip(pan[0] + rng.normal(0, 3, pan[0].shape), 0, 255).astype(np.uint8)
    assert feature_motion(pan[0], still) < 0.2
    noise = rng.integers(0, 256, (2, 120, 160), dtype=np.uint8)
    flat = np.full((120, 160), 128, np.uint8)
    assert np.isnan(feature_motion(flat, flat))  # nothing to track: unknown, not "still"
    assert np.isnan(feature_motion(noise[0], noise[1])) or feature_motion(noise[0], noise[1]) > 0.3


def test_extract_writes_frames_and_index(tmp_path: Path) -> None:
    video = bad_inputs.write_video(tmp_path / "pan.mp4", bad_inputs.textured_frames(40, 160, 120))
    result = extract_frames(_video_input(video), tmp_path / "out", SMALL, "fp-1")
    assert result.count == 8 and result.fingerprint == "fp-1"
    assert (result.width, result.height) == (120, 90)
    index = json.loads(result.index.read_text())
    times = [f["time_s"] for f in index["frames"]]
    assert times == sorted(times) and len(set(times)) == 8
    assert index["dropped_duplicates"] == []
    assert index["frames"][0]["motion_px"] is None
    # None: too far apart to track, which is never a duplicate.
    assert all(f["motion_px"] is None or f["motion_px"] > SMALL.duplicate_motion_px for f in index["frames"][1:])
    for path in result.files():
        image = cv2.imread(str(path))
        assert image.shape == (90, 120, 3)


def _saved_matches(result, upright: np.ndarray, entry: dict) -> tuple[float, float]:
    """Mean difference of a saved frame to its true upright source, and to that turned 180°
    (lossy codecs on random texture: blurred images are compared)."""
    saved = cv2.cvtColor(cv2.imread(str(result.dir / entry["file"])), cv2.COLOR_BGR2RGB).astype(float)
    truth = upright[entry["source_index"]].astype(float)
    blur = lambda a: cv2.GaussianBlur(a, (9, 9), 3)  # noqa: E731
    return np.abs(blur(saved) - blur(truth)).mean(), np.abs(blur(saved) - blur(np.rot90(truth, 2))).mean()


# What phones record: H.264 or HEVC, in .mp4 or .mov, portrait as landscape pixels plus a
# display rotation (PyAV degrees, counter-clockwise: iPhones read back -90, some Androids 90).
PHONE_FORMATS = [
    ("libx264", "mp4", 90),
    ("libx264", "mp4", -90),
    ("libx264", "mov", 0),
    ("libx265", "mp4", 0),
    ("libx265", "mov", -90),
    ("libx264", "mp4", 180),
]


@pytest.mark.parametrize(("codec", "suffix", "rotation"), PHONE_FORMATS, ids=[f"{c}-{s}-{r}" for c, s, r in PHONE_FORMATS])
def test_phone_videos_come_out_upright(tmp_path: Path, codec: str, suffix: str, rotation: int) -> None:
    upright = bad_inputs.textured_frames(20, 96, 160)  # a tall image, as the phone saw it
    stored = np.rot90(upright, k=-(rotation // 90), axes=(1, 2))  # what the phone stores ...
    video = bad_inputs.write_video(tmp_path / f"clip.{suffix}", stored, codec=codec, rotation=rotation)  # ... and says
    settings = FrameSettings(count=5, long_side=1000, min_frames=4, image_format="png")
    result = extract_frames(_video_input(video), tmp_path / "out", settings, "fp")
    assert (result.width, result.height) == (96, 160)
    index = json.loads(result.index.read_text())
    assert index["rotation"] % 360 == rotation % 360
    right, turned = _saved_matches(result, upright, index["frames"][0])
    assert right < 12 and turned > 20


def test_variable_frame_rate_picks_follow_timestamps(tmp_path: Path) -> None:
    # 48 frames in the first second, then 12 frames over 3 s; the scene pans with time.
    times = np.concatenate([np.arange(48) / 48.0, 1.0 + np.arange(12) * 0.25])
    pan = bad_inputs.textured_frames(int(times[-1] * 40) + 1, 160, 120)
    frames = pan[np.round(times * 40).astype(int)]  # 160 px/s, wherever the frames fall
    video = bad_inputs.write_video(tmp_path / "vfr.mp4", frames, times=times.tolist())
    settings = FrameSettings(count=8, long_side=160, min_frames=4, search_fraction=0.0, image_format="png")
    result = extract_frames(_video_input(video), tmp_path / "out", settings, "fp")
    index = json.loads(result.index.read_text())
    picked = np.array([f["time_s"] for f in index["frames"]])
    assert np.allclose(picked, times[[f["source_index"] for f in index["frames"]]], atol=2e-3)
    assert result.count == 8 and np.diff(picked).max() < 2 * 4.0 / 8, picked  # even over 4 s
    assert (picked < 1.0).sum() == 2  # by frame index, 6 of the 8 would fall in the first second
    right, _ = _saved_matches(result, frames, index["frames"][-1])
    assert right < 12  # the saved pixels are those of the recorded timestamp


def test_pause_in_the_orbit_drops_near_duplicates(tmp_path: Path) -> None:
    pause = (24, 48)  # the camera stands still for a second, then goes on
    video = bad_inputs.write_video(tmp_path / "pause.mp4", bad_inputs.paused_pan(72, 160, 120, pause))
    settings = FrameSettings(count=18, long_side=160, min_frames=4, search_fraction=0.0)
    result = extract_frames(_video_input(video), tmp_path / "out", settings, "fp")
    index = json.loads(result.index.read_text())
    dropped = index["dropped_duplicates"]
    kept = [f["source_index"] for f in index["frames"]]
    assert len(dropped) >= 4 and result.count == 18 - len(dropped)
    inside = lambda i: pause[0] <= i < pause[1]  # noqa: E731
    assert all(inside(d["source_index"]) and inside(d["duplicate_of"]) for d in dropped)
    assert all(d["motion_px"] < settings.duplicate_motion_px for d in dropped)
    assert sum(inside(i) for i in kept) == 1  # one view of the pause is kept
    every = extract_frames(_video_input(video), tmp_path / "all", replace(settings, duplicate_motion_px=0), "fp")
    assert every.count == 18  # 0 turns the check off


@pytest.mark.parametrize(
    ("maker", "phrase"),
    [
        ("empty_file", "empty"),
        ("text_as_mp4", "not a readable video"),
        ("audio_only", "no video track"),
        ("one_frame", "fewer than"),
        ("all_black", "too dark"),
        ("truncated_mp4", "cut short"),
        ("static_camera", "camera hardly moved"),
    ],
)
def test_bad_uploads_get_clear_errors(tmp_path: Path, maker: str, phrase: str) -> None:
    path = getattr(bad_inputs, maker)(tmp_path)
    with pytest.raises(BadVideoError) as err:
        extract_frames(_video_input(path), tmp_path / "out", SMALL, "fp")
    assert phrase in str(err.value)
    assert path.name in str(err.value)  # the seller's file is named


def test_limits_refuse_oversized_uploads(tmp_path: Path) -> None:
    video = bad_inputs.write_video(tmp_path / "big.mp4", bad_inputs.textured_frames(12, 320, 240), fps=60)
    with pytest.raises(BadVideoError, match="MP limit") as err:
        extract_frames(_video_input(video), tmp_path / "a", FrameSettings(max_pixels=320 * 200, max_fps=30, min_frames=4), "fp")
    assert "frames.max_pixels" in str(err.value) and "60 fps is over the 30 fps limit" in str(err.value)  # every limit named
    with pytest.raises(BadVideoError, match="s limit"):
        extract_frames(_video_input(video), tmp_path / "b", FrameSettings(max_duration_s=0.1, min_frames=4), "fp")
    assert not (tmp_path / "a").exists()  # refused before anything was decoded or written
