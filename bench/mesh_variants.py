"""The mesh stage run again on one trained field with other settings, each measured against the truth.

    python -m bench.mesh_variants --run bench-out/gpu --turntable .benchdata/basket1080 \\
        --variant "mesh.surface=density" --variant "mesh.surface=depth_fusion mesh.fusion.close_base=false"

``--run`` is a ``bench.run_stages`` output folder (its ``records.json``); every ``--variant`` is
a space-separated list of Hydra overrides on top of ``profile=<--profile>``. Each variant is the
whole mesh stage (surface, cleaning, budget, texture, export), timed, into ``<run>/mesh-v<i>``;
the table compares its Chamfer distance and F-score (camera-aligned and ICP-refined).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench import quality
from bench.records import load_records, run_parser
from flows.config import compose_config
from tasks.mesh import MeshSettings, extract_mesh

KEYS = ("variant", "seconds", "triangles", "glb_bytes", "chamfer_of_diag", "fscore_1pct", "precision_1pct",
        "recall_1pct", "chamfer_of_diag_icp", "fscore_1pct_icp", "bbox_extent_error_max")


def run_variants(run: Path, turntable: Path, profile: str, variants: list[str], device: str) -> list[dict[str, Any]]:
    records = load_records(run)
    stills, rig, masks, field = records["frames"], records["colmap"], records["segment"], records["train"]
    rows = []
    for i, variant in enumerate(variants):
        cfg = compose_config([f"profile={profile}", *variant.split()])
        started = time.perf_counter()
        asset = extract_mesh(field, masks, run / f"mesh-v{i}", MeshSettings(**cfg["mesh"]), f"v{i}", device=device)
        seconds = time.perf_counter() - started
        estimate = quality.glb_in_truth_frame(asset.glb, stills.index, rig.transforms, turntable / "truth")
        metrics = json.loads(Path(asset.metrics).read_text())
        row: dict[str, Any] = {"variant": variant or "(preset)", "seconds": round(seconds, 2), "triangles": asset.triangles,
                               "glb_bytes": metrics["glb_bytes"], "stage_seconds": metrics["seconds"]}
        row.update(quality.rounded_geometry(estimate, turntable / "truth" / "mesh.ply"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variant", action="append", default=[], help="space-separated overrides (repeatable)")
    parser.add_argument("--name", default="mesh_variants", help="results file name (without .json)")
    args = parser.parse_args()
    rows = run_variants(args.run, args.turntable, args.profile, args.variant or [""], args.device)
    (args.run / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print(quality.markdown_table(rows, KEYS))


if __name__ == "__main__":
    main()
