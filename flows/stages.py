"""The nine stages as Prefect tasks, and the runner that keys, times and reports them.

Each task wraps a plain function from ``tasks/`` (testable without Prefect). The cache key
of every task is its output folder, ``<unique_id>/<stage>-<fingerprint>``, where the
fingerprint chains the video's sha256 through the settings, code and library versions of
each stage up to this one (``tasks.fingerprint``). Retries, delays and timeouts come from
``conf/config.yaml`` (``stages:``) and are applied with ``with_options`` per run.

How a stage executes is conf too (:class:`StageExecution`): ``isolate: true`` runs it in a
child process whose timeout really stops it (``flows.isolate``; Prefect's own timeout cannot
interrupt a sync call), and ``gpu: true`` holds a slot of the global concurrency limit named by
``orchestration.gpu_limit`` while it runs, so one GPU trains one product at a time. Both apply
only when the stage really executes: a cached stage neither waits for the GPU nor spawns.
Results persist to ``orchestration.results_dir`` / ``results_block`` (see
:func:`flows.config.result_storage`), so a worker sharing that storage and ``data_dir`` reuses
every finished stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from prefect import Task, task
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext

from flows.isolate import StageTimedOut, run_isolated, timeout_reason
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


@dataclass(frozen=True)
class StageExecution:
    """How one run of a stage executes (from ``stages.<name>`` and ``orchestration``)."""

    stage: str
    timeout_s: float | None = None
    isolate: bool = False
    gpu_limit: str | None = None  # global concurrency limit to hold while running; None = none


def _stage_task(fn: Callable[..., Any], name: str) -> Task:
    """The Prefect task of a stage function: same parameters plus ``execution``.

    The function is looked up by name on every run (a replaced ``tasks.mesh.extract_mesh`` is
    the one that runs) and executed as ``execution`` says.
    """
    signature = inspect.signature(fn)

    def run_stage(*args: Any, execution: StageExecution | None = None, **kwargs: Any) -> Any:
        current = getattr(importlib.import_module(fn.__module__), fn.__name__)
        arguments = signature.bind(*args, **kwargs).arguments
        return execute_stage(current, arguments, execution or StageExecution(name))

    run_stage.__name__, run_stage.__qualname__ = fn.__name__, fn.__qualname__
    run_stage.__module__, run_stage.__doc__ = fn.__module__, fn.__doc__
    extra = inspect.Parameter("execution", inspect.Parameter.KEYWORD_ONLY, default=None)
    run_stage.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])  # type: ignore[attr-defined]
    return task(run_stage, name=name, cache_key_fn=output_folder_key, persist_result=True)


def execute_stage(fn: Callable[..., Any], kwargs: dict[str, Any], execution: StageExecution) -> Any:
    """``fn(**kwargs)``: holding a GPU slot when ``execution.gpu_limit`` is set, in a child
    process with a hard timeout when ``execution.isolate``."""
    with gpu_slot(execution.gpu_limit, execution.stage):
        if execution.isolate:
            return run_isolated(fn, kwargs, execution.stage, execution.timeout_s)
        return fn(**kwargs)


@contextlib.contextmanager
def gpu_slot(limit: str | None, stage: str) -> Iterator[None]:
    """Hold one slot of the Prefect global concurrency limit ``limit`` (no-op when None)."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    with contextlib.ExitStack() as held:
        if limit:
            try:
                held.enter_context(concurrency(limit, occupy=1, strict=True))
            except ConcurrencySlotAcquisitionError as exc:
                raise RuntimeError(
                    f"cannot take a slot of the GPU concurrency limit {limit!r} (orchestration.gpu_limit) "
                    f"for {stage}: {exc}. Create the limit (infra/, or `prefect gcl create {limit} --limit 1`) "
                    "or set orchestration.gpu_limit=null"
                ) from exc
        yield


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
            ("trimesh", "scikit-image", "fast-simplification", "xatlas", "usd-core"),
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
    """Runs stages in order for one product: keys, output folders, options, progress lines.

    ``stage_options``: conf ``stages:`` (retries, retry_delay_s, timeout_s, isolate, gpu);
    ``result_storage``: where Prefect persists results (None: Prefect's default);
    ``gpu_limit``: the global concurrency limit the ``gpu: true`` stages hold (None: none).
    ``current`` names the stage being run, for failure reasons outside any stage.
    """

    unique_id: str
    work_dir: Path
    stage_options: Mapping[str, Mapping[str, Any]]
    refresh_cache: bool = False
    echo: Callable[[str], None] = print
    runs: list[StageRun] = field(default_factory=list)
    result_storage: Any = None
    gpu_limit: str | None = None
    stages: Mapping[str, StageSpec] = field(default_factory=lambda: STAGES)
    current: str | None = None

    def run(
        self,
        name: str,
        upstream: Sequence[str],
        keyed_on: Mapping[str, Any],
        reuse_if: Callable[[Any], bool] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run (or reuse) stage ``name``.

        ``upstream``: fingerprints of the records it reads; ``keyed_on``: the settings that
        shape its output; ``reuse_if(record)``: whether a cached record still holds (for
        effects outside the work folder); ``kwargs``: its function's arguments but ``out_dir``
        and ``fingerprint``. Raises :class:`StageFailed` with the stage's own error message.
        """
        spec = self.stages[name]
        self.current = name
        fingerprint = stage_fingerprint(name, upstream, keyed_on, spec.modules, spec.libraries)
        out_dir = self.work_dir / f"{name}-{fingerprint[:24]}"
        if "fingerprint" in inspect.signature(spec.task.fn).parameters:
            kwargs["fingerprint"] = fingerprint
        index, count = list(self.stages).index(name) + 1, len(self.stages)
        self.echo(f"[{index}/{count}] {name} ...")
        started = time.perf_counter()
        state, record = self._submit(spec, out_dir, kwargs, refresh=self.refresh_cache)
        if state.is_completed() and state.name == "Cached" and not (
            _outputs_present(record) and (reuse_if is None or reuse_if(record))
        ):
            # The cache remembers a folder someone deleted, or a store that changed since:
            # rebuild it rather than hand on a ghost.
            state, record = self._submit(spec, out_dir, kwargs, refresh=True)
        seconds = time.perf_counter() - started
        run = StageRun(name, state.name or state.type.value, seconds, out_dir, fingerprint, record)
        self.runs.append(run)
        if not state.is_completed():
            self.echo(f"[{index}/{count}] {name} failed after {seconds:.1f} s")
            raise StageFailed(name, _failure_message(state, self.execution(name)))
        self.echo(f"[{index}/{count}] {name} {'reused (cached)' if run.state == 'Cached' else 'done'} in {seconds:.1f} s")
        return record

    def execution(self, name: str) -> StageExecution:
        """How stage ``name`` executes, from its ``stages:`` entry."""
        options = self.stage_options.get(name, {})
        timeout = float(options["timeout_s"]) if options.get("timeout_s") else None
        gpu = self.gpu_limit if options.get("gpu") else None
        return StageExecution(name, timeout, bool(options.get("isolate", False)), gpu)

    def _submit(self, spec: StageSpec, out_dir: Path, kwargs: dict[str, Any], refresh: bool) -> tuple[Any, Any]:
        options = dict(self.stage_options.get(spec.name, {}))
        execution = self.execution(spec.name)
        configured = spec.task.with_options(
            retries=int(options.get("retries", 0)),
            retry_delay_seconds=float(options.get("retry_delay_s", 0)),
            # An isolated stage enforces its own timeout, by killing its process.
            timeout_seconds=None if execution.isolate else execution.timeout_s,
            refresh_cache=refresh,
            **({"result_storage": self.result_storage} if self.result_storage is not None else {}),
        )
        state = configured(out_dir=out_dir, execution=execution, return_state=True, **kwargs)
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


def _failure_message(state: Any, execution: StageExecution) -> str:
    try:
        state.result()
    except StageTimedOut as exc:  # an isolated stage's own deadline
        return str(exc)
    except BaseException as exc:  # the stage's own exception, re-raised by Prefect
        if state.name == "TimedOut" and execution.timeout_s:
            # Prefect's timeout (a stage in the flow's thread) stops it at its next Python step.
            return timeout_reason(execution.stage, execution.timeout_s, "the task was interrupted")
        return str(exc) or type(exc).__name__
    return state.message or "failed"
