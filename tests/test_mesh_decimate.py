"""Decimation in pieces: the pieces weld back into one closed surface, and a failure costs only the speed-up."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from skimage.measure import marching_cubes

import tasks.mesh_decimate as mesh_decimate
from tasks.mesh_decimate import decimate, decimate_pieces, piece_count


@pytest.fixture(scope="module")
def bumpy_sphere() -> tuple[np.ndarray, np.ndarray]:
    """A closed marching-cubes surface (~40k faces) of a sphere of radius ~0.5 with bumps."""
    axis = np.linspace(-0.7, 0.7, 72)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    level = r - (0.5 + 0.04 * np.sin(6 * x) * np.cos(5 * y))
    vertices, faces, _, _ = marching_cubes(level, 0.0, spacing=(axis[1] - axis[0],) * 3)
    return vertices.astype(np.float64) - 0.7, faces.astype(np.int64)


def _open_edges(faces: np.ndarray) -> int:
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int((counts != 2).sum())


def _radius_error(vertices: np.ndarray) -> float:
    """Largest distance of a vertex from the bumpy surface, in its radius."""
    x, y, _ = vertices.T
    return float(np.abs(np.linalg.norm(vertices, axis=1) - (0.5 + 0.04 * np.sin(6 * x) * np.cos(5 * y))).max())


def test_pieces_weld_back_into_one_closed_surface(bumpy_sphere):
    vertices, faces = bumpy_sphere
    assert _open_edges(faces) == 0
    welded_vertices, welded_faces = decimate_pieces(vertices, faces, target=8000, parts=4)
    assert _open_edges(welded_faces) == 0  # the cuts stayed where they were, on both sides
    assert 6000 < len(welded_faces) < 10000
    assert len(np.unique(welded_faces)) == len(welded_vertices)  # no stray vertices
    assert _radius_error(welded_vertices) < 0.01


def test_decimate_in_pieces_meets_the_budget_like_one_pass(bumpy_sphere):
    vertices, faces = bumpy_sphere
    one_v, one_f = decimate(vertices, faces, 3000)
    pieces_v, pieces_f = decimate(vertices, faces, 3000, parts=4, piece_margin=1.5)
    assert len(one_f) <= 3000 and 2800 < len(pieces_f) <= 3000
    assert _open_edges(pieces_f) == 0
    assert _radius_error(pieces_v) < 1.5 * _radius_error(one_v) + 1e-3


def test_a_failed_piece_falls_back_to_one_pass(bumpy_sphere, monkeypatch, caplog):
    vertices, faces = bumpy_sphere

    def crash(jobs, timeout_s):
        raise RuntimeError("a decimation piece failed (exit code -11): Segmentation fault")

    monkeypatch.setattr(mesh_decimate, "_run_children", crash)
    with caplog.at_level(logging.WARNING, logger="tasks.mesh_decimate"):
        v, f = decimate(vertices, faces, 3000, parts=4)
    assert len(f) <= 3000 and _open_edges(f) == 0
    assert "decimating the whole mesh in one pass" in caplog.text and "exit code -11" in caplog.text


def test_a_child_that_fails_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="decimation piece failed .exit code 1"):
        mesh_decimate._run_children([(tmp_path / "missing.npz", tmp_path / "out.npz")], timeout_s=60)


def test_piece_count_is_one_per_share_and_at_most_one_per_core(monkeypatch):
    monkeypatch.setattr(mesh_decimate.os, "cpu_count", lambda: 16)
    assert piece_count(1_400_000, 100_000) == 14
    assert piece_count(2_400_000, 100_000) == 16
    assert piece_count(150_000, 100_000) == 1
    assert piece_count(1_400_000, 0) == 1
