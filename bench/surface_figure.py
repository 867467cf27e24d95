"""A picture of estimated meshes next to the true one, each in the truth's frame, rows of 4 views.

    python -m bench.surface_figure --turntable .benchdata/basket1080 --out fig.png \\
        --mesh RUN_A/mesh-v0/model.glb RUN_A/colmap/transforms.json --mesh RUN_B/mesh/model.glb RUN_B/colmap/transforms.json

Row 1 is the true mesh; each ``--mesh GLB TRANSFORMS`` adds a row, moved into the truth's world
through its run's solved cameras (``bench.quality.glb_in_truth_frame``). Grey shading, so the
geometry shows rather than the texture. Needs pyrender and an OpenGL context
(``PYOPENGL_PLATFORM=osmesa`` headless).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from bench import quality
from tasks.mesh_export import Z_UP_TO_Y_UP
from tasks.mesh_preview import _orbit_poses, _render_pyrender


def surface_figure(turntable: Path, meshes: list[tuple[Path, Path]], out: Path, size: int = 256, views: int = 4) -> Path:
    truth = trimesh.load(turntable / "truth" / "mesh.ply", force="mesh")
    frames = turntable / "frames" / "frames.json"
    rows = [truth] + [quality.glb_in_truth_frame(glb, frames, transforms, turntable / "truth") for glb, transforms in meshes]
    centre, scale = truth.bounds.mean(0), float(np.linalg.norm(truth.extents))
    images = []
    for mesh in rows:
        vertices = (np.asarray(mesh.vertices) - centre) / scale @ Z_UP_TO_Y_UP.T  # the viewer orbits around +Y
        strip = _render_pyrender(trimesh.Trimesh(vertices, mesh.faces, process=False), _orbit_poses(np.zeros(3), 1.6, views), size)
        images.append(np.concatenate(strip, 1))
    Image.fromarray(np.concatenate(images, 0)).save(out, optimize=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turntable", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mesh", nargs=2, type=Path, action="append", default=[], metavar=("GLB", "TRANSFORMS"))
    args = parser.parse_args()
    print(surface_figure(args.turntable, [tuple(m) for m in args.mesh], args.out))


if __name__ == "__main__":
    main()
