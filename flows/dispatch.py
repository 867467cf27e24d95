"""Hand queued products to runs of the ``reconstruct-product`` deployment, each exactly once.

The claim hand-over. ``process-queue`` (``dispatch=True``) is the only thing that *claims*:

1. it claims the oldest claimable product with the store's atomic ``claim_next`` under a fresh
   claimant name, ``<worker>/dispatch-<random>``, unique to this one hand-over, with the
   ordinary lease (``queue.lease_s``) and attempt limit (``queue.max_attempts``);
2. it creates one flow run of ``reconstruct-product`` with ``claim=<that name>`` (idempotency
   key = the name, so a retried request cannot create a second run);
3. the run, on whichever GPU worker picks it up, does not claim again: :func:`take_over` checks
   that the product is still PROCESSING under *its* claimant name and works under that claim
   (renewing it, one more attempt, only if the lease ran out while the run waited and nobody
   took the product meanwhile). If the claim went elsewhere, the run does nothing (Cancelled).

Why this keeps the two promises:

- *Each product processed exactly once.* Only ``claim_next`` hands a product out, atomically,
  and each hand-over's name is unique; a run whose hand-over is no longer the product's current
  claim (its lease ran out and the product was handed out again, or it is DONE) refuses.
  As with every worker, the lease must outlast the run (queue wait + stages): the store has no
  lease renewal, so a run still going when its lease ends can meet a second one.
- *A dead worker's product comes back after its lease.* A killed run, a run lost in the pool,
  or a dispatcher that died between claiming and creating the run, all leave the product
  PROCESSING with a lease that ends; the next tick's ``claim_next`` takes it again (attempts
  + 1, so a product that kills workers ends FAILED after ``queue.max_attempts``).

Attempts count once per hand-over (the run does not call ``claim``, which would count again,
except to renew a lease that ran out before the run started).
At most ``deploy.max_in_flight`` products are held at a time, so claims do not wait in the work
pool while their leases run.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tasks.storage import ProductStore
from tasks.storage.base import StoreError
from tasks.types import Product

# "flow name/deployment name" of the runs the dispatcher starts (flows/deploy.py creates it).
RECONSTRUCT_DEPLOYMENT = "reconstruct-product/reconstruct-product"


@dataclass(frozen=True)
class Dispatch:
    """One product handed to one flow run."""

    unique_id: str
    claim: str
    attempt: int
    flow_run_id: str
    flow_run_name: str


def claim_name(worker: str) -> str:
    """A claimant name unique to one hand-over: the dispatching worker plus a random suffix."""
    return f"{worker}/dispatch-{uuid.uuid4().hex[:12]}"


def held_products(store: ProductStore, lease_s: float, now: float | None = None) -> list[Product]:
    """Products PROCESSING under a lease that has not run out (by ``claimed_at + lease_s``)."""
    now = time.time() if now is None else now
    return [
        p for p in store.list_products("PROCESSING") if p.claimed_at is not None and p.claimed_at + lease_s > now
    ]


def take_over(store: ProductStore, unique_id: str, claim: str, lease_s: float) -> Product | None:
    """The product, if ``claim`` is still its current claim; else None.

    Called by a ``reconstruct-product`` run handed ``claim`` by the dispatcher. None means the
    hand-over is stale (the product went to another run, or it finished): the run must not
    touch the product. When the lease ran out while the run waited for a worker and nobody has
    taken the product since, the claim is renewed under the same name (one more attempt);
    if another claim wins that race, None.
    """
    product = store.get(unique_id)
    if product.status != "PROCESSING" or product.claimed_by != claim:
        return None
    if product.claimed_at is not None and product.claimed_at + lease_s > time.time():
        return product
    try:
        return store.claim(unique_id, claim, lease_s)  # refused while another claim's lease lives
    except StoreError:
        return None


def check_deployment(name: str = RECONSTRUCT_DEPLOYMENT) -> None:
    """Fail before claiming anything when the deployment runs would be created from is missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise RuntimeError(
                f"no deployment {name!r} on the Prefect server: run `korokoro deploy` (or "
                "`prefect deploy --all` from the repository root) first"
            ) from None


def dispatch_products(
    store: ProductStore,
    cfg: dict[str, Any],
    overrides: Sequence[str],
    start_run: Callable[..., Any] | None = None,
    echo: Callable[[str], None] = print,
) -> list[Dispatch]:
    """Claim up to the free in-flight slots and start one ``reconstruct-product`` run per product.

    ``overrides`` (Hydra, JSON-friendly) go to every run, which resolves conf on its own worker
    (its ``worker`` name, its paths); the resolved ``cfg`` never travels. ``start_run`` is
    Prefect's ``run_deployment`` unless given (tests pass a recorder).
    """
    queue, deploy = cfg["queue"], cfg["deploy"]
    lease_s = float(queue["lease_s"])
    limit = int(deploy["max_in_flight"])
    free = limit - len(held_products(store, lease_s)) if limit > 0 else None
    if free is not None and free <= 0:
        echo(f"{limit} products in flight (deploy.max_in_flight): nothing dispatched")
        return []
    if start_run is None:
        from prefect.deployments import run_deployment as start_run

        check_deployment()
    dispatched: list[Dispatch] = []
    while free is None or len(dispatched) < free:
        claim = claim_name(cfg["worker"])
        product = store.claim_next(claim, lease_s, int(queue["max_attempts"]))
        if product is None:
            break
        name = f"{product.unique_id}-attempt-{product.attempts}"
        # If this call fails the product stays claimed and comes back after its lease.
        run = start_run(
            RECONSTRUCT_DEPLOYMENT,
            parameters={"unique_id": product.unique_id, "overrides": list(overrides), "claim": claim},
            flow_run_name=name,
            idempotency_key=claim,
            tags=["korokoro", f"product:{product.unique_id}"],
            timeout=0,
        )
        echo(f"dispatched {product.unique_id} ({product.title!r}, attempt {product.attempts}) to run {name} [{run.id}]")
        dispatched.append(Dispatch(product.unique_id, claim, product.attempts, str(run.id), name))
    return dispatched
