"""End to end: a tiny rendered turntable through all nine stages, caching, reruns after a
failed stage, artifacts, a multirun sweep, and a broken upload.

Runs the real pipeline (pycolmap, OpenCV isolation, the PyTorch NeRF on the CPU, marching
cubes, trimesh export, sharding, the local store) under a temporary Prefect server; colmap,
train and mesh run in child processes as conf/config.yaml says. One full run (the module
fixture) is shared by every test; the others change only late stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

pytest.importorskip("pyrender", reason="the turntable renderer needs pyrender-maintained (pip install 'korokoro[render]')")

from flows.config import compose_config
from flows.process_queue import process_queue
from flows.reconstruct import reconstruct_product
from tasks.storage import open_store
from tests import bad_inputs
from tests.truth import align_similarity, load_truth_cameras

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def turntable(tmp_path_factory):
    from tools.turntable import render_turntable

    # SIFT needs ~480 px on a plain background (24 frames at 160 px register almost nothing).
    return render_turntable(
        "basket", tmp_path_factory.mktemp("turntable"), frames=48, width=480, height=360, elevation_deg=30.0
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _config(data_dir: Path, *extra: str) -> dict:
    return compose_config(["profile=cpu", f"data_dir={data_dir}", "worker=test-worker", *extra])


def _states(result) -> dict[str, str]:
    report = json.loads((Path(result.report).parent / "report.json").read_text())
    return {s["stage"]: s["state"] for s in report["stages"]}


@pytest.fixture(scope="module")
def first_run(turntable, data_dir):
    cfg = _config(data_dir)
    open_store(cfg["storage"]).enqueue("wicker basket", "others", turntable.video, "basket-1")
    return reconstruct_product("basket-1", config=cfg)


def _glb_in_truth_frame(glb: Path, work: Path, truth_dir: Path) -> np.ndarray:
    """The GLB's vertices moved into the turntable's metric world, via the solved cameras."""
    mesh = trimesh.load(glb, force="mesh")
    y_up = np.asarray(mesh.vertices)
    z_up = np.stack([y_up[:, 0], -y_up[:, 2], y_up[:, 1]], axis=1)  # glTF +Y up → our +Z up
    colmap_dir = next(work.glob("colmap-*"))
    frames_index = json.loads(next(work.glob("frames-*")).joinpath("frames.json").read_text())
    source_of = {Path(f["file"]).name: f["source_index"] for f in frames_index["frames"]}
    transforms = json.loads((colmap_dir / "transforms.json").read_text())
    est = np.array([f["transform_matrix"] for f in transforms["frames"]])[:, :3, 3]
    truth = load_truth_cameras(truth_dir)
    true = truth.centers[[source_of[Path(f["file_path"]).name] for f in transforms["frames"]]]
    s, R, t = align_similarity(est, true)
    return (s * (R @ z_up.T)).T + t


def test_end_to_end_turns_a_video_into_a_model(first_run, turntable, data_dir) -> None:
    assert first_run.status == "DONE", first_run.error
    product = open_store(_config(data_dir)["storage"]).get("basket-1")
    assert product.status == "DONE" and product.model_manifest == "models/basket-1/manifest.json"
    glb = Path(first_run.glb)
    assert glb.stat().st_size < 3 * 2**20
    vertices = _glb_in_truth_frame(glb, Path(first_run.report).parent, turntable.mesh.parent)
    true_mesh = trimesh.load(turntable.mesh, force="mesh")
    est_extent = vertices.max(0) - vertices.min(0)
    true_extent = true_mesh.extents
    assert np.all(np.abs(est_extent - true_extent) <= 0.15 * true_extent), (est_extent, true_extent)
    report = Path(first_run.report).read_text()
    assert "| colmap |" in report and "| mesh |" in report


def test_run_leaves_artifacts_in_the_prefect_ui(first_run) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.artifacts import artifact_key

    assert first_run.status == "DONE", first_run.error
    kinds = ("training", "metrics", "masks", "preview", "model")
    keys = {artifact_key("basket-1", kind): kind for kind in kinds}
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))
    by_kind = {keys[a.key]: a for a in found}
    assert set(by_kind) == set(kinds), sorted(by_kind)
    assert float(by_kind["training"].data) == 100.0
    metrics = json.loads(by_kind["metrics"].data) if isinstance(by_kind["metrics"].data, str) else by_kind["metrics"].data
    rows = {row["metric"]: row["value"] for row in metrics}
    assert rows["psnr_holdout_db"] > 15 and rows["triangles"] > 1000 and rows["train"].startswith("Completed")
    assert "data:image/jpeg;base64," in by_kind["masks"].data
    assert by_kind["preview"].data == "http://127.0.0.1:8765/store/models/basket-1/preview.png"
    assert "http://127.0.0.1:8765/product.html?id=basket-1" in by_kind["model"].data


def test_same_product_twice_runs_nothing(first_run, data_dir) -> None:
    again = reconstruct_product("basket-1", config=_config(data_dir))
    assert again.status == "DONE"
    assert set(_states(again).values()) == {"Cached"}, _states(again)


def test_failed_mesh_then_rerun_resumes_at_mesh(first_run, data_dir, monkeypatch) -> None:
    import tasks.mesh
    from tests import stage_fakes

    cfg = _config(data_dir, "mesh.max_triangles=20000")
    with monkeypatch.context() as faulty:
        faulty.setattr(tasks.mesh, "extract_mesh", stage_fakes.broken_mesh)  # runs in the mesh child process
        failed = reconstruct_product("basket-1", config=cfg, return_state=True)
    assert failed.is_failed()
    product = open_store(cfg["storage"]).get("basket-1")
    assert product.status == "FAILED"
    assert product.error == "mesh: injected fault: marching cubes found no surface", product.error
    # The rerun (as the UI's retry would start it): every stage before mesh is reused.
    changed = reconstruct_product("basket-1", config=cfg)
    assert changed.status == "DONE", changed.error
    assert open_store(cfg["storage"]).get("basket-1").status == "DONE"
    states = _states(changed)
    assert {k for k, v in states.items() if v != "Cached"} == {"mesh", "shard", "upload"}, states
    assert changed.glb != first_run.glb  # a new folder: the first model is untouched


def test_multirun_sweep_writes_a_comparison_table(first_run, turntable, data_dir, monkeypatch, capsys) -> None:
    import sys

    from flows import cli

    assert first_run.status == "DONE", first_run.error
    monkeypatch.setattr(sys, "argv", ["korokoro"])
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(data_dir / "prefect" / "results"))  # cli sets it
    args = [f"video={turntable.video}", "name=wicker basket", "unique_id=basket-1", f"data_dir={data_dir}"]
    with pytest.raises(SystemExit) as done:
        # 20000 is the failed-mesh test's setting, 30000 the first run's: both meshes are cached.
        cli.main(["--multirun", "run", *args, "worker=test-worker", "profile=cpu", "mesh.max_triangles=20000,30000"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    (table_csv,) = data_dir.glob("multirun/*/*/comparison.csv")
    assert str(table_csv.with_suffix(".md")) in out
    import csv

    rows = list(csv.DictReader(table_csv.open()))
    assert [(r["job"], r["mesh.max_triangles"], r["status"]) for r in rows] == [("0", "20000", "DONE"), ("1", "30000", "DONE")]
    smaller, first = rows
    assert 1000 < int(smaller["triangles"]) <= 20000
    assert float(smaller["PSNR dB"]) == float(first["PSNR dB"]) > 15  # one trained field, reused
    # Job 1 has the first run's settings: its mesh is the first run's, reused from the cache.
    assert int(first["triangles"]) == json.loads((Path(first_run.glb).parent / "metrics.json").read_text())["triangles"]
    assert float(first["GLB MiB"]) == pytest.approx(Path(first_run.glb).stat().st_size / 2**20, abs=0.01)


def test_broken_upload_fails_with_reason_and_worker_goes_on(data_dir, tmp_path) -> None:
    cfg = _config(data_dir)
    store = open_store(cfg["storage"])
    store.enqueue("not a video", "others", bad_inputs.text_as_mp4(tmp_path), "broken-1")
    store.enqueue("empty", "others", bad_inputs.empty_file(tmp_path), "broken-2")
    results = process_queue(config=cfg)
    assert [r.unique_id for r in results] == ["broken-1", "broken-2"]
    broken = store.get("broken-1")
    assert broken.status == "FAILED" and "notes.mp4" in broken.error and "not a readable video" in broken.error
    assert broken.error.startswith("frames:")
    assert store.get("broken-2").status == "FAILED"
    assert store.object_exists(broken.video_link)  # the input is kept


def test_viewer_shows_the_model_the_pipeline_made(first_run, data_dir, tmp_path) -> None:
    import threading

    from flows.viewer_server import make_server
    from tests.test_viewer import browser_skip_reason, non_background_fraction, run_browser

    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    assert first_run.status == "DONE", first_run.error
    storage = _config(data_dir)["storage"]
    server = make_server(Path(storage["root"]), storage["bucket"], "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scenario = {"name": "basket", "path": "/product.html?id=basket-1", "screenshot": "pipeline-basket.png"}
        report = run_browser(server, [scenario], tmp_path, "pipeline")
    finally:
        server.shutdown()
        server.server_close()
    page = report["results"][0]
    assert page["state"] == "loaded", page["message"]
    assert page["model_visible"] is True
    assert non_background_fraction(Path(page["screenshot"])) > 0.01
