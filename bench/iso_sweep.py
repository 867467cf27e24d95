"""Geometry against the truth at every candidate marching-cubes level, for one trained field.

    python -m bench.iso_sweep --run bench-out/gpu --turntable .benchdata/basket1080 [mesh overrides]

``--run`` is a ``bench.run_stages`` output folder (its ``records.json``). The density grid is
sampled once; each level is meshed and cleaned as the mesh stage does (hull cull, main
components, smoothing, decimation to the budget) but not coloured, then measured (Chamfer and
F-score, camera-aligned and ICP-refined) next to the silhouette score the mesh stage ranks
levels by. It shows whether the rule that picks the level picks a good one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from bench import quality
from bench.records import load_records, run_parser
from flows.config import compose_config
from tasks import mesh_geometry as geo
from tasks.mesh import MeshSettings
from tasks.mesh_surface import clean_surface, meshing_box
from tasks.mesh_iso import choose_iso_level, silhouette_iou
from tasks.nerf.base import get_backend


def sweep(run: Path, turntable: Path, overrides: list[str], device: str) -> list[dict[str, Any]]:
    cfg = compose_config(overrides)
    settings = MeshSettings(**cfg["mesh"])
    records = load_records(run)
    stills, rig, masks, field = records["frames"], records["colmap"], records["segment"], records["train"]
    radiance = get_backend(field.backend).load(Path(field.dir), device)
    aabb = radiance.aabb.detach().float().cpu().numpy().astype(np.float64).reshape(2, 3)
    box = meshing_box(aabb, masks, settings)
    grid = geo.sample_density_grid(radiance, box, settings.grid_resolution, settings.chunk_points, device)
    axes = [np.linspace(box[0, k], box[1, k], settings.grid_resolution) for k in range(3)]
    scores = silhouette_iou(grid, axes, Path(masks.transforms), settings.iso_levels, settings.iso_views, settings.iso_work_px)
    chosen = choose_iso_level(scores, settings.iso_tolerance)
    s, R, t = quality.world_to_truth(stills.index, rig.transforms, turntable / "truth")
    rows = []
    for level in settings.iso_levels:
        try:
            v, f = geo.grid_to_mesh(grid, box, level)
        except geo.EmptyFieldError:
            continue
        v, f, _ = clean_surface(v, f, masks, settings, settings.hull_cull)
        v, f = geo.decimate(v, f, settings.max_triangles)
        estimate = trimesh.Trimesh(vertices=s * v @ R.T + t, faces=f, process=False)
        row = {"level": level, "silhouette_iou": round(scores.get(level, float("nan")), 4), "chosen": level == chosen}
        row.update(quality.rounded_geometry(estimate, turntable / "truth" / "mesh.ply"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = sweep(args.run, args.turntable, [f"profile={args.profile}", *args.overrides], args.device)
    (args.run / "iso_sweep.json").write_text(json.dumps(rows, indent=1))
    keys = ["level", "silhouette_iou", "chosen", "chamfer_of_diag", "fscore_1pct", "chamfer_of_diag_icp", "fscore_1pct_icp"]
    print(quality.markdown_table(rows, keys))


if __name__ == "__main__":
    main()
