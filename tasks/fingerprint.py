"""Content keys for stage results.

Prefect's default cache policy includes the run id (so nothing is reused across runs) and a
``Path`` argument hashes only its text (so a changed file at the same path returns a stale
result). KoroKoro keys every stage on content instead: the sha256 of the input video, chained
through each stage's resolved settings, the source of the code that runs it, and the versions
of the libraries it leans on. Change the mesh settings and only mesh, shard and upload get a
new key; change nothing and every key repeats.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

CHUNK_BYTES = 8 << 20  # read big videos in pieces: never the whole file in memory


def hash_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal settings give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _module_files(name: str) -> list[Path]:
    """The source files of a module (a package counts all its .py files)."""
    origin = Path(importlib.import_module(name).__file__ or "")
    return sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]


def _project_imports(file: Path, prefix: str) -> set[str]:
    """Modules under ``prefix`` that ``file`` imports (``import tasks.x``, ``from tasks.x import y``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(prefix) and _is_module(n))
    return found


def _is_module(name: str) -> bool:
    """``from tasks.x import y``: y may be a module or just a name inside tasks.x."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@lru_cache(maxsize=None)
def source_digest(modules: tuple[str, ...], prefix: str = "tasks.") -> str:
    """sha256 over the source of the given modules and of every ``prefix`` module they import,
    transitively: a change in a helper module invalidates the stages that use it."""
    seen: set[str] = set()
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for file in _module_files(name):
            pending.extend(_project_imports(file, prefix) - seen)
    digest = hashlib.sha256()
    files = sorted({f for name in seen for f in _module_files(name)})
    for file in files:
        digest.update(str(file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=None)
def library_versions(distributions: tuple[str, ...]) -> str:
    """``name==version`` of each installed distribution, ``name==absent`` if missing."""
    parts = []
    for dist in distributions:
        try:
            parts.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}==absent")
    return ",".join(parts)


def stage_fingerprint(
    stage: str,
    upstream: Sequence[str],
    settings: Mapping[str, Any],
    modules: Sequence[str] = (),
    libraries: Sequence[str] = (),
) -> str:
    """The cache key of one stage: upstream keys + settings + code + library versions."""
    digest = hashlib.sha256()
    digest.update(stage.encode())
    for key in upstream:
        digest.update(key.encode())
    digest.update(canonical_json(dict(settings)).encode())
    digest.update(source_digest(tuple(modules)).encode())
    digest.update(library_versions(tuple(libraries)).encode())
    return digest.hexdigest()
