"""``reconstruct-product``: the nine stages for one product, from its video to a published model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from prefect import flow

from flows.config import compose_config, to_plain
from flows.report import write_report
from flows.stages import StageFailed, StageRunner
from tasks import colmap, detect, frames, mesh, segment
from tasks.storage import ProductStore, open_store
from tasks.storage.base import StorageSettings
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


def _training_progress(echo: Callable[[str], None]) -> Callable[[int, int, dict[str, float]], None]:
    """A tqdm bar on the terminal while the NeRF trains."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def progress(step: int, total: int, stats: dict[str, float]) -> None:
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
    runner = StageRunner(uid, work_dir, cfg["stages"], bool(cfg.get("refresh_cache")), echo)
    status, error, result = "FAILED", None, {}
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
            "train", [masks.fingerprint], cfg["nerf"], masks=masks, settings=cfg["nerf"], progress=_training_progress(echo)
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
            store.put_object(f"{model_prefix(uid)}/preview.png", preview, "image/png")
        target = {"backend": storage.backend, "root": storage.root, "bucket": storage.bucket}
        published = runner.run("upload", [shards.fingerprint], target, shards=shards, store=store, unique_id=uid)
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
        error = f"pipeline: {type(exc).__name__}: {exc}"
    if status != "DONE":
        store.mark_failed(uid, error or "unknown error")
    report = write_report(work_dir, uid, product.title, runner.runs, status, error, cfg)
    return ProductResult(uid, status, error, str(report), **result)


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


@flow(name="reconstruct-product", log_prints=True)
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
