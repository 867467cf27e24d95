"""Dispatching products to reconstruct-product runs, the deployments and the pool templates.

Fast: a local store, a recorder in place of Prefect's run_deployment, and one temporary Prefect
server for the flow's take-over path. The real server + two workers run is tests/test_server.py.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.config import compose_config
from flows.deploy import deployment_specs
from flows.dispatch import RECONSTRUCT_DEPLOYMENT, dispatch_products, held_products, take_over
from tasks.storage import open_store

REPO = Path(__file__).resolve().parents[1]
VIDEO = REPO / "sample" / "basket" / "video.mp4"


class RunRecorder:
    """Stands in for run_deployment: remembers each call, returns a flow-run-like object."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, name, **kwargs):
        self.calls.append({"name": name, **kwargs})
        return SimpleNamespace(id=uuid.uuid4(), name=kwargs.get("flow_run_name"))


def _cfg(tmp_path: Path, *extra: str) -> dict:
    return compose_config([f"data_dir={tmp_path}", "worker=dispatcher", *extra])


def _queue(cfg: dict, n: int) -> None:
    store = open_store(cfg["storage"])
    for i in range(n):
        store.enqueue(f"basket {i}", "others", VIDEO, f"p{i}")


def test_dispatch_hands_each_product_to_one_run_under_its_own_claim(tmp_path) -> None:
    cfg = _cfg(tmp_path, "deploy.max_in_flight=2")
    _queue(cfg, 3)
    store = open_store(cfg["storage"])
    runs = RunRecorder()
    first = dispatch_products(store, cfg, ["profile=cpu"], start_run=runs, echo=lambda _: None)
    assert [d.unique_id for d in first] == ["p0", "p1"]  # oldest first, max_in_flight of them
    assert len({d.claim for d in first}) == 2 and all(d.claim.startswith("dispatcher/dispatch-") for d in first)
    for call, d in zip(runs.calls, first):
        assert call["name"] == RECONSTRUCT_DEPLOYMENT and call["timeout"] == 0
        assert call["parameters"] == {"unique_id": d.unique_id, "overrides": ["profile=cpu"], "claim": d.claim}
        assert call["idempotency_key"] == d.claim  # a retried request cannot create a second run
        product = store.get(d.unique_id)
        assert (product.status, product.claimed_by, product.attempts) == ("PROCESSING", d.claim, 1)
    # Both slots are held: the next tick dispatches nothing, p2 keeps waiting.
    assert dispatch_products(store, cfg, [], start_run=runs, echo=lambda _: None) == []
    assert len(runs.calls) == 2 and store.get("p2").status == "IDLE"
    assert {p.unique_id for p in held_products(store, float(cfg["queue"]["lease_s"]))} == {"p0", "p1"}


def test_take_over_only_by_the_current_claim(tmp_path) -> None:
    cfg = _cfg(tmp_path, "queue.lease_s=0.5", "deploy.max_in_flight=1")
    _queue(cfg, 1)
    store = open_store(cfg["storage"])
    (old,) = dispatch_products(store, cfg, [], start_run=RunRecorder(), echo=lambda _: None)
    assert take_over(store, "p0", old.claim, 0.5).claimed_by == old.claim
    assert take_over(store, "p0", "someone/dispatch-else", 0.5) is None
    # The run never came (a dead worker): after the lease the next tick hands the product out again.
    time.sleep(0.6)
    (new,) = dispatch_products(store, cfg, [], start_run=RunRecorder(), echo=lambda _: None)
    assert new.unique_id == "p0" and new.claim != old.claim and new.attempt == 2
    assert take_over(store, "p0", old.claim, 60) is None  # the late first run must not touch it
    assert take_over(store, "p0", new.claim, 60) is not None


def test_a_late_run_renews_its_claim_when_nobody_took_the_product(tmp_path) -> None:
    cfg = _cfg(tmp_path, "queue.lease_s=2", "deploy.max_in_flight=1")
    _queue(cfg, 1)
    store = open_store(cfg["storage"])
    (hand_over,) = dispatch_products(store, cfg, [], start_run=RunRecorder(), echo=lambda _: None)
    time.sleep(2.1)  # the run waited in the pool longer than the lease
    renewed = take_over(store, "p0", hand_over.claim, 2)
    assert (renewed.status, renewed.claimed_by, renewed.attempts) == ("PROCESSING", hand_over.claim, 2)
    assert store.claim_next("dispatcher/dispatch-next", 2, 3) is None  # held again


def test_dispatch_gives_up_after_max_attempts(tmp_path) -> None:
    cfg = _cfg(tmp_path, "queue.lease_s=0.05", "queue.max_attempts=2", "deploy.max_in_flight=0")
    _queue(cfg, 1)
    store = open_store(cfg["storage"])
    runs = RunRecorder()
    for _ in range(3):  # every run dies: claimed, lease runs out, claimed again...
        dispatch_products(store, cfg, [], start_run=runs, echo=lambda _: None)
        time.sleep(0.1)
    assert len(runs.calls) == 2
    product = store.get("p0")
    assert product.status == "FAILED" and "2 attempts" in product.error


def test_prefect_yaml_describes_the_deployments_conf_makes() -> None:
    """prefect.yaml (for `prefect deploy --all`) and `korokoro deploy` agree."""
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    in_yaml = {d["name"]: d for d in project["deployments"]}
    for spec in deployment_specs(compose_config(), []):
        d = in_yaml[spec.name]
        assert d["entrypoint"] == spec.entrypoint
        assert d["work_pool"]["name"] == spec.work_pool
        assert d["parameters"] == spec.parameters
        intervals = [s["interval"] for s in d.get("schedules", [])]
        assert intervals == ([spec.interval_s] if spec.interval_s else [])
        module, function = spec.entrypoint.split(":")
        assert f"def {function}(" in (REPO / module).read_text()
    assert set(in_yaml) == {"process-queue", "reconstruct-product"}
    assert RECONSTRUCT_DEPLOYMENT == "reconstruct-product/reconstruct-product"


def _rendered(template_file: Path) -> dict:
    """A base job template's job configuration with its variables' defaults filled in."""
    from prefect.utilities.templating import apply_values, find_placeholders

    template = yaml.safe_load(template_file.read_text())
    declared = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(declared), f"undeclared variables {used - set(declared)} in {template_file}"
    defaults = {k: v["default"] for k, v in declared.items() if "default" in v}
    return apply_values(template["job_configuration"], defaults)


def test_kubernetes_template_requests_one_gpu_per_run() -> None:
    job = _rendered(REPO / "infra" / "k8s" / "gpu-job-template.yaml")["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["backoffLimit"] == 0  # a failed pod is not started again behind the lease's back
    assert {v["name"] for v in pod["volumes"]} >= {"korokoro-data"}


def test_docker_template_reserves_one_gpu_per_run() -> None:
    kwargs = _rendered(REPO / "infra" / "job-templates" / "docker-gpu.yaml")["container_create_kwargs"]
    (request,) = kwargs["device_requests"]
    assert request == {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}


def test_compose_file_reserves_the_gpu_for_the_gpu_worker() -> None:
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker-cpu", "worker-gpu"} <= set(services)
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert "deploy" not in services["worker-cpu"]
    # Passwords come from the environment (infra/.env), never from the file.
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if "PASSWORD" in key.upper():
                assert value.startswith("${"), key
            for secret in re.findall(r"password=(\S+)|//[^:/@]+:([^@]+)@", value):
                assert "".join(secret).startswith("${"), key


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_stale_hand_over_ends_cancelled_and_touches_nothing(tmp_path, prefect_server) -> None:
    from flows.reconstruct import reconstruct_product

    cfg = _cfg(tmp_path, "deploy.max_in_flight=1")
    _queue(cfg, 1)
    store = open_store(cfg["storage"])
    (current,) = dispatch_products(store, cfg, [], start_run=RunRecorder(), echo=lambda _: None)
    before = store.get("p0")
    state = reconstruct_product("p0", config=cfg, claim="dispatcher/dispatch-stale", return_state=True)
    assert state.is_cancelled(), state
    assert store.get("p0") == before  # no claim, no stage, no mark, attempts unchanged
    assert not (Path(cfg["data_dir"]) / "work" / "p0").exists()
    assert current.claim == before.claimed_by


def test_colab_notebook_is_valid_and_its_run_line_composes() -> None:
    import json

    notebook = json.loads((REPO / "infra" / "korokoro_colab.ipynb").read_text())
    assert notebook["nbformat"] == 4
    runs = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        runs += [line for line in lines if line.lstrip().startswith("!korokoro run ")]
        # IPython's ! and % lines (read as `pass`) aside, every code cell is Python.
        magic = [line.lstrip()[:1] in ("!", "%") for line in lines]
        python = [line[: len(line) - len(line.lstrip())] + "pass" if m else line for line, m in zip(lines, magic)]
        compile("\n".join(python), "cell", "exec")
    (run_line,) = runs
    overrides = [a for a in run_line.split()[2:] if "{" not in a]  # the notebook fills {VIDEO} etc.
    cfg = compose_config(overrides)
    assert cfg["profile_name"] == "gpu" and cfg["nerf"]["device"] == "cuda"
