"""The segment stage's masks against the truth on a fixed set of rendered turntables.

    PYOPENGL_PLATFORM=osmesa python -m bench.mask_sets --out bench-out/masks [--run RUN --turntable T] [overrides]
    PYOPENGL_PLATFORM=osmesa python -m bench.mask_sets --out bench-out/masks segmenter.see_through_margin=0

Each set is a turntable rendered with ``tools/turntable.py`` (30° elevation) and a camera rig
built from its true cameras (``tests/rig_fixtures.py``: noisy product, floor and far points as
COLMAP would give), so only detection and segmentation are measured. Sets are rendered once
into ``--out`` and reused. ``--run`` adds a ``bench.run_stages`` run's own solved cameras and
detections (e.g. the 1080p basket), segmented again with the given settings. The detector and
segmenter are the weight-free ``cv2`` ones, Hydra overrides apply on top.

Per set: median and worst IoU with the true masks, and the pixels the masks add to or miss
from the truth as fractions of all true product pixels (true masks shrunk to the frames' size
by area averaging and thresholded at one half).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.quality import source_index_by_name, true_mask
from bench.records import load_records
from flows.config import compose_config
from tasks.detect import detect_product, detector_settings
from tasks.segment import segment_product, segmenter_settings

# object, background, frames, width, height
DEFAULT_SETS = (
    ("basket", "plain", 48, 480, 360),
    ("basket", "cluttered", 48, 480, 360),
    ("basket", "cluttered", 24, 240, 180),
    ("macaroni_and_cheese", "cluttered", 24, 240, 180),
    ("plate", "cluttered", 24, 240, 180),
)


def score_masks(masks_transforms: Path, truth_dir: Path, source_index: dict[str, int] | None = None) -> dict[str, float]:
    """IoU and added / missed pixels of every mask of ``masks_transforms`` against the true masks.

    ``source_index``: frame file name → video frame index (default: the number in the file name).
    """
    meta = json.loads(Path(masks_transforms).read_text())
    root = Path(masks_transforms).parent
    ious, added, missed, total = [], 0, 0, 0
    for frame in meta["frames"]:
        name = Path(frame["file_path"]).name
        index = source_index[name] if source_index else int(re.findall(r"\d+", name)[-1])
        pred = cv2.imread(str(root / frame["mask_path"]), cv2.IMREAD_GRAYSCALE) > 127
        true = true_mask(truth_dir, index, pred.shape[1], pred.shape[0])
        ious.append((pred & true).sum() / max((pred | true).sum(), 1))
        added += int((pred & ~true).sum())
        missed += int((true & ~pred).sum())
        total += int(true.sum())
    return {
        "iou_median": float(np.median(ious)),
        "iou_worst": float(np.min(ious)),
        "added_of_truth": added / max(total, 1),
        "missed_of_truth": missed / max(total, 1),
    }


def rendered_set(out: Path, obj: str, background: str, frames: int, width: int, height: int, cfg: dict[str, Any]):
    """The set's rig and detections (rendered and detected on first use). → (rig, detections, truth dir, folder)."""
    from tests.rig_fixtures import build_rig_fixture  # noqa: PLC0415 - test fixtures, bench only
    from tools.turntable import render_turntable  # noqa: PLC0415 - needs pyrender

    folder = out / f"{obj}_{background}_{frames}_{width}x{height}"
    if not (folder / "turntable" / "truth" / "meta.json").is_file():
        render_turntable(obj, folder / "turntable", frames=frames, width=width, height=height,
                         elevation_deg=30.0, background=background)
    rig, _ = build_rig_fixture(folder / "turntable", folder / "rig")
    boxes = detect_product(rig, folder / "detect", detector_settings(cfg["detector"]), "bench")
    return rig, boxes, folder / "turntable" / "truth", folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="sets are rendered here; results.json is written here")
    parser.add_argument("--run", type=Path, default=None, help="also a bench.run_stages run (its cameras and detections)")
    parser.add_argument("--turntable", type=Path, default=None, help="the run's turntable (with truth/)")
    parser.add_argument("--tag", default="masks", help="name of this configuration's mask folders and results")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. segmenter.see_through_margin=0")
    args = parser.parse_args()
    cfg = compose_config(["profile=cpu", "detector=cv2", "segmenter=cv2", *args.overrides])
    settings = segmenter_settings(cfg["segmenter"])
    results: dict[str, Any] = {"overrides": args.overrides, "sets": {}}
    jobs = [(f"{o}_{b}_{n}_{w}x{h}", *rendered_set(args.out, o, b, n, w, h, cfg), None) for o, b, n, w, h in DEFAULT_SETS]
    if args.run is not None:
        if args.turntable is None:
            parser.error("--run needs --turntable")
        done = load_records(args.run)
        by_name = source_index_by_name(done["frames"].index)
        jobs.append((f"run_{args.turntable.name}", done["colmap"], done["detect"], args.turntable / "truth", args.out / f"run_{args.turntable.name}", by_name))
    for name, rig, boxes, truth, folder, by_name in jobs:
        started = time.perf_counter()
        masks = segment_product(rig, boxes, folder / f"segment_{args.tag}", settings, "bench")
        row = {**score_masks(masks.transforms, truth, by_name), "segment_seconds": time.perf_counter() - started}
        results["sets"][name] = row
        print(name, {k: round(v, 5) for k, v in row.items()})
    (args.out / f"results_{args.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
