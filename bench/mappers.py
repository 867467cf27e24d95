"""COLMAP 4's two mappers on the same frames: which registers more, and more accurately.

    python -m bench.mappers --turntable sample/basket --profile cpu
    python -m bench.mappers --turntable .benchdata/mac1080 --frames .benchdata/mac1080/frames --profile gpu

Runs the camera stage once per mapper (``colmap.mapper=incremental|global``, no retries, no
fallback) on one set of frames and prints frames registered, median rotation and position
error against the turntable's truth, reprojection error and wall time. ``conf/colmap`` keeps
the better one as ``mapper`` and the other as ``fallback_mapper``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import quality
from bench.run_stages import existing_frames
from flows.config import compose_config
from tasks import colmap
from tasks.types import VideoInput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turntable", type=Path, required=True)
    parser.add_argument("--frames", type=Path, default=None, help="frames extracted earlier (else from the video)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-out/mappers"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = compose_config([f"profile={args.profile}"])
    if args.frames is None:
        from tasks import frames

        video = VideoInput("bench", "bench", "others", args.turntable / "video.mp4", "-", 0, "bench")
        stills = frames.extract_frames(video, args.out / "frames", frames.FrameSettings(**cfg["frames"]), "f")
    else:
        stills = existing_frames(args.frames)
    rows = []
    for mapper in ("incremental", "global"):
        settings = colmap.ColmapSettings(**{**cfg["colmap"], "mapper": mapper, "mapping_attempts": 1, "fallback_mapper": "none"})
        started = time.perf_counter()
        try:
            rig = colmap.solve_cameras(stills, args.out / mapper, settings, mapper)
        except Exception as exc:  # a mapper that fails is a result too
            rows.append({"mapper": mapper, "error": str(exc)[:200], "seconds": round(time.perf_counter() - started, 1)})
            continue
        row = {"mapper": mapper, "seconds": round(time.perf_counter() - started, 1),
               "reprojection_error_px": round(rig.reprojection_error_px, 3)}
        row.update(quality.camera_quality(stills.index, rig.transforms, args.turntable / "truth"))
        rows.append(row)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"turntable": str(args.turntable), "profile": args.profile, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
