"""The detection models behind ``detector=yolo|owlvit|auto``: load from the weights folder, boxes per frame.

Each ``find_*`` takes frames as ``(H, W, 3)`` uint8 BGR arrays and returns one :class:`Candidates`
per frame: boxes as ``[x0, y0, x1, y1]`` in pixels of that frame (x right, y down, the frame's
top-left corner at 0, 0), scores in ``[0, 1]`` sorted best first, only those above the backend's
threshold. Frames go through the model ``settings.batch_size`` at a time. The heavy libraries are
imported here, on first use, after :func:`tasks.isolation_weights.offline_model_environment`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tasks.isolation_weights import offline_model_environment, owlvit_weights, require, resolve_device, yolo_weights


class Skipped(Exception):
    """``detector=auto`` passes over a backend that does not apply to this product (the reason is the message)."""


@dataclass(frozen=True)
class Candidates:
    """One frame's detections: ``boxes (K, 4)`` float64 xyxy frame pixels, ``scores (K,)`` descending."""

    boxes: np.ndarray
    scores: np.ndarray

    @staticmethod
    def from_arrays(boxes: Any, scores: Any, width: int, height: int) -> "Candidates":
        """Sort by score and clip the boxes to a ``width`` x ``height`` frame."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        order = np.argsort(-scores, kind="stable")
        boxes = np.clip(boxes[order], 0.0, [width, height, width, height])
        return Candidates(boxes, scores[order])


def _batches(items: list, size: int) -> list[list]:
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


def product_words(query: str) -> str:
    """The product's name from the stage's query (``"<category> <title>"``): the placeholder category dropped."""
    return re.sub(r"^\s*others\b", "", query, flags=re.IGNORECASE).strip()


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", str(text).lower()).strip() + " "


def matching_classes(names: Mapping[int, str], query: str) -> list[int]:
    """Class ids whose name appears in ``query`` as whole words, case-blind; a name inside a longer
    matching one does not count ("teddy bear" is not a "bear")."""
    text = _words(query)
    found = {int(k): _words(name) for k, name in names.items() if name and _words(name).strip() and _words(name) in text}
    return sorted(k for k, w in found.items() if not any(w != o and w in o for o in found.values()))


# --------------------------------------------------------------------------- YOLOv8 (ultralytics)


@lru_cache(maxsize=2)
def load_yolo(path: Path) -> Any:
    """An ultralytics ``YOLO`` model from a checkpoint file (cached per path)."""
    offline_model_environment()
    from ultralytics import YOLO  # noqa: PLC0415

    return YOLO(str(path), task="detect")


def find_yolo(images: list[np.ndarray], settings: Any, query: str, forced: bool) -> list[Candidates]:
    """YOLOv8 boxes of the COCO classes named in ``query`` (all classes when forced and none is named).

    Raises :class:`Skipped` under ``detector=auto`` when no class is named (the seed's rule: YOLO
    only for COCO products), :class:`~tasks.isolation_weights.MissingWeights` without the checkpoint.
    """
    model = load_yolo(require(yolo_weights(settings), settings.weights_dir))
    classes = matching_classes(model.names, query)
    if not classes and not forced:
        raise Skipped(f"{query!r} names none of the model's {len(model.names)} classes")
    device = resolve_device(settings.device)
    out: list[Candidates] = []
    for chunk in _batches(images, settings.batch_size):
        results = model.predict(chunk, conf=settings.yolo_confidence, iou=settings.yolo_iou,
                                imgsz=settings.yolo_image_size, max_det=settings.yolo_max_detections,
                                classes=classes or None, device=device, half=device.startswith("cuda"),
                                verbose=False, save=False)
        for image, result in zip(chunk, results):
            boxes = result.boxes  # xyxy in the original frame's pixels (ultralytics scales back from the letterbox)
            out.append(Candidates.from_arrays(boxes.xyxy.float().cpu().numpy(), boxes.conf.float().cpu().numpy(),
                                              image.shape[1], image.shape[0]))
    return out


# --------------------------------------------------------------------------- OWL-ViT (transformers)


@lru_cache(maxsize=2)
def load_owlvit(folder: Path, device: str) -> tuple[Any, Any]:
    """``(OwlViTForObjectDetection, OwlViTProcessor)`` from a local snapshot folder (never the hub)."""
    offline_model_environment()
    from transformers import OwlViTForObjectDetection, OwlViTProcessor  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()

    processor = OwlViTProcessor.from_pretrained(str(folder), local_files_only=True)
    model = OwlViTForObjectDetection.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    return model, processor


def owlvit_outputs(model: Any, processor: Any, images: list[np.ndarray], text: str, device: str) -> Any:
    """The raw model outputs for ``images`` (BGR) queried with one ``text`` each (one forward)."""
    import torch  # noqa: PLC0415

    rgb = [np.ascontiguousarray(image[..., ::-1]) for image in images]
    inputs = processor(text=[[text]] * len(rgb), images=rgb, return_tensors="pt").to(device)
    with torch.inference_mode():
        return model(**inputs)


def find_owlvit(images: list[np.ndarray], settings: Any, query: str, forced: bool) -> list[Candidates]:
    """OWL-ViT boxes for the product's name (``query`` without the ``others`` placeholder).

    The processor squashes every frame to its square input, so ``target_sizes`` = each frame's
    (height, width) maps the normalised boxes back to frame pixels.
    """
    text = product_words(query)
    if not text:
        raise Skipped("no product name to query OWL-ViT with")
    device = resolve_device(settings.device)
    model, processor = load_owlvit(require(owlvit_weights(settings), settings.weights_dir), device)
    out: list[Candidates] = []
    for chunk in _batches(images, settings.batch_size):
        outputs = owlvit_outputs(model, processor, chunk, text, device)
        sizes = [(image.shape[0], image.shape[1]) for image in chunk]
        found = processor.post_process_grounded_object_detection(
            outputs, threshold=settings.owlvit_threshold, target_sizes=sizes)
        for (h, w), result in zip(sizes, found):
            out.append(Candidates.from_arrays(result["boxes"].float().cpu().numpy(),
                                              result["scores"].float().cpu().numpy(), w, h))
    return out


FINDERS = {"yolo": find_yolo, "owlvit": find_owlvit}
