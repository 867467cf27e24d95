"""STAND-IN for nerfstudio 1.1.5's ns-train / ns-export / ns-eval (tests/test_nerf_backends.py).

The test copies this file into a fake environment's bin/ under each tool's name (with this
interpreter as its shebang). It records its arguments in bin/calls.jsonl and writes the files the
real tool writes, in nerfstudio's layout:
- ns-train: <output-dir>/<experiment-name>/<method>/<timestamp>/config.yml,
  nerfstudio_models/step-<max-1:09d>.ckpt, dataparser_transforms.json (a deliberately
  NON-identity transform, so the backend's inverse mapping is exercised);
- ns-export poisson|tsdf: <output-dir>/poisson_mesh.ply|tsdf_mesh.ply (a coloured sphere of radius
  0.5 at (0.1, -0.05, 0.2) in our world, carried into nerfstudio's coordinates), mesh.obj,
  material_0.mtl, material_0.png;
- ns-eval: <output-path> json with "results" (psnr, ssim, lpips, ...) and, with
  --render-output-path, eval_img_<j>.png per held-out frame (every --eval-interval-th): the frame
  on black | a "rendering" that is that plus RENDER_OFFSET on every object pixel (clipped at 255).
FAKE_NS_MODE=shuffled writes those strips in reverse order; FAKE_NS_MODE=fail exits 3 with a CUDA error line; FAKE_NS_MODE=hang starts a `sleep 60` grandchild
(its pid in bin/grandchild.pid) and sleeps.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRANSFORM = [[0.0, -1.0, 0.0, 0.1], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -0.2]]  # 90 degrees about z, shifted
SCALE = 0.8
CENTRE, RADIUS, RGBA = (0.1, -0.05, 0.2), 0.5, (200, 30, 30, 255)
RENDER_OFFSET = 16


def write_eval_renders(config: Path, out: Path, reverse: bool) -> None:
    import cv2
    import numpy as np

    settings = dict(line.split(": ", 1) for line in config.read_text().splitlines())
    data = Path(settings["data"])
    frames = json.loads(data.read_text())["frames"]
    held_out = [f for i, f in enumerate(frames) if i % int(settings["eval_interval"]) == 0]
    out.mkdir(parents=True, exist_ok=True)
    for j, frame in enumerate(reversed(held_out) if reverse else held_out):
        rgba = cv2.imread(str(data.parent / frame["file_path"]), cv2.IMREAD_UNCHANGED).astype(np.float64)
        on_black = rgba[..., :3] * rgba[..., 3:] / 255.0
        rendered = np.where(rgba[..., 3:] > 127, np.minimum(on_black + RENDER_OFFSET, 255.0), on_black)
        cv2.imwrite(str(out / f"eval_img_{j:04d}.png"), np.round(np.concatenate([on_black, rendered], 1)).astype(np.uint8))


def value(argv: list[str], flag: str, n: int = 1) -> list[str]:
    i = argv.index(flag)
    return argv[i + 1 : i + 1 + n]


def main() -> None:
    here, tool, argv = Path(sys.argv[0]).resolve().parent, Path(sys.argv[0]).name, sys.argv[1:]
    with open(here / "calls.jsonl", "a") as log:
        log.write(json.dumps(argv) + "\n")
    mode = os.environ.get("FAKE_NS_MODE", "ok")
    if mode == "fail":
        print("RuntimeError: CUDA error: no kernel image is available for execution on the device")
        sys.exit(3)
    if mode == "hang":
        child = subprocess.Popen(["sleep", "60"])
        (here / "grandchild.pid").write_text(str(child.pid))
        print("training...", flush=True)
        time.sleep(60)
    if tool == "ns-train":
        run = Path(value(argv, "--output-dir")[0]) / value(argv, "--experiment-name")[0] / argv[0] / value(argv, "--timestamp")[0]
        data = Path(value(argv, "--data")[0])
        assert all((data.parent / f["file_path"]).is_file() for f in json.loads(data.read_text())["frames"])
        (run / "nerfstudio_models").mkdir(parents=True)
        interval = value(argv, "--eval-interval")[0]
        (run / "config.yml").write_text(f"method_name: {argv[0]}\ndata: {data}\neval_interval: {interval}\n")
        step = int(value(argv, "--max-num-iterations")[0]) - 1
        (run / "nerfstudio_models" / f"step-{step:09d}.ckpt").write_bytes(b"weights")
        (run / "dataparser_transforms.json").write_text(json.dumps({"transform": TRANSFORM, "scale": SCALE}))
    elif tool == "ns-export":
        import numpy as np
        import trimesh

        out = Path(value(argv, "--output-dir")[0])
        out.mkdir(parents=True, exist_ok=True)
        t = np.array(TRANSFORM)
        sphere = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
        world = sphere.vertices + np.array(CENTRE)
        colors = np.tile([RGBA], (len(world), 1)).astype(np.uint8)
        name = {"poisson": "poisson_mesh.ply", "tsdf": "tsdf_mesh.ply"}[argv[0]]
        trimesh.Trimesh(SCALE * (world @ t[:, :3].T + t[:, 3]), sphere.faces, vertex_colors=colors, process=False).export(out / name)
        (out / "mesh.obj").write_text("mtllib material_0.mtl\n")
        (out / "material_0.mtl").write_text("newmtl material_0\nmap_Kd material_0.png\n")
        (out / "material_0.png").write_bytes(b"png")
    else:
        if "--render-output-path" in argv:
            write_eval_renders(Path(value(argv, "--load-config")[0]), Path(value(argv, "--render-output-path")[0]), mode == "shuffled")
        results = {"psnr": 31.5, "psnr_std": 0.4, "ssim": 0.95, "ssim_std": 0.01, "lpips": 0.05, "lpips_std": 0.01}
        Path(value(argv, "--output-path")[0]).write_text(
            json.dumps({"experiment_name": "korokoro", "method_name": "nerfacto", "checkpoint": "x", "results": results})
        )


if __name__ == "__main__":
    main()
