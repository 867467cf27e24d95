"""Generators for odd and broken uploads (no binary blobs in the repo: every file is made here).

Each function writes one file into a folder and returns its path. Run
``python -m tests.bad_inputs OUT_DIR`` to write the whole corpus.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np


def textured_frames(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A camera panning over a random texture: ``[count, height, width, 3]`` uint8 frames."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, size=(height // 4 + 1, (width + count * 4) // 4 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(texture, 4, axis=0), 4, axis=1)
    return np.stack([texture[:height, 4 * i : 4 * i + width] for i in range(count)])


def write_video(
    path: Path, frames: np.ndarray, fps: int = 24, codec: str = "libx264", rotation: int = 0
) -> Path:
    """Encode ``[F, H, W, 3]`` uint8 frames; ``rotation`` sets display-rotation side data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


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


CORPUS: dict[str, Callable[[Path], Path]] = {
    "empty": empty_file,
    "text": text_as_mp4,
    "truncated": truncated_mp4,
    "one_frame": one_frame,
    "black": all_black,
    "audio_only": audio_only,
    "portrait": portrait_rotated,
}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "bad-inputs")
    target.mkdir(parents=True, exist_ok=True)
    for name, make in CORPUS.items():
        print(f"{name:12} {make(target)}")
