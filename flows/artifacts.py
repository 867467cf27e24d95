"""Per-product artifacts in the Prefect UI (``prefect.artifacts``).

Every key starts with ``korokoro-<product>-`` so each product's artifacts show on the
Artifacts page, one versioned entry per kind (a rerun adds a version):

* ``…-training``: a progress artifact, updated while the NeRF trains (throttled);
* ``…-metrics``: a table of the run: stage times and states, the train and mesh metrics;
* ``…-masks``: markdown with the mask contact sheet (embedded as a small JPEG, because the
  viewer serves only published models) and where the full-size sheet lies on the worker;
* ``…-preview``: an image artifact of the turntable preview, served by the viewer;
* ``…-model``: a link to the product page in the viewer.

The preview and the link point at ``orchestration.viewer_url`` (default: the ``korokoro view``
address of this machine), which serves ``/store/models/<id>/...`` only once the product is DONE.
Artifacts are for people: a failure to write one is logged and never fails a product.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

from flows.report import run_summary
from flows.stages import StageRun

log = logging.getLogger("korokoro")


def artifact_key(unique_id: str, kind: str) -> str:
    """``korokoro-<slug>-<kind>``: Prefect keys allow lowercase letters, digits and dashes only;
    a unique_id that needed changing gets a short hash so two products never share a key."""
    slug = re.sub(r"[^a-z0-9]+", "-", unique_id.lower()).strip("-") or "product"
    if slug != unique_id:
        slug = f"{slug}-{hashlib.sha256(unique_id.encode()).hexdigest()[:6]}"
    return f"korokoro-{slug}-{kind}"


def viewer_url(cfg: dict[str, Any]) -> str:
    """Base URL of the shop-page viewer, without a trailing slash."""
    configured = (cfg.get("orchestration") or {}).get("viewer_url")
    if configured:
        return str(configured).rstrip("/")
    viewer = cfg.get("viewer") or {}
    return f"http://{viewer.get('host', '127.0.0.1')}:{viewer.get('port', 8765)}"


def _quietly(what: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except Exception as exc:  # artifacts are for people; the product's fate never hangs on them
        log.warning("could not write the %s artifact: %s", what, exc)
        return None


class TrainingProgress:
    """A ``progress(step, total, stats)`` callback that keeps a progress artifact up to date,
    writing at most once every ``every_s`` seconds (and always at the last step)."""

    def __init__(self, unique_id: str, every_s: float) -> None:
        self.key = artifact_key(unique_id, "training")
        self.every_s = float(every_s)
        self.artifact_id: Any = None
        self.last = float("-inf")
        self.writes = 0

    def __call__(self, step: int, total: int, stats: dict[str, float]) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        if step < total and now - self.last < self.every_s:
            return
        self.last = now
        percent = 100.0 * step / max(1, total)
        text = f"step {step}/{total}" + "".join(f", {k} {v:.3g}" for k, v in stats.items())
        if self.artifact_id is None:
            self.artifact_id = _quietly(
                "training progress", lambda: create_progress_artifact(percent, key=self.key, description=text)
            )
        else:
            _quietly("training progress", lambda: update_progress_artifact(self.artifact_id, percent, description=text))
        self.writes += 1


def metrics_table(runs: Sequence[StageRun]) -> list[dict[str, Any]]:
    """Rows ``{"group", "metric", "value"}``: each stage's state and seconds, then the run's
    summary (held-out PSNR, triangles, GLB size, ...)."""
    rows = [{"group": "stage", "metric": r.stage, "value": f"{r.state}, {r.seconds:.1f} s"} for r in runs]
    rows += [{"group": "result", "metric": k, "value": v} for k, v in run_summary(runs).items() if v is not None]
    return rows


def _inline_jpeg(path: Path, width: int) -> str:
    """``data:image/jpeg;base64,...`` of ``path`` shrunk to ``width`` pixels across."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, max(1, round(image.height * width / image.width))))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def publish_run_artifacts(
    unique_id: str,
    title: str,
    runs: Sequence[StageRun],
    status: str,
    error: str | None,
    cfg: dict[str, Any],
    preview_key: str | None,
) -> list[str]:
    """Write the product's artifacts for this run; returns the keys written."""
    from prefect.artifacts import (
        create_image_artifact,
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    written: list[str] = []
    headline = f"{title} ({unique_id}): {status}" + (f" — {error}" if error else "")

    def make(kind: str, create: Callable[[str], Any]) -> None:
        key = artifact_key(unique_id, kind)
        if _quietly(kind, lambda: create(key)) is not None:
            written.append(key)

    make("metrics", lambda key: create_table_artifact(metrics_table(runs), key=key, description=headline))
    segment = next((r for r in runs if r.stage == "segment" and r.record is not None), None)
    sheet = Path(segment.record.contact_sheet) if segment is not None else None
    if sheet is not None and sheet.is_file():
        width = int((cfg.get("orchestration") or {}).get("artifact_image_px", 720))
        lines = [f"### Masks of {title} (`{unique_id}`)", ""]
        if width > 0:
            lines += [f"![mask contact sheet]({_inline_jpeg(sheet, width)})", ""]
        lines.append(f"Full size on the worker: `{sheet}`")
        make("masks", lambda key: create_markdown_artifact("\n".join(lines), key=key, description=headline))
    base = viewer_url(cfg)
    if status == "DONE" and preview_key:
        image = f"{base}/store/{quote(preview_key)}"
        make("preview", lambda key: create_image_artifact(image, key=key, description=f"turntable preview of {title}"))
    if status == "DONE":
        page = f"{base}/product.html?id={quote(unique_id)}"
        make("model", lambda key: create_link_artifact(page, link_text=f"{title} in the viewer", key=key, description=headline))
    return written
