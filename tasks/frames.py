"""Frame extraction: the sharpest, evenly spread stills of a phone video.

Two passes over the video with PyAV (FFmpeg): the first measures every frame's sharpness
(variance of the Laplacian on a small grey copy) and brightness without keeping pixels, the
second decodes again and saves only the picks. Memory stays flat for long 4K uploads.
Frames come out upright: the display-rotation metadata phones write is applied.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from tasks.types import FrameSet, VideoInput


class BadVideoError(ValueError):
    """The upload cannot become a model; the message names the file and what to do."""


@dataclass(frozen=True)
class FrameSettings:
    """``conf/frames/*.yaml``."""

    count: int = 150
    long_side: int = 1280
    search_fraction: float = 0.5
    min_frames: int = 12
    max_duration_s: float = 600.0
    max_pixels: int = 3840 * 2160
    max_fps: float = 120.0
    min_brightness: float = 12.0
    min_contrast: float = 4.0
    probe_long_side: int = 320
    image_format: str = "jpg"
    jpeg_quality: int = 95


@dataclass(frozen=True)
class FrameProbe:
    """Per-frame measurements of the first pass. All arrays have shape ``[F]``."""

    time_s: np.ndarray
    sharpness: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    width: int
    height: int
    rotation: int


def _open(video: Path) -> av.container.InputContainer:
    if not video.is_file() or video.stat().st_size == 0:
        raise BadVideoError(f"{video.name}: the file is empty or missing; upload the video again")
    try:
        container = av.open(str(video))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise BadVideoError(f"{video.name} is not a readable video ({exc}); upload an MP4 or MOV file") from exc
    if not container.streams.video:
        container.close()
        raise BadVideoError(f"{video.name} has no video track (audio only?); upload a video of the product")
    return container


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the display rotation (degrees counter-clockwise, as FFmpeg reports it)."""
    turns = (round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


def _check_limits(video: Path, stream: av.video.stream.VideoStream, settings: FrameSettings) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > settings.max_pixels:
        raise BadVideoError(
            f"{video.name} is {width}x{height}, over the {settings.max_pixels / 1e6:.1f} MP limit "
            "(frames.max_pixels); record at 1080p or 4K at most"
        )
    duration = float(stream.duration * stream.time_base) if stream.duration else None
    if duration is None and stream.container.duration:
        duration = stream.container.duration / av.time_base
    if duration is not None and duration > settings.max_duration_s:
        raise BadVideoError(
            f"{video.name} lasts {duration:.0f} s, over the {settings.max_duration_s:.0f} s limit "
            "(frames.max_duration_s); one slow orbit of 20-60 s is enough"
        )
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    if rate > settings.max_fps:
        raise BadVideoError(
            f"{video.name} runs at {rate:.0f} fps, over the {settings.max_fps:.0f} fps limit (frames.max_fps); "
            "record at 30 or 60 fps"
        )


def probe_frames(video: Path, settings: FrameSettings) -> FrameProbe:
    """First pass: sharpness, brightness and contrast of every decodable frame."""
    container = _open(video)
    times, sharp, bright, contrast = [], [], [], []
    rotation, size = 0, (0, 0)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        _check_limits(video, stream, settings)
        try:
            for frame in container.decode(stream):
                rotation = int(getattr(frame, "rotation", 0) or 0)
                size = (frame.width, frame.height)
                scale = settings.probe_long_side / max(frame.width, frame.height)
                grey = frame.reformat(
                    width=max(2, int(frame.width * min(scale, 1.0))),
                    height=max(2, int(frame.height * min(scale, 1.0))),
                    format="gray",
                ).to_ndarray()
                times.append(float(frame.time) if frame.time is not None else len(times) / 30.0)
                sharp.append(float(cv2.Laplacian(grey, cv2.CV_32F).var()))
                bright.append(float(grey.mean()))
                contrast.append(float(grey.std()))
        except av.error.FFmpegError as exc:
            if not times:
                raise BadVideoError(f"{video.name} could not be decoded ({exc}); the file may be truncated") from exc
            # A truncated tail still leaves usable frames: keep what decoded.
    finally:
        container.close()
    if not times:
        raise BadVideoError(f"{video.name} contains no decodable frames; the file may be truncated")
    width, height = size
    if round(rotation / 90.0) % 2:
        width, height = height, width
    return FrameProbe(
        np.asarray(times), np.asarray(sharp), np.asarray(bright), np.asarray(contrast), width, height, rotation
    )


def pick_frames(sharpness: np.ndarray, count: int, search_fraction: float) -> np.ndarray:
    """Indices of ``count`` frames spread evenly over the video, each the sharpest of its window.

    sharpness ``[F]`` → sorted unique indices ``[K]``, ``K <= count``. Each pick searches
    ``search_fraction`` of the spacing between picks around its even position, so picks never
    bunch up on one sharp stretch.
    """
    total = len(sharpness)
    count = min(count, total)
    centres = (np.arange(count) + 0.5) * total / count
    half = max(0, int(search_fraction * total / count / 2))
    picks = []
    for c in centres.astype(int):
        lo, hi = max(0, c - half), min(total, c + half + 1)
        picks.append(lo + int(np.argmax(sharpness[lo:hi])))
    return np.unique(np.asarray(picks, dtype=int))


def extract_frames(video: VideoInput, out_dir: Path, settings: FrameSettings, fingerprint: str) -> FrameSet:
    """Pick, upright, downscale and save frames; write ``frames.json``."""
    path = Path(video.video)
    probe = probe_frames(path, settings)
    if len(probe.time_s) < settings.min_frames:
        raise BadVideoError(
            f"{path.name} has only {len(probe.time_s)} frames, fewer than the {settings.min_frames} needed "
            "(frames.min_frames); film one slow full orbit around the product"
        )
    if np.median(probe.brightness) < settings.min_brightness:
        raise BadVideoError(
            f"{path.name} is too dark (median brightness {np.median(probe.brightness):.0f}/255); "
            "film with more light"
        )
    if np.median(probe.contrast) < settings.min_contrast:
        raise BadVideoError(
            f"{path.name} looks blank (median contrast {np.median(probe.contrast):.1f}); "
            "film the product itself, in focus"
        )
    picks = pick_frames(probe.sharpness, settings.count, settings.search_fraction)
    scale = min(1.0, settings.long_side / max(probe.width, probe.height))
    out_w, out_h = int(round(probe.width * scale)), int(round(probe.height * scale))

    out_dir.mkdir(parents=True, exist_ok=True)
    images = out_dir / "images"
    images.mkdir(exist_ok=True)
    wanted = set(picks.tolist())
    records = []
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index not in wanted:
                    continue
                rgb = _upright(frame.to_ndarray(format="rgb24"), probe.rotation)
                if scale < 1.0:
                    rgb = cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)
                name = f"frame_{len(records):05d}.{settings.image_format}"
                params = [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality] if settings.image_format == "jpg" else []
                cv2.imwrite(str(images / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
                records.append(
                    {
                        "file": f"images/{name}",
                        "source_index": index,
                        "time_s": round(float(probe.time_s[index]), 4),
                        "sharpness": round(float(probe.sharpness[index]), 2),
                        "width": rgb.shape[1],
                        "height": rgb.shape[0],
                    }
                )
                if len(records) == len(wanted):
                    break
        except av.error.FFmpegError:
            pass  # the probe already saw where the stream ends
    finally:
        container.close()
    if len(records) < settings.min_frames:
        raise BadVideoError(f"{path.name}: only {len(records)} frames could be saved; the file may be damaged")

    index_path = out_dir / "frames.json"
    index_path.write_text(
        json.dumps(
            {
                "video": path.name,
                "video_sha256": video.sha256,
                "decoded_frames": int(len(probe.time_s)),
                "rotation": probe.rotation,
                "settings": asdict(settings),
                "frames": records,
            },
            indent=1,
        )
    )
    return FrameSet(
        dir=out_dir, index=index_path, count=len(records), width=out_w, height=out_h, fingerprint=fingerprint
    )
