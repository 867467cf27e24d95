"""A picture of estimated meshes next to the true one, each in the truth's frame, rows of 4 views.

    python -m bench.surface_figure --turntable .benchdata/basket1080 --out fig.png \\
        --mesh RUN_A/mesh-v0/model.glb RUN_A/colmap/transforms.json --mesh RUN_B/mesh/model.glb RUN_B/colmap/transforms.json

Row 1 is the true mesh; each ``--mesh GLB TRANSFORMS`` adds a row, moved into the truth's world
through its run's solved cameras (``bench.quality.glb_in_truth_frame``). Grey shading, so the
geometry shows rather than the texture. With ``--errors`` each mesh's row is coloured by its
distance to the truth (where precision is lost) and followed by the truth coloured by its
distance to that mesh (where recall is lost): green on the surface, yellow at the F-score's
threshold (1 % of the diagonal), red at twice that or more. Needs pyrender and an OpenGL context
(``PYOPENGL_PLATFORM=osmesa`` headless).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from bench import quality
from tasks.mesh_export import Z_UP_TO_Y_UP
from tasks.mesh_preview import _orbit_poses, _render_pyrender


def distance_colours(points: np.ndarray, other: trimesh.Trimesh, threshold: float, samples: int = 300_000) -> np.ndarray:
    """RGBA ``[N, 4]`` uint8 of ``points [N, 3]`` by their distance to ``other``'s surface: green at 0,
    yellow at ``threshold``, red at twice it or more."""
    surface, _ = trimesh.sample.sample_surface(other, samples, seed=0)
    x = np.clip(cKDTree(surface).query(points)[0] / (2.0 * threshold), 0.0, 1.0)
    rgb = np.stack([np.minimum(1.0, 2.0 * x), np.minimum(1.0, 2.0 - 2.0 * x), np.zeros_like(x)], 1)
    return np.concatenate([rgb * 255, np.full((len(x), 1), 255.0)], 1).astype(np.uint8)


def surface_figure(
    turntable: Path, meshes: list[tuple[Path, Path]], out: Path, size: int = 256, views: int = 4, errors: bool = False
) -> Path:
    truth = trimesh.load(turntable / "truth" / "mesh.ply", force="mesh")
    frames = turntable / "frames" / "frames.json"
    estimates = [quality.glb_in_truth_frame(glb, frames, transforms, turntable / "truth") for glb, transforms in meshes]
    centre, scale = truth.bounds.mean(0), float(np.linalg.norm(truth.extents))
    rows: list[tuple[trimesh.Trimesh, np.ndarray | None]] = [(truth, None)]
    if errors:
        dense_truth = truth.subdivide().subdivide()  # finer colour on the scan's large faces
        for estimate in estimates:
            rows.append((estimate, distance_colours(np.asarray(estimate.vertices), truth, 0.01 * scale)))
            rows.append((dense_truth, distance_colours(np.asarray(dense_truth.vertices), estimate, 0.01 * scale)))
    else:
        rows += [(estimate, None) for estimate in estimates]
    images = []
    for mesh, colours in rows:
        vertices = (np.asarray(mesh.vertices) - centre) / scale @ Z_UP_TO_Y_UP.T  # the viewer orbits around +Y
        shown = trimesh.Trimesh(vertices, mesh.faces, process=False)
        if colours is not None:
            shown.visual = trimesh.visual.ColorVisuals(shown, vertex_colors=colours)
        strip = _render_pyrender(shown, _orbit_poses(np.zeros(3), 1.6, views), size)
        images.append(np.concatenate(strip, 1))
    Image.fromarray(np.concatenate(images, 0)).save(out, optimize=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turntable", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mesh", nargs=2, type=Path, action="append", default=[], metavar=("GLB", "TRANSFORMS"))
    parser.add_argument("--errors", action="store_true", help="colour each mesh and the truth by their distance to each other")
    args = parser.parse_args()
    print(surface_figure(args.turntable, [tuple(m) for m in args.mesh], args.out, errors=args.errors))


if __name__ == "__main__":
    main()
