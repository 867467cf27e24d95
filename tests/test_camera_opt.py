"""Camera refinement during training (tasks/nerf/camera_opt.py): the maths, the files, and a
training run on the analytic box scene whose cameras were knocked off by ~1.5°."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.nerf.camera_opt import REFINED_TRANSFORMS, CameraCorrections, so3_exp, write_refined_transforms
from tasks.train import train_field
from tests.test_nerf_ngp import TINY, write_scene


def skew(w: torch.Tensor) -> torch.Tensor:
    x, y, z = w.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(-1, 3, 3)


def test_so3_exp_is_the_matrix_exponential_and_differentiable_at_zero():
    omega = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    omega[0] = 0.0
    omega[1] = 1e-6
    torch.testing.assert_close(so3_exp(omega), torch.linalg.matrix_exp(skew(omega)))
    # At zero the derivative is the generator: dR/d(omega_z) at 0 has R[1, 0] = +1, R[0, 1] = -1.
    zero = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    (so3_exp(zero)[0, 1, 0] - so3_exp(zero)[0, 0, 1]).backward()
    torch.testing.assert_close(zero.grad, torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64))


def test_corrections_start_as_identity_and_fill_untrained_frames_from_neighbours():
    c2w = torch.eye(4).repeat(5, 1, 1)
    c2w[:, :3, 3] = torch.randn(5, 3)
    cameras = CameraCorrections(5, trained=[1, 2, 4])
    torch.testing.assert_close(cameras.apply(c2w), c2w)
    with torch.no_grad():
        cameras.delta[1] = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.0, 0.0])
        cameras.delta[2] = torch.tensor([0.0, 0.0, 0.3, 0.4, 0.0, 0.0])
        cameras.delta[4] = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.6])
    filled = cameras.filled()
    torch.testing.assert_close(filled[0], cameras.delta[1].detach())  # before the first: its only neighbour
    torch.testing.assert_close(filled[3], (cameras.delta[2] + cameras.delta[4]).detach() / 2)
    torch.testing.assert_close(filled[[1, 2, 4]], cameras.delta[[1, 2, 4]].detach())
    moved = cameras.apply(c2w, filled)
    # A translation correction moves the centre along the camera's own axes (here the world's).
    torch.testing.assert_close(moved[1, :3, 3], c2w[1, :3, 3] + torch.tensor([0.2, 0.0, 0.0]))
    assert float(cameras.penalty(1.0, 0.0).detach()) == pytest.approx((0.1 + 0.3 + 0.5) / 3, rel=1e-5)


def test_refined_transforms_keep_every_key_and_rebase_paths(tmp_path):
    src = tmp_path / "segment"
    src.mkdir()
    meta = {"fl_x": 100.0, "korokoro": {"point_views": "../colmap/point_views.npz"},
            "frames": [{"file_path": "../frames/a.jpg", "mask_path": "masks/a.png", "transform_matrix": np.eye(4).tolist(), "extra": 1}]}
    (src / "transforms.json").write_text(json.dumps(meta))
    pose = torch.eye(4)
    pose[0, 3] = 0.5
    (tmp_path / "train").mkdir()
    out = write_refined_transforms(src / "transforms.json", ["../frames/a.jpg"], pose[None], tmp_path / "train" / "refined.json")
    refined = json.loads(out.read_text())
    frame = refined["frames"][0]
    assert frame["transform_matrix"][0][3] == 0.5 and frame["extra"] == 1 and refined["fl_x"] == 100.0
    assert (out.parent / frame["file_path"]).resolve() == (tmp_path / "frames/a.jpg").resolve()
    assert (out.parent / frame["mask_path"]).resolve() == (src / "masks/a.png").resolve()
    assert (out.parent / refined["korokoro"]["point_views"]).resolve() == (tmp_path / "colmap/point_views.npz").resolve()
    with pytest.raises(ValueError, match="a.jpg.*retrain"):
        write_refined_transforms(src / "transforms.json", ["../frames/b.jpg"], pose[None], tmp_path / "x.json")


def _relative_rotation_errors_deg(poses: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Angle between each consecutive pair's relative rotation and the true one (gauge-free)."""
    errors = []
    for i in range(len(poses) - 1):
        rel = poses[i, :3, :3].T @ poses[i + 1, :3, :3]
        true_rel = truth[i, :3, :3].T @ truth[i + 1, :3, :3]
        cos = (np.trace(rel.T @ true_rel) - 1) / 2
        errors.append(math.degrees(math.acos(np.clip(cos, -1, 1))))
    return np.array(errors)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_refines_cameras_knocked_off_by_a_degree_and_a_half(tmp_path, device):
    masks = write_scene(tmp_path / "scene")
    meta = json.loads(Path(masks.transforms).read_text())
    truth = np.array([f["transform_matrix"] for f in meta["frames"]])
    rng = np.random.default_rng(0)
    for frame in meta["frames"]:
        axis = rng.normal(size=3)
        knock = so3_exp(torch.tensor(axis / np.linalg.norm(axis) * math.radians(1.5))[None])[0].numpy()
        pose = np.array(frame["transform_matrix"])
        pose[:3, :3] = pose[:3, :3] @ knock
        frame["transform_matrix"] = pose.tolist()
    Path(masks.transforms).write_text(json.dumps(meta))
    knocked = np.array([f["transform_matrix"] for f in meta["frames"]])

    settings = {**TINY, "pose_lr": 3e-3, "holdout_every": 0}
    if device == "cuda":  # the refinement replayed from a CUDA graph (tasks/nerf/graphed.py)
        settings.update(device="cuda", cpu_threads=0, cuda_graph_after=16)
    record = train_field(masks, tmp_path / "train", settings, "fp")
    refined_meta = json.loads((Path(record.dir) / REFINED_TRANSFORMS).read_text())
    refined = np.array([f["transform_matrix"] for f in refined_meta["frames"]])
    before = _relative_rotation_errors_deg(knocked, truth)
    after = _relative_rotation_errors_deg(refined, truth)
    print(f"relative rotation error: knocked {np.median(before):.2f} deg, refined {np.median(after):.2f} deg")
    assert np.median(after) < 0.6 * np.median(before)
    extra = json.loads(Path(record.metrics).read_text())["extra"]
    assert 0.3 < extra["pose_rotation_deg_median"] < 3.0
    assert extra["cuda_graph_captures"] >= (1 if device == "cuda" else 0)
    # Retraining without refinement removes the old poses, so the mesh stage cannot pick them up.
    train_field(masks, tmp_path / "train", {**TINY, "steps": 5, "holdout_every": 0}, "fp2")
    assert not (tmp_path / "train" / REFINED_TRANSFORMS).exists()


def test_diverged_refinement_fails_naming_the_setting(tmp_path):
    masks = write_scene(tmp_path / "scene")
    settings = {**TINY, "steps": 60, "pose_lr": 0.3, "holdout_every": 0}
    with pytest.raises(RuntimeError, match=r"diverged.*pose_max_rotation_deg=2.0.*lower nerf.pose_lr=0.3"):
        train_field(masks, tmp_path / "train", settings, "fp")
    assert not (tmp_path / "train" / REFINED_TRANSFORMS).exists()
