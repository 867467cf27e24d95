"""The ``store`` fixture over every backend that can run here (local, postgres, supabase
stand-in), shared by the contract suite and the publish/fetch tests.

Stores come from ``open_store`` as flows get them (retries included), with quick retry
delays so that tests which inject faults stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tasks.storage import StorageSettings, open_store
from tests.pg_cluster import new_database
from tests.supabase_standin import FAKE_KEY, FakeSupabase

QUICK_RETRY = {"attempts": 4, "base_delay_s": 0.001, "max_delay_s": 0.01, "jitter": 0.5}


# ------------------------------------------------------------------------------------------
# The store fixture, over every backend
# ------------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "postgres", "supabase"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    settings = StorageSettings(backend=backend, root=str(tmp_path / "store"), retry=QUICK_RETRY)
    if backend == "local":
        yield open_store(settings)
        return
    cluster = request.getfixturevalue("pg_cluster")
    dsn = new_database(cluster)
    if backend == "postgres":
        monkeypatch.setenv("KOROKORO_PG_DSN", dsn)  # as `storage=postgres` opens it: conf + environment
        yield open_store(settings)
        return
    fake = FakeSupabase(dsn)
    monkeypatch.setenv("SUPABASE_URL", fake.url)
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", FAKE_KEY)
    try:
        s = open_store(settings)
        s.fake = fake
        yield s
    finally:
        fake.close()


@pytest.fixture
def video(tmp_path: Path) -> Path:
    (p := tmp_path / "my mug (1).mp4").write_bytes(b"not really a video, the store does not care")
    return p
