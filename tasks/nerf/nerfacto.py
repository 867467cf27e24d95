"""``nerfacto``: nerfstudio's nerfacto, run through nerfstudio's own command line in its own environment.

nerfstudio 1.1.5 pins versions that clash with ours (opencv-python-headless 4.10, protobuf ≤ 3.20,
gsplat 1.4.0, nerfacc 0.5.2), so it lives in a separate environment whose ``bin`` folder is
``nerf.env_path`` (infra/nerfstudio/setup_env.sh creates it and prints the override). Nothing of
nerfstudio is imported here: we run its tools as subprocesses, each with a timeout
(``train_timeout_s``, ``export_timeout_s``, ``eval_timeout_s``; the whole process group is killed at
the limit) and its output kept in ``<checkpoint>/logs/<tool>.log``.

1. ``ns-train <method> ... nerfstudio-data --data <data>/transforms.json``: the frames as RGBA PNGs
   (mask = alpha; with ``crop_to_product``, the default, cropped to one size around the product and
   the principal points moved to match, because nerfacto draws its rays uniformly over each frame
   and a product covers only a few percent of a whole frame) with ``background-color random``, so
   the background is learned as empty; the
   dataparser leaves our normalised world alone (orientation/centre ``none``, no pose rescaling) and
   holds out every ``holdout_every``-th frame (``--eval-mode interval``), the same frames as the
   ngp backend. Output: ``runs/korokoro/<method>/train/`` with ``config.yml``,
   ``nerfstudio_models/step-*.ckpt`` and ``dataparser_transforms.json``.
2. ``ns-export poisson|tsdf --load-config <config.yml>`` cut to the padded hull box → ``export/``:
   ``poisson_mesh.ply`` / ``tsdf_mesh.ply`` (vertex colours) and the xatlas-textured ``mesh.obj`` +
   ``material_0.mtl`` + ``material_0.png``. Poisson uses ``--normal-method open3d`` because nerfacto
   predicts no normals unless trained with them.
3. ``ns-eval --render-output-path`` → ``eval.json``: nerfstudio's own PSNR / SSIM / LPIPS on the
   held-out frames (whole images on black), and its renders of them, from which
   :func:`holdout_psnr_on_black` takes our object-pixel PSNR (the ngp backend's
   ``psnr_holdout_object_on_black``).

The mesh stage wants a density field, and a nerfstudio checkpoint only loads inside nerfstudio's
environment. So the interface is the exported mesh: its vertices are mapped back from nerfstudio's
coordinates (the inverse of dataparser_transforms.json) and stored as a mesh-backed field
(tasks/nerf/mesh_field.py): density from inside/outside the mesh, colour from the nearest vertex.
``load`` needs no nerfstudio and no GPU.

What was run here (2 CPU cores, no GPU): real nerfstudio 1.1.5 in a throwaway venv with a CPU torch
2.13, on the tests' 10-frame 48 px capture, with ``--machine.device-type cpu`` and
``implementation=torch``. This module's ``ns-train`` command trained 200 steps (~15 min) and wrote
runs/korokoro/nerfacto/train/{config.yml, nerfstudio_models/step-000000199.ckpt,
dataparser_transforms.json} (an identity transform, as intended); ``ns-export poisson`` wrote
poisson_mesh.ply (vertex colours), mesh.obj, material_0.mtl/png, which loaded as a mesh field;
``ns-eval`` wrote its json. Findings: (1) LPIPS downloads torchvision's AlexNet weights on first
use, so an offline worker fails in ns-train (setup_env.sh fetches them); (2) with torch ≥ 2.6,
ns-export / ns-eval cannot load the checkpoint (run with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 here;
setup_env.sh pins torch 2.1.2); (3) poisson ignores ``--bounding-box-*``: its mesh spanned
hundreds of units, hence the obb, whose meaning (centre, full side lengths) was checked against
nerfstudio's OrientedBox. The cropped poisson export was NOT seen to finish: on the CPU the
barely trained model gave too few opaque points inside the box within 20 min (``export_timeout_s``
bounds this). The tests run this module end to end against stand-in ``ns-*`` scripts.
On the H100 (session 15, bench/RESULTS.md): the whole chain ran on the 1080p basket from
bench/nerfstudio_offline's environment (torch 2.11, ``implementation=torch``, ``export_method=tsdf``,
``export_texture=false``), and the held-out renders paired with our frames. On an H200 (session 16)
the crop took that basket from F 0.20 to 0.66 at 3000 steps. Not verified: tcnn, Poisson on a GPU,
nerfacto's full 30000 steps.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from tasks.nerf.base import TrainReport, register_backend
from tasks.nerf.external import MeshBackedBackend, PreparedCapture, padded_box, prepare_rgba_capture, split_settings, warn_ignored
from tasks.nerf.mesh_field import MeshFieldOptions, read_mesh, write_mesh_field
from tasks.nerf.rays import psnr_from_mse

TOOLS = ("ns-train", "ns-export", "ns-eval")
EXPERIMENT, TIMESTAMP = "korokoro", "train"
EXPORT_MESH = {"poisson": "poisson_mesh.ply", "tsdf": "tsdf_mesh.ply"}
TEXTURE_OFF = {"poisson": "point_cloud", "tsdf": "tsdf"}  # --texture-method without the mesh.obj bake
SETUP_SCRIPT = "infra/nerfstudio/setup_env.sh"


class NerfstudioError(RuntimeError):
    """A nerfstudio tool is missing, failed, timed out or wrote nothing."""


@dataclass(frozen=True)
class NerfactoSettings(MeshFieldOptions):
    """Every knob of the nerfacto backend (conf/nerf/nerfacto.yaml documents each one)."""

    backend: str = "nerfacto"
    env_path: str = ""
    method: str = "nerfacto"
    max_num_iterations: int = 30000
    train_num_rays_per_batch: int = 4096
    seed: int = 42
    implementation: str = "tcnn"
    background_color: str = "random"
    disable_scene_contraction: bool = False
    scene_scale: float = 1.0
    holdout_every: int = 8
    crop_to_product: bool = True
    crop_margin: float = 0.15
    aabb_padding: float = 0.1
    export_method: str = "poisson"
    export_num_points: int = 1000000
    export_target_num_faces: int = 50000
    export_texture_pixels: int = 2048
    export_texture: bool = True
    tsdf_resolution: int = 256
    run_eval: bool = True
    extra_train_args: str = ""
    train_timeout_s: float = 7200.0
    export_timeout_s: float = 1800.0
    eval_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.export_method not in EXPORT_MESH:
            raise ValueError(f"nerf.export_method={self.export_method!r}: choose one of {', '.join(EXPORT_MESH)}")
        if self.implementation not in ("tcnn", "torch"):
            raise ValueError(f"nerf.implementation={self.implementation!r}: choose 'tcnn' or 'torch'")


def nerfstudio_bin(env_path: str) -> Path:
    """The folder holding ns-train / ns-export / ns-eval (``env_path`` or its ``bin``), or a clear error."""
    advice = (
        f"Create that environment with `bash {SETUP_SCRIPT}` (it prints the override to use), "
        "then pass nerf.env_path=<environment>/bin."
    )
    why = "nerf=nerfacto runs nerfstudio's command line from its own environment (nerfstudio 1.1.5 pins versions that clash with KoroKoro's)"
    if not env_path:
        raise NerfstudioError(f"{why}, and nerf.env_path is empty. {advice}")
    folder = Path(env_path).expanduser()
    if (folder / "bin" / TOOLS[0]).exists():
        folder = folder / "bin"  # the environment's root works too
    missing = [tool for tool in TOOLS if not os.access(folder / tool, os.X_OK)]
    if missing:
        raise NerfstudioError(f"{why}, and nerf.env_path={env_path!r} has no executable {', '.join(missing)}. {advice}")
    return folder


def ns_train_command(s: NerfactoSettings, bin_dir: Path, data: Path, runs_dir: Path) -> list[str]:
    """``ns-train`` for ``data`` (a transforms.json) writing under ``runs_dir``."""
    return [
        str(bin_dir / "ns-train"), s.method,
        "--output-dir", str(runs_dir),
        "--experiment-name", EXPERIMENT,
        "--timestamp", TIMESTAMP,
        "--max-num-iterations", str(s.max_num_iterations),
        "--save-only-latest-checkpoint", "True",
        "--vis", "tensorboard",
        "--machine.seed", str(s.seed),
        "--pipeline.datamanager.train-num-rays-per-batch", str(s.train_num_rays_per_batch),
        "--pipeline.model.background-color", s.background_color,
        "--pipeline.model.disable-scene-contraction", str(s.disable_scene_contraction),
        "--pipeline.model.implementation", s.implementation,
        *shlex.split(s.extra_train_args),
        "nerfstudio-data",
        "--data", str(data),
        "--downscale-factor", "1",
        "--orientation-method", "none",
        "--center-method", "none",
        "--auto-scale-poses", "False",
        "--scene-scale", str(s.scene_scale),
        "--eval-mode", "interval" if s.holdout_every > 0 else "all",
        "--eval-interval", str(max(1, s.holdout_every)),
    ]


def ns_export_command(s: NerfactoSettings, bin_dir: Path, config: Path, export_dir: Path, box: np.ndarray) -> list[str]:
    """``ns-export poisson|tsdf`` of ``config``'s model inside ``box [2, 3]`` (nerfstudio coordinates).

    In nerfstudio 1.1.5 ``tsdf`` crops to ``--bounding-box-min/max`` but ``poisson`` ignores them
    and crops its point cloud only to the oriented box ``--obb-center/rotation/scale`` (found by
    running it: without the obb the Poisson surface spanned hundreds of units). Poisson gets both.
    """
    fmt = lambda values: [f"{v:.6g}" for v in values]  # noqa: E731
    common = [
        "--load-config", str(config),
        "--output-dir", str(export_dir),
        "--use-bounding-box", "True",
        "--bounding-box-min", *fmt(box[0]),
        "--bounding-box-max", *fmt(box[1]),
        "--target-num-faces", str(s.export_target_num_faces),
        "--num-pixels-per-side", str(s.export_texture_pixels),
        # "nerf" also bakes nerfstudio's textured mesh.obj; the other keeps only the coloured mesh.
        "--texture-method", "nerf" if s.export_texture else TEXTURE_OFF[s.export_method],
    ]
    if s.export_method == "poisson":
        method = [
            "--obb-center", *fmt(box.mean(0)), "--obb-rotation", "0", "0", "0", "--obb-scale", *fmt(box[1] - box[0]),
            "--num-points", str(s.export_num_points), "--remove-outliers", "True", "--normal-method", "open3d",
        ]
    else:
        method = ["--resolution", str(s.tsdf_resolution)]
    return [str(bin_dir / "ns-export"), s.export_method, *common, *method]


def ns_eval_command(bin_dir: Path, config: Path, output: Path, renders: Path) -> list[str]:
    """``ns-eval`` of ``config``'s model on its held-out frames: results to ``output`` (json), images to ``renders``."""
    return [str(bin_dir / "ns-eval"), "--load-config", str(config), "--output-path", str(output), "--render-output-path", str(renders)]


def holdout_psnr_on_black(renders: Path, prepared: PreparedCapture) -> float:
    """Object-pixel PSNR (dB) of nerfstudio's held-out renders, on black, pooled over the frames.

    ``ns-eval --render-output-path`` writes ``eval_img_<j>.png`` per held-out frame, in its eval
    order (our ``holdout_ids``: ``--eval-mode interval`` picks every n-th frame the same way): the
    true frame on black | the rendering. With ``background_color=random`` nerfacto renders on black,
    so this is the ngp backend's ``psnr_holdout_object_on_black``: rendering against the frame on
    the mask's pixels (the RGBA's alpha > 127), in the frame's own (distorted) geometry, as
    nerfstudio renders it. Each pairing is checked: the left half must be our frame on black.
    """
    images = sorted(Path(renders).glob("eval_img_*.png"))
    if len(images) != len(prepared.holdout_ids):
        raise NerfstudioError(f"ns-eval wrote {len(images)} eval_img_*.png in {renders}, expected one per held-out frame ({len(prepared.holdout_ids)})")
    squared_error, values = 0.0, 0
    for path, k in zip(images, prepared.holdout_ids):
        rgba = cv2.imread(str(prepared.data_dir / prepared.frames[k]["file_path"]), cv2.IMREAD_UNCHANGED)
        strip = cv2.imread(str(path), cv2.IMREAD_COLOR)
        h, w = rgba.shape[:2]
        if strip is None or strip.shape != (h, 2 * w, 3):
            raise NerfstudioError(f"{path} is not a {2 * w}x{h} truth | rendering strip of held-out frame {k}")
        truth, alpha = rgba[..., :3].astype(np.float64) / 255.0, rgba[..., 3].astype(np.float64) / 255.0
        shown_truth, rendered = strip[:, :w].astype(np.float64) / 255.0, strip[:, w:].astype(np.float64) / 255.0
        if np.abs(shown_truth - truth * alpha[..., None]).mean() > 2.0 / 255.0:
            raise NerfstudioError(f"{path} does not show held-out frame {k} ({prepared.frames[k]['file_path']}): ns-eval's order differs from ours")
        mask = alpha > 0.5
        squared_error += float(((rendered - truth)[mask] ** 2).sum())
        values += int(mask.sum()) * 3
    return psnr_from_mse(squared_error / max(values, 1))


def run_tool(command: list[str], log: Path, timeout_s: float, timeout_key: str, bin_dir: Path) -> float:
    """Run one nerfstudio tool with its output in ``log``; returns its seconds.

    Its own session, so a timeout kills the whole process group (dataloader workers included).
    PATH starts with the tool's environment and PYTHONPATH is dropped, so our packages never
    shadow nerfstudio's.
    """
    tool = Path(command[0]).name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise NerfstudioError(f"{tool} ran past nerf.{timeout_key}={timeout_s:g} s and was stopped; its log: {log}") from None
        finally:
            if process.poll() is None:  # timed out or interrupted: stop the tool and its children
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise NerfstudioError(f"{tool} failed with exit status {code}; the end of its log {log}:\n{tail}")
    return time.perf_counter() - started


def _trained_run(runs_dir: Path, method: str, log: Path) -> tuple[Path, Path]:
    """``(config.yml, checkpoint)`` of the run ns-train wrote, or an error naming its log."""
    run_dir = runs_dir / EXPERIMENT / method / TIMESTAMP
    checkpoints = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    if not (run_dir / "config.yml").is_file() or not checkpoints:
        raise NerfstudioError(f"ns-train exited cleanly but wrote no config.yml + nerfstudio_models/step-*.ckpt in {run_dir}; its log: {log}")
    return run_dir / "config.yml", checkpoints[-1]


def dataparser_transform(run_dir: Path) -> tuple[np.ndarray, float]:
    """nerfstudio's world → its coordinates: ``p_ns = scale * (T @ [p, 1])``. → T ``[3, 4]``, scale."""
    path = run_dir / "dataparser_transforms.json"
    if not path.is_file():
        raise NerfstudioError(f"{path} is missing: cannot map nerfstudio's coordinates back to ours")
    data = json.loads(path.read_text())
    return np.asarray(data["transform"], np.float64).reshape(3, 4), float(data["scale"])


def to_nerfstudio(points: np.ndarray, transform: np.ndarray, scale: float) -> np.ndarray:
    """World ``[N, 3]`` → nerfstudio coordinates ``[N, 3]``."""
    return scale * (points @ transform[:, :3].T + transform[:, 3])


def from_nerfstudio(points: np.ndarray, transform: np.ndarray, scale: float) -> np.ndarray:
    """nerfstudio coordinates ``[N, 3]`` → world ``[N, 3]`` (inverse of :func:`to_nerfstudio`)."""
    return (points / scale - transform[:, 3]) @ np.linalg.inv(transform[:, :3]).T


def train_nerfacto(
    transforms: Path,
    hull: Path,
    out_dir: Path,
    settings: dict[str, Any],
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainReport:
    """ns-train, ns-export and ns-eval on the masked capture; writes the mesh-backed field."""
    s, ignored = split_settings(settings, NerfactoSettings)
    warn_ignored("nerfacto", ignored)
    bin_dir = nerfstudio_bin(s.env_path)  # before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    prepared = prepare_rgba_capture(transforms, out_dir / "data", s.holdout_every, s.crop_margin if s.crop_to_product else None)
    runs_dir, export_dir = out_dir / "runs", out_dir / "export"
    for stale in (runs_dir, export_dir):  # a rerun starts from scratch
        if stale.is_dir():
            shutil.rmtree(stale)
    (out_dir / "eval.json").unlink(missing_ok=True)

    if progress is not None:
        progress(0, s.max_num_iterations, {})
    train_log = logs / "ns-train.log"
    train_seconds = run_tool(ns_train_command(s, bin_dir, prepared.transforms, runs_dir), train_log, s.train_timeout_s, "train_timeout_s", bin_dir)
    config, checkpoint = _trained_run(runs_dir, s.method, train_log)
    if progress is not None:
        progress(s.max_num_iterations, s.max_num_iterations, {})

    transform, scale = dataparser_transform(config.parent)
    box = padded_box(hull, s.aabb_padding)
    corners = np.stack(np.meshgrid(*box.T, indexing="ij"), -1).reshape(-1, 3)
    ns_corners = to_nerfstudio(corners, transform, scale)
    ns_box = np.stack([ns_corners.min(0), ns_corners.max(0)])
    export_log = logs / "ns-export.log"
    export_seconds = run_tool(ns_export_command(s, bin_dir, config, export_dir, ns_box), export_log, s.export_timeout_s, "export_timeout_s", bin_dir)
    mesh_path = export_dir / EXPORT_MESH[s.export_method]
    if not mesh_path.is_file():
        raise NerfstudioError(f"ns-export exited cleanly but wrote no {mesh_path.name} in {export_dir}; its log: {export_log}")
    vertices, faces, colors = read_mesh(mesh_path)
    write_mesh_field(out_dir, from_nerfstudio(vertices, transform, scale), faces, colors, box, s, {
        "tool": f"ns-export {s.export_method}", "mesh": str(mesh_path), "checkpoint": str(checkpoint),
    })

    results, psnr_on_black = None, None
    if s.run_eval and prepared.holdout_ids:
        renders = out_dir / "eval_renders"
        shutil.rmtree(renders, ignore_errors=True)
        run_tool(ns_eval_command(bin_dir, config, out_dir / "eval.json", renders), logs / "ns-eval.log", s.eval_timeout_s, "eval_timeout_s", bin_dir)
        results = json.loads((out_dir / "eval.json").read_text()).get("results")
        psnr_on_black = holdout_psnr_on_black(renders, prepared)
    return TrainReport(
        steps=s.max_num_iterations,
        seconds=train_seconds,
        # Largest finished child's RSS: ns-train's host memory (GPU memory is not visible from here).
        peak_memory_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        device="cuda (nerfstudio)",
        extra={
            "psnr_holdout_object": None,  # composited over the plate: needs the rendered alpha, which ns-eval saves only as a colour map
            "psnr_holdout_object_on_black": psnr_on_black,
            "psnr_holdout_nerfstudio": (results or {}).get("psnr"),
            "nerfstudio_eval": results,
            "peak_memory_kind": "host RSS of the largest nerfstudio process",
            "holdout_frames": len(prepared.holdout_ids),
            "train_frames": len(prepared.train_ids),
            "export_seconds": export_seconds,
            "export_method": s.export_method,
            "mesh_vertices": int(len(vertices)),
            "mesh_faces": int(len(faces)),
            "mesh_vertex_colors": colors is not None,
            "aabb": box.tolist(),
            "config": str(config),
            "checkpoint": str(checkpoint),
            "textured_obj": str(export_dir / "mesh.obj") if (export_dir / "mesh.obj").is_file() else None,
            "logs": str(logs),
            "reused_rgba_frames": prepared.reused_rgba,
            "ignored_settings": ignored,
        },
    )


# Trains with its tool, loads as a mesh-backed field: ``get_backend("nerfacto")``.
register_backend("nerfacto")(lambda: MeshBackedBackend("nerfacto", NerfactoSettings, train_nerfacto))
