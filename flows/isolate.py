"""Run one stage function in a child process whose timeout really stops it.

A sync Prefect task runs in the flow's thread, and Prefect's timeout can only raise between
Python bytecodes (an alarm in the main thread, an injected exception in others): a training
step on the GPU or pycolmap's mapper runs on long past the limit. Heavy stages therefore run
in a *spawned* child (a fresh interpreter: CUDA-safe, and a crash or the OOM-killer takes
only the child), while the parent waits on a pipe:

* the stage's ``progress`` callback is replaced in the child by one that sends
  ``(step, total, stats)`` back; the parent calls the real callback (terminal bar, artifacts);
* the stage's return value (a frozen dataclass record) or its exception comes back the same way;
* at the deadline, or when the parent is interrupted (flow timeout, cancellation), the child
  is killed and reaped; a child that dies on its own fails with its exit signal.

The stage function and its arguments must pickle (module-level function, records, settings).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any, Callable

log = logging.getLogger("korokoro")

_PROGRESS = "progress"  # the keyword argument the stages use for their progress callback
_WAIT_S = 0.25  # how often the parent looks at the deadline while nothing arrives


class StageTimedOut(TimeoutError):
    """The stage ran past its ``stages.<name>.timeout_s`` and was stopped."""


class ChildDied(RuntimeError):
    """The child process ended without handing back a result (killed, crashed, os._exit)."""


def timeout_reason(stage: str, seconds: float, stopped: str) -> str:
    """The seller-facing text of a timeout (the caller prefixes ``<stage>: ``)."""
    return (
        f"timed out after {seconds:g} s (stages.{stage}.timeout_s); {stopped}. "
        f"Raise stages.{stage}.timeout_s, or use a smaller profile or shorter video"
    )


def describe_exit(exitcode: int | None) -> str:
    """Why a child ended, in words: ``killed by SIGKILL (...)``, ``exited with status 3``."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {
            "SIGKILL": "the machine may have run out of memory (the kernel's OOM-killer), or it was killed",
            "SIGSEGV": "a crash in native code",
            "SIGABRT": "a crash in native code",
            "SIGBUS": "a crash in native code, or a full disk under a mapped file",
            "SIGTERM": "it was asked to stop",
        }.get(name)
        return f"killed by {name}" + (f" ({hint})" if hint else "")
    return f"exited with status {exitcode}"


def run_isolated(fn: Callable[..., Any], kwargs: dict[str, Any], stage: str, timeout_s: float | None) -> Any:
    """``fn(**kwargs)`` in a spawned child; returns its result or raises its exception.

    Raises :class:`StageTimedOut` after ``timeout_s`` seconds (None or 0: no limit) and
    :class:`ChildDied` if the child ends without an answer. The child never outlives this call.
    """
    kwargs = dict(kwargs)
    progress = kwargs.get(_PROGRESS)
    if callable(progress):
        kwargs[_PROGRESS] = _SEND_PROGRESS
    else:
        progress = None
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_child_main, args=(fn, kwargs, send, os.getpid()), name=f"korokoro-{stage}", daemon=False
    )
    try:
        child.start()  # spawn pickles fn and kwargs here
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        receive.close()
        send.close()
        raise TypeError(f"cannot run in a child process: its arguments do not pickle ({exc})") from exc
    send.close()  # the child holds the only writer: its death reads as end-of-file
    log.info("%s runs in child process %d", stage, child.pid)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while True:
            wait = _WAIT_S if deadline is None else max(0.0, min(_WAIT_S, deadline - time.monotonic()))
            if receive.poll(wait):
                try:
                    kind, payload = receive.recv()
                except EOFError:
                    break  # the child is gone without an answer
                if kind == "progress":
                    progress(*payload)  # type: ignore[misc]
                elif kind == "result":
                    return payload
                else:
                    raise payload
            elif deadline is not None and time.monotonic() >= deadline:
                raise StageTimedOut(timeout_reason(stage, float(timeout_s), "the child process was stopped"))
        child.join(5.0)
        raise ChildDied(f"the {stage} process {describe_exit(child.exitcode)}")
    finally:
        _stop(child)
        receive.close()


def _stop(child: Any) -> None:
    """Kill the child if it still runs and reap it, so no process is left behind."""
    if child.pid is None:
        return
    if child.is_alive():
        child.kill()
    child.join()
    child.close()


class _SendProgress:
    """Marker the parent puts in place of the progress callback; the child swaps in a sender."""


_SEND_PROGRESS = _SendProgress()


def _child_main(fn: Callable[..., Any], kwargs: dict[str, Any], send: Any, parent_pid: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if isinstance(kwargs.get(_PROGRESS), _SendProgress):
        kwargs[_PROGRESS] = lambda step, total, stats: send.send(("progress", (step, total, dict(stats))))
    try:
        message: tuple[str, Any] = ("result", fn(**kwargs))
    except BaseException as exc:  # the stage's own error travels back to the parent
        message = ("error", _portable(exc))
    try:
        send.send(message)
    except Exception as exc:  # a result that does not pickle
        send.send(("error", TypeError(f"the stage's result cannot be sent back from its process: {exc}")))
    send.close()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the parent re-raises the same type), else a RuntimeError
    with its type and text; the child's traceback rides along as a note."""
    note = "in the stage's child process:\n" + "".join(traceback.format_exception(exc))
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:
        copy = RuntimeError(f"{type(exc).__name__}: {exc}")
    copy.__traceback__ = None
    copy.add_note(note)
    return copy


def _exit_with_parent(parent_pid: int) -> None:
    """A child whose parent died (kill -9 of the worker) stops too instead of training on."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(70)
