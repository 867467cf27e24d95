"""``segmenter=sam|auto``: Segment Anything's first pass, batched, with GrabCut for the frames it is unsure of.

SAM is prompted per frame with the detector's box and a few of its seed points (product points
label 1, background points inside the box label 0), spread out by farthest-point sampling.
``sam_batch_size`` frames go through the image encoder in one forward (``Sam.forward`` takes a
list of frames with their prompts); its masks come back at the frame's own size. A frame without
a box, or whose mask SAM scores below ``min_predicted_iou``, or that covers less than
``min_seed_coverage`` of its seed points, gets the GrabCut first pass instead. The consistency
step after it (``tasks.segment``) is the same for every backend.

``auto`` runs SAM when its checkpoint is in the weights folder (and, unless ``auto_on_cpu``, a GPU
is there: SAM ViT-B takes ~12 s a frame on two CPU cores), else GrabCut, with one log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tasks import isolation_geometry as geo
from tasks.isolation_weights import (
    offline_model_environment,
    require,
    resolve_device,
    sam_weights,
    weights_folder,
)
from tasks.segment import FirstPass, SegmenterSettings, grabcut_frames, register_segmenter
from tasks.segment_checks import seed_coverage
from tasks.segment_grabcut import grabcut_first_pass, keep_main_components

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamSettings(SegmenterSettings):
    """Settings of ``segmenter=sam|auto`` (conf/segmenter/sam.yaml); the cv2 fields drive the rest of the stage."""

    weights_dir: str = "~/.cache/korokoro/weights"  # the weights folder (conf: ${weights_dir})
    device: str = "auto"  # torch device; auto = cuda when available
    sam_model_type: str = "vit_b"  # key of segment_anything.sam_model_registry (vit_b, vit_l, vit_h)
    sam_checkpoint: str = "sam_vit_b_01ec64.pth"
    sam_url: str = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    sam_batch_size: int = 4  # frames per image-encoder forward
    prompt_fg_points: int = 3  # product seed points given to SAM with the box
    prompt_bg_points: int = 2  # background seed points inside the box given to SAM
    multimask_output: bool = True  # SAM proposes 3 masks; the one it scores best is kept
    min_predicted_iou: float = 0.7  # a mask SAM scores lower is replaced by GrabCut's
    bf16_on_cuda: bool = True  # run the model in bfloat16 autocast on a GPU
    auto_on_cpu: bool = False  # segmenter=auto uses SAM without a GPU too


@lru_cache(maxsize=2)
def load_sam(path: Path | None, model_type: str, device: str) -> Any:
    """A ``segment_anything.Sam`` built by its registry entry ``model_type`` (random weights when ``path`` is None)."""
    offline_model_environment()
    from segment_anything import sam_model_registry  # noqa: PLC0415

    if model_type not in sam_model_registry:
        raise ValueError(f"segmenter.sam_model_type={model_type!r} is not one of {sorted(sam_model_registry)}")
    return sam_model_registry[model_type](checkpoint=None if path is None else str(path)).to(device).eval()


def farthest_points(uv: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` rows of ``uv (M, 2)`` spread out: first the one nearest the median, then farthest-first."""
    if len(uv) <= count:
        return uv
    chosen = [int(np.argmin(np.linalg.norm(uv - np.median(uv, axis=0), axis=1)))]
    dist = np.linalg.norm(uv - uv[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(uv - uv[chosen[-1]], axis=1))
    return uv[chosen]


def prompt_points(detection: Mapping[str, Any], fg_count: int, bg_count: int) -> tuple[np.ndarray, np.ndarray]:
    """SAM's point prompt from a boxes.json entry: ``coords (P, 2)`` pixels and ``labels (P,)`` (1 product, 0 not).

    Only seeds inside the box count (outside it SAM already knows it is background).
    """
    x0, y0, x1, y1 = detection["box"]
    picked, labels = [], []
    for key, count, label in (("seeds_fg", fg_count, 1), ("seeds_bg", bg_count, 0)):
        uv = np.asarray(detection.get(key) or [], dtype=np.float64).reshape(-1, 2)
        uv = uv[(uv[:, 0] >= x0) & (uv[:, 0] < x1) & (uv[:, 1] >= y0) & (uv[:, 1] < y1)]
        uv = farthest_points(uv, count) if count > 0 else uv[:0]
        picked.append(uv)
        labels.append(np.full(len(uv), label, dtype=np.int64))
    return np.concatenate(picked), np.concatenate(labels)


def sam_predict(model: Any, images: list[np.ndarray], boxes: list[np.ndarray], points: list[tuple[np.ndarray, np.ndarray]],
                settings: Any, device: str) -> list[tuple[np.ndarray, float]]:
    """SAM masks for ``images`` (``(H, W, 3)`` BGR) with one ``box (4,)`` xyxy and ``points`` each.

    Returns per frame ``(mask (H, W) bool, predicted IoU)``, the best of SAM's proposals;
    ``settings.sam_batch_size`` frames per forward.
    """
    import torch  # noqa: PLC0415
    from segment_anything.utils.transforms import ResizeLongestSide  # noqa: PLC0415

    resize = ResizeLongestSide(model.image_encoder.img_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda") and settings.bf16_on_cuda)
    out: list[tuple[np.ndarray, float]] = []
    step = max(1, int(settings.sam_batch_size))
    for start in range(0, len(images), step):
        batch = []
        for image, box, (coords, labels) in zip(images[start:start + step], boxes[start:start + step],
                                                points[start:start + step]):
            size = image.shape[:2]
            record = {
                "image": torch.as_tensor(resize.apply_image(np.ascontiguousarray(image[..., ::-1])), device=device)
                .permute(2, 0, 1).contiguous(),
                "original_size": size,
                "boxes": torch.as_tensor(resize.apply_boxes(np.asarray(box, np.float64)[None], size),
                                         dtype=torch.float32, device=device),
            }
            if len(coords):
                record["point_coords"] = torch.as_tensor(resize.apply_coords(coords, size)[None], dtype=torch.float32,
                                                         device=device)
                record["point_labels"] = torch.as_tensor(labels[None], device=device)
            batch.append(record)
        with torch.inference_mode(), autocast:
            results = model(batch, multimask_output=settings.multimask_output)
        for result in results:
            scores = result["iou_predictions"][0].float()
            best = int(torch.argmax(scores))
            out.append((result["masks"][0, best].cpu().numpy().astype(bool), float(scores[best])))
    return out


def sam_first_pass(images: list[np.ndarray], detections: list[Mapping[str, Any]], settings: SamSettings,
                   model: Any = None) -> FirstPass:
    """SAM on every frame with a box (batched), GrabCut where SAM has no box or is unsure (see the module doc).

    ``model``: an already built ``Sam`` (otherwise it is loaded from the weights folder).
    """
    device = resolve_device(settings.device)
    if model is None:
        model = load_sam(require(sam_weights(settings), settings.weights_dir), settings.sam_model_type, device)
    else:
        device = str(next(model.parameters()).device)
    prompted = [i for i, d in enumerate(detections) if d.get("box") is not None]
    predicted = sam_predict(model, [images[i] for i in prompted],
                            [np.asarray(detections[i]["box"], np.float64) for i in prompted],
                            [prompt_points(detections[i], settings.prompt_fg_points, settings.prompt_bg_points)
                             for i in prompted], settings, device)
    masks: list[np.ndarray | None] = [None] * len(images)
    sources = ["grabcut (sam: no box)"] * len(images)
    for i, (mask, iou) in zip(prompted, predicted):
        mask = keep_main_components(mask, settings.keep_component_fraction)
        covered = seed_coverage(mask, detections[i])
        if iou < settings.min_predicted_iou:
            sources[i] = f"grabcut (sam: predicted IoU {iou:.2f} < {settings.min_predicted_iou})"
        elif covered is not None and covered < settings.min_seed_coverage:
            sources[i] = f"grabcut (sam: covers {covered:.0%} of the seed points)"
        else:
            masks[i], sources[i] = mask, "sam"
    redo = [i for i, m in enumerate(masks) if m is None]
    for i, mask in zip(redo, geo.thread_map(lambda i: grabcut_first_pass(images[i], detections[i], settings), redo,
                                            workers=settings.workers)):
        masks[i] = mask
    return FirstPass(masks, sources)  # type: ignore[arg-type]


def auto_first_pass(images: list[np.ndarray], detections: list[Mapping[str, Any]], settings: SamSettings) -> FirstPass:
    """``segmenter=auto``: SAM when its checkpoint is present (and a GPU, unless ``auto_on_cpu``), else GrabCut."""
    weights = sam_weights(settings)
    folder = weights_folder(settings.weights_dir)
    if weights.missing(folder):
        log.warning("segmenter=auto: no SAM checkpoint at %s: using the weight-free GrabCut first pass "
                    "(`korokoro weights` lists what to fetch)", weights.path(folder))
        return grabcut_frames(images, detections, settings)
    if resolve_device(settings.device) == "cpu" and not settings.auto_on_cpu:
        log.warning("segmenter=auto: no GPU, and SAM takes seconds a frame on a CPU: using the GrabCut first pass "
                    "(segmenter=sam or segmenter.auto_on_cpu=true runs SAM anyway)")
        return grabcut_frames(images, detections, settings)
    return sam_first_pass(images, detections, settings)


register_segmenter("sam", SamSettings)(sam_first_pass)
register_segmenter("auto", SamSettings)(auto_first_pass)
