"""More than one machine, for real, on loopback (issue #7).

A Prefect server backed by PostgreSQL (a throwaway cluster from tests/pg_cluster.py; SQLite when
PostgreSQL's server binaries are missing), the pools and the ``gpu`` limit from infra/pools.sh,
the deployments from prefect.yaml and then ``korokoro deploy``, a CPU worker for the scheduled
dispatcher and two workers on the GPU pool (``--limit 1``, different ``KOROKORO_WORKER`` names)
standing in for two GPU machines. Six tiny but real products (the sample video, every stage run)
go through the PostgreSQL queue; all six must end DONE with a verified model, each claimed once,
run by exactly one ``reconstruct-product`` flow run on one of the two workers.

About 5-8 minutes on 2 busy cores (marked slow). Run it alone with
``PYOPENGL_PLATFORM=osmesa .venv/bin/pytest -q -p no:cacheprovider tests/test_server.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import compose_config
from tests import loopback
from tests.loopback import BIN, REPO, SAMPLE_VIDEO, TINY

pytestmark = pytest.mark.slow

PRODUCTS = [f"shelf-{i}" for i in range(6)]
GPU_WORKERS = ("gpu-a", "gpu-b")


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    """(Prefect's SQLAlchemy URL or None, the products queue's DSN or None): PostgreSQL if it starts."""
    from tests.pg_cluster import QUEUE_SQL, apply_sql, start_cluster, stop_cluster

    cluster, why = start_cluster()
    if cluster is None:
        print(f"PostgreSQL unavailable ({why.splitlines()[0]}): Prefect on SQLite, the local store")
        yield None, None
        return
    try:
        import psycopg

        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE prefect")
            conn.execute("CREATE DATABASE korokoro")
        apply_sql(cluster.dsn("korokoro"), QUEUE_SQL)
        url = f"postgresql+asyncpg://{cluster.user}@/prefect?host={cluster.socket_dir}&port={cluster.port}"
        yield url, cluster.dsn("korokoro")
    finally:
        stop_cluster(cluster)


def _flow_runs(api: str, deployment: str) -> list:
    """Every flow run of ``deployment`` ("flow/deployment") on the server at ``api``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def _deployment(api: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _server_accepts_pool_templates(api: str) -> None:
    """The Docker and Kubernetes GPU templates are valid pool templates for this Prefect server
    (it checks every placeholder is a declared variable). No Docker or cluster runs them here."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    templates = {
        "docker": REPO / "infra" / "job-templates" / "docker-gpu.yaml",
        "kubernetes": REPO / "infra" / "k8s" / "gpu-job-template.yaml",
    }
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for kind, path in templates.items():
            template = yaml.safe_load(path.read_text())
            pool = client.create_work_pool(WorkPoolCreate(name=f"check-{kind}", type=kind, base_job_template=template))
            assert pool.base_job_template == template


def test_two_workers_process_six_products_each_exactly_once(databases, tmp_path, monkeypatch) -> None:
    from tasks.fetch import fetch_model
    from tasks.storage import open_store

    prefect_db, queue_dsn = databases
    data = tmp_path / "data"
    logs = tmp_path / "logs"
    storage = ["storage=postgres"] if queue_dsn else []
    # Short lease would let a slow product be handed out twice; 15 min outlasts any tiny run.
    overrides = [*TINY, *storage, "deploy.interval_s=5", "deploy.max_in_flight=2", "queue.lease_s=900"]

    with loopback.prefect_server(tmp_path / "server-home", logs, prefect_db) as api:
        env = loopback.base_env(
            PREFECT_API_URL=api,
            PREFECT_HOME=str(tmp_path / "client-home"),
            KOROKORO_DATA=str(data),
            KOROKORO_HOME=str(REPO),
            PREFECT_WORKER_QUERY_SECONDS="2",
            **({"KOROKORO_PG_DSN": queue_dsn} if queue_dsn else {}),
        )
        loopback.run(["bash", str(REPO / "infra" / "pools.sh"), "process", "2", *storage], env)
        _server_accepts_pool_templates(api)
        # prefect.yaml deploys as it is; then `korokoro deploy` replaces both with this test's overrides.
        loopback.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
        assert _deployment(api, "process-queue/process-queue").work_pool_name == "korokoro-cpu"
        loopback.run([str(BIN / "korokoro"), "deploy", *overrides], env)
        dispatcher = _deployment(api, "process-queue/process-queue")
        assert [s.schedule.interval.total_seconds() for s in dispatcher.schedules] == [5.0]
        assert dispatcher.parameters == {"overrides": overrides, "dispatch": True}
        assert _deployment(api, "reconstruct-product/reconstruct-product").work_pool_name == "korokoro-gpu"

        monkeypatch.setenv("KOROKORO_DATA", str(data))
        if queue_dsn:
            monkeypatch.setenv("KOROKORO_PG_DSN", queue_dsn)
        cfg = compose_config(overrides)
        store = open_store(cfg["storage"])
        for uid in PRODUCTS:  # six distinct products that share one video file
            store.enqueue(f"basket {uid}", "others", SAMPLE_VIDEO, uid)

        workers = [
            loopback.start(
                "worker-cpu",
                [str(BIN / "prefect"), "worker", "start", "--pool", "korokoro-cpu", "--name", "cpu-1", "--limit", "1"],
                {**env, "KOROKORO_WORKER": "cpu-1"}, logs,
            )
        ] + [
            loopback.start(
                f"worker-{name}",
                [str(BIN / "prefect"), "worker", "start", "--pool", "korokoro-gpu", "--name", name, "--limit", "1"],
                {**env, "KOROKORO_WORKER": name}, logs,
            )
            for name in GPU_WORKERS
        ]
        try:
            finished = lambda: all(store.get(u).status in ("DONE", "FAILED") for u in PRODUCTS)  # noqa: E731
            loopback.wait_for("six products DONE or FAILED", finished, timeout_s=900, every_s=3, procs=tuple(workers))
        finally:
            for worker in workers:
                loopback.stop(worker)

        products = {uid: store.get(uid) for uid in PRODUCTS}
        assert {uid: p.status for uid, p in products.items()} == {uid: "DONE" for uid in PRODUCTS}, {
            uid: p.error for uid, p in products.items()
        }
        # Claimed once each, by a dispatch hand-over.
        assert all(p.attempts == 1 and "/dispatch-" in p.claimed_by for p in products.values())
        for uid in PRODUCTS:  # a complete model: every part there, every sha256 right
            fetched = fetch_model(store, uid, tmp_path / "fetched" / uid, 2)
            assert fetched.manifest_key == products[uid].model_manifest and fetched.files

        runs = _flow_runs(api, "reconstruct-product/reconstruct-product")
        by_product: dict[str, list] = {}
        for run in runs:
            by_product.setdefault(run.parameters["unique_id"], []).append(run)
        assert sorted(by_product) == sorted(PRODUCTS)
        assert all(len(r) == 1 for r in by_product.values()), {u: [x.name for x in r] for u, r in by_product.items()}
        assert all(r[0].state.is_completed() for r in by_product.values())
        ran_on = {uid: r[0].labels.get("prefect.worker.name") for uid, r in by_product.items()}
        assert set(ran_on.values()) == set(GPU_WORKERS), ran_on  # both machines worked, nobody else
        assert any(r.state.is_completed() for r in _flow_runs(api, "process-queue/process-queue"))
