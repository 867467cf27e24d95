"""train stage: masked frames → a radiance-field checkpoint folder (``TrainedField``).

``settings`` is the resolved ``nerf`` config group (conf/nerf/<backend>.yaml): ``backend``
picks the implementation, every other key belongs to that backend's settings dataclass.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

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
    if settings_type is not None and dataclasses.is_dataclass(settings_type):
        settings_from_dict(settings, settings_type)
    return name


def train_field(
    masks: MaskSet,
    out_dir: Path,
    settings: dict[str, Any],
    fingerprint: str,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainedField:
    """Train the backend named by ``settings["backend"]`` on ``masks`` into ``out_dir``.

    Writes the backend's checkpoint files and ``out_dir/metrics.json`` (the TrainReport);
    ``progress(step, total, {"loss", "psnr", ...})`` is called every few steps.
    """
    name = validate_nerf_settings(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = get_backend(name).train(Path(masks.transforms), Path(masks.hull), out_dir, dict(settings), progress)
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps({"backend": name, **dataclasses.asdict(report)}, indent=2))
    return TrainedField(dir=out_dir, backend=name, metrics=metrics, fingerprint=fingerprint)
