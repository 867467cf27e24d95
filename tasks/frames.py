"""Frame extraction: the sharpest, evenly spread stills of a phone video.

Two passes over the video with PyAV (FFmpeg): the first measures every frame's sharpness
(variance of the Laplacian on a small grey copy) and brightness without keeping pixels, the
second decodes again and saves only the picks. Memory stays flat for long 4K uploads.
Picks are spread evenly in *time* (presentation timestamps), so variable-frame-rate phone
videos are sampled evenly over the orbit, not over their frame indices. A pick the camera
barely moved from (a pause in the orbit) is dropped as a near-duplicate of the last kept one.
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
    duplicate_motion_px: float = 0.3
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
        with open(video, "rb") as head:
            is_iso_media = head.read(12)[4:8] == b"ftyp"  # MP4 / MOV files start with an ftyp box
        if is_iso_media:
            # An MP4 cut short loses its index (the moov box is written last): say "upload again".
            raise BadVideoError(
                f"{video.name} is an MP4/MOV file that is cut short or damaged ({type(exc).__name__}); "
                "upload the complete file again"
            ) from exc
        # strerror, not str(exc): FFmpeg's message carries the worker's path to the file.
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise BadVideoError(f"{video.name} is not a readable video ({why}); upload an MP4 or MOV file") from exc
    if not container.streams.video:
        container.close()
        raise BadVideoError(f"{video.name} has no video track (audio only?); upload a video of the product")
    return container


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the display rotation (degrees counter-clockwise, as FFmpeg reports it)."""
    turns = (round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


def _check_limits(video: Path, stream: av.video.stream.VideoStream, settings: FrameSettings) -> None:
    """Refuse uploads over the configured size, length or rate, naming every limit crossed."""
    width, height = stream.codec_context.width, stream.codec_context.height
    over = []
    if width * height > settings.max_pixels:
        over.append(f"{width}x{height} is over the {settings.max_pixels / 1e6:.1f} MP limit (frames.max_pixels)")
    duration = float(stream.duration * stream.time_base) if stream.duration else None
    if duration is None and stream.container.duration:
        duration = stream.container.duration / av.time_base
    if duration is not None and duration > settings.max_duration_s:
        over.append(f"{duration:.0f} s is over the {settings.max_duration_s:.0f} s limit (frames.max_duration_s)")
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    if rate > settings.max_fps:
        over.append(f"{rate:.0f} fps is over the {settings.max_fps:.0f} fps limit (frames.max_fps)")
    if over:
        raise BadVideoError(
            f"{video.name}: " + "; ".join(over) + ". Film one slow orbit of 20-60 s at "
            f"{_resolution_hint(settings.max_pixels)}, {min(60, int(settings.max_fps))} fps at most"
        )


def _resolution_hint(max_pixels: int) -> str:
    """The largest common recording size within ``max_pixels``."""
    for name, pixels in (("4K", 3840 * 2160), ("1080p", 1920 * 1080), ("720p", 1280 * 720)):
        if pixels <= max_pixels:
            return name
    return f"{max_pixels / 1e6:.1f} MP"


def _grey(frame: av.VideoFrame, long_side: int) -> np.ndarray:
    """The frame as a grey ``[h, w]`` uint8 image, shrunk so its longer side is at most ``long_side``."""
    scale = min(1.0, long_side / max(frame.width, frame.height))
    return frame.reformat(
        width=max(2, int(frame.width * scale)), height=max(2, int(frame.height * scale)), format="gray"
    ).to_ndarray()


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
                grey = _grey(frame, settings.probe_long_side)
                times.append(float(frame.time) if frame.time is not None else len(times) / 30.0)
                sharp.append(float(cv2.Laplacian(grey, cv2.CV_32F).var()))
                bright.append(float(grey.mean()))
                contrast.append(float(grey.std()))
        except av.error.FFmpegError as exc:
            if not times:
                why = getattr(exc, "strerror", None) or type(exc).__name__
                raise BadVideoError(f"{video.name} could not be decoded ({why}); the file may be truncated") from exc
            # A truncated tail still leaves usable frames: keep what decoded.
    finally:
        container.close()
    if not times:
        raise BadVideoError(f"{video.name} contains no decodable frames; the file may be truncated")
    width, height = size
    if round(rotation / 90.0) % 2:
        width, height = height, width
    # Timestamps must not go backwards for the time-based picks (a few muxers repeat a pts).
    time_s = np.maximum.accumulate(np.asarray(times))
    return FrameProbe(time_s, np.asarray(sharp), np.asarray(bright), np.asarray(contrast), width, height, rotation)


def pick_frames(time_s: np.ndarray, sharpness: np.ndarray, count: int, search_fraction: float) -> np.ndarray:
    """Indices of ``count`` frames spread evenly over the video's duration, each the sharpest of its window.

    time_s ``[F]`` non-decreasing presentation times, sharpness ``[F]`` → sorted unique indices
    ``[K]``, ``K <= count``. Targets are evenly spaced in time (not in frame index: phones record
    at a variable frame rate); each pick searches ``search_fraction`` of the spacing around its
    target, so picks never bunch up on one sharp stretch. A target whose window holds no frame
    (a gap in a variable-rate video) takes the frame nearest to it.
    """
    time_s = np.asarray(time_s, dtype=np.float64)
    total = len(sharpness)
    count = min(count, total)
    step = float(np.median(np.diff(time_s))) if total > 1 else 1.0
    span = float(time_s[-1] - time_s[0]) + step  # the last frame lasts one frame duration too
    # The middle of each of ``count`` equal slots, less half a frame: the frame shown at that
    # moment is the one nearest to the target (no ties between two frames).
    targets = time_s[0] + (np.arange(count) + 0.5) * span / count - step / 2
    half = search_fraction * span / count / 2
    starts = np.searchsorted(time_s, targets - half, side="left")
    ends = np.searchsorted(time_s, targets + half, side="right")
    after = np.searchsorted(time_s, targets)
    left, right = np.clip(after - 1, 0, total - 1), np.clip(after, 0, total - 1)
    nearest = np.where(np.abs(time_s[left] - targets) <= np.abs(time_s[right] - targets), left, right)
    picks = [lo + int(np.argmax(sharpness[lo:hi])) if hi > lo else int(n) for lo, hi, n in zip(starts, ends, nearest)]
    return np.unique(np.asarray(picks, dtype=int))


def feature_motion(before: np.ndarray, after: np.ndarray, max_corners: int = 200) -> float:
    """How far the scene moved between two grey ``[h, w]`` uint8 images, in pixels.

    The median displacement of corners tracked by pyramidal Lucas-Kanade, keeping only tracks
    that come back to where they started (forward-backward check), so sensor noise, which has
    no consistent corners, is not mistaken for content. NaN when fewer than 8 corners track
    (a blank wall): the motion is then unknown, not zero.
    """
    a = cv2.GaussianBlur(before, (0, 0), 1.5)  # blur first: corners on noise are not corners
    b = cv2.GaussianBlur(after, (0, 0), 1.5)
    corners = cv2.goodFeaturesToTrack(a, max_corners, 0.05, 7)
    if corners is None or len(corners) < 8:
        return float("nan")
    lk = dict(winSize=(15, 15), maxLevel=2)
    ahead, ok_ahead, _ = cv2.calcOpticalFlowPyrLK(a, b, corners, None, **lk)
    back, ok_back, _ = cv2.calcOpticalFlowPyrLK(b, a, ahead, None, **lk)
    consistent = (ok_ahead[:, 0] == 1) & (ok_back[:, 0] == 1) & (np.linalg.norm((back - corners)[:, 0], axis=1) < 0.5)
    if consistent.sum() < 8:
        return float("nan")
    return float(np.median(np.linalg.norm((ahead - corners)[consistent, 0], axis=1)))


def extract_frames(video: VideoInput, out_dir: Path, settings: FrameSettings, fingerprint: str) -> FrameSet:
    """Pick, upright, downscale and save frames; write ``frames.json``.

    ``frames.json`` lists the saved frames (``file``, ``source_index``, ``time_s``, ``sharpness``,
    ``motion_px`` from the previous saved frame, ``width``, ``height``) and, under
    ``dropped_duplicates``, the picks left out because the camera had not moved since the last
    saved frame (``motion_px`` below ``duplicate_motion_px``, at the probe's scale).
    """
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
    picks = pick_frames(probe.time_s, probe.sharpness, settings.count, settings.search_fraction)
    scale = min(1.0, settings.long_side / max(probe.width, probe.height))
    out_w, out_h = int(round(probe.width * scale)), int(round(probe.height * scale))

    out_dir.mkdir(parents=True, exist_ok=True)
    images = out_dir / "images"
    images.mkdir(exist_ok=True)
    wanted = set(picks.tolist())
    records, dropped, seen = [], [], 0
    last_kept: tuple[int, np.ndarray] | None = None
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index not in wanted:
                    continue
                seen += 1
                grey = _grey(frame, settings.probe_long_side)
                motion = None
                if last_kept is not None and settings.duplicate_motion_px > 0:
                    # Pixels at the probe's scale, whatever the video's own size.
                    motion = feature_motion(last_kept[1], grey) * settings.probe_long_side / max(grey.shape)
                    if motion < settings.duplicate_motion_px:  # NaN (motion unknown) is kept
                        dropped.append(
                            {
                                "source_index": index,
                                "time_s": round(float(probe.time_s[index]), 4),
                                "motion_px": round(motion, 3),
                                "duplicate_of": last_kept[0],
                            }
                        )
                        if seen == len(wanted):
                            break
                        continue
                last_kept = (index, grey)
                records.append(_save_frame(frame, probe, index, images, len(records), (out_w, out_h), settings))
                records[-1]["motion_px"] = None if motion is None or np.isnan(motion) else round(motion, 3)
                if seen == len(wanted):
                    break
        except av.error.FFmpegError:
            pass  # the probe already saw where the stream ends
    finally:
        container.close()
    if len(records) < settings.min_frames and dropped:
        raise BadVideoError(
            f"{path.name}: the camera hardly moved: only {len(records)} distinct views among {seen} picks, "
            f"fewer than the {settings.min_frames} needed (frames.duplicate_motion_px); "
            "walk slowly all the way around the product while filming. If you did, the views look alike "
            "(a plain, round product on a plain surface): film it on a patterned cloth or newspaper"
        )
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
                "dropped_duplicates": dropped,
            },
            indent=1,
        )
    )
    return FrameSet(
        dir=out_dir, index=index_path, count=len(records), width=out_w, height=out_h, fingerprint=fingerprint
    )


def _save_frame(
    frame: av.VideoFrame, probe: FrameProbe, index: int, images: Path, number: int, size: tuple[int, int],
    settings: FrameSettings,
) -> dict:
    """Write one pick upright at ``size`` (w, h); its frames.json entry."""
    rgb = _upright(frame.to_ndarray(format="rgb24"), probe.rotation)
    if (rgb.shape[1], rgb.shape[0]) != size:
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    name = f"frame_{number:05d}.{settings.image_format}"
    params = [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality] if settings.image_format == "jpg" else []
    cv2.imwrite(str(images / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    return {
        "file": f"images/{name}",
        "source_index": index,
        "time_s": round(float(probe.time_s[index]), 4),
        "sharpness": round(float(probe.sharpness[index]), 2),
        "width": rgb.shape[1],
        "height": rgb.shape[0],
    }
