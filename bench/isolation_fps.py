"""Frames per second of each isolation path on a rendered turntable: cv2 (weight-free), YOLOv8, OWL-ViT, SAM.

    python -m bench.isolation_fps --turntable sample/basket --out bench-out/isolation                 # CPU
    python -m bench.isolation_fps --turntable sample/basket --rig bench-out/isolation/rig --device cuda  # GPU

The rig (frames + true cameras + sparse points, ``tests.rig_fixtures``) is built from the
turntable's video on the first run and reused from ``--rig`` afterwards (so a machine without
PyAV can run on a rig built elsewhere). ``--frames`` evenly spaced frames are kept.

Paths timed:

- ``cv2``: the weight-free detect stage, its GrabCut first pass alone, and the whole segment stage
  (first pass + consistency + hull + refine), with mask IoU against the true masks;
- ``yolo`` / ``owlvit`` / ``sam``: the model itself on ``--model-frames`` frames (``--sam-frames``
  for SAM), batched as the stage batches them, after an untimed warm-up on two frames.

Models load from the weights folder (``--weights``, default the conf's ``weights_dir``). A model
whose real weights are absent is timed with random weights of the same architecture
(``tools.random_weights``: yolov8x from its yaml, OWL-ViT base-patch32 from its default config,
SAM from its registry): the timing holds, the boxes and masks mean nothing, and the output says
``"weights": "random"``. Prints a table and writes ``<out>/isolation_fps.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flows.config import compose_config
from tasks import detect, isolation_geometry as geo, segment
from tasks.isolation_weights import offline_model_environment, owlvit_weights, sam_weights, weights_folder, yolo_weights
from tasks.types import CameraRig


def prepare_rig(turntable: Path, rig_dir: Path, frames: int) -> tuple[CameraRig, list[Path]]:
    """A rig of ``frames`` evenly spaced frames in ``rig_dir`` (built once) and their true mask files."""
    transforms = rig_dir / "transforms.json"
    if not transforms.exists():
        from tests.rig_fixtures import build_rig_fixture  # noqa: PLC0415 - needs PyAV to decode the video

        build_rig_fixture(turntable, rig_dir)
        raw = json.loads(transforms.read_text())
        keep = np.unique(np.round(np.linspace(0, len(raw["frames"]) - 1, frames)).astype(int))
        raw["frames"] = [raw["frames"][i] for i in keep]
        transforms.write_text(json.dumps(raw, indent=1))
    raw = json.loads(transforms.read_text())
    masks = [turntable / "truth" / "masks" / Path(f["file_path"]).name for f in raw["frames"]]
    rig = CameraRig(dir=rig_dir, transforms=transforms, points=rig_dir / "points.npy", registered=len(masks),
                    total=len(masks), reprojection_error_px=0.0, fingerprint="bench")
    return rig, masks


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (after the GPU has finished)."""
    import torch  # noqa: PLC0415

    sync = torch.cuda.synchronize if device.startswith("cuda") and torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def ensure_weights(kind: str, real_dir: Path, scratch: Path, det: Any, seg: Any) -> tuple[Path, str]:
    """The folder holding ``kind``'s weights: the real one, or ``scratch`` with a random stand-in written."""
    from tools import random_weights  # noqa: PLC0415

    wanted = {"yolo": yolo_weights(det), "owlvit": owlvit_weights(det), "sam": sam_weights(seg)}[kind]
    if not wanted.missing(real_dir):
        return real_dir, "real"
    if wanted.missing(scratch):
        if kind == "yolo":
            random_weights.write_random_yolo(scratch, det.yolo_weights)
        elif kind == "owlvit":
            random_weights.write_random_owlvit(scratch, det.owlvit_weights)
        else:
            random_weights.write_random_sam(scratch, seg.sam_checkpoint, seg.sam_model_type)
    return scratch, "random"


def bench_cv2(rig: CameraRig, true_masks: list[Path], out: Path, workers: int) -> dict[str, Any]:
    """The weight-free path: detect stage, GrabCut first pass alone, whole segment stage, IoU to the truth."""
    import cv2  # noqa: PLC0415

    det_s = detect.detector_settings(compose_config(["detector=cv2"])["detector"])
    seg_s = replace(segment.segmenter_settings(compose_config(["segmenter=cv2"])["segmenter"]), workers=workers)
    boxes, t_detect = timed(lambda: detect.detect_product(rig, out / "cv2-detect", det_s, "bench"), "cpu")
    views = geo.load_views(rig.transforms)
    images = [geo.read_image(p) for p in views.images]
    entries = {f["file_path"]: f for f in json.loads(Path(boxes.boxes).read_text())["frames"]}
    entries = [entries[p] for p in views.file_paths]
    _, t_first = timed(lambda: segment.grabcut_frames(images, entries, seg_s), "cpu")
    masks, t_segment = timed(lambda: segment.segment_product(rig, boxes, out / "cv2-segment", seg_s, "bench"), "cpu")
    transforms = json.loads(Path(masks.transforms).read_text())
    ious = [geo.mask_iou(cv2.imread(str(masks.dir / f["mask_path"]), cv2.IMREAD_GRAYSCALE) > 127,
                         cv2.imread(str(t), cv2.IMREAD_GRAYSCALE) > 127) for f, t in zip(transforms["frames"], true_masks)]
    n = len(images)
    return {"path": "cv2", "weights": "none", "frames": n, "detect_s": round(t_detect, 3),
            "first_pass_s": round(t_first, 3), "segment_s": round(t_segment, 3),
            "fps_first_pass": round(n / t_first, 2), "fps_detect_plus_segment": round(n / (t_detect + t_segment), 2),
            "iou_median": round(float(np.median(ious)), 4), "iou_worst": round(float(np.min(ious)), 4)}


def bench_model(kind: str, rig: CameraRig, count: int, device: str, real_dir: Path, scratch: Path,
                boxes_json: Path) -> dict[str, Any]:
    """The model ``kind`` alone on ``count`` frames (SAM prompted from the cv2 detector's ``boxes_json``)."""
    from tasks import detect_models, segment_sam  # noqa: PLC0415

    cfg = compose_config([f"weights_dir={real_dir}", "detector=auto", "segmenter=sam", f"detector.device={device}",
                          f"segmenter.device={device}"])
    det = detect.detector_settings(cfg["detector"])
    seg = segment.segmenter_settings(cfg["segmenter"])
    folder, which = ensure_weights(kind, real_dir, scratch, det, seg)
    det, seg = replace(det, weights_dir=str(folder)), replace(seg, weights_dir=str(folder))
    views = geo.load_views(rig.transforms)
    pick = np.unique(np.round(np.linspace(0, len(views) - 1, count)).astype(int))
    images = [geo.read_image(views.images[i]) for i in pick]
    if kind == "yolo":
        run = lambda k: detect_models.find_yolo([images[i] for i in k], det, "", forced=True)  # noqa: E731
        batch_size = det.batch_size
    elif kind == "owlvit":
        run = lambda k: detect_models.find_owlvit([images[i] for i in k], det, "wicker basket", forced=True)  # noqa: E731
        batch_size = det.batch_size
    else:  # prompted as the stage prompts it: the cv2 detector's box and seed points
        entries = [json.loads(Path(boxes_json).read_text())["frames"][i] for i in pick]
        model = segment_sam.load_sam(folder / seg.sam_checkpoint, seg.sam_model_type, device)
        boxes = [np.asarray(e["box"]) for e in entries]
        points = [segment_sam.prompt_points(e, seg.prompt_fg_points, seg.prompt_bg_points) for e in entries]
        run = lambda k: segment_sam.sam_predict(  # noqa: E731
            model, [images[i] for i in k], [boxes[i] for i in k], [points[i] for i in k], seg, device)
        batch_size = seg.sam_batch_size
    everything = list(range(len(images)))
    _, t_warm = timed(lambda: run(everything[:min(batch_size, 2)]), device)  # lazy set-up, kernels, autotune
    _, seconds = timed(lambda: run(everything), device)
    return {"path": kind, "weights": which, "frames": len(images), "batch_size": batch_size, "device": device,
            "warmup_s": round(t_warm, 3), "seconds": round(seconds, 3), "fps": round(len(images) / seconds, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turntable", type=Path, default=Path("sample/basket"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/isolation"))
    parser.add_argument("--rig", type=Path, default=None, help="a rig folder to reuse (default <out>/rig)")
    parser.add_argument("--frames", type=int, default=48, help="frames kept for the cv2 path (the cpu profile's count)")
    parser.add_argument("--model-frames", type=int, default=8, help="frames timed for YOLO and OWL-ViT")
    parser.add_argument("--sam-frames", type=int, default=4, help="frames timed for SAM")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="threads of the cv2 path (0 = one per core)")
    parser.add_argument("--weights", type=Path, default=None, help="the weights folder (default: conf weights_dir)")
    parser.add_argument("--paths", default="cv2,yolo,owlvit,sam")
    args = parser.parse_args(argv)

    offline_model_environment()
    import torch  # noqa: PLC0415

    args.out.mkdir(parents=True, exist_ok=True)
    rig, true_masks = prepare_rig(args.turntable, args.rig or args.out / "rig", args.frames)
    real_dir = weights_folder(args.weights or compose_config([])["weights_dir"])
    rows: list[dict[str, Any]] = []
    paths = args.paths.split(",")
    with tempfile.TemporaryDirectory(prefix="korokoro-random-weights-") as scratch:
        if "cv2" in paths or "sam" in paths:
            rows.append(bench_cv2(rig, true_masks, args.out, args.workers))  # SAM is prompted with the cv2 boxes
            print(json.dumps(rows[-1]), flush=True)
        for kind in [p for p in paths if p != "cv2"]:
            try:
                count = args.sam_frames if kind == "sam" else args.model_frames
                rows.append(bench_model(kind, rig, count, args.device, real_dir, Path(scratch),
                                        args.out / "cv2-detect" / "boxes.json"))
            except ImportError as exc:  # a model library missing on this machine
                rows.append({"path": kind, "skipped": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "cpu_count": os.cpu_count(),
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "turntable": str(args.turntable), "frame_size": [int(s) for s in
                                                                                 geo.load_views(rig.transforms).sizes[0]],
        "weights_dir": str(real_dir), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], "rows": rows,
        "note": "weights=random: the architecture's real cost with random weights (boxes and masks meaningless)",
    }
    (args.out / "isolation_fps.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'path':8} {'weights':8} {'frames':>6} {'fps':>8}  notes")
    for r in rows:
        if "skipped" in r:
            print(f"{r['path']:8} {'-':8} {'-':>6} {'-':>8}  skipped ({r['skipped']})")
        elif r["path"] == "cv2":
            print(f"{'cv2':8} {'none':8} {r['frames']:>6} {r['fps_detect_plus_segment']:>8}  detect {r['detect_s']} s + "
                  f"segment {r['segment_s']} s (GrabCut first pass alone {r['fps_first_pass']} fps); "
                  f"IoU median {r['iou_median']} worst {r['iou_worst']}")
        else:
            print(f"{r['path']:8} {r['weights']:8} {r['frames']:>6} {r['fps']:>8}  model only, batch {r['batch_size']}, "
                  f"{r['device']}" + (" (RANDOM weights: timing only)" if r["weights"] == "random" else ""))
    print(f"\nwrote {args.out / 'isolation_fps.json'}")


if __name__ == "__main__":
    main()
