"""How far the trained field's surface depth lies from the true surface, pixel by pixel.

    # 1. where pyrender runs (PYOPENGL_PLATFORM=osmesa on the 2-core machine): the true depth
    python -m bench.depth_errors --run RUN --turntable .benchdata/basket1080 --write-truth
    # 2. after training (the GPU machine, RUN reused there): the field's depth against it
    python -m bench.depth_errors --run RUN --turntable .benchdata/basket1080 [mesh overrides]

The views are the mesh stage's fusion views (``tasks.mesh_fusion.fusion_views``: same frames,
crops and masks, from ``--profile`` and the overrides). Step 1 renders the true mesh, moved
into the run's world through the solved cameras, on each crop and saves ``RUN/true_depth.npz``.
Step 2 renders the field's packed samples once per view and reads, at several opacity levels,
where each ray's opacity reaches that level (what ``mesh.fusion.surface_opacity`` picks), and
the expected depth. Errors are in metres along the ray, positive where the field's surface lies
behind the true one (inside the product). Pixels count where the mask, the true mesh and the
level all agree. Written: ``RUN/depth_errors.json`` and a figure ``RUN/depth_errors.png``
(true depth | field depth | signed error) of the view with the median error spread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bench import quality
from bench.records import load_records, run_parser
from flows.config import compose_config
from tasks.mesh import MeshSettings
from tasks.mesh_fusion import FusionView, fusion_views

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TRUTH_FILE = "true_depth.npz"


def _views(run: Path, overrides: list[str]) -> tuple[list[FusionView], dict[str, Any]]:
    records = load_records(run)
    settings = MeshSettings(**compose_config(overrides)["mesh"])
    return list(fusion_views(Path(records["segment"].transforms), settings.fusion)), records


def write_truth(run: Path, turntable: Path, overrides: list[str]) -> Path:
    """Render the true mesh's depth ``[h, w]`` (0 = no surface) on every fusion view's crop."""
    import trimesh

    from bench.fusion_ceiling import TrueDepthField

    views, records = _views(run, overrides)
    s, R, t = quality.world_to_truth(records["frames"].index, records["colmap"].transforms, turntable / "truth")
    truth = trimesh.load(turntable / "truth" / "mesh.ply", force="mesh")
    field = TrueDepthField(trimesh.Trimesh((np.asarray(truth.vertices) - t) @ R / s, truth.faces, process=False))
    depths = {}
    for view in views:
        out = field.render(view.c2w, view.crop_k, *view.crop_size)
        depths[f"view_{view.index}"] = np.where(out["alpha"].numpy() > 0, out["depth"].numpy(), 0).astype(np.float32)
    path = run / TRUTH_FILE
    np.savez_compressed(path, world_to_metres=np.float64(s), **depths)
    return path


@torch.no_grad()
def field_depths(field: Any, view: FusionView, levels: tuple[float, ...]) -> dict[str, np.ndarray]:
    """The ngp field's depth ``[h, w]`` at each opacity level (0 where never reached), its
    expected depth over the accumulated opacity, and that opacity ``alpha``."""
    from tasks.nerf.packed import depth_at_opacity

    cw, ch = view.crop_size
    parts: dict[str, list[torch.Tensor]] = {}
    for out, samples in field.render_chunks(view.c2w, view.crop_k, cw, ch):
        found = {f"{level:.1f}": depth_at_opacity(out["weights"], samples, level) for level in levels}
        found["mean"] = out["depth"] / out["alpha"].clamp(min=1e-6)
        found["alpha"] = out["alpha"]
        for key, value in found.items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(value).reshape(ch, cw).numpy() for key, value in parts.items()}


def depth_errors(run: Path, turntable: Path, overrides: list[str], device: str) -> dict[str, Any]:
    from tasks.nerf.base import get_backend

    views, records = _views(run, overrides)
    truth = np.load(run / TRUTH_FILE)
    to_metres = float(truth["world_to_metres"])
    diag = float(json.loads((turntable / "truth" / "meta.json").read_text())["bbox_diagonal_m"])
    field = get_backend(records["train"].backend).load(Path(records["train"].dir), device)
    errors: dict[str, list[np.ndarray]] = {}
    spreads, shown = [], []
    on_pixels = 0
    for view in views:
        true = truth[f"view_{view.index}"]
        found = field_depths(field, view, LEVELS)
        on = view.crop_mask.numpy() & (true > 0)
        on_pixels += int(on.sum())
        for key in (*[f"{level:.1f}" for level in LEVELS], "mean"):
            level = float(key) if key != "mean" else 0.5
            valid = on & (found["alpha"] >= level) & (found[key] > 0)
            errors.setdefault(key, []).append(((found[key] - true) * to_metres)[valid])
        err = np.where(on & (found["0.5"] > 0), (found["0.5"] - true) * to_metres, np.nan)
        spreads.append(float(np.nanpercentile(np.abs(err), 75)) if np.isfinite(err).any() else 0.0)
        shown.append((view.index, true, found["0.5"], err))
    rows = []
    threshold = 0.01 * diag
    for key, parts in errors.items():
        e = np.concatenate(parts)
        rows.append({
            "depth": key, "pixels_fraction": round(len(e) / max(on_pixels, 1), 4),
            "median_mm": round(float(np.median(e)) * 1e3, 3), "p10_mm": round(float(np.percentile(e, 10)) * 1e3, 3),
            "p90_mm": round(float(np.percentile(e, 90)) * 1e3, 3),
            "median_abs_mm": round(float(np.median(np.abs(e))) * 1e3, 3),
            "within_1pct": round(float(np.mean(np.abs(e) <= threshold)), 4),
        })
    middle = int(np.argsort(spreads)[len(spreads) // 2])
    _figure(run / "depth_errors.png", *shown[middle], threshold)
    return {"overrides": overrides, "views": len(views), "threshold_mm": round(threshold * 1e3, 3),
            "figure_view": shown[middle][0], "levels": rows}


def _figure(path: Path, index: int, true: np.ndarray, found: np.ndarray, err: np.ndarray, threshold: float) -> None:
    """true depth | field depth (opacity 0.5) | signed error (red: behind the truth, blue: in front; full colour at 1 % of the diagonal)."""
    both = np.concatenate([true[true > 0], found[found > 0]])
    lo, hi = (np.percentile(both, [1, 99]) if len(both) else (0.0, 1.0))

    def gray(depth: np.ndarray) -> np.ndarray:
        img = np.clip((depth - lo) / max(hi - lo, 1e-9), 0, 1) * 255
        img = np.where(depth > 0, 255 - img, 0).astype(np.uint8)
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)

    scaled = np.clip(np.nan_to_num(err) / threshold, -1, 1)
    signed = np.zeros((*err.shape, 3), np.uint8)
    signed[..., 2] = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    signed[..., 0] = (np.clip(-scaled, 0, 1) * 255).astype(np.uint8)
    signed[..., 1] = np.where(np.isfinite(err), (1 - np.abs(scaled)) * 255, 0).astype(np.uint8)
    panel = np.concatenate([gray(true), gray(found), signed], 1)
    scale = max(1, 900 // panel.shape[1])
    panel = cv2.resize(panel, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.putText(panel, f"view {index}: true | field (opacity 0.5) | error (green 0, red behind, blue in front; full at {threshold * 1e3:.1f} mm)",
                (8, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), panel)


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--write-truth", action="store_true", help="render the true depth (needs pyrender) and stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the mesh stage, e.g. mesh.fusion.views=32")
    args = parser.parse_args()
    overrides = [f"profile={args.profile}", *args.overrides]
    if args.write_truth:
        print(write_truth(args.run, args.turntable, overrides))
        return
    result = depth_errors(args.run, args.turntable, overrides, args.device)
    (args.run / "depth_errors.json").write_text(json.dumps(result, indent=1))
    print(quality.markdown_table(result["levels"], list(result["levels"][0])))


if __name__ == "__main__":
    main()
