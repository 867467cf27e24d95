"""Frame extraction: picks, upright output, downscaling, and clear errors for bad uploads."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.frames import BadVideoError, FrameSettings, extract_frames, pick_frames
from tasks.types import VideoInput
from tests import bad_inputs


def _video_input(path: Path) -> VideoInput:
    return VideoInput("p1", "thing", "others", path, "0" * 64, path.stat().st_size, "fp")


SMALL = FrameSettings(count=8, long_side=120, min_frames=4)


def test_pick_frames_spreads_and_prefers_sharp() -> None:
    sharpness = np.ones(100)
    sharpness[[3, 27, 52, 77]] = 10.0  # one sharp frame near each quarter's centre
    picks = pick_frames(sharpness, 4, search_fraction=0.8)
    assert picks.tolist() == [3, 27, 52, 77]
    even = pick_frames(np.ones(100), 4, search_fraction=0.0)
    assert np.all(np.diff(even) == 25)
    assert len(pick_frames(np.ones(5), 10, 0.5)) == 5  # never more picks than frames


def test_extract_writes_frames_and_index(tmp_path: Path) -> None:
    video = bad_inputs.write_video(tmp_path / "pan.mp4", bad_inputs.textured_frames(40, 160, 120))
    result = extract_frames(_video_input(video), tmp_path / "out", SMALL, "fp-1")
    assert result.count == 8 and result.fingerprint == "fp-1"
    assert (result.width, result.height) == (120, 90)
    index = json.loads(result.index.read_text())
    times = [f["time_s"] for f in index["frames"]]
    assert times == sorted(times) and len(set(times)) == 8
    for path in result.files():
        image = cv2.imread(str(path))
        assert image.shape == (90, 120, 3)


def test_portrait_video_comes_out_upright(tmp_path: Path) -> None:
    upright = bad_inputs.textured_frames(20, 96, 160)  # a tall image, as the phone saw it
    stored = np.rot90(upright, k=-1, axes=(1, 2))  # phones store it turned clockwise ...
    video = bad_inputs.write_video(tmp_path / "portrait.mp4", stored, rotation=90)  # ... and say so
    settings = FrameSettings(count=5, long_side=1000, min_frames=4, image_format="png")
    result = extract_frames(_video_input(video), tmp_path / "out", settings, "fp")
    assert (result.width, result.height) == (96, 160)
    first = json.loads(result.index.read_text())["frames"][0]
    saved = cv2.cvtColor(cv2.imread(str(result.dir / first["file"])), cv2.COLOR_BGR2RGB).astype(float)
    truth = upright[first["source_index"]].astype(float)
    # Lossy H.264 of random texture: compare blurred images, the orientation must match.
    blur = lambda a: cv2.GaussianBlur(a, (9, 9), 3)  # noqa: E731
    assert np.abs(blur(saved) - blur(truth)).mean() < 12
    assert np.abs(blur(saved) - blur(np.rot90(truth, 2))).mean() > 20


@pytest.mark.parametrize(
    ("maker", "phrase"),
    [
        ("empty_file", "empty"),
        ("text_as_mp4", "not a readable video"),
        ("audio_only", "no video track"),
        ("one_frame", "fewer than"),
        ("all_black", "too dark"),
    ],
)
def test_bad_uploads_get_clear_errors(tmp_path: Path, maker: str, phrase: str) -> None:
    path = getattr(bad_inputs, maker)(tmp_path)
    with pytest.raises(BadVideoError) as err:
        extract_frames(_video_input(path), tmp_path / "out", SMALL, "fp")
    assert phrase in str(err.value)
    assert path.name in str(err.value)  # the seller's file is named


def test_truncated_video_keeps_what_decodes_or_says_truncated(tmp_path: Path) -> None:
    path = bad_inputs.truncated_mp4(tmp_path)
    try:
        result = extract_frames(_video_input(path), tmp_path / "out", SMALL, "fp")
    except BadVideoError as err:
        assert path.name in str(err)
    else:
        assert 4 <= result.count <= 8


def test_limits_refuse_oversized_uploads(tmp_path: Path) -> None:
    video = bad_inputs.write_video(tmp_path / "big.mp4", bad_inputs.textured_frames(12, 320, 240))
    with pytest.raises(BadVideoError, match="MP limit"):
        extract_frames(_video_input(video), tmp_path / "a", FrameSettings(max_pixels=320 * 200, min_frames=4), "fp")
    with pytest.raises(BadVideoError, match="s limit"):
        extract_frames(_video_input(video), tmp_path / "b", FrameSettings(max_duration_s=0.1, min_frames=4), "fp")
