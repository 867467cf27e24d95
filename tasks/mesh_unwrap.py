"""UV unwrapping with xatlas, optionally in a child process.

xatlas 0.0.11 segfaults on some inputs (a plain 80k-face icosphere, here): a crash must cost
the texture, not the worker. The child is ``python -m tasks.mesh_unwrap in.npz out.npz`` (a
plain subprocess, not multiprocessing: spawn would re-run the caller's main script). This
module imports only numpy and xatlas so the child starts quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


class UnwrapError(RuntimeError):
    """xatlas failed (crashed, timed out or gave more than one atlas)."""


def _unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)  # texels-per-unit is then estimated to roughly fill this size
    pack.padding = int(padding_px)
    pack.bilinear = True  # leave room for bilinear filtering at chart borders
    atlas.generate(xatlas.ChartOptions(), pack)
    if atlas.atlas_count != 1:
        raise UnwrapError(f"xatlas packed {atlas.atlas_count} atlases; expected one")
    vmapping, new_faces, uv = atlas.get_mesh(0)
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float64)


def unwrap(
    vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding_px: int, in_subprocess: bool, timeout_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Charts and packs the mesh into one texture.

    vertices ``[V, 3]``, faces ``[F, 3]`` → ``vmapping [V']`` (source vertex of each new vertex;
    vertices are split along chart seams), ``faces [F, 3]`` into the new vertices, ``uv [V', 2]``
    in 0..1 (origin bottom-left, v up: the OBJ convention).
    """
    if not in_subprocess:
        return _unwrap(vertices, faces, texture_size, padding_px)
    with tempfile.TemporaryDirectory(prefix="korokoro-unwrap-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, vertices=vertices, faces=faces, size=texture_size, padding=padding_px)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)  # so the child finds `tasks`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tasks.mesh_unwrap", str(src), str(dst)],
                env=env, capture_output=True, text=True, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as err:  # subprocess.run kills its child on timeout
            raise UnwrapError(f"xatlas took over {timeout_s:.0f} s (mesh.unwrap_timeout_s)") from err
        if proc.returncode != 0 or not dst.exists():
            raise UnwrapError(
                f"xatlas failed on a mesh of {len(faces)} triangles (exit code {proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        with np.load(dst) as out:
            return out["vmapping"], out["faces"], out["uv"]


if __name__ == "__main__":
    with np.load(sys.argv[1]) as job:
        vmapping, new_faces, uv = _unwrap(job["vertices"], job["faces"], int(job["size"]), int(job["padding"]))
    np.savez(sys.argv[2], vmapping=vmapping, faces=new_faces, uv=uv)
