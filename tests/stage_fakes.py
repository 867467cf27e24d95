"""Stand-in stage functions for the orchestration tests.

Standard library only: a spawned child process imports this module (to unpickle the function)
in well under a second, so isolation tests measure the runner, not imports.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class FakeRecord:
    """What the fake stages hand back: a folder, like every real record."""

    dir: Path
    fingerprint: str
    pid: int


def _start(out_dir: Path) -> None:
    """Note the process and count the execution (``executions`` has one line per real run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "executions").open("a") as fh:
        fh.write(f"{os.getpid()}\n")


def executions(out_dir: Path) -> list[int]:
    """The pids of every real execution of a fake stage into ``out_dir``."""
    path = Path(out_dir) / "executions"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def sleeping_stage(out_dir: Path, fingerprint: str, seconds: float) -> FakeRecord:
    """Sleeps ``seconds`` (past any short timeout)."""
    _start(out_dir)
    time.sleep(seconds)
    return FakeRecord(Path(out_dir), fingerprint, os.getpid())


def counting_stage(
    out_dir: Path, fingerprint: str, steps: int = 3, progress: Callable[[int, int, dict[str, float]], None] | None = None
) -> FakeRecord:
    """Reports ``steps`` progress calls and returns at once."""
    _start(out_dir)
    for step in range(1, steps + 1):
        if progress is not None:
            progress(step, steps, {"loss": 1.0 / step})
    return FakeRecord(Path(out_dir), fingerprint, os.getpid())


def killed_stage(out_dir: Path, fingerprint: str) -> Any:
    """Dies the way the kernel's OOM-killer ends a process."""
    _start(out_dir)
    os.kill(os.getpid(), signal.SIGKILL)


def failing_stage(out_dir: Path, fingerprint: str, message: str) -> Any:
    """Raises ``ValueError(message)``, as a stage does on bad input."""
    _start(out_dir)
    raise ValueError(message)


def broken_mesh(*args: Any, **kwargs: Any) -> Any:
    """Replaces ``tasks.mesh.extract_mesh`` to make the mesh stage fail once."""
    raise RuntimeError("injected fault: marching cubes found no surface")
