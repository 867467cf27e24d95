"""Processes for tests that run KoroKoro as separate programs on loopback: a Prefect server,
workers, ``korokoro`` commands. Every process starts in its own session and :func:`stop` ends
it with everything it started (the process worker puts each flow run in a session of its own,
so a process group alone would miss them).

Also the tiny-but-real override set those tests run products with.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE_VIDEO = REPO / "sample" / "basket" / "video.mp4"

# A real run of every stage in well under a minute on one core: SIFT still needs ~480 px frames
# (the cpu profile keeps them), so frames are fewer rather than smaller; a short NeRF, a coarse
# grid and a small texture.
TINY = [
    "profile=cpu",
    "frames.count=24",
    # One thread makes COLMAP's mapping repeatable: threaded, one of six runs of the same 24 frames
    # once placed only 2 of them through every retry (session 8, on two busy cores).
    "colmap.num_threads=1",
    "nerf.steps=200",
    "nerf.occ_warmup_steps=64",
    "nerf.save_previews=false",
    "nerf.eval_max_frames=1",
    "mesh.grid_resolution=64",
    "mesh.texture_size=256",
    "mesh.min_texture_size=256",
    "mesh.max_triangles=4000",
    "mesh.min_triangles=2000",
    "mesh.color_views=1",
    "mesh.color_ray_samples=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any Prefect or KoroKoro settings of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KOROKORO_"))}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYOPENGL_PLATFORM="osmesa",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    """A started program, its log, and the processes it started (collected while it lives)."""

    name: str
    popen: subprocess.Popen
    log: Path
    seen: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def remember_descendants(self) -> set[int]:
        self.seen |= set(descendants(self.popen.pid))
        return self.seen


def start(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path = REPO) -> Proc:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_hard(proc: Proc) -> None:
    """kill -9 the program and everything it started: a machine that dies mid-work."""
    pids = proc.remember_descendants() | {proc.popen.pid}
    _signal_all(pids, signal.SIGKILL)
    proc.popen.wait(timeout=30)


def stop(proc: Proc, grace_s: float = 20.0) -> None:
    """SIGINT (Prefect workers and servers shut down on it, not on SIGTERM), then SIGKILL for
    whatever is left of the program and every process it started."""
    if proc.alive():
        proc.remember_descendants()
        try:
            os.killpg(proc.popen.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            proc.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    pids = {p for p in proc.seen if Path(f"/proc/{p}").exists()} | ({proc.popen.pid} if proc.alive() else set())
    _signal_all(pids, signal.SIGKILL)
    if proc.alive():
        proc.popen.wait(timeout=30)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 1.0,
             procs: tuple[Proc, ...] = ()) -> None:
    """Poll ``check`` until it holds; fail with ``what`` (and the logs of ``procs``) on timeout
    or when one of ``procs`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            p.remember_descendants()
        if check():
            return
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise AssertionError(f"{dead[0].name} exited ({dead[0].popen.returncode}) while waiting for {what}:\n{dead[0].tail()}")
        time.sleep(every_s)
    logs = "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as answer:
            return answer.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(home: Path, logs: Path, database_url: str | None = None) -> Iterator[str]:
    """``prefect server start`` on a free loopback port; yields its API URL. ``database_url``:
    a SQLAlchemy URL (PostgreSQL via asyncpg), else SQLite under ``home``."""
    port = free_port()
    env = base_env(PREFECT_HOME=str(home))
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    server = start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env, logs,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for("the Prefect server", lambda: healthy(api), 180, procs=(server,))
        yield api
    finally:
        stop(server)


def run(cmd: list[str], env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run a command to its end; fail with its output when it fails."""
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
                          start_new_session=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done
