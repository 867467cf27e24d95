"""``reconstruct-product``: the nine stages for one product, from its video to a published model.

A product ends DONE or FAILED with its reason. ``run_stages`` marks a stage's failure (and
any error between stages) itself; the flow's on_failure / on_crashed / on_cancellation hook
covers what escapes it (a crash before the stages, a flow timeout, a cancellation, a killed
run) and marks the row FAILED with the stage that was running. Rerunning the flow (the UI's
retry of the same run, or a new run of the same unique_id) claims the product again, reuses
every finished stage from the result storage and resumes at the one that failed.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from prefect import flow

from flows.artifacts import TrainingProgress, publish_run_artifacts
from flows.config import compose_config, result_storage, to_plain
from flows.report import write_report
from flows.stages import StageFailed, StageRunner
from tasks import colmap, detect, frames, mesh, segment
from tasks.storage import ProductStore, open_store
from tasks.storage.base import StorageSettings, StoreError
from tasks.types import Product
from tasks.upload import model_prefix

log = logging.getLogger("korokoro")


class ProductFailed(RuntimeError):
    """Raised by the flow so Prefect marks the run Failed; carries the run's result."""

    def __init__(self, result: "ProductResult") -> None:
        super().__init__(result.error)
        self.result = result


@dataclass(frozen=True)
class ProductResult:
    """What a run leaves behind, for the command line and for callers."""

    unique_id: str
    status: str
    error: str | None
    report: str
    glb: str | None = None
    obj: str | None = None
    manifest_key: str | None = None
    shards_dir: str | None = None


# unique_id → the runner of a run in this process that has not marked its product yet; the
# flow's failure hook reads which stage was running when something escaped run_stages.
_UNMARKED: dict[str, StageRunner] = {}


def _training_progress(unique_id: str, cfg: dict[str, Any]) -> Callable[[int, int, dict[str, float]], None]:
    """A tqdm bar on the terminal and a progress artifact in the Prefect UI while the NeRF trains."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}
    artifact = TrainingProgress(unique_id, float((cfg.get("orchestration") or {}).get("progress_every_s", 10)))

    def progress(step: int, total: int, stats: dict[str, float]) -> None:
        artifact(step, total, stats)
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="    train", unit="step", leave=False, mininterval=1.0)
        b = bar["bar"]
        b.update(step - b.n)
        b.set_postfix({k: f"{v:.3g}" for k, v in stats.items()}, refresh=False)
        if step >= total:
            b.close()

    return progress


def run_stages(product: Product, store: ProductStore, cfg: dict[str, Any], echo: Callable[[str], None] = print) -> ProductResult:
    """Run every stage for a product already claimed; mark it DONE or FAILED with the reason."""
    uid = product.unique_id
    work_dir = Path(cfg["data_dir"]) / "work" / uid
    work_dir.mkdir(parents=True, exist_ok=True)
    storage = StorageSettings(**cfg["storage"])
    orchestration = cfg.get("orchestration") or {}
    runner = StageRunner(
        uid, work_dir, cfg["stages"], bool(cfg.get("refresh_cache")), echo,
        result_storage=result_storage(cfg), gpu_limit=orchestration.get("gpu_limit") or None,
    )
    _UNMARKED[uid] = runner
    status, error, result, preview_key = "FAILED", None, {}, None
    try:
        # The video's version in the store keys ingest; its sha256 keys everything after.
        source = {"video_link": product.video_link, "version": store.object_version(product.video_link)}
        video = runner.run("ingest", [], source, product=product, store=store, max_bytes=storage.max_video_bytes)
        stills = runner.run(
            "frames", [video.fingerprint], cfg["frames"], video=video, settings=frames.FrameSettings(**cfg["frames"])
        )
        rig = runner.run(
            "colmap", [stills.fingerprint], cfg["colmap"], frames=stills, settings=colmap.ColmapSettings(**cfg["colmap"])
        )
        query = f"{product.category} {product.title}".strip()
        boxes = runner.run(
            "detect",
            [rig.fingerprint],
            {**cfg["detector"], "query": query},
            rig=rig,
            settings=detect.detector_settings(cfg["detector"]),
            query=query,
        )
        masks = runner.run(
            "segment",
            [boxes.fingerprint],
            cfg["segmenter"],
            rig=rig,
            detections=boxes,
            settings=segment.segmenter_settings(cfg["segmenter"]),
        )
        field = runner.run(
            "train", [masks.fingerprint], cfg["nerf"], masks=masks, settings=cfg["nerf"],
            progress=_training_progress(uid, cfg), oom_retry=cfg["stages"]["train"].get("oom_retry"),
        )
        asset = runner.run(
            "mesh", [field.fingerprint], cfg["mesh"], field=field, masks=masks, settings=mesh.MeshSettings(**cfg["mesh"])
        )
        preview = _write_preview(Path(asset.glb), Path(asset.dir) / "preview.png")
        shards = runner.run(
            "shard", [asset.fingerprint], {"part_bytes": storage.part_bytes}, mesh=asset, unique_id=uid,
            part_bytes=storage.part_bytes,
        )
        if preview is not None:
            # The gallery's thumbnail and the product page's poster; published before the manifest.
            preview_key = f"{model_prefix(uid)}/preview.png"
            store.put_object(preview_key, preview, "image/png")
        target = {"backend": storage.backend, "root": storage.root, "bucket": storage.bucket}
        published = runner.run(
            "upload", [shards.fingerprint], target, reuse_if=_still_published(store, shards), shards=shards, store=store,
            unique_id=uid,
        )
        store.mark_done(uid, published.manifest_key)
        status = "DONE"
        result = {
            "glb": str(asset.glb),
            "obj": str(asset.obj),
            "manifest_key": published.manifest_key,
            "shards_dir": str(shards.dir),
        }
    except StageFailed as exc:
        error = exc.reason
    except Exception as exc:  # a bug outside a stage still fails the product with its reason
        log.exception("run of %s failed outside a stage", uid)
        error = f"{runner.current or 'pipeline'}: {type(exc).__name__}: {exc}"
    if status != "DONE":
        store.mark_failed(uid, error or "unknown error")
    _UNMARKED.pop(uid, None)
    report = write_report(work_dir, uid, product.title, runner.runs, status, error, cfg)
    publish_run_artifacts(uid, product.title, runner.runs, status, error, cfg, preview_key)
    return ProductResult(uid, status, error, str(report), **result)


def _still_published(store: ProductStore, shards: Any) -> Callable[[Any], bool]:
    """A cached upload holds only while the store's manifest is still this one (a run with
    other settings may have published another model of the product since)."""

    def check(publication: Any) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                current = store.get_object(publication.manifest_key, Path(tmp) / "manifest.json").read_bytes()
            except Exception:  # missing or unreadable: publish again
                return False
        return current == Path(shards.manifests[0]).read_bytes()

    return check


def _write_preview(glb: Path, png: Path) -> Path | None:
    """A turntable strip of the model (made once per mesh folder); None when no renderer works."""
    if png.exists():
        return png
    try:
        from tasks.mesh_preview import render_preview_in_subprocess

        return render_preview_in_subprocess(glb, png)
    except Exception as exc:  # a missing OpenGL must not fail a finished product
        log.info("no preview image: %s", exc)
        return None


def _flow_config(parameters: dict[str, Any]) -> dict[str, Any]:
    config = parameters.get("config")
    return to_plain(config) if config is not None else compose_config(parameters.get("overrides") or ())


def mark_failed_for_good(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (failed, crashed, cancelled): leave the product FAILED with the stage and why.

    Runs in the flow's process, or in the worker's when a cancelled run's process was killed.
    A product that run_stages already marked, or that another worker holds, is left alone.
    """
    parameters = dict(flow_run.parameters or {})
    unique_id = str(parameters.get("unique_id"))
    runner = _UNMARKED.pop(unique_id, None)
    try:
        outcome = state.result(raise_on_failure=False)
    except BaseException as exc:  # a crashed state may carry no retrievable result
        outcome = exc
    if isinstance(outcome, ProductFailed):
        return
    cfg = _flow_config(parameters)
    store = open_store(cfg["storage"])
    try:
        product = store.get(unique_id)
    except StoreError:  # no such product: nothing to mark
        return
    # The claimant: a hand-over's name when the dispatcher passed one (``claim``), else the worker's.
    claimant = parameters.get("claim") or cfg["worker"]
    if product.status != "PROCESSING" or product.claimed_by != claimant:
        return
    stage = runner.current if runner is not None and runner.current else "run"
    what = {"CRASHED": "crashed", "CANCELLED": "was cancelled", "CANCELLING": "was cancelled"}.get(
        state.type.value, "failed"
    )
    detail = f"{type(outcome).__name__}: {outcome}" if isinstance(outcome, BaseException) else state.message
    reason = f"{stage}: the run {what} ({detail or state.name}); nothing was published. Rerun the product to resume"
    store.mark_failed(unique_id, reason)
    log.warning("marked %s FAILED: %s", unique_id, reason)


@flow(
    name="reconstruct-product",
    log_prints=True,
    on_failure=[mark_failed_for_good],
    on_crashed=[mark_failed_for_good],
    on_cancellation=[mark_failed_for_good],
)
def reconstruct_product(
    unique_id: str,
    overrides: Sequence[str] | None = None,
    config: dict[str, Any] | None = None,
    claim: str | None = None,
) -> ProductResult:
    """Claim one product by id and run the pipeline on it; raises :class:`ProductFailed` if it fails.

    ``overrides`` are Hydra overrides (``["nerf.steps=2000", "mesh=full"]``); ``config`` is an
    already resolved configuration (the command line passes it) and wins over ``overrides``.
    ``claim``: the claimant name process-queue claimed the product under for this run
    (flows/dispatch.py); the run works under that claim, or ends Cancelled, touching nothing,
    when the claim has gone to another run.
    """
    cfg = to_plain(config) if config is not None else compose_config(overrides or ())
    store = open_store(cfg["storage"])
    if claim:
        from prefect.states import Cancelled

        from flows.dispatch import take_over

        product = take_over(store, unique_id, claim, float(cfg["queue"]["lease_s"]))
        if product is None:
            return Cancelled(message=f"{unique_id} is no longer claimed by {claim}: another run has it")
    else:
        product = store.claim(unique_id, cfg["worker"], float(cfg["queue"]["lease_s"]))
    result = run_stages(product, store, cfg)
    if result.status != "DONE":
        raise ProductFailed(result)  # the flow run shows Failed; the row already says why
    return result


def reconstruct_and_report(unique_id: str, config: dict[str, Any]) -> ProductResult:
    """Run the flow and return its result whether it finished DONE or FAILED."""
    state = reconstruct_product(unique_id, config=config, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, ProductFailed):
        return result.result
    if isinstance(result, BaseException):
        raise result
    return result
