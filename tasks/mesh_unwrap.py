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


def partition_faces(vertices: np.ndarray, faces: np.ndarray, parts: int) -> np.ndarray:
    """``[F]`` part label of each face: ``parts`` compact, equal pieces (recursive median splits of the
    face centroids along the longest side of each piece's box)."""
    labels = np.zeros(len(faces), dtype=np.int64)
    if parts <= 1 or len(faces) < 2 * parts:
        return labels
    corners = vertices.astype(np.float32)
    centroids = corners[faces[:, 0]] + corners[faces[:, 1]] + corners[faces[:, 2]]  # 3× the centroid: same order
    groups = [np.arange(len(faces))]
    while len(groups) < parts:
        groups.sort(key=len)
        group = groups.pop()
        c = centroids[group]
        axis = int(np.argmax(c.max(0) - c.min(0)))
        half = len(group) // 2
        order = group[np.argpartition(c[:, axis], half)]  # a median split needs no full sort
        groups += [order[:half], order[half:]]
    for label, group in enumerate(groups):
        labels[group] = label
    return labels


def _unwrap(
    vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding_px: int, parts: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas on ``parts`` pieces of the mesh, packed into one atlas.

    xatlas' chart growing is far worse than linear in a mesh's size (100k decimated marching-cubes
    faces: 100 s on an H100 host) and it charts separate meshes on separate threads: 16 pieces
    of the same mesh took 2.3 s there, for +3 % charts and +1 % vertices (cut along the pieces).
    """
    import xatlas

    labels = partition_faces(vertices, faces, parts)
    atlas = xatlas.Atlas()
    pieces = []
    for label in range(int(labels.max()) + 1):
        used, local = np.unique(faces[labels == label], return_inverse=True)
        if len(used) == 0:
            continue
        pieces.append((used, np.flatnonzero(labels == label)))
        atlas.add_mesh(np.ascontiguousarray(vertices[used], dtype=np.float32), local.reshape(-1, 3).astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)  # texels-per-unit is then estimated to roughly fill this size
    pack.padding = int(padding_px)
    pack.bilinear = True  # leave room for bilinear filtering at chart borders
    # Charts on 4×4 texel blocks: fewer places to try, so packing is faster (100k faces: 44 → 31 s on
    # two busy cores) and utilisation was no worse (0.85 vs 0.84).
    pack.blockAlign = True
    atlas.generate(xatlas.ChartOptions(), pack)
    if atlas.atlas_count != 1:
        raise UnwrapError(f"xatlas packed {atlas.atlas_count} atlases; expected one")
    vmaps, new_faces, uvs = [], np.empty((len(faces), 3), dtype=np.int64), []
    offset = 0
    for index, (used, face_ids) in enumerate(pieces):
        vmapping, piece_faces, uv = atlas.get_mesh(index)
        vmaps.append(used[vmapping.astype(np.int64)])
        new_faces[face_ids] = piece_faces.astype(np.int64) + offset  # faces keep their input order
        uvs.append(uv.astype(np.float64))
        offset += len(vmapping)
    return np.concatenate(vmaps), new_faces, np.concatenate(uvs)


def unwrap(
    vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding_px: int, in_subprocess: bool, timeout_s: float,
    parts: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Charts and packs the mesh into one texture.

    vertices ``[V, 3]``, faces ``[F, 3]`` → ``vmapping [V']`` (source vertex of each new vertex;
    vertices are split along chart seams), ``faces [F, 3]`` into the new vertices, ``uv [V', 2]``
    in 0..1 (origin bottom-left, v up: the OBJ convention). ``parts``: xatlas charts that many
    pieces of the mesh in parallel (see :func:`_unwrap`).
    """
    if not in_subprocess:
        return _unwrap(vertices, faces, texture_size, padding_px, parts)
    with tempfile.TemporaryDirectory(prefix="korokoro-unwrap-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, vertices=vertices, faces=faces, size=texture_size, padding=padding_px, parts=parts)
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
        vmapping, new_faces, uv = _unwrap(job["vertices"], job["faces"], int(job["size"]), int(job["padding"]), int(job["parts"]))
    np.savez(sys.argv[2], vmapping=vmapping, faces=new_faces, uv=uv)
