"""Orchestration inside a run: isolated stages with real timeouts, result storage, the GPU slot,
the failure hook, artifacts, GPU out-of-memory retries and the multirun table.

Fake stage functions (tests/stage_fakes.py) stand in for the real ones: no pipeline run here.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flows import stages as stages_module
from flows.config import compose_config, result_storage
from flows.isolate import ChildDied, StageTimedOut, run_isolated
from flows.stages import StageExecution, StageFailed, StageRunner, StageSpec, _stage_task, execute_stage
from tests import stage_fakes as fakes

# Stages run here outside a flow; Prefect warns that their log lines have no flow run to go to.
pytestmark = pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")

SLEEPER = StageSpec("train", _stage_task(fakes.sleeping_stage, "train"), ("tests.stage_fakes",))
COUNTER = StageSpec("train", _stage_task(fakes.counting_stage, "train"), ("tests.stage_fakes",))


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _child_pid(caplog: pytest.LogCaptureFixture) -> int:
    found = [re.search(r"process (\d+)", r.getMessage()) for r in caplog.records if "runs in child process" in r.getMessage()]
    assert found and found[-1], [r.getMessage() for r in caplog.records]
    return int(found[-1].group(1))


# -- the child-process runner (no Prefect) -----------------------------------------------------


def test_isolated_stage_is_killed_at_its_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="korokoro")
    with pytest.raises(StageTimedOut, match=r"^timed out after 2 s \(stages\.train\.timeout_s\)"):
        run_isolated(fakes.sleeping_stage, {"out_dir": tmp_path, "fingerprint": "f", "seconds": 600}, "train", 2.0)
    pid = _child_pid(caplog)
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not left sleeping
    assert fakes.executions(tmp_path) in ([], [pid])


def test_isolated_stage_that_dies_fails_with_its_signal(tmp_path: Path) -> None:
    with pytest.raises(ChildDied, match="the mesh process killed by SIGKILL .*out of memory"):
        run_isolated(fakes.killed_stage, {"out_dir": tmp_path, "fingerprint": "f"}, "mesh", 120.0)
    assert len(fakes.executions(tmp_path)) == 1


def test_isolated_stage_returns_its_record_reports_progress_and_raises_its_error(tmp_path: Path) -> None:
    import os

    seen: list[tuple] = []
    kwargs = {"out_dir": tmp_path / "a", "fingerprint": "f", "steps": 4, "progress": lambda *a: seen.append(a)}
    record = run_isolated(fakes.counting_stage, kwargs, "train", None)
    assert record == fakes.FakeRecord(tmp_path / "a", "f", record.pid) and record.pid != os.getpid()
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)] and seen[-1][2] == {"loss": 0.25}
    with pytest.raises(ValueError) as failed:
        run_isolated(fakes.failing_stage, {"out_dir": tmp_path / "b", "fingerprint": "f", "message": "the video is upside down"}, "frames", 60)
    assert str(failed.value) == "the video is upside down"  # the stage's own type and text
    assert "in the stage's child process" in "".join(getattr(failed.value, "__notes__", []))


# -- stage options from conf ----------------------------------------------------------------------


def test_conf_gives_every_stage_a_timeout_and_isolates_the_heavy_ones() -> None:
    cfg = compose_config([])
    assert set(cfg["stages"]) == set(stages_module.STAGES)
    assert all(float(options["timeout_s"]) > 0 for options in cfg["stages"].values())
    runner = StageRunner("p", Path("."), cfg["stages"], gpu_limit="gpu")
    assert {n for n in cfg["stages"] if runner.execution(n).isolate} >= {"colmap", "train", "mesh"}
    assert runner.execution("train") == StageExecution("train", 7200.0, True, "gpu")
    assert runner.execution("shard").gpu_limit is None and not runner.execution("shard").isolate
    assert StageRunner("p", Path("."), cfg["stages"]).execution("train").gpu_limit is None


def test_gpu_slot_is_taken_only_when_a_limit_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    @contextmanager
    def recording_concurrency(names, occupy=1, **kwargs):
        calls.append((names, occupy, kwargs.get("strict")))
        yield

    monkeypatch.setattr(stages_module, "concurrency", recording_concurrency)
    kwargs = {"out_dir": tmp_path, "fingerprint": "f"}
    execute_stage(fakes.counting_stage, kwargs, StageExecution("train", 60.0, False, None))
    assert calls == []
    execute_stage(fakes.counting_stage, kwargs, StageExecution("train", 60.0, False, "gpu"))
    assert calls == [("gpu", 1, True)]
    assert len(fakes.executions(tmp_path)) == 2


# -- through Prefect ----------------------------------------------------------------------------------


def _runner(tmp_path: Path, spec: StageSpec, options: dict, **kwargs) -> StageRunner:
    work = tmp_path / "data" / "work" / "p1"
    cfg = {"data_dir": str(tmp_path / "data"), "orchestration": kwargs.pop("orchestration", {})}
    return StageRunner("p1", work, {"train": options}, echo=lambda _: None, stages={"train": spec},
                       result_storage=result_storage(cfg), **kwargs)


def test_isolated_stage_timeout_fails_the_stage_with_the_setting_named(prefect_api, tmp_path: Path) -> None:
    runner = _runner(tmp_path, SLEEPER, {"timeout_s": 2, "isolate": True})
    with pytest.raises(StageFailed) as failed:
        runner.run("train", [], {"seconds": 600}, seconds=600)
    assert failed.value.reason.startswith("train: timed out after 2 s (stages.train.timeout_s); the child process was stopped")


def test_thread_stage_timeout_names_the_setting_too(prefect_api, tmp_path: Path) -> None:
    # Not isolated: Prefect's own timeout interrupts time.sleep in the main thread.
    runner = _runner(tmp_path, SLEEPER, {"timeout_s": 2, "isolate": False})
    with pytest.raises(StageFailed, match=r"train: timed out after 2 s \(stages\.train\.timeout_s\); the task was interrupted"):
        runner.run("train", [], {"seconds": 60}, seconds=60)


def test_results_in_shared_storage_are_reused_by_a_second_worker(prefect_api, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    shared = tmp_path / "shared-results"
    first = _runner(tmp_path, COUNTER, {"timeout_s": 60}, orchestration={"results_dir": str(shared)})
    record = first.run("train", [], {"steps": 2}, steps=2)
    assert first.runs[-1].state == "Completed" and any(shared.rglob("*"))
    # Another machine: its own Prefect defaults, the same results_dir and data_dir.
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "elsewhere"}):
        second = _runner(tmp_path, COUNTER, {"timeout_s": 60}, orchestration={"results_dir": str(shared)})
        again = second.run("train", [], {"steps": 2}, steps=2)
    assert second.runs[-1].state == "Cached" and again == record
    assert len(fakes.executions(record.dir)) == 1
    # Without the shared results the second worker would have run the stage again.
    third = _runner(tmp_path, COUNTER, {"timeout_s": 60}, orchestration={"results_dir": str(tmp_path / "own")})
    third.run("train", [], {"steps": 2}, steps=2)
    assert third.runs[-1].state == "Completed" and len(fakes.executions(record.dir)) == 2


def test_results_block_is_used_when_named(prefect_api, tmp_path: Path) -> None:
    from prefect.filesystems import LocalFileSystem

    LocalFileSystem(basepath=str(tmp_path / "block-results")).save("korokoro-test-results", overwrite=True)
    runner = _runner(tmp_path, COUNTER, {"timeout_s": 60}, orchestration={"results_block": "local-file-system/korokoro-test-results"})
    runner.run("train", [], {"steps": 1}, steps=1)
    assert any(p.is_file() for p in (tmp_path / "block-results").rglob("*"))


def test_gpu_limit_that_does_not_exist_fails_clearly_and_one_that_does_is_used(prefect_api, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    runner = _runner(tmp_path, COUNTER, {"timeout_s": 60, "gpu": True}, gpu_limit="korokoro-test-gpu")
    with pytest.raises(StageFailed, match="GPU concurrency limit 'korokoro-test-gpu' \\(orchestration.gpu_limit\\)"):
        runner.run("train", [], {"steps": 1}, steps=1)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="korokoro-test-gpu", limit=1))
        runner.run("train", [], {"steps": 1}, steps=1)
        assert runner.runs[-1].state == "Completed"
        assert client.read_global_concurrency_limit_by_name("korokoro-test-gpu").active_slots == 0  # released


# -- the flow's failure hook ------------------------------------------------------------------------


class Interrupted(BaseException):
    """Stands in for what no ``except Exception`` catches: a cancellation, a termination signal."""


def _store_with(tmp_path: Path, *unique_ids: str) -> tuple[dict, object]:
    from tasks.storage import open_store

    cfg = compose_config([f"data_dir={tmp_path / 'data'}", "worker=worker-1"])
    store = open_store(cfg["storage"])
    video = tmp_path / "mug.mp4"
    video.write_bytes(b"never decoded in these tests")
    for uid in unique_ids:
        store.enqueue("red mug", "others", video, uid)
    return cfg, store


def test_a_run_that_crashes_mid_stage_leaves_the_product_failed_with_the_stage(
    prefect_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.ingest
    from flows.reconstruct import reconstruct_product

    cfg, store = _store_with(tmp_path, "mug-1")

    def interrupted(*args, **kwargs):
        raise Interrupted("the worker was told to stop")

    monkeypatch.setattr(tasks.ingest, "fetch_video", interrupted)
    with pytest.raises(Interrupted):
        reconstruct_product("mug-1", config=cfg)
    product = store.get("mug-1")
    assert product.status == "FAILED", product
    assert product.error.startswith("ingest: the run crashed"), product.error
    assert "Rerun the product" in product.error


def test_the_same_flow_run_retried_claims_again_and_ends_done(
    prefect_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import reconstruct

    cfg, store = _store_with(tmp_path, "mug-4")
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    attempts: list[tuple[int, str]] = []

    def fails_once(product, store, cfg, echo=print):
        attempts.append((product.attempts, product.status))
        if len(attempts) == 1:
            store.mark_failed(product.unique_id, "mesh: injected")
            return reconstruct.ProductResult(product.unique_id, "FAILED", "mesh: injected", "report.md")
        store.put_object("models/mug-4/manifest.json", manifest, "application/json")
        store.mark_done(product.unique_id, "models/mug-4/manifest.json")
        return reconstruct.ProductResult(product.unique_id, "DONE", None, "report.md")

    monkeypatch.setattr(reconstruct, "run_stages", fails_once)
    result = reconstruct.reconstruct_product.with_options(retries=1)("mug-4", config=cfg)
    assert result.status == "DONE" and attempts == [(1, "PROCESSING"), (2, "PROCESSING")]
    assert store.get("mug-4").status == "DONE"


def test_the_hook_leaves_a_product_another_worker_holds_alone(prefect_api, tmp_path: Path) -> None:
    from flows.reconstruct import reconstruct_product

    cfg, store = _store_with(tmp_path, "mug-2")
    store.claim("mug-2", "worker-2", 3600)
    state = reconstruct_product("mug-2", config=cfg, return_state=True)
    assert state.is_failed()
    product = store.get("mug-2")
    assert product.status == "PROCESSING" and product.claimed_by == "worker-2" and product.error is None


def test_the_hook_marks_a_cancelled_run_from_its_parameters(tmp_path: Path) -> None:
    # As the worker runs it after killing a cancelled run's process: nothing in memory.
    from prefect.states import Cancelled

    from flows.reconstruct import mark_failed_for_good

    cfg, store = _store_with(tmp_path, "mug-3")
    store.claim("mug-3", "worker-1", 3600)
    flow_run = SimpleNamespace(parameters={"unique_id": "mug-3", "config": cfg})
    mark_failed_for_good(None, flow_run, Cancelled(message="cancelled from the UI"))
    product = store.get("mug-3")
    assert product.status == "FAILED" and product.error.startswith("run: the run was cancelled"), product.error


# -- GPU out of memory in training ---------------------------------------------------------------------


def _train_with_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int, *overrides: str):
    from tasks.nerf.base import TrainReport
    from tasks.nerf.ngp import NgpBackend
    from tasks.train import train_field
    from tasks.types import MaskSet

    seen: list[dict] = []

    def train(self, transforms, hull, out_dir, settings, progress=None):
        seen.append(dict(settings))
        if len(seen) <= failures:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return TrainReport(steps=settings["steps"], seconds=1.0, peak_memory_mb=10.0, device="cuda:0", extra={})

    monkeypatch.setattr(NgpBackend, "train", train)
    cfg = compose_config(["profile=gpu", *overrides])
    masks = MaskSet(tmp_path, tmp_path / "transforms.json", tmp_path / "hull.json", tmp_path / "sheet.jpg", tmp_path / "s.json", "fp")
    return seen, lambda: train_field(masks, tmp_path / "train", cfg["nerf"], "fp", oom_retry=cfg["stages"]["train"]["oom_retry"])


def test_gpu_out_of_memory_is_retried_once_with_halved_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen, train = _train_with_oom(tmp_path, monkeypatch, failures=1)
    record = train()
    first, second = seen
    assert second["rays_per_batch"] == first["rays_per_batch"] // 2
    assert second["render_chunk"] == first["render_chunk"] // 2
    assert {k: v for k, v in second.items() if k not in ("rays_per_batch", "render_chunk")} == {
        k: v for k, v in first.items() if k not in ("rays_per_batch", "render_chunk")
    }
    metrics = json.loads(Path(record.metrics).read_text())
    assert metrics["oom_retry"] == {"rays_per_batch": second["rays_per_batch"], "render_chunk": second["render_chunk"]}


def test_gpu_out_of_memory_twice_fails_with_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen, train = _train_with_oom(tmp_path, monkeypatch, failures=2)
    with pytest.raises(RuntimeError) as failed:
        train()
    message = str(failed.value)
    assert len(seen) == 2
    assert message.startswith(f"the GPU ran out of memory even with rays_per_batch={seen[1]['rays_per_batch']}")
    assert "try profile=cpu or a smaller nerf.rays_per_batch" in message
    seen, train = _train_with_oom(tmp_path, monkeypatch, 1, "stages.train.oom_retry.keys=[]")
    with pytest.raises(RuntimeError, match="stages.train.oom_retry names no batch setting"):
        train()
    assert len(seen) == 1


# -- artifacts and the multirun table ------------------------------------------------------------------


def test_artifact_keys_are_what_prefect_accepts() -> None:
    from flows.artifacts import artifact_key

    assert artifact_key("basket-1", "metrics") == "korokoro-basket-1-metrics"
    odd = artifact_key("Red_Mug.2", "preview")
    assert re.fullmatch(r"[a-z0-9-]+", odd) and odd != artifact_key("red-mug-2", "preview")


def test_training_progress_artifact_is_throttled_and_ends_at_100(prefect_api) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from prefect import flow

    from flows.artifacts import TrainingProgress

    progress = TrainingProgress("mug-9", every_s=3600)

    @flow
    def training() -> None:
        for step in range(1, 11):
            progress(step, 10, {"loss": 0.1, "psnr": 20.0})

    training()
    assert progress.writes == 2  # the first call, then the last step; nothing in between
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[progress.key])))
    assert [a.type for a in found] == ["progress"] and float(found[0].data) == 100.0
    assert "step 10/10" in found[0].description


def test_sweep_table_compares_the_swept_settings(tmp_path: Path) -> None:
    from flows.multirun import SweepTable

    table = SweepTable()
    for job, (steps, glb, psnr) in enumerate([(2000, 2**20, 24.5), (4000, 3 * 2**19, 26.25)]):
        work = tmp_path / f"job{job}"
        work.mkdir()
        summary = {"run_seconds": 10.0 + job, "train_seconds": 5.0, "psnr_holdout_db": psnr, "triangles": 1000 * (job + 1), "glb_bytes": glb}
        (work / "report.json").write_text(json.dumps({"summary": summary}))
        result = SimpleNamespace(unique_id="mug", status="DONE", error=None, report=str(work / "report.md"))
        table.add(job, ["video=mug.mp4", f"nerf.steps={steps}"], result)
    markdown, table_csv = table.write(tmp_path / "sweep")
    rows = table_csv.read_text().splitlines()
    assert rows[0] == "job,nerf.steps,status,run s,train s,PSNR dB,triangles,GLB MiB,error"
    assert rows[1:] == ["0,2000,DONE,10.00,5.00,24.50,1000,1.00,", "1,4000,DONE,11.00,5.00,26.25,2000,1.50,"]
    assert "| 1 | 4000 | DONE |" in markdown.read_text()
