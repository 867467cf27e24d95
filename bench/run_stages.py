"""Time every stage on a rendered turntable and measure quality against its truth.

    python -m bench.run_stages --turntable sample/basket --out bench-out/basket --profile cpu
    python -m bench.run_stages --turntable DIR --frames DIR/frames --profile gpu   # frames made elsewhere
    python -m bench.run_stages --turntable DIR --reuse OUT1 --out OUT2 nerf.steps=8000  # from train on

Runs the stage functions directly (no Prefect: the figures are the stages' own cost) in one
process, prints a table and writes ``results.json`` + ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable

from bench import quality
from bench.records import load_records, save_records
from bench.targets import check_targets, targets_markdown
from flows.config import compose_config
from tasks import detect, mesh, segment, shard, train
from tasks.nerf.camera_opt import REFINED_TRANSFORMS
from tasks.types import FrameSet, VideoInput


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gpu_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _timed(rows: list[dict[str, Any]], name: str, fn: Callable[[], Any]) -> Any:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(_peak_rss_mb()),
                 "peak_gpu_mb": None if _gpu_peak_mb() is None else round(_gpu_peak_mb())})
    print(f"  {name:8} {rows[-1]['seconds']:8.2f} s", flush=True)
    return result


def training_gpu_peak_mb(train_metrics: dict[str, Any], measured_here: int | None) -> int | None:
    """The train stage's peak GPU MB: torch's peak in this process, unless an outside tool trained.

    nerfstudio and instant-ngp train in their own process or allocator (metrics.json ``extra``
    names a ``peak_memory_kind``), so this process's peak is not the training's: their own GPU
    figure when they report one, else ``None`` (not measured), never a 0 that passes the bound.
    """
    kind = train_metrics.get("extra", {}).get("peak_memory_kind")
    if kind is None:
        return measured_here
    own = train_metrics.get("peak_memory_mb")
    return round(own) if kind.startswith("GPU") and own else None


def existing_frames(folder: Path) -> FrameSet:
    """A frames folder made earlier by the frames stage (``frames.json`` + images)."""
    index = json.loads((folder / "frames.json").read_text())
    first = index["frames"][0]
    return FrameSet(folder, folder / "frames.json", len(index["frames"]), first["width"], first["height"], "pre")


def run(
    turntable: Path, out: Path, overrides: list[str], frames_dir: Path | None, reuse: Path | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    cfg = compose_config(overrides)
    truth = turntable / "truth"
    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    if reuse is not None:
        # Cameras and masks of an earlier run (its records.json): time only train, mesh, shard.
        done = load_records(reuse)
        stills, rig, boxes, masks = done["frames"], done["colmap"], done["detect"], done["segment"]
    elif frames_dir is None:
        from tasks import frames  # PyAV: only where the video is decoded here

        video = VideoInput("bench", "bench", "others", turntable / "video.mp4", "-", 0, "bench")
        stills = _timed(rows, "frames", lambda: frames.extract_frames(
            video, out / "frames", frames.FrameSettings(**cfg["frames"]), "f"))
    else:
        stills = existing_frames(frames_dir)
    if reuse is None:
        from tasks import colmap  # pycolmap: only where cameras are solved (a --reuse run needs none)

        rig = _timed(rows, "colmap", lambda: colmap.solve_cameras(
            stills, out / "colmap", colmap.ColmapSettings(**cfg["colmap"]), "c"))
        boxes = _timed(rows, "detect", lambda: detect.detect_product(
            rig, out / "detect", detect.detector_settings(cfg["detector"]), "d"))
        masks = _timed(rows, "segment", lambda: segment.segment_product(
            rig, boxes, out / "segment", segment.segmenter_settings(cfg["segmenter"]), "s"))
    if until == "segment":
        # Cameras and masks only (e.g. made on a CPU machine for a later --reuse on the GPU one).
        save_records(out, {"frames": stills, "colmap": rig, "detect": boxes, "segment": masks})
        result = {"turntable": str(turntable), "overrides": overrides, "stages": rows}
        (out / "results.json").write_text(json.dumps(result, indent=1))
        return result
    field = _timed(rows, "train", lambda: train.train_field(masks, out / "train", cfg["nerf"], "t"))
    device = "cuda" if cfg["nerf"].get("device") == "cuda" else "cpu"
    asset = _timed(rows, "mesh", lambda: mesh.extract_mesh(
        field, masks, out / "mesh", mesh.MeshSettings(**cfg["mesh"]), "m", device=device))
    save_records(out, {"frames": stills, "colmap": rig, "detect": boxes, "segment": masks, "train": field, "mesh": asset})
    _timed(rows, "shard", lambda: shard.shard_assets(asset, "bench", out / "shard", cfg["storage"]["part_bytes"], "h"))

    figures: dict[str, Any] = {}
    figures.update(quality.camera_quality(stills.index, rig.transforms, truth))
    refined = Path(field.dir) / REFINED_TRANSFORMS
    if refined.is_file():  # nerf.pose_lr: the cameras as training left them
        cams = quality.camera_quality(stills.index, refined, truth)
        figures["rotation_error_deg_median_refined"] = cams["rotation_error_deg_median"]
        figures["position_error_of_radius_median_refined"] = cams["position_error_of_radius_median"]
    figures.update(quality.mask_quality(stills.index, masks.transforms, truth))
    train_metrics = json.loads(field.metrics.read_text())
    train_row = next(r for r in rows if r["stage"] == "train")
    train_row["peak_gpu_mb"] = training_gpu_peak_mb(train_metrics, train_row["peak_gpu_mb"])
    figures["psnr_holdout_object"] = train_metrics.get("extra", {}).get("psnr_holdout_object")
    figures["train_steps"] = train_metrics.get("steps")
    estimate = quality.glb_in_truth_frame(asset.glb, stills.index, rig.transforms, truth)
    figures.update(quality.geometry_quality(estimate, truth / "mesh.ply"))
    figures["triangles"] = asset.triangles
    figures["glb_bytes"] = Path(asset.glb).stat().st_size
    figures["frames_size"] = f"{stills.width}x{stills.height}"
    # SSIM next to PSNR, training time and memory, OBJ and USDZ sizes: what each stage's metrics.json holds.
    mesh_metrics = json.loads(Path(asset.metrics).read_text())
    figures.update(quality.run_figures(train_metrics, mesh_metrics))

    import torch

    result = {
        "turntable": str(turntable),
        "overrides": overrides,
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "stages": rows,
        # Where the mesh stage's time went (surface, cleaning, decimation, colour, unwrap, bake, export).
        "mesh_parts_seconds": mesh_metrics.get("seconds"),
        "total_seconds": round(sum(r["seconds"] for r in rows), 2),
        "quality": figures,
    }
    result["targets"] = check_targets(result, cfg["profile_name"])
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| stage | seconds | peak RSS MB | peak GPU MB |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_rss_mb']} | {r['peak_gpu_mb'] or '-'} |" for r in rows]
    lines += [f"| **total** | **{result['total_seconds']}** | | |", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]
    lines += ["", *targets_markdown(result["targets"])]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turntable", type=Path, required=True, help="folder with video.mp4 and truth/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--frames", type=Path, default=None, help="use frames extracted earlier")
    parser.add_argument("--reuse", type=Path, default=None, help="start at train with the cameras and masks of this earlier run")
    parser.add_argument("--until", choices=["segment"], default=None, help="stop after this stage (records.json for --reuse)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. nerf.steps=2000")
    args = parser.parse_args()
    run(args.turntable, args.out, [f"profile={args.profile}", *args.overrides], args.frames, args.reuse, args.until)


if __name__ == "__main__":
    main()
