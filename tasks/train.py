"""train stage: masked frames → a radiance-field checkpoint folder (``TrainedField``).

``settings`` is the resolved ``nerf`` config group (conf/nerf/<backend>.yaml): ``backend``
picks the implementation, every other key belongs to that backend's settings dataclass.

GPU out-of-memory: training is retried once with the batch-size settings named by
``oom_retry["keys"]`` scaled by ``oom_retry["scale"]`` (conf ``stages.train.oom_retry``); a
second out-of-memory fails with what was tried.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

from tasks.nerf.base import get_backend
from tasks.nerf.settings import settings_from_dict
from tasks.types import MaskSet, TrainedField


def validate_nerf_settings(settings: dict[str, Any]) -> str:
    """Check the nerf settings against the chosen backend; returns the backend name.

    A typo in a key or a wrong value type fails here, naming the key, before any work.
    """
    if not isinstance(settings, dict) or "backend" not in settings:
        raise ValueError("nerf settings need a 'backend' key (e.g. backend: ngp); pass the resolved nerf config group")
    name = str(settings["backend"])
    backend = get_backend(name)
    settings_type = getattr(backend, "settings_type", None)
    validate = getattr(backend, "validate_settings", None)  # a backend with its own rules (tasks/nerf/external.py)
    if validate is not None:
        validate(settings)
    elif settings_type is not None and dataclasses.is_dataclass(settings_type):
        settings_from_dict(settings, settings_type)
    return name


def smaller_batches(settings: dict[str, Any], keys: list[str], scale: float) -> dict[str, Any]:
    """``settings`` with each of ``keys`` multiplied by ``scale`` (ints stay ints, at least 1)."""
    if not 0 < scale < 1:
        raise ValueError(f"stages.train.oom_retry.scale must be between 0 and 1, got {scale!r}")
    smaller = dict(settings)
    for key in keys:
        value = settings[key] * scale
        smaller[key] = max(1, int(value)) if isinstance(settings[key], int) else value
    return smaller


def _free_gpu_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_field(
    masks: MaskSet,
    out_dir: Path,
    settings: dict[str, Any],
    fingerprint: str,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    oom_retry: dict[str, Any] | None = None,
) -> TrainedField:
    """Train the backend named by ``settings["backend"]`` on ``masks`` into ``out_dir``.

    Writes the backend's checkpoint files and ``out_dir/metrics.json`` (the TrainReport);
    ``progress(step, total, {"loss", "psnr", ...})`` is called every few steps. After a GPU
    out-of-memory the run starts over once with smaller batches (metrics.json ``oom_retry``).
    """
    name = validate_nerf_settings(settings)
    retry_keys = [str(k) for k in (oom_retry or {}).get("keys") or [] if k in settings]
    scale = float((oom_retry or {}).get("scale", 0.5))
    smaller = smaller_batches(settings, retry_keys, scale) if retry_keys else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = get_backend(name)
    transforms, hull = Path(masks.transforms), Path(masks.hull)
    retried: dict[str, Any] | None = None
    try:
        report = backend.train(transforms, hull, out_dir, dict(settings), progress)
    except torch.cuda.OutOfMemoryError as exc:
        tried = ", ".join(f"{k}={settings[k]}" for k in retry_keys) or "the configured batch sizes"
        if smaller is None:
            raise RuntimeError(
                f"the GPU ran out of memory with {tried} (stages.train.oom_retry names no batch setting to shrink); "
                "try profile=cpu or a smaller nerf.rays_per_batch"
            ) from exc
        _free_gpu_memory()
        retried = {k: smaller[k] for k in retry_keys}
        try:
            report = backend.train(transforms, hull, out_dir, dict(smaller), progress)
        except torch.cuda.OutOfMemoryError as again:
            _free_gpu_memory()
            less = ", ".join(f"{k}={v}" for k, v in retried.items())
            raise RuntimeError(
                f"the GPU ran out of memory even with {less} (retried after running out with {tried}); "
                f"try profile=cpu or a smaller {' / '.join('nerf.' + k for k in retry_keys)}"
            ) from again
    metrics = out_dir / "metrics.json"
    written = {"backend": name, **dataclasses.asdict(report)}
    if retried is not None:
        written["oom_retry"] = retried  # trained with these instead of the configured values
    metrics.write_text(json.dumps(written, indent=2))
    return TrainedField(dir=out_dir, backend=name, metrics=metrics, fingerprint=fingerprint)
