"""``process-queue``: take products from the store's queue, one by one; a failure never stops it.

Two ways to run it:

- ``dispatch=False`` (``korokoro queue``, one machine): claim a product, run its stages here,
  repeat until the queue is empty (or ``queue.max_products`` are done).
- ``dispatch=True`` (the ``process-queue`` deployment, on an interval schedule): claim up to
  ``deploy.max_in_flight`` products and start one ``reconstruct-product`` run per product on the
  GPU pool; ``flows/dispatch.py`` explains how the claim is handed over exactly once.

Not named ``queue.py``: Prefect puts ``flows/`` on ``sys.path`` when it loads a flow from its
file, and a ``flows/queue.py`` then shadows the standard library's ``queue`` in every child
process a stage starts (they died on ``import queue``).
"""

from __future__ import annotations

from typing import Any, Sequence

from prefect import flow

from flows.config import compose_config, to_plain
from flows.dispatch import Dispatch, dispatch_products
from flows.reconstruct import ProductResult, run_stages
from tasks.storage import open_store


@flow(name="process-queue", log_prints=True)
def process_queue(
    overrides: Sequence[str] | None = None, config: dict[str, Any] | None = None, dispatch: bool = False
) -> list[ProductResult] | list[Dispatch]:
    """Process the queue here (one result per product claimed), or with ``dispatch`` hand each
    claimed product to a ``reconstruct-product`` run (one :class:`Dispatch` per product).

    ``overrides`` are Hydra overrides; ``config`` an already resolved configuration that wins
    over them here. Dispatched runs get ``overrides`` only and resolve conf on their own worker.
    """
    cfg = to_plain(config) if config is not None else compose_config(overrides or ())
    store = open_store(cfg["storage"])
    if dispatch:
        return dispatch_products(store, cfg, list(overrides or ()))
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
