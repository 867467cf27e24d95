"""STAND-IN for pyngp, instant-ngp's Python bindings (tests/test_nerf_backends.py).

``fake_pyngp_module`` builds a module with ``TestbedMode.Nerf`` and ``Testbed``; the testbed records
the calls scripts/run.py makes (load_training_data, reload_network_from_file, frame, save_snapshot,
compute_marching_cubes_mesh, set_camera_to_training_view, render) and trains nothing. It knows two
shapes: renders show the analytic sphere the capture was made of (so a held-out view rendered from
the right camera matches its frame), and its marching-cubes mesh is an ellipsoid inside it (three
radii, so an axis mix-up shows), placed where instant-ngp would have it: ``cycle(p * scale + offset)``
with ``cycle(x, y, z) = (y, z, x)`` (instant-ngp's nerf_loader), colours in linear RGB.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import cv2
import numpy as np
import torch
import trimesh

from tests.analytic_field import AnalyticField, SphereSpec, quadrant_color


class FakeTestbed:
    """Stand-in for ``pyngp.Testbed``: records calls, trains nothing, renders the sphere, meshes the ellipsoid."""

    def __init__(self, calls: list, mode: str, spec: SphereSpec, radii: np.ndarray) -> None:
        self.calls, self.spec, self.radii = calls, spec, np.asarray(radii)
        calls.append(("Testbed", mode))
        self.nerf = types.SimpleNamespace(training=types.SimpleNamespace(random_bg_color=None, near_distance=None))
        self.shall_train, self.training_step, self.view, self.dataset = False, 0, None, None

    @property
    def loss(self) -> float:
        return 1.0 / (1 + self.training_step)

    def load_training_data(self, path: str) -> None:
        data = json.loads(Path(path).read_text())
        frames = sorted(data["frames"], key=lambda f: f["file_path"])  # instant-ngp sorts by file_path
        channels = {cv2.imread(str(Path(path).parent / f["file_path"]), cv2.IMREAD_UNCHANGED).shape[2] for f in frames}
        self.dataset = {**data, "frames": frames, "scale": data.get("scale", 0.33), "offset": data.get("offset", [0.5] * 3)}
        self.calls.append(("load_training_data", Path(path).name, len(frames), channels, data.get("aabb_scale")))

    def reload_network_from_file(self, path: str = "") -> None:
        self.calls.append(("reload_network_from_file", path))

    def frame(self) -> bool:
        self.training_step += int(self.shall_train)
        return True

    def save_snapshot(self, path: str, include_optimizer_state: bool = False) -> None:
        Path(path).write_bytes(b"fake snapshot")
        self.calls.append(("save_snapshot", Path(path).name, self.training_step))

    def compute_marching_cubes_mesh(self, resolution, thresh, aabb=None) -> dict:
        """An ellipsoid inside the sphere (its three radii tell the axes apart), placed where instant-ngp
        would have it: ``cycle(p * scale + offset)``; colours linear."""
        self.calls.append(("compute_marching_cubes_mesh", list(resolution), thresh))
        sphere = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
        world = sphere.vertices * self.radii + np.array(self.spec.centre)
        placed = world * self.dataset["scale"] + np.array(self.dataset["offset"])
        ngp = placed[:, [1, 2, 0]]  # (x, y, z) → (y, z, x)
        colors = quadrant_color(world, np.array(self.spec.centre))
        return {"V": ngp.astype(np.float32), "N": sphere.vertex_normals.astype(np.float32),
                "C": colors.astype(np.float32), "F": sphere.faces.astype(np.int32)}

    def set_camera_to_training_view(self, view: int) -> None:
        self.view = view

    def render(self, width: int, height: int, spp: int, linear: bool) -> np.ndarray:
        frame = self.dataset["frames"][self.view]
        d = self.dataset
        out = AnalyticField(self.spec).render(torch.tensor(frame["transform_matrix"], dtype=torch.float32),
                                         torch.tensor([d["fl_x"], d["fl_y"], d["cx"], d["cy"]]), width, height)
        return np.dstack([out["rgb"].numpy(), out["alpha"].numpy()]).astype(np.float32)


def fake_pyngp_module(calls: list, spec: SphereSpec, radii: np.ndarray) -> types.ModuleType:
    """A ``pyngp`` module whose testbeds append to ``calls``."""
    module = types.ModuleType("pyngp")
    module.TestbedMode = types.SimpleNamespace(Nerf="Nerf")
    module.Testbed = lambda mode: FakeTestbed(calls, mode, spec, radii)
    return module
