"""Where a run's held-out error is: per held-out frame, on the run's masks and on the true ones.

    python -m bench.holdout_errors --run RUN --turntable .benchdata/basket1080 --out ERRORS.json [--figure PNG]

The run's ``psnr_holdout_object`` pools the squared error over the pixels the *run's own* masks
call product. On a rendered turntable the true masks are known, so this tool splits that
figure: per held-out frame the PSNR on the run's masks, on the true masks, and on the true
masks' interior (eroded by ``--edge-px``, i.e. without the silhouette's anti-aliased band);
the pixels the run's masks add to or miss from the truth, and the share of the error that
the added pixels carry (there the frame shows background, which a good field renders as
empty, so a mask that bleeds onto the background costs PSNR however good the field is).
``--figure`` draws the worst frame: frame | rendering | error x4 | where the masks disagree.
The rendering is composited over the frame's background plate, as the run's own figure is.

The true masks are the turntable's (one per video frame), shrunk to the frames' size the way
the frames stage shrinks frames (area averaging) and thresholded at one half.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bench.quality import source_index_by_name, true_mask
from bench.records import load_records, run_parser
from tasks.nerf.base import get_backend
from tasks.nerf.dataset import _camera_matrix, load_capture
from tasks.nerf.evaluate import background_plate, composite_on_plate
from tasks.nerf.rays import psnr_from_mse


def _psnr(squared_error: float, values: int) -> float | None:
    return psnr_from_mse(squared_error / values) if values else None


def holdout_errors(run: Path, turntable: Path, edge_px: int = 2, device: str = "auto") -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-frame and pooled figures (see the module doc), and the worst frame's images for the figure."""
    records = load_records(run)
    trained, masks = records["train"], records["segment"]
    settings = json.loads((Path(trained.dir) / "settings.json").read_text())
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    field = get_backend(trained.backend).load(trained.dir, dev)
    capture = load_capture(masks.transforms, int(settings.get("downscale", 1)), int(settings.get("holdout_every", 8)), dev)
    by_name = source_index_by_name(records["frames"].index)
    kernel = np.ones((2 * edge_px + 1, 2 * edge_px + 1), np.uint8)
    meta = json.loads(Path(masks.transforms).read_text())
    frame_meta = {str(f["file_path"]): f for f in meta["frames"]}

    rows, pooled, worst = [], dict.fromkeys(("run", "true", "interior", "added", "run_n", "true_n", "interior_n"), 0.0), None
    for i in capture.holdout_ids:
        with torch.no_grad():
            view = field.render(capture.c2w[i], capture.intrinsics[i], capture.width, capture.height)
        image = capture.images[i].float() / 255.0
        # Composited over the frame's background plate, as the run's own figure (tasks/nerf/evaluate.py).
        composited = composite_on_plate(view["rgb"], view["alpha"], background_plate(image, capture.masks[i]))
        rendered = composited.clamp(0, 1).cpu().numpy()
        frame = image.cpu().numpy()
        error = ((rendered - frame) ** 2).sum(-1)  # [H, W], summed over the channels
        run_mask = capture.masks[i].cpu().numpy()
        undistort = _camera_matrix(frame_meta[capture.names[i]], meta, masks.transforms)
        # At the frames' full size (where K applies), then shrunk as the capture shrank them.
        full = (int(meta.get("w", capture.width)), int(meta.get("h", capture.height)))
        truth = true_mask(Path(turntable) / "truth", by_name[Path(capture.names[i]).name], *full, undistort)
        if full != (capture.width, capture.height):
            truth = cv2.resize(truth.astype(np.float32), (capture.width, capture.height), interpolation=cv2.INTER_AREA) > 0.5
        interior = cv2.erode(truth.astype(np.uint8), kernel) > 0
        added, missed = run_mask & ~truth, truth & ~run_mask
        row = {
            "frame": Path(capture.names[i]).name,
            "psnr_run_mask": _psnr(float(error[run_mask].sum()), int(run_mask.sum()) * 3),
            "psnr_true_mask": _psnr(float(error[truth].sum()), int(truth.sum()) * 3),
            "psnr_true_interior": _psnr(float(error[interior].sum()), int(interior.sum()) * 3),
            "mask_added_px": int(added.sum()),
            "mask_missed_px": int(missed.sum()),
            "error_share_added": float(error[added].sum() / max(error[run_mask].sum(), 1e-12)),
        }
        rows.append(row)
        for key, sel in (("run", run_mask), ("true", truth), ("interior", interior)):
            pooled[key] += float(error[sel].sum())
            pooled[f"{key}_n"] += int(sel.sum()) * 3
        pooled["added"] += float(error[added].sum())
        if worst is None or row["psnr_run_mask"] < worst["row"]["psnr_run_mask"]:
            worst = {"row": row, "frame": frame, "rendered": rendered, "error": error, "added": added, "missed": missed, "truth": truth}
    summary = {
        "run": str(run),
        "holdout_frames": len(rows),
        "edge_px": edge_px,
        "psnr_run_mask": _psnr(pooled["run"], int(pooled["run_n"])),
        "psnr_true_mask": _psnr(pooled["true"], int(pooled["true_n"])),
        "psnr_true_interior": _psnr(pooled["interior"], int(pooled["interior_n"])),
        "error_share_added": pooled["added"] / max(pooled["run"], 1e-12),
        "frames": rows,
    }
    return summary, worst


def worst_frame_figure(worst: dict[str, Any], path: Path, pad: int = 12) -> None:
    """frame | rendering | error x4 | masks (green: the run's mask adds, red: it misses), cropped to the product."""
    frame, rendered = worst["frame"], worst["rendered"]
    rows, cols = np.nonzero(worst["truth"] | worst["added"])
    y0, y1 = max(0, rows.min() - pad), min(frame.shape[0], rows.max() + 1 + pad)
    x0, x1 = max(0, cols.min() - pad), min(frame.shape[1], cols.max() + 1 + pad)
    error = np.repeat(np.clip(np.sqrt(worst["error"] / 3) * 4, 0, 1)[..., None], 3, -1)
    masks = np.zeros_like(frame)
    masks[worst["added"]] = (0.1, 0.9, 0.2)
    masks[worst["missed"]] = (0.95, 0.15, 0.1)
    panels = [p[y0:y1, x0:x1] for p in (frame, rendered, error, masks)]
    strip = (np.concatenate(panels, axis=1) * 255).round().astype(np.uint8)
    label = f"{worst['row']['frame']}: {worst['row']['psnr_run_mask']:.1f} dB on the run's mask, {worst['row']['psnr_true_mask']:.1f} on the true one"
    strip = np.concatenate([np.full((22, strip.shape[1], 3), 255, np.uint8), strip], axis=0)
    cv2.putText(strip, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), strip[..., ::-1])


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="JSON written here")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the worst held-out frame")
    parser.add_argument("--edge-px", type=int, default=2, help="silhouette band left out of the interior figure")
    args = parser.parse_args()
    summary, worst = holdout_errors(args.run, args.turntable, args.edge_px)
    args.out.write_text(json.dumps(summary, indent=1))
    if args.figure is not None and worst is not None:
        worst_frame_figure(worst, args.figure)
    keys = ("psnr_run_mask", "psnr_true_mask", "psnr_true_interior", "error_share_added")
    print(" | ".join(f"{k} {summary[k]:.3f}" for k in keys if summary[k] is not None))
    for row in sorted(summary["frames"], key=lambda r: r["psnr_run_mask"])[:5]:
        print(row)


if __name__ == "__main__":
    main()
