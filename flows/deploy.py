"""The two deployments, built from conf: registered on a Prefect server, or served from here.

- ``process-queue`` (``dispatch=True``) on ``deploy.dispatch_pool``, every ``deploy.interval_s``
  seconds: claims products and starts one ``reconstruct-product`` run each (flows/dispatch.py).
- ``reconstruct-product`` on ``deploy.gpu_pool``: one product (``unique_id``, ``claim``).

Both carry the Hydra ``overrides`` given when deploying as their default parameters; every run
resolves conf on the worker that runs it (its ``KOROKORO_WORKER``, ``KOROKORO_DATA``).

:func:`deploy_to_server` (``korokoro deploy``) registers them on ``$PREFECT_API_URL`` for
workers (``prefect worker start --pool ...``) on this or other machines; the code is pulled from
``source`` (this checkout, or ``$KOROKORO_HOME``: the path where every worker has the project).
:func:`serve_here` (``korokoro serve``) runs both in this process, no pools or workers needed.
prefect.yaml describes the same two deployments for ``prefect deploy --all``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DeploymentSpec:
    """What one deployment is: the flow's entrypoint, its pool, parameters and schedule."""

    name: str
    entrypoint: str
    work_pool: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    interval_s: float | None = None


def deployment_specs(cfg: dict[str, Any], overrides: Sequence[str] = ()) -> list[DeploymentSpec]:
    """The dispatcher and the per-product deployment, as conf's ``deploy:`` section names them."""
    deploy = cfg["deploy"]
    overrides = [str(o) for o in overrides]
    return [
        DeploymentSpec(
            name="process-queue",
            entrypoint="flows/process_queue.py:process_queue",
            work_pool=str(deploy["dispatch_pool"]),
            description="Claim queued products and start one reconstruct-product run per product.",
            parameters={"overrides": overrides, "dispatch": True},
            interval_s=float(deploy["interval_s"]),
        ),
        DeploymentSpec(
            name="reconstruct-product",
            entrypoint="flows/reconstruct.py:reconstruct_product",
            work_pool=str(deploy["gpu_pool"]),
            description="Run the nine stages for one product (unique_id, Hydra overrides, dispatch claim).",
            parameters={"overrides": overrides},
        ),
    ]


def deploy_to_server(
    cfg: dict[str, Any], overrides: Sequence[str] = (), source: str | Path | None = None
) -> dict[str, str]:
    """Create or update both deployments on the configured Prefect server; name → id.

    The pools must exist (infra/pools.sh). ``source`` is where workers find the project
    (default ``$KOROKORO_HOME``, else this checkout's path).
    """
    from prefect import flow

    source = Path(source or os.environ.get("KOROKORO_HOME") or REPO).expanduser().resolve()
    ids = {}
    for spec in deployment_specs(cfg, overrides):
        remote = flow.from_source(source=str(source), entrypoint=spec.entrypoint)
        deployment_id = remote.deploy(
            name=spec.name,
            work_pool_name=spec.work_pool,
            parameters=spec.parameters,
            interval=spec.interval_s,
            description=spec.description,
            tags=["korokoro"],
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
        )
        ids[spec.name] = str(deployment_id)
    return ids


def serve_here(cfg: dict[str, Any], overrides: Sequence[str] = ()) -> None:
    """Run both deployments from this process until interrupted (one machine, no workers).

    Runs at most ``deploy.max_in_flight`` products at a time, plus the dispatcher's own run.
    """
    from prefect import serve
    from prefect.flows import load_flow_from_entrypoint

    # Served runs load their flow from the entrypoint relative to the working directory.
    os.chdir(REPO)
    deployments = []
    for spec in deployment_specs(cfg, overrides):
        flow = load_flow_from_entrypoint(spec.entrypoint)
        deployments.append(
            flow.to_deployment(
                name=spec.name,
                parameters=spec.parameters,
                interval=spec.interval_s,
                description=spec.description,
                tags=["korokoro"],
            )
        )
    in_flight = int(cfg["deploy"]["max_in_flight"])
    serve(*deployments, limit=in_flight + 1 if in_flight > 0 else None)
