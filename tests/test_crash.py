"""Crash safety (issue #10): kill -9 a worker in the middle of training, then recover.

Worker A (``korokoro queue`` in its own session, Prefect in its temporary-server mode) claims a
tiny real product; the moment its train stage starts, A and every process it started are killed
with SIGKILL, as if the machine died. Then:

- nothing of the model is visible in the bucket (the manifest is published last, after parts
  that were never made), and the product still shows A's claim;
- while A's lease lasts, worker B takes nothing;
- after the lease, B reclaims the product, reuses the five finished stages from the shared
  result storage, trains again, publishes, and marks it DONE; every part of its manifest exists
  and matches its sha256.

Once with the local store (SQLite + folder) and once with the PostgreSQL queue (a throwaway
cluster, tests/pg_cluster.py). About 2-4 minutes each on 2 busy cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.config import compose_config
from tests import loopback
from tests.loopback import BIN, SAMPLE_VIDEO, TINY
from tests.pg_cluster import pg_cluster, pg_db  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

UID = "crash-basket"
# A's lease: long enough to still run when A dies (so B's early try shows it is respected).
LEASE_S = 60
# A few hundred steps keep training going for seconds after its folder appears.
OVERRIDES = [*TINY, "nerf.steps=400", f"queue.lease_s={LEASE_S}"]


@pytest.fixture(params=["local", "postgres"])
def backend(request) -> tuple[list[str], dict[str, str]]:
    """(storage overrides, environment) of the store under test."""
    if request.param == "local":
        return [], {}
    dsn = request.getfixturevalue("pg_db")
    return ["storage=postgres"], {"KOROKORO_PG_DSN": dsn}


def _queue_worker(name: str, overrides: list[str], env: dict[str, str], logs: Path) -> loopback.Proc:
    return loopback.start(name, [str(BIN / "korokoro"), "queue", *overrides], {**env, "KOROKORO_WORKER": name}, logs)


def _stages(report_json: Path) -> dict[str, dict]:
    return {s["stage"]: s for s in json.loads(report_json.read_text())["stages"]}


def test_killed_worker_leaves_nothing_published_and_another_finishes(backend, tmp_path, monkeypatch) -> None:
    from tasks.fetch import fetch_model
    from tasks.storage import open_store

    storage, store_env = backend
    data, logs = tmp_path / "data", tmp_path / "logs"
    overrides = [*OVERRIDES, *storage]
    env = loopback.base_env(KOROKORO_DATA=str(data), PREFECT_HOME=str(tmp_path / "prefect-home"), **store_env)
    monkeypatch.setenv("KOROKORO_DATA", str(data))
    for key, value in store_env.items():
        monkeypatch.setenv(key, value)
    store = open_store(compose_config(overrides)["storage"])
    store.enqueue("wicker basket", "others", SAMPLE_VIDEO, UID)
    work = data / "work" / UID
    manifest_key = f"models/{UID}/manifest.json"

    worker_a = _queue_worker("worker-a", overrides, env, logs)
    try:
        loopback.wait_for("the train stage to start", lambda: any(work.glob("train-*")), 600, every_s=0.2,
                          procs=(worker_a,))
        time.sleep(1.0)  # into the optimisation proper
        loopback.kill_hard(worker_a)
    finally:
        loopback.stop(worker_a)

    (train_dir,) = work.glob("train-*")
    assert not (train_dir / "metrics.json").exists(), "training had finished: the kill came too late"
    assert not any(work.glob("mesh-*"))
    assert not store.object_exists(manifest_key)
    assert store.list_objects(f"models/{UID}") == []  # not a single part: nothing half-published
    held = store.get(UID)
    assert (held.status, held.claimed_by, held.attempts) == ("PROCESSING", "worker-a", 1)

    if held.claimed_at + LEASE_S > time.time() + 20:  # A's lease still runs: B must leave it alone
        loopback.run([str(BIN / "korokoro"), "queue", *overrides], {**env, "KOROKORO_WORKER": "worker-b"})
        assert store.get(UID) == held
    time.sleep(max(0.0, held.claimed_at + LEASE_S - time.time() + 1))

    done = loopback.run([str(BIN / "korokoro"), "queue", *overrides], {**env, "KOROKORO_WORKER": "worker-b"},
                        timeout_s=900)
    assert "processed 1 products: 1 DONE" in done.stdout, done.stdout[-3000:]
    product = store.get(UID)
    assert (product.status, product.claimed_by, product.attempts) == ("DONE", "worker-b", 2)
    assert product.model_manifest == manifest_key
    fetched = fetch_model(store, UID, tmp_path / "fetched", 2)  # every part there, every sha256 right
    assert fetched.files and all(f.stat().st_size > 0 for f in fetched.files)

    stages = _stages(work / "report.json")
    states = {name: s["state"] for name, s in stages.items()}
    finished_before = ("ingest", "frames", "colmap", "detect", "segment")
    assert {s: states[s] for s in finished_before} == {s: "Cached" for s in finished_before}, states
    # Trained again, to the end (into A's folder, unless the training code changed in between).
    assert states["train"] == "Completed" and (Path(stages["train"]["out_dir"]) / "metrics.json").exists()
