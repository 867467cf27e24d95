"""Issue #10: a Supabase-configured run that fails keeps the service key to itself.

The real flow (``flows.reconstruct.reconstruct_and_report``) runs under a temporary Prefect
server against a loopback stand-in that answers errors and echoes the key it was sent into
every error body. The key (deliberately not key-shaped, so only the exact scrubbing can hide
it) must appear in no log line (caplog and the process's stdout/stderr), no file under
data_dir (report included), no exception text, no product error sent to the table, and
nothing Prefect stored: flow and task runs, their states, logs and artifacts (the Prefect
database file itself is searched).
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from flows.config import compose_config
from tests.supabase_standin import FakeSupabase

KEY = "fake-service-key-7f3a9c2e41d8b6a0-DONOTLEAK"


class ErrorSupabase(FakeSupabase):
    """Claims succeed for ``claimable`` ids; every other call fails with the key in its answer."""

    def __init__(self, claimable: set[str]) -> None:
        super().__init__(None, key=KEY)
        self.claimable = claimable
        self.reasons: list[str] = []

    def echo(self, h: Any, status: int) -> None:
        auth = h.headers.get("Authorization", "")
        self.send(h, status, {"message": f"upstream said no to {auth} (apikey {h.headers.get('apikey')})",
                              "code": "XX000", "statusCode": str(status), "error": f"denied {auth}"},
                  headers={"X-Debug-Echo": auth})

    def rpc(self, h: Any, fn: str, args: dict[str, Any]) -> None:
        uid = args.get("uid")
        row = {"unique_id": uid, "title": "mug", "category": "cup", "video_link": f"videos/{uid}/mug.mp4",
               "status": "PROCESSING", "error": None, "attempts": 1, "model_manifest": None,
               "claimed_by": args.get("worker"), "claimed_at": "2026-01-01T00:00:00+00:00",
               "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00"}
        if fn == "claim_product" and uid in self.claimable:
            return self.send(h, 200, [row])
        if fn == "mark_product_failed":
            self.reasons.append(args["reason"])
            return self.send(h, 200, [{**row, "status": "FAILED", "error": args["reason"]}])
        return self.echo(h, 500)

    def info(self, h: Any, rest: str) -> None:  # the video is there...
        self.send(h, 200, {"name": rest, "etag": '"e1"', "version": "v1", "last_modified": "2026-01-01T00:00:00Z"})

    def download(self, h: Any, rest: str) -> None:  # ...but every download fails
        self.echo(h, 503)


@pytest.fixture(scope="module")
def prefect_db():
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = get_current_settings().server.database.connection_url.get_secret_value()
        yield Path(url.split(":///", 1)[1])


def _leaks(text: str) -> bool:
    return KEY in text or quote(KEY, safe="") in text or KEY[10:30] in text


def _prefect_texts() -> list[str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        texts = [json.dumps(r.model_dump(mode="json")) for r in client.read_flow_runs()]
        texts += [json.dumps(r.model_dump(mode="json")) for r in client.read_task_runs()]
        texts += [json.dumps(a.model_dump(mode="json")) for a in client.read_artifacts()]
        texts += [log.message for log in client.read_logs()]
    return texts


def test_a_failing_supabase_run_never_shows_the_key(prefect_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    from flows.reconstruct import reconstruct_and_report
    from tasks.storage import StoreError

    caplog.set_level(logging.DEBUG)
    fake = ErrorSupabase(claimable={"mug-1"})
    monkeypatch.setenv("SUPABASE_URL", fake.url)
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", KEY)
    data = tmp_path / "data"
    cfg = compose_config(["storage=supabase", f"data_dir={data}", "worker=w1", "storage.retry.attempts=2",
                          "storage.retry.base_delay_s=0", "stages.ingest.retries=0"])
    texts: list[str] = [json.dumps(cfg)]
    try:
        # 1. The claim itself fails: the flow raises, nothing is marked.
        with pytest.raises(StoreError) as err:
            reconstruct_and_report("mug-2", config=cfg)
        texts += [str(err.value), repr(err.value), "".join(traceback.format_exception(err.value))]
        assert "claim mug-2 failed" in str(err.value) and "***" in str(err.value)
        # 2. The claim works, the video download fails: the product is FAILED with the reason.
        result = reconstruct_and_report("mug-1", config=cfg)
    finally:
        fake.close()
    assert result.status == "FAILED" and result.error.startswith("ingest:") and "HTTP 503" in result.error
    assert fake.reasons == [result.error]  # the reason the table got
    texts += [result.error, *fake.reasons]
    report = Path(result.report)
    assert report.is_file()
    texts += [p.read_text(errors="replace") for p in data.rglob("*") if p.is_file()]  # report.md/json and all
    texts += [r.getMessage() for r in caplog.records] + [r.exc_text or "" for r in caplog.records]
    out, errs = capfd.readouterr()
    texts += [out, errs]
    texts += _prefect_texts()
    assert prefect_db.stat().st_size > 0
    db_bytes = b"".join(p.read_bytes() for p in prefect_db.parent.glob(prefect_db.name + "*"))
    assert KEY.encode() not in db_bytes and KEY[10:30].encode() not in db_bytes
    # The key did travel where it belongs (every request's headers) and nowhere else.
    assert all(r["headers"].get("apikey") == KEY for r in fake.requests)
    leaked = [t[max(0, t.find(KEY[10:30]) - 300):t.find(KEY[10:30]) + 100] for t in texts if _leaks(t)]
    assert not leaked, leaked
    # Not vacuous: the echoed header reached httpcore's DEBUG lines, scrubbed.
    assert "Bearer ***" in errs or any("Bearer ***" in r.getMessage() for r in caplog.records)
