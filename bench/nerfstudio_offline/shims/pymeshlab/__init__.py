"""Stand-in for the one part of pymeshlab that ``ns-export tsdf --texture-method tsdf`` uses.

BENCHMARK USE ONLY (bench/nerfstudio_offline/setup_offline_env.sh). pymeshlab's wheel (99 MB)
does not fit the GPU machine's 64 MB carry. In nerfstudio 1.1.5 the TSDF export reaches pymeshlab
only in ``TSDF.export_mesh``, to write the marching-cubes mesh as a PLY file:
``Mesh(vertex_matrix=, face_matrix=, v_normals_matrix=, v_color_matrix=)``, then
``MeshSet().add_mesh(m, name)`` and ``save_current_mesh(filename)``. This writes the same mesh
with trimesh. Anything else of pymeshlab (decimation, Poisson, the textured ``--texture-method
nerf`` path) raises, naming this file.
"""

from __future__ import annotations

import numpy as np

_WHY = "bench/nerfstudio_offline/shims/pymeshlab is a stand-in that only writes meshes; install the real pymeshlab for"


class Mesh:
    """Vertices ``[V, 3]``, faces ``[F, 3]``, normals ``[V, 3]`` and RGBA colours ``[V, 4]`` in [0, 1]."""

    def __init__(self, vertex_matrix, face_matrix, v_normals_matrix=None, v_color_matrix=None, **unused):
        if unused:
            raise NotImplementedError(f"{_WHY} Mesh({', '.join(unused)}=...)")
        self.vertices = np.asarray(vertex_matrix, np.float64)
        self.faces = np.asarray(face_matrix, np.int64)
        self.normals = None if v_normals_matrix is None else np.asarray(v_normals_matrix, np.float64)
        self.colors = None if v_color_matrix is None else np.asarray(v_color_matrix, np.float64)


class MeshSet:
    """Holds meshes; ``save_current_mesh`` writes the last one added (PLY, OBJ, ... by extension)."""

    def __init__(self):
        self._meshes: list[Mesh] = []

    def add_mesh(self, mesh: Mesh, mesh_name: str = "") -> None:
        self._meshes.append(mesh)

    def save_current_mesh(self, file_name: str, **unused) -> None:
        import trimesh

        mesh = self._meshes[-1]
        colors = None if mesh.colors is None else np.clip(np.round(mesh.colors * 255.0), 0, 255).astype(np.uint8)
        out = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_normals=mesh.normals, vertex_colors=colors, process=False)
        out.export(str(file_name))

    def __getattr__(self, name: str):
        raise NotImplementedError(f"{_WHY} MeshSet.{name}")
