"""The seed's mesh export, next to ours, from the same trained field.

    python -m bench.naive_mesh --run bench-out/cpu --turntable sample/basket --profile cpu

The seed (shared/NOTES.md) ran marching cubes at 256³ over the whole field box with vertex
colours and no cleaning or decimation, and shipped the OBJ. This rebuilds that from a
``bench.run_stages`` run (its ``records.json``): the same field, the same iso-level the mesh
stage chose (so the comparison is about what happens after marching cubes, not about the
level), the OBJ written by our own writer with vertex colours. It prints triangles, file size,
Chamfer and F-score for both meshes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import trimesh

from bench import quality
from bench.records import load_records
from tasks import mesh_geometry as geo
from tasks.mesh_export import write_obj
from tasks.nerf.base import get_backend


def naive_obj(run: Path, out: Path, resolution: int, device: str) -> dict:
    records = load_records(run)
    field, asset = records["train"], records["mesh"]
    metrics = json.loads(Path(asset.metrics).read_text())
    # The seed meshed one density level; a fused-depth mesh has none, so use the preset's fixed level.
    level = float(metrics.get("iso_level", metrics["settings"]["density_threshold"]))
    radiance = get_backend(field.backend).load(Path(field.dir), device)
    box = radiance.aabb.detach().float().cpu().numpy().astype(np.float64).reshape(2, 3)
    grid = geo.sample_density_grid(radiance, box, resolution, 1 << 18, device)
    vertices, faces = geo.grid_to_mesh(grid, box, level)
    normals = geo.vertex_normals(vertices, faces)
    with torch.no_grad():  # colour seen from outside, along the inverted normal
        colors = radiance.color(torch.from_numpy(vertices).float(), torch.from_numpy(-normals).float()).cpu().numpy()
    out.mkdir(parents=True, exist_ok=True)
    obj = write_obj(out / "naive.obj", vertices, normals, faces, 0.7, colors_srgb=colors)
    return {"obj": obj, "vertices": vertices, "faces": faces, "level": level}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--turntable", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    records = load_records(args.run)
    stills, rig, asset = records["frames"], records["colmap"], records["mesh"]
    truth = args.turntable / "truth"
    naive = naive_obj(args.run, args.run / "naive", args.resolution, args.device)
    s, R, t = quality.world_to_truth(stills.index, rig.transforms, truth)
    rows = {}
    seed_mesh = trimesh.Trimesh(vertices=s * naive["vertices"] @ R.T + t, faces=naive["faces"], process=False)
    rows["seed (256³ marching cubes, vertex colours, no decimation)"] = {
        "triangles": len(naive["faces"]), "file": "OBJ", "bytes": Path(naive["obj"]).stat().st_size,
        **quality.geometry_quality(seed_mesh, truth / "mesh.ply"),
    }
    ours = quality.glb_in_truth_frame(asset.glb, stills.index, rig.transforms, truth)
    rows["ours (mesh stage)"] = {
        "triangles": asset.triangles, "file": "GLB", "bytes": Path(asset.glb).stat().st_size,
        **quality.geometry_quality(ours, truth / "mesh.ply"),
    }
    rows["ours (mesh stage), OBJ"] = {"triangles": asset.triangles, "file": "OBJ + texture",
                                      "bytes": Path(asset.obj).stat().st_size + sum(
                                          p.stat().st_size for p in Path(asset.obj).parent.glob("model_texture.*"))}
    (args.run / "naive_mesh.json").write_text(json.dumps({"iso_level": naive["level"], "rows": rows}, indent=1))
    print(f"iso level {naive['level']} (the mesh stage's choice), field box at {args.resolution}³")
    print("| mesh | triangles | file | MB | Chamfer / diag | F-score @ 1 % |\n|---|---:|---|---:|---:|---:|")
    for name, r in rows.items():
        cd = f"{100 * r['chamfer_of_diag']:.2f} %" if "chamfer_of_diag" in r else "-"
        fs = f"{r['fscore_1pct']:.3f}" if "fscore_1pct" in r else "-"
        print(f"| {name} | {r['triangles']:,} | {r['file']} | {r['bytes'] / 1e6:.2f} | {cd} | {fs} |")


if __name__ == "__main__":
    main()
