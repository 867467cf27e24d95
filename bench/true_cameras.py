"""A copy of a ``bench.run_stages`` run with the turntable's true cameras in place of the solved ones.

    python -m bench.true_cameras --run RUN --turntable .benchdata/basket1080 --out TRUE
    python -m bench.run_stages --turntable .benchdata/basket1080 --reuse TRUE --out OUT --profile gpu

What it answers: how much of a run's held-out PSNR and geometry error the camera solve costs.
The true poses are moved into the run's own normalised world (the similarity fitted on the
camera centres, as every quality figure does), so the run's hull, masks and frames stay valid;
the intrinsics are the truth's, scaled to the frames, with no distortion. Only the two
``transforms.json`` (cameras, and masks) are rewritten, with absolute image and mask paths;
everything else is the original run's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench import quality
from bench.records import load_records, run_parser, save_records
from tests.truth import load_truth_cameras


def true_poses_in_run_world(frames_json: Path, transforms: Path, truth_dir: Path) -> np.ndarray:
    """The true camera-to-world of every frame of ``transforms``, in that file's world. → ``[N, 4, 4]``.

    With ``truth ≈ s R est + t`` fitted on the centres: ``R_est = Rᵀ R_true``, ``c_est = Rᵀ (c_true - t) / s``.
    """
    s, R, t = quality.world_to_truth(frames_json, transforms, truth_dir)
    true = load_truth_cameras(truth_dir).c2w[quality.source_indices(frames_json, transforms)]
    est = np.repeat(np.eye(4)[None], len(true), axis=0)
    est[:, :3, :3] = R.T @ true[:, :3, :3]
    est[:, :3, 3] = (true[:, :3, 3] - t) @ R / s
    return est


def with_true_cameras(transforms: Path, poses: dict[str, np.ndarray], truth_dir: Path, out: Path) -> Path:
    """``transforms`` rewritten into ``out`` with the truth's pinhole intrinsics and, for each frame,
    ``poses[image file name]`` (``[4, 4]``)."""
    meta: dict[str, Any] = json.loads(Path(transforms).read_text())
    truth = load_truth_cameras(truth_dir)
    scale = meta["w"] / truth.w
    if abs(meta["h"] / truth.h - scale) > 1e-3:
        raise ValueError(f"{transforms}: frames {meta['w']}x{meta['h']} are not the truth's {truth.w}x{truth.h} scaled")
    meta.update(camera_model="PINHOLE", fl_x=truth.fl_x * scale, fl_y=truth.fl_y * scale,
                cx=truth.cx * scale, cy=truth.cy * scale, k1=0.0, k2=0.0, p1=0.0, p2=0.0)
    root = Path(transforms).parent.resolve()
    for frame in meta["frames"]:
        name = Path(frame["file_path"]).name
        if name not in poses:
            raise ValueError(f"{transforms}: frame {name} is not among the solved cameras' frames")
        frame["transform_matrix"] = poses[name].tolist()
        for key in ("file_path", "mask_path"):
            if key in frame:
                frame[key] = str((root / frame[key]).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=1))
    return out


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="the new run folder (its records.json)")
    args = parser.parse_args()
    records = load_records(args.run)
    truth_dir = args.turntable / "truth"
    stills, rig, masks = records["frames"], records["colmap"], records["segment"]
    names = [Path(f["file_path"]).name for f in json.loads(Path(rig.transforms).read_text())["frames"]]
    poses = dict(zip(names, true_poses_in_run_world(stills.index, rig.transforms, truth_dir)))
    new_rig = with_true_cameras(rig.transforms, poses, truth_dir, args.out / "colmap" / "transforms.json")
    new_masks = with_true_cameras(masks.transforms, poses, truth_dir, args.out / "segment" / "transforms.json")
    records["colmap"] = dataclasses.replace(rig, transforms=new_rig)
    records["segment"] = dataclasses.replace(masks, transforms=new_masks)
    records = {name: records[name] for name in ("frames", "colmap", "detect", "segment")}
    save_records(args.out, records)
    print(f"{len(poses)} true cameras written to {args.out}")


if __name__ == "__main__":
    main()
