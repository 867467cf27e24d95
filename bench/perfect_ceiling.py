"""What a *perfect* field would score under the held-out PSNR: the turntable's own renderer.

    PYOPENGL_PLATFORM=osmesa python -m bench.perfect_ceiling --run RUN --turntable .benchdata/basket1080

For every held-out frame of a ``bench.run_stages`` run (every ``nerf.holdout_every``-th of its
frames sorted by name, as the training capture holds them out) the true scan is rendered again
from the turntable's true camera with the same lights, on black, at the video's size, and
shrunk to the frames' size by area averaging (as the frames stage shrinks video frames): that
is a premultiplied rendering with exact alpha, i.e. a field with no error at all. It is then
scored on the run's masks against the run's frames (the JPEGs the field trained on) both ways:
on black (how ``psnr_object`` was taken up to session 4) and composited over the frame's
background plate (``tasks/nerf/evaluate.py`` now). What is left is the frames' own codec and
JPEG noise plus, on black, the background share of every silhouette pixel the masks count.
The frames are compared as extracted (no undistortion), so run it with cameras solved with the
true focal length, whose distortion is ~0. Needs pyrender on OSMesa (the ``render`` extra).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bench.quality import source_index_by_name
from bench.records import load_records, run_parser
from tasks.nerf.evaluate import background_plate, composite_on_plate
from tasks.nerf.rays import psnr_from_mse
from tools import turntable
from tools.scans import load_scan


def _true_renderer(meta: dict[str, Any]):
    """A function ``video frame index -> (rgb on black [H, W, 3] 0..1, coverage [H, W] 0..1)`` at the video's size.

    Rebuilds the scene of ``tools/turntable.py render_turntable`` (scan, camera-attached key light,
    ambient light) from the truth's meta.json; its private helpers are used so the two never differ.
    """
    pyrender = turntable._import_pyrender()
    scan = load_scan(meta["object"])
    lo, hi = scan.bounds
    radius = meta["distance_factor"] * scan.diagonal
    poses, _, _ = turntable.orbit_poses((lo + hi) / 2.0, radius, meta["frames_per_orbit"], meta["elevation_deg"], meta["wobble_deg"])
    width, height = meta["width"], meta["height"]
    focal = 0.5 * height / math.tan(math.radians(meta["fov_deg"]) / 2.0)
    scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 1.0], ambient_light=[turntable._AMBIENT] * 3)
    scene.add(turntable._object_mesh(pyrender, scan))
    camera = pyrender.IntrinsicsCamera(fx=focal, fy=focal, cx=width / 2.0, cy=height / 2.0, znear=0.02 * radius, zfar=20.0 * radius)
    cam_node = scene.add(camera, pose=poses[0])
    light = scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=turntable._KEY_LIGHT), pose=poses[0])
    renderer = pyrender.OffscreenRenderer(width, height)

    def render(index: int) -> tuple[np.ndarray, np.ndarray]:
        scene.set_pose(cam_node, poses[index])
        scene.set_pose(light, poses[index])
        colour, depth = renderer.render(scene)
        return colour[..., :3].astype(np.float32) / 255.0, (depth > 0).astype(np.float32)

    return render


def perfect_ceiling(run: Path, turntable_dir: Path, holdout_every: int = 8) -> dict[str, Any]:
    """Pooled PSNR of the true renderer on the run's held-out frames and masks, on black and composited."""
    records = load_records(run)
    transforms = Path(records["segment"].transforms)
    frames = sorted(json.loads(transforms.read_text())["frames"], key=lambda f: str(f["file_path"]))
    by_name = source_index_by_name(records["frames"].index)
    render = _true_renderer(json.loads((Path(turntable_dir) / "truth" / "meta.json").read_text()))
    sums = {"on_black": 0.0, "composited": 0.0}
    values, rows = 0, []
    for frame in frames[::holdout_every]:
        image = cv2.imread(str(transforms.parent / frame["file_path"]), cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0
        mask = cv2.imread(str(transforms.parent / frame["mask_path"]), cv2.IMREAD_GRAYSCALE) > 127
        size = (image.shape[1], image.shape[0])
        rgb, coverage = render(by_name[Path(frame["file_path"]).name])
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(coverage, size, interpolation=cv2.INTER_AREA)
        truth, mask_t = torch.from_numpy(image), torch.from_numpy(mask)
        composited = composite_on_plate(torch.from_numpy(rgb), torch.from_numpy(alpha), background_plate(truth, mask_t))
        errors = {"on_black": float(((rgb - image)[mask] ** 2).sum()), "composited": float(((composited - truth)[mask_t] ** 2).sum())}
        for key in sums:
            sums[key] += errors[key]
        values += int(mask.sum()) * 3
        rows.append({"frame": Path(frame["file_path"]).name, **{f"psnr_{k}": psnr_from_mse(v / (int(mask.sum()) * 3)) for k, v in errors.items()}})
    return {
        "run": Path(run).name,
        "holdout_frames": len(rows),
        **{f"psnr_{k}": psnr_from_mse(v / max(values, 1)) for k, v in sums.items()},
        "frames": rows,
    }


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--out", type=Path, default=None, help="JSON written here (default: RUN/perfect_ceiling.json)")
    parser.add_argument("--holdout-every", type=int, default=8)
    args = parser.parse_args()
    result = perfect_ceiling(args.run, args.turntable, args.holdout_every)
    (args.out or args.run / "perfect_ceiling.json").write_text(json.dumps(result, indent=1))
    print(f"perfect field on {result['holdout_frames']} held-out frames: {result['psnr_on_black']:.2f} dB on black, "
          f"{result['psnr_composited']:.2f} dB composited over the background plate")


if __name__ == "__main__":
    main()
