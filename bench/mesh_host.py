"""What a machine's host CPU gives the mesh stage: its CPU quota, how work scales over processes,
and one-pass decimation of a big marching-cubes surface.

    python -m bench.mesh_host [--resolution 480] [--out host.json]

The surface is a bumpy sphere's marching cubes (``--resolution`` 480: about 1.3 million faces,
like a fused basket's 1.4 million). No GPU, field or bench data is needed, so the figures separate
the host from the rest of the mesh stage. (Session 11's call 3 also timed decimation in pieces on
every core, with the version of this tool at commit 5ad6bbe; that path was dropped.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import marching_cubes

from tasks import mesh_geometry as geo

_BUSY = "import time; t = time.perf_counter(); s = sum(i * i for i in range(3_000_000)); print(time.perf_counter() - t)"


def cpu_quota() -> dict[str, Any]:
    """The cgroup's CPU limit (``cpu.max``: quota and period in µs) and its throttling counters."""
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    for name in ("cpu.max", "cpu.stat"):
        path = Path("/sys/fs/cgroup") / name
        out[name] = path.read_text().strip() if path.is_file() else None
    return out


def process_scaling(counts: tuple[int, ...]) -> dict[int, float]:
    """Wall seconds for N processes each running the same busy loop at once (ideal: flat in N)."""
    walls = {}
    for n in counts:
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.DEVNULL) for _ in range(n)]
        for proc in procs:
            proc.wait()
        walls[n] = round(time.perf_counter() - started, 3)
    return walls


def bumpy_sphere(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-0.7, 0.7, resolution, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    level = np.sqrt(x**2 + y**2 + z**2) - (0.5 + 0.03 * np.sin(40 * x) * np.cos(37 * y) * np.sin(31 * z))
    vertices, faces, _, _ = marching_cubes(level, 0.0)
    return vertices.astype(np.float64), faces.astype(np.int64)


def decimation_seconds(vertices: np.ndarray, faces: np.ndarray, target: int) -> float:
    """Seconds of the mesh stage's one-pass quadric decimation down to ``target`` faces."""
    started = time.perf_counter()
    geo.decimate(vertices, faces, target)
    return round(time.perf_counter() - started, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=480)
    parser.add_argument("--target", type=int, default=100000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {"quota": cpu_quota()}
    cores = result["quota"]["affinity"]
    result["process_scaling_s"] = process_scaling(tuple(sorted({1, 2, max(1, cores // 2), cores})))
    vertices, faces = bumpy_sphere(args.resolution)
    result["faces"] = len(faces)
    result["decimation_one_pass_s"] = decimation_seconds(vertices, faces, args.target)
    result["quota_after"] = cpu_quota()["cpu.stat"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
