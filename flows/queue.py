"""``process-queue``: claim products one by one and reconstruct each; a failure never stops the worker."""

from __future__ import annotations

from typing import Any, Sequence

from prefect import flow

from flows.config import compose_config, to_plain
from flows.reconstruct import ProductResult, run_stages
from tasks.storage import open_store


@flow(name="process-queue", log_prints=True)
def process_queue(
    overrides: Sequence[str] | None = None, config: dict[str, Any] | None = None
) -> list[ProductResult]:
    """Claim the oldest waiting product, run it, repeat until the queue is empty
    (or ``queue.max_products`` are done). Returns one result per product claimed."""
    cfg = to_plain(config) if config is not None else compose_config(overrides or ())
    store = open_store(cfg["storage"])
    queue = cfg["queue"]
    results: list[ProductResult] = []
    while not queue["max_products"] or len(results) < queue["max_products"]:
        product = store.claim_next(cfg["worker"], float(queue["lease_s"]), int(queue["max_attempts"]))
        if product is None:
            break
        print(f"claimed {product.unique_id} ({product.title!r}, attempt {product.attempts})")
        result = run_stages(product, store, cfg)
        print(f"{product.unique_id}: {result.status}" + (f" — {result.error}" if result.error else ""))
        results.append(result)
    return results
