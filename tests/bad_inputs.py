"""Generators for odd and broken uploads (no binary blobs in the repo: every file is made here).

Each function writes one file into a folder and returns its path. Run
``python -m tests.bad_inputs OUT_DIR`` to write the whole corpus. (The corpus's odd product
*names* and *unique_ids* are not files: see ``ODD_TITLE`` / ``TRAVERSAL_IDS`` and
tests/test_bad_inputs.py.)
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence

import av
import numpy as np


def textured_frames(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A camera panning over a random texture: ``[count, height, width, 3]`` uint8 frames."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, size=(height // 4 + 1, (width + count * 4) // 4 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(texture, 4, axis=0), 4, axis=1)
    return np.stack([texture[:height, 4 * i : 4 * i + width] for i in range(count)])


# Odd product names and unique_ids a seller (or an attacker) may type.
ODD_TITLE = 'Mum\'s "best" mug / 2 \\ ../../etc/passwd'
TRAVERSAL_IDS = ("../../etc/cron.d/x", "..", "a/b", "/abs")


def write_video(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: int = 24,
    codec: str = "libx264",
    rotation: int = 0,
    times: Sequence[float] | None = None,
) -> Path:
    """Encode ``[H, W, 3]`` uint8 frames (an array ``[F, H, W, 3]`` or any iterable of them).

    ``rotation`` sets display-rotation side data (degrees counter-clockwise, as PyAV reads it
    back); ``times`` gives each frame its own timestamp in seconds (a variable frame rate),
    else frames are ``1 / fps`` apart. The container follows the suffix (.mp4, .mov).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = None
        for i, image in enumerate(frames):
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps))
                stream.width, stream.height = image.shape[1], image.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.time_base = Fraction(1, 1000)
                if codec == "libx265":
                    stream.codec_context.codec_tag = "hvc1"  # what iPhones write
                    stream.options = {"x265-params": "log-level=error"}
                if rotation:
                    stream.set_display_rotation(rotation)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = round(1000 * (times[i] if times is not None else i / fps))
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def paused_pan(count: int, width: int, height: int, pause: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A pan that stands still for frames ``pause[0]:pause[1]``, with fresh sensor noise on
    every frame: ``[count, height, width, 3]`` uint8."""
    steps = np.ones(count, dtype=int)
    steps[0] = 0
    steps[pause[0] + 1 : pause[1]] = 0
    offsets = np.cumsum(steps)
    pan = textured_frames(int(offsets[-1]) + 1, width, height, seed)[offsets]
    noise = np.random.default_rng(seed + 1).normal(0.0, 2.0, pan.shape)
    return np.clip(pan + noise, 0, 255).astype(np.uint8)


def empty_file(out: Path) -> Path:
    (p := out / "empty.mp4").write_bytes(b"")
    return p


def text_as_mp4(out: Path) -> Path:
    (p := out / "notes.mp4").write_text("this is a shopping list, not a video\n" * 20)
    return p


def truncated_mp4(out: Path) -> Path:
    full = write_video(out / "full.mp4", textured_frames(48, 160, 120))
    data = full.read_bytes()
    full.unlink()
    (p := out / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return p


def one_frame(out: Path) -> Path:
    return write_video(out / "one_frame.mp4", textured_frames(1, 160, 120))


def all_black(out: Path) -> Path:
    return write_video(out / "black.mp4", np.zeros((30, 120, 160, 3), np.uint8))


def audio_only(out: Path) -> Path:
    path = out / "audio_only.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)) * 0.2).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def portrait_rotated(out: Path) -> Path:
    """Landscape pixels with 90° display rotation: a phone held upright."""
    return write_video(out / "portrait.mp4", textured_frames(30, 160, 96), rotation=90)


def static_camera(out: Path) -> Path:
    """A tripod shot: a textured scene that never moves, only sensor noise changes (2 s)."""
    return write_video(out / "tripod.mp4", paused_pan(48, 160, 120, pause=(0, 48)))


def blank_wall(out: Path) -> Path:
    """A pan along a plain wall: a soft lighting gradient, a little noise, no features (2 s)."""
    count, width, height = 48, 192, 144
    y, x = np.mgrid[0:height, 0 : width + 2 * count].astype(np.float32)
    wall = 150 + 40 * np.sin(x / 90.0) + 20 * (y / height)  # light falling off across the wall
    rng = np.random.default_rng(3)
    frames = (
        np.clip(wall[:, 2 * i : 2 * i + width, None] + rng.normal(0, 1.0, (height, width, 1)), 0, 255)
        .repeat(3, axis=2)
        .astype(np.uint8)
        for i in range(count)
    )
    return write_video(out / "wall.mp4", frames)


def uhd_60fps(out: Path) -> Path:
    """A 3840x2160 60 fps clip (6 frames: the limits are read from the header, not decoded)."""
    ramp = np.linspace(0, 255, 3840, dtype=np.float32)[None, :, None]
    frames = (np.broadcast_to((ramp + 20 * i) % 256, (2160, 3840, 3)).astype(np.uint8) for i in range(6))
    return write_video(out / "uhd60.mp4", frames, fps=60)


CORPUS: dict[str, Callable[[Path], Path]] = {
    "empty": empty_file,
    "text": text_as_mp4,
    "truncated": truncated_mp4,
    "one_frame": one_frame,
    "black": all_black,
    "audio_only": audio_only,
    "portrait": portrait_rotated,
    "static_camera": static_camera,
    "blank_wall": blank_wall,
    "uhd_60fps": uhd_60fps,
}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "bad-inputs")
    target.mkdir(parents=True, exist_ok=True)
    for name, make in CORPUS.items():
        print(f"{name:12} {make(target)}")
