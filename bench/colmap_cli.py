"""Our camera stage side by side with Debian's ``colmap`` command line, on the same frames.

    apt-get install -y colmap          # Debian 12: COLMAP 3.8, CPU only (a bench tool, not a test dependency)
    python -m bench.colmap_cli --turntable sample/basket --profile cpu --out bench-out/colmap-cli/sample
    python -m bench.colmap_cli --turntable .benchdata/basket1080 --frames .benchdata/basket1080/frames \\
        --profile gpu --out bench-out/colmap-cli/basket1080
    python -m bench.colmap_cli --turntable .benchdata/basket1080 --profile gpu --skip-ours --skip-cli \\
        --frames-repeat 3 --out bench-out/frames-1080            # the frames stage alone, timed

Both sides get the frames our frames stage made (``--frames``, else extracted here from the
turntable's ``video.mp4`` with the profile's frame settings) and the same knobs where the two
correspond (conf/colmap: camera model, focal prior, SIFT image size / features / peak threshold,
ratio test, inliers, sequential overlap, mapper thresholds). The CLI runs ``feature_extractor``
(one shared camera), ``sequential_matcher`` and ``mapper`` twice: with our settings, and with
COLMAP's own defaults (what a user typing the three commands gets); ours is ``tasks.colmap.solve_cameras``
(pycolmap 4.x), whose pycolmap calls are timed one by one by wrapping them for the run.
Differences that stay: COLMAP 3.8's sequential matcher cannot close the loop without a vocabulary
tree (ours matches the last frames with the first), and ours maps again when too few frames register.

Reports, per side: wall and CPU seconds of each step, frames registered, mean reprojection error,
and the median rotation / position error against the turntable's true cameras after a similarity
alignment (``tests.truth.camera_errors``). Writes ``<out>/colmap_cli.json`` (and ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pycolmap

from bench.quality import camera_quality
from flows.config import compose_config
from tasks import colmap
from tasks.geometry import world_to_camera_cv_to_c2w_gl
from tasks.types import FrameSet, VideoInput
from tests.truth import camera_errors, load_truth_cameras


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def _timed(rows: list[dict[str, Any]], step: str) -> Iterator[None]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    rows.append({"step": step, "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu_seconds() - cpu, 2)})
    print(f"  {step:28} {rows[-1]['wall_s']:8.2f} s wall {rows[-1]['cpu_s']:8.2f} s cpu", flush=True)


def frames_folder(folder: Path) -> FrameSet:
    """A frames folder made by the frames stage (``frames.json`` + images)."""
    index = json.loads((folder / "frames.json").read_text())
    first = index["frames"][0]
    return FrameSet(folder, folder / "frames.json", len(index["frames"]), first["width"], first["height"], "bench")


def cli_commands(
    colmap_bin: str, frames: FrameSet, work: Path, s: colmap.ColmapSettings, ours: bool = True
) -> list[tuple[str, list[str]]]:
    """The three COLMAP 3.8 commands: with our settings where an option corresponds (``ours``),
    else COLMAP's own defaults (what a user typing the commands gets), one shared camera either way."""
    names = [e["file"] for e in colmap.read_frame_list(frames)]
    work.mkdir(parents=True, exist_ok=True)
    (work / "images.txt").write_text("".join(f"{n}\n" for n in names))
    db, images, sparse = str(work / "database.db"), str(Path(frames.dir).resolve()), work / "sparse"
    sparse.mkdir(parents=True, exist_ok=True)
    flag = lambda value: "1" if value else "0"  # noqa: E731
    extract = [colmap_bin, "feature_extractor", "--database_path", db, "--image_path", images,
               "--image_list_path", str(work / "images.txt"), "--ImageReader.single_camera", "1",
               "--SiftExtraction.use_gpu", "0"]
    match = [colmap_bin, "sequential_matcher", "--database_path", db, "--SiftMatching.use_gpu", "0"]
    mapper = [colmap_bin, "mapper", "--database_path", db, "--image_path", images, "--output_path", str(sparse)]
    if ours:
        extract += ["--ImageReader.camera_model", s.camera_model,
                    "--ImageReader.default_focal_length_factor", str(s.default_focal_length_factor),
                    "--SiftExtraction.num_threads", str(s.num_threads),
                    "--SiftExtraction.max_image_size", str(s.max_image_size),
                    "--SiftExtraction.max_num_features", str(s.max_num_features),
                    "--SiftExtraction.peak_threshold", str(s.sift_peak_threshold)]
        match += ["--SiftMatching.num_threads", str(s.num_threads), "--SiftMatching.max_ratio", str(s.max_ratio),
                  "--SiftMatching.min_num_inliers", str(s.min_num_inliers),
                  "--SequentialMatching.overlap", str(s.sequential_overlap),
                  "--SequentialMatching.quadratic_overlap", flag(s.quadratic_overlap)]
        mapper += ["--Mapper.num_threads", str(s.num_threads), "--Mapper.min_num_matches", str(s.min_num_inliers),
                   "--Mapper.init_min_num_inliers", str(s.init_min_num_inliers),
                   "--Mapper.init_min_tri_angle", str(s.init_min_tri_angle),
                   "--Mapper.abs_pose_min_num_inliers", str(s.abs_pose_min_num_inliers),
                   "--Mapper.ba_refine_principal_point", flag(s.refine_principal_point)]
    return [("feature_extractor", extract), ("sequential_matcher", match), ("mapper", mapper)]


def model_quality(rec: pycolmap.Reconstruction | None, frames: FrameSet, truth_dir: Path) -> dict[str, Any]:
    """Registered frames and camera errors of a COLMAP model against the turntable's truth."""
    entries = colmap.read_frame_list(frames)
    if rec is None:
        return {"registered": 0, "frames": len(entries)}
    source = {e["file"]: e["source_index"] for e in entries}
    posed = sorted((img for img in rec.images.values() if img.has_pose), key=lambda img: img.name)
    w2c = np.stack([img.cam_from_world().matrix() for img in posed])
    est = world_to_camera_cv_to_c2w_gl(w2c)
    truth = load_truth_cameras(truth_dir)
    rot, pos = camera_errors(est, truth.c2w[[source[img.name] for img in posed]])
    radius = float(np.linalg.norm(truth.centers - truth.centers.mean(0), axis=1).mean())
    return {
        "registered": len(posed),
        "frames": len(entries),
        "rotation_error_deg_median": float(np.median(rot)),
        "position_error_of_radius_median": float(np.median(pos) / radius),
        "reprojection_error_px": float(rec.compute_mean_reprojection_error()),
    }


def run_cli(
    colmap_bin: str, frames: FrameSet, work: Path, settings: colmap.ColmapSettings, truth: Path, ours: bool
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    commands = cli_commands(colmap_bin, frames, work, settings, ours)
    for step, cmd in commands:
        with _timed(rows, f"colmap {step}"):
            done = subprocess.run(cmd, capture_output=True, text=True)
        (work / f"{step}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"colmap {step} failed ({done.returncode}); see {work / f'{step}.log'}")
    models = [pycolmap.Reconstruction(str(d)) for d in sorted((work / "sparse").iterdir()) if d.is_dir()]
    best = max(models, key=lambda r: r.num_reg_images(), default=None)
    return {"steps": rows, **_totals(rows), "commands": [" ".join(cmd) for _, cmd in commands],
            "models": len(models), **model_quality(best, frames, truth)}


def _totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Whole-side figures: the ``(total)`` row if there is one, else the sum of the steps."""
    whole = [r for r in rows if r["step"].endswith("(total)")] or rows
    return {"total_wall_s": round(sum(r["wall_s"] for r in whole), 2), "total_cpu_s": round(sum(r["cpu_s"] for r in whole), 2)}


@contextlib.contextmanager
def _pycolmap_timers(rows: list[dict[str, Any]]) -> Iterator[None]:
    """Time each pycolmap call ``tasks.colmap`` makes (it looks them up on the module per call)."""
    names = ("extract_features", "match_image_pairs", "match_exhaustive", "incremental_mapping", "global_mapping")
    originals = {n: getattr(pycolmap, n) for n in names}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with _timed(rows, f"pycolmap {name}"):
                return fn(*args, **kwargs)

        return timed

    for name, fn in originals.items():
        setattr(pycolmap, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(pycolmap, name, fn)


def run_ours(frames: FrameSet, work: Path, settings: colmap.ColmapSettings, truth: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with _pycolmap_timers(rows), _timed(rows, "solve_cameras (total)"):
        rig = colmap.solve_cameras(frames, work, settings, "bench")
    meta = json.loads(Path(rig.transforms).read_text())["korokoro"]
    figures = camera_quality(frames.index, rig.transforms, truth)
    return {"steps": rows, **_totals(rows), "mapping_attempts": meta["mapping_attempts"], "matcher": meta["matcher"],
            "reprojection_error_px": rig.reprojection_error_px, **figures}


def _colmap_version(colmap_bin: str) -> str:
    out = subprocess.run([colmap_bin, "-h"], capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if line.strip().startswith("COLMAP")), "unknown")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turntable", type=Path, required=True, help="folder with video.mp4 and truth/")
    parser.add_argument("--frames", type=Path, help="frames made by the frames stage (default: extract them here)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write the results here (e.g. bench/results/...)")
    parser.add_argument("--colmap", default="colmap", help="the COLMAP executable")
    parser.add_argument("--frames-repeat", type=int, default=1, help="time the frames stage this many times")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. colmap.num_threads=2")
    args = parser.parse_args(argv)
    cfg = compose_config([f"profile={args.profile}", *args.overrides])
    settings = colmap.ColmapSettings(**cfg["colmap"])
    truth = args.turntable / "truth"
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "turntable": str(args.turntable), "profile": args.profile, "overrides": args.overrides,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "pycolmap": pycolmap.__version__, "colmap_cli": _colmap_version(args.colmap),
                    "load_average_at_start": os.getloadavg()},
    }
    if args.frames is None:
        from tasks.frames import FrameSettings, extract_frames

        video = VideoInput("bench", "bench", "others", args.turntable / "video.mp4", "-", 0, "bench")
        rows: list[dict[str, Any]] = []
        for run in range(args.frames_repeat):
            with _timed(rows, f"frames (extract_frames) run {run + 1}"):
                frames = extract_frames(video, args.out / f"frames-{run + 1}", FrameSettings(**cfg["frames"]), "bench")
        result["frames_stage"] = {"steps": rows, "settings": cfg["frames"]}
    else:
        frames = frames_folder(args.frames)
    result["frames"] = {"dir": str(frames.dir), "count": frames.count, "size": f"{frames.width}x{frames.height}"}
    if not args.skip_ours:
        print("ours (pycolmap):", flush=True)
        result["ours"] = run_ours(frames, args.out / "ours", settings, truth)
    if not args.skip_cli:
        for variant, ours in (("colmap_cli_our_settings", True), ("colmap_cli_defaults", False)):
            print(f"{result['machine']['colmap_cli']} command line, {variant}:", flush=True)
            result[variant] = run_cli(args.colmap, frames, args.out / variant, settings, truth, ours)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    (args.out / "colmap_cli.json").write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    for side in ("ours", "colmap_cli_our_settings", "colmap_cli_defaults"):
        if side in result:
            r = result[side]
            print(f"{side:24} registered {r['registered']}/{r['frames']}  "
                  f"rotation {r.get('rotation_error_deg_median', float('nan')):.3f} deg  "
                  f"position {100 * r.get('position_error_of_radius_median', float('nan')):.3f} % of radius  "
                  f"{r['total_wall_s']:.1f} s wall, {r['total_cpu_s']:.1f} s cpu")
    return result


if __name__ == "__main__":
    main()
