"""The run report: one markdown page per product run, for people, plus the same as JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from flows.stages import StageRun


def _read_json(path: Any) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, TypeError, ValueError):
        return {}


def _outputs(run: StageRun) -> str:
    """A short description of what a stage produced, from its record."""
    r = run.record
    if r is None:
        return ""
    name = run.stage
    if name == "ingest":
        return f"{Path(r.video).name}, {r.size_bytes / 2**20:.1f} MiB, sha256 {r.sha256[:12]}"
    if name == "frames":
        return f"{r.count} frames at {r.width}x{r.height}"
    if name == "colmap":
        return (
            f"{r.registered}/{r.total} frames registered ({100 * r.registered_fraction:.0f} %), "
            f"reprojection {r.reprojection_error_px:.2f} px"
        )
    if name == "detect":
        return f"{r.found}/{r.total} frames with a box ({r.detector})"
    if name == "segment":
        return f"masks, contact sheet `{Path(r.contact_sheet).name}`"
    if name == "train":
        m = _read_json(r.metrics)
        psnr = (m.get("extra") or {}).get("psnr_holdout_object")
        return f"{r.backend}, {m.get('steps', '?')} steps" + (f", held-out PSNR {psnr:.1f} dB" if psnr else "")
    if name == "mesh":
        return f"{r.triangles} triangles, GLB {Path(r.glb).stat().st_size / 2**20:.2f} MiB"
    if name == "shard":
        return f"{r.parts} parts"
    if name == "upload":
        return f"manifest `{r.manifest_key}`"
    return ""


def run_summary(runs: Sequence[StageRun]) -> dict[str, Any]:
    """The few numbers that compare runs (multirun table, metrics artifact); None where a stage
    did not finish. Train and mesh numbers come from their metrics files, so a cached stage
    reports the time it took when it ran."""
    by_stage = {r.stage: r for r in runs if r.record is not None}
    summary: dict[str, Any] = {"run_seconds": round(sum(r.seconds for r in runs), 2)}
    train = _read_json(by_stage["train"].record.metrics) if "train" in by_stage else {}
    extra = train.get("extra") or {}
    summary.update(
        train_backend=train.get("backend"),
        train_steps=train.get("steps"),
        train_seconds=round(train["seconds"], 2) if "seconds" in train else None,
        train_device=train.get("device"),
        psnr_holdout_db=round(extra["psnr_holdout_object"], 3) if extra.get("psnr_holdout_object") is not None else None,
        mask_iou_holdout=round(extra["mask_iou_holdout"], 4) if extra.get("mask_iou_holdout") is not None else None,
    )
    mesh = _read_json(by_stage["mesh"].record.metrics) if "mesh" in by_stage else {}
    summary.update(
        triangles=mesh.get("triangles"),
        glb_bytes=mesh.get("glb_bytes"),
        mesh_seconds=round(sum((mesh.get("seconds") or {}).values()), 2) if mesh.get("seconds") else None,
    )
    return summary


def write_report(
    work_dir: Path,
    unique_id: str,
    title: str,
    runs: Sequence[StageRun],
    status: str,
    error: str | None,
    config: dict[str, Any],
) -> Path:
    """Write ``report.md`` and ``report.json`` into ``work_dir``; return the markdown path."""
    total = sum(r.seconds for r in runs)
    lines = [
        f"# KoroKoro run: {title} (`{unique_id}`)",
        "",
        f"- status: **{status}**" + (f" — {error}" if error else ""),
        f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- total stage time: {total:.1f} s",
        f"- profile: nerf={config.get('nerf', {}).get('backend')}, frames={config.get('frames', {}).get('count')}",
        "",
        "| # | stage | state | seconds | outputs | folder |",
        "|---|---|---|---:|---|---|",
    ]
    for i, run in enumerate(runs, 1):
        lines.append(
            f"| {i} | {run.stage} | {run.state} | {run.seconds:.1f} | {_outputs(run)} | `{run.out_dir.name}` |"
        )
    mesh = next((r for r in runs if r.stage == "mesh" and r.record is not None), None)
    if mesh is not None:
        lines += ["", "## Mesh metrics", "", "```json", json.dumps(_read_json(mesh.record.metrics), indent=1), "```"]
    segment = next((r for r in runs if r.stage == "segment" and r.record is not None), None)
    if segment is not None and Path(segment.record.contact_sheet).exists():
        rel = Path(segment.record.contact_sheet).relative_to(work_dir)
        lines += ["", "## Masks", "", f"![mask contact sheet]({rel.as_posix()})"]
    if mesh is not None and (Path(mesh.record.dir) / "preview.png").exists():
        rel = (Path(mesh.record.dir) / "preview.png").relative_to(work_dir)
        lines += ["", "## Result", "", f"![turntable preview]({rel.as_posix()})"]
    md = work_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    (work_dir / "report.json").write_text(
        json.dumps(
            {
                "unique_id": unique_id,
                "title": title,
                "status": status,
                "error": error,
                "summary": run_summary(runs),
                "stages": [
                    {"stage": r.stage, "state": r.state, "seconds": round(r.seconds, 3), "out_dir": str(r.out_dir)}
                    for r in runs
                ],
            },
            indent=1,
        )
    )
    return md
