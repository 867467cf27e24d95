"""Camera geometry helpers for the cameras stage: axis conventions and scene normalisation.

Conventions used throughout:
- ``c2w``: ``(N, 4, 4)`` camera-to-world matrices, OpenGL camera axes (x right, y up,
  the camera looks along -z) unless the name says ``_cv``.
- ``_cv`` poses use COLMAP / OpenCV camera axes (x right, y down, looks along +z).
- A similarity ``S`` is a ``(4, 4)`` matrix ``[[s R, t], [0, 1]]`` acting on column points.
"""

from __future__ import annotations

import numpy as np

# Flipping y and z of the camera frame turns OpenCV camera axes into OpenGL ones (and back).
CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


def world_to_camera_cv_to_c2w_gl(w2c_cv: np.ndarray) -> np.ndarray:
    """COLMAP world-to-camera ``(N, 3, 4)`` [R|t] (OpenCV axes) → ``(N, 4, 4)`` c2w in OpenGL axes."""
    rot = w2c_cv[:, :3, :3]
    trans = w2c_cv[:, :3, 3]
    rot_c2w = np.transpose(rot, (0, 2, 1))
    c2w_cv = np.tile(np.eye(4), (len(w2c_cv), 1, 1))
    c2w_cv[:, :3, :3] = rot_c2w
    c2w_cv[:, :3, 3] = -np.einsum("nij,nj->ni", rot_c2w, trans)
    return c2w_cv @ CV_TO_GL


def closest_point_to_axes(origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Least-squares point nearest to N lines (``origins``, ``directions``: ``(N, 3)``) → ``(3,)``.

    Minimises ``sum_i |(I - d_i d_i^T)(p - o_i)|^2``; raises ValueError when the lines are
    all parallel (the normal equations are singular), e.g. a camera that only translated.
    """
    d = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    projectors = np.eye(3)[None] - d[:, :, None] * d[:, None, :]  # (N, 3, 3)
    lhs = projectors.sum(axis=0)
    rhs = np.einsum("nij,nj->i", projectors, origins)
    if np.linalg.cond(lhs) > 1e8:
        raise ValueError("camera optical axes are (nearly) parallel: no point they all look at")
    return np.linalg.solve(lhs, rhs)


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The ``(3, 3)`` rotation taking unit direction ``a`` onto unit direction ``b`` (shortest arc)."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if c < -1.0 + 1e-9:
        # Opposite directions: turn half a circle about any axis orthogonal to a.
        helper = np.eye(3)[np.argmin(np.abs(a))]
        axis = np.cross(a, helper)
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def normalizing_similarity(c2w: np.ndarray, camera_distance: float) -> np.ndarray:
    """The ``(4, 4)`` similarity that puts an object-centred orbit in the product world.

    ``c2w``: ``(N, 4, 4)`` OpenGL camera-to-world. Centre = least-squares point closest to
    every optical axis (where the seller pointed the camera); up = mean camera up vector
    (+y column; over an orbit the tilts cancel), rotated onto +Z; scale so the mean camera
    distance to the centre is ``camera_distance``.
    """
    centers = c2w[:, :3, 3]
    look_dirs = -c2w[:, :3, 2]
    target = closest_point_to_axes(centers, look_dirs)
    up = c2w[:, :3, 1].mean(axis=0)
    if np.linalg.norm(up) < 1e-6:
        raise ValueError("camera up vectors cancel out: cannot tell which way is up")
    rot = rotation_between(up, np.array([0.0, 0.0, 1.0]))
    mean_distance = float(np.linalg.norm(centers - target, axis=1).mean())
    scale = camera_distance / mean_distance
    sim = np.eye(4)
    sim[:3, :3] = scale * rot
    sim[:3, 3] = -scale * rot @ target
    return sim


def apply_similarity_to_poses(sim: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Move ``(N, 4, 4)`` c2w poses by a ``(4, 4)`` similarity, keeping their rotations orthonormal."""
    scale = np.cbrt(np.linalg.det(sim[:3, :3]))
    moved = sim[None] @ c2w
    moved[:, :3, :3] /= scale
    return moved


def apply_similarity_to_points(sim: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Move ``(N, 3)`` points by a ``(4, 4)`` similarity → ``(N, 3)``."""
    return xyz @ sim[:3, :3].T + sim[:3, 3]
