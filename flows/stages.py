"""The nine stages as Prefect tasks, and the runner that keys, times and reports them.

Each task wraps a plain function from ``tasks/`` (testable without Prefect). The cache key
of every task is its output folder, ``<unique_id>/<stage>-<fingerprint>``, where the
fingerprint chains the video's sha256 through the settings, code and library versions of
each stage up to this one (``tasks.fingerprint``). Retries, delays and timeouts come from
``conf/config.yaml`` (``stages:``) and are applied with ``with_options`` per run.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from prefect import Task, task
from prefect.context import TaskRunContext

from tasks import colmap, detect, frames, ingest, mesh, segment, shard, train, upload
from tasks.fingerprint import stage_fingerprint
from tasks.types import StageOutputMissing


def output_folder_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key = the stage's output folder, ``<data_dir>/work/<unique_id>/<stage>-<fingerprint>``.

    The fingerprint makes it a content key; the data_dir part keeps two stores that share
    Prefect's result storage (tests, experiments) from handing each other their folders.
    """
    out_dir = Path(parameters["out_dir"]).resolve()
    where = hashlib.sha256(str(out_dir.parent.parent.parent).encode()).hexdigest()[:12]
    return f"{where}/" + "/".join(out_dir.parts[-2:])


def _stage_task(fn: Callable[..., Any], name: str) -> Task:
    return task(fn, name=name, cache_key_fn=output_folder_key, persist_result=True)


@dataclass(frozen=True)
class StageSpec:
    """A stage: its task, and the code and libraries whose change must invalidate it."""

    name: str
    task: Task
    modules: tuple[str, ...]
    libraries: tuple[str, ...] = ()


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("ingest", _stage_task(ingest.fetch_video, "ingest"), ("tasks.ingest", "tasks.storage")),
        StageSpec("frames", _stage_task(frames.extract_frames, "frames"), ("tasks.frames",), ("av", "opencv-python-headless")),
        StageSpec("colmap", _stage_task(colmap.solve_cameras, "colmap"), ("tasks.colmap",), ("pycolmap",)),
        StageSpec("detect", _stage_task(detect.detect_product, "detect"), ("tasks.detect",),
                  ("opencv-python-headless", "torch", "ultralytics", "ultralytics-opencv-headless", "transformers")),
        StageSpec("segment", _stage_task(segment.segment_product, "segment"), ("tasks.segment",),
                  ("opencv-python-headless", "torch", "segment-anything")),
        StageSpec("train", _stage_task(train.train_field, "train"), ("tasks.train", "tasks.nerf"), ("torch",)),
        StageSpec(
            "mesh",
            _stage_task(mesh.extract_mesh, "mesh"),
            ("tasks.mesh",),
            ("trimesh", "scikit-image", "fast-simplification", "xatlas"),
        ),
        StageSpec("shard", _stage_task(shard.shard_assets, "shard"), ("tasks.shard",)),
        StageSpec("upload", _stage_task(upload.publish_model, "upload"), ("tasks.upload", "tasks.storage")),
    )
}


class StageFailed(RuntimeError):
    """A stage failed for good; ``reason`` is what the product row records."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = f"{stage}: {reason}"


@dataclass
class StageRun:
    """One line of the run report."""

    stage: str
    state: str
    seconds: float
    out_dir: Path
    fingerprint: str
    record: Any = None


@dataclass
class StageRunner:
    """Runs stages in order for one product: keys, output folders, options, progress lines."""

    unique_id: str
    work_dir: Path
    stage_options: Mapping[str, Mapping[str, Any]]
    refresh_cache: bool = False
    echo: Callable[[str], None] = print
    runs: list[StageRun] = field(default_factory=list)

    def run(
        self,
        name: str,
        upstream: Sequence[str],
        keyed_on: Mapping[str, Any],
        **kwargs: Any,
    ) -> Any:
        """Run (or reuse) stage ``name``.

        ``upstream``: fingerprints of the records it reads; ``keyed_on``: the settings that
        shape its output; ``kwargs``: its function's arguments but ``out_dir`` and
        ``fingerprint``. Raises :class:`StageFailed` with the stage's own error message.
        """
        spec = STAGES[name]
        fingerprint = stage_fingerprint(name, upstream, keyed_on, spec.modules, spec.libraries)
        out_dir = self.work_dir / f"{name}-{fingerprint[:24]}"
        if "fingerprint" in spec.task.fn.__code__.co_varnames:
            kwargs["fingerprint"] = fingerprint
        index = list(STAGES).index(name) + 1
        self.echo(f"[{index}/{len(STAGES)}] {name} ...")
        started = time.perf_counter()
        state, record = self._submit(spec, out_dir, kwargs, refresh=self.refresh_cache)
        if state.is_completed() and state.name == "Cached" and not _outputs_present(record):
            # The cache remembers a folder someone deleted: rebuild it rather than hand on a ghost.
            state, record = self._submit(spec, out_dir, kwargs, refresh=True)
        seconds = time.perf_counter() - started
        run = StageRun(name, state.name or state.type.value, seconds, out_dir, fingerprint, record)
        self.runs.append(run)
        if not state.is_completed():
            self.echo(f"[{index}/{len(STAGES)}] {name} failed after {seconds:.1f} s")
            raise StageFailed(name, _failure_message(state))
        self.echo(f"[{index}/{len(STAGES)}] {name} {'reused (cached)' if run.state == 'Cached' else 'done'} in {seconds:.1f} s")
        return record

    def _submit(self, spec: StageSpec, out_dir: Path, kwargs: dict[str, Any], refresh: bool) -> tuple[Any, Any]:
        options = dict(self.stage_options.get(spec.name, {}))
        configured = spec.task.with_options(
            retries=int(options.get("retries", 0)),
            retry_delay_seconds=float(options.get("retry_delay_s", 0)),
            timeout_seconds=float(options["timeout_s"]) if options.get("timeout_s") else None,
            refresh_cache=refresh,
        )
        state = configured(out_dir=out_dir, return_state=True, **kwargs)
        record = state.result(raise_on_failure=False) if state.is_completed() else None
        return state, record


def _outputs_present(record: Any) -> bool:
    check = getattr(record, "check", None)
    if check is None:
        return True
    try:
        check()
    except StageOutputMissing:
        return False
    return True


def _failure_message(state: Any) -> str:
    try:
        state.result()
    except BaseException as exc:  # the stage's own exception, re-raised by Prefect
        return str(exc) or type(exc).__name__
    return state.message or "failed"
