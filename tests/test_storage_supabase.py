"""The Supabase backend without a server: the HTTP requests supabase-py builds (httpx
MockTransport), how errors map, and the service key never reaching an exception, a log record,
a repr or a pickle (also against the loopback stand-in, echoing the key into its errors)."""

from __future__ import annotations

import json
import logging
import pickle
import traceback
from pathlib import Path
from typing import Any

import httpx
import pytest

from tasks.storage import StorageSettings, StoreError, open_store
from tasks.storage.base import ProductNotFound
from tasks.types import Product
from tests.supabase_standin import FAKE_KEY, FakeSupabase


# ------------------------------------------------------------------------------------------
# Supabase without a server: the requests supabase-py builds, and the key never leaking
# ------------------------------------------------------------------------------------------
class Recorder:
    """An httpx MockTransport handler answering like PostgREST/Storage and recording requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Any] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        for (method, prefix), answer in self.routes.items():
            if request.method == method and str(request.url).startswith(prefix):
                return answer(request) if callable(answer) else answer
        return httpx.Response(404, json={"message": f"no route for {request.method} {request.url}"})


def _row(uid: str, **kw: Any) -> dict[str, Any]:
    row = {"unique_id": uid, "title": "t", "category": "cup", "video_link": f"videos/{uid}/v.mp4", "status": "IDLE",
           "error": None, "attempts": 0, "model_manifest": None, "claimed_by": None, "claimed_at": None,
           "created_at": "2026-01-02T03:04:05.123456+00:00", "updated_at": "2026-01-02T03:04:05.123456+00:00",
           "price": 9.5, "image_link": None, "id": 7, "lease_until": None}
    row.update(kw)
    return row


URL = "https://proj.supabase.example"


@pytest.fixture
def mocked(tmp_path: Path):
    from tasks.storage.supabase import SupabaseStore

    rec = Recorder()
    client = httpx.Client(transport=httpx.MockTransport(rec))
    s = SupabaseStore(StorageSettings(backend="supabase", root=str(tmp_path)),
                      environ={"SUPABASE_URL": URL, "SUPABASE_SERVICE_KEY": FAKE_KEY}, http_client=client)
    return s, rec


def test_supabase_builds_the_documented_requests(mocked, tmp_path: Path) -> None:
    s, rec = mocked
    rec.routes[("POST", f"{URL}/rest/v1/rpc/claim_next_product")] = httpx.Response(
        200, json=[_row("mug-1", status="PROCESSING", attempts=1, claimed_by="w1",
                        claimed_at="2026-01-02T03:04:06+00:00")])
    rec.routes[("GET", f"{URL}/rest/v1/products")] = httpx.Response(200, json=[_row("mug-1")])
    rec.routes[("POST", f"{URL}/storage/v1/object/korokoro_bucket/")] = httpx.Response(
        200, json={"Key": "korokoro_bucket/models/mug-1/manifest.json"})
    rec.routes[("GET", f"{URL}/storage/v1/object/info/korokoro_bucket/")] = httpx.Response(
        200, json={"name": "manifest.json", "etag": '"abc"', "version": "v1", "last_modified": "2026-01-02T03:04:05Z"})
    rec.routes[("POST", f"{URL}/rest/v1/rpc/mark_product_done")] = httpx.Response(
        200, json=[_row("mug-1", status="DONE", model_manifest="models/mug-1/manifest.json")])

    p = s.claim_next("w1", 90, 4)
    assert p.unique_id == "mug-1" and p.attempts == 1 and p.claimed_at == 1767323046.0
    req = rec.requests[-1]
    assert req.method == "POST" and req.url.path == "/rest/v1/rpc/claim_next_product"
    assert json.loads(req.content) == {"worker": "w1", "lease": "90.000 seconds", "max_attempts": 4}
    assert req.headers["apikey"] == FAKE_KEY and req.headers["authorization"] == f"Bearer {FAKE_KEY}"

    assert s.get("mug-1").created_at == pytest.approx(1767323045.123456)
    req = rec.requests[-1]
    assert req.method == "GET" and req.url.path == "/rest/v1/products"
    assert req.url.params["unique_id"] == "eq.mug-1" and req.url.params["select"].startswith("unique_id,title")

    (m := tmp_path / "manifest.json").write_text('{"version": 1}')
    s.put_object("models/mug-1/manifest.json", m, "application/json")
    req = rec.requests[-1]
    assert req.method == "POST" and req.url.path == "/storage/v1/object/korokoro_bucket/models/mug-1/manifest.json"
    assert req.headers["x-upsert"] == "true" and req.headers["content-type"].startswith("multipart/form-data")
    assert b"Content-Type: application/json" in req.content and b'{"version": 1}' in req.content

    assert s.object_version("models/mug-1/manifest.json") == '"abc"-v1-2026-01-02T03:04:05Z'
    done = s.mark_done("mug-1", "models/mug-1/manifest.json")
    assert done.status == "DONE"
    assert [r.url.path for r in rec.requests[-2:]] == [
        "/storage/v1/object/info/korokoro_bucket/models/mug-1/manifest.json", "/rest/v1/rpc/mark_product_done"]
    assert json.loads(rec.requests[-1].content) == {"uid": "mug-1", "manifest": "models/mug-1/manifest.json"}


def test_supabase_maps_sql_errors(mocked) -> None:
    s, rec = mocked
    rec.routes[("POST", f"{URL}/rest/v1/rpc/claim_product")] = httpx.Response(
        400, json={"code": "55P03", "message": "product a is being processed by w1 (lease ends in 50 s); wait or use another unique_id",
                   "details": None, "hint": None})
    rec.routes[("POST", f"{URL}/rest/v1/rpc/mark_product_failed")] = httpx.Response(
        404, json={"code": "P0002", "message": "no product with unique_id 'zz'", "details": None, "hint": None})
    with pytest.raises(StoreError, match="being processed by w1"):
        s.claim("a", "w2", 60)
    with pytest.raises(ProductNotFound, match="no product with unique_id 'zz'"):
        s.mark_failed("zz", "x")


def test_supabase_fetches_foreign_videos_without_the_key_and_within_the_limit(mocked, tmp_path: Path) -> None:
    s, rec = mocked
    rec.routes[("GET", "https://cdn.example.test/v.mp4")] = httpx.Response(
        302, headers={"Location": "https://cdn2.example.test/real.mp4"})
    rec.routes[("GET", "https://cdn2.example.test/real.mp4")] = httpx.Response(200, content=b"x" * 5000)
    rec.routes[("GET", "https://cdn.example.test/huge.mp4")] = httpx.Response(
        200, headers={"Content-Length": str(10**12)}, content=b"")
    rec.routes[("GET", "https://cdn.example.test/endless.mp4")] = lambda r: httpx.Response(
        200, stream=httpx.ByteStream(b"y" * 300_000))
    rec.routes[("GET", f"{URL}/storage/v1/object/korokoro_bucket/public/")] = httpx.Response(200, content=b"seed video")

    def product(link: str) -> Product:
        return Product(unique_id="v1", title="t", video_link=link)

    got = s.fetch_video(product("https://cdn.example.test/v.mp4?token=secret-signed"), tmp_path / "a.mp4", 10_000)
    assert got.read_bytes() == b"x" * 5000
    for req in rec.requests:
        assert "apikey" not in req.headers and "authorization" not in req.headers, "the key went to a foreign host"
    with pytest.raises(StoreError, match=r"is 953674 MiB, over the 0\.1 MiB limit"):
        s.fetch_video(product("https://cdn.example.test/huge.mp4"), tmp_path / "b.mp4", 100_000)
    with pytest.raises(StoreError, match="stopped reading"):
        s.fetch_video(product("https://cdn.example.test/endless.mp4"), tmp_path / "c.mp4", 100_000)
    assert not (tmp_path / "c.mp4").exists() and not list(tmp_path.glob(".part-*"))
    with pytest.raises(StoreError, match="must be https"):
        s.fetch_video(product("http://cdn.example.test/v.mp4"), tmp_path / "d.mp4", 100_000)
    # The seed stored public URLs of its own bucket: those are read as bucket paths, with the key.
    own = f"{URL}/storage/v1/object/public/korokoro_bucket/public/my%20mug.mp4"
    assert s.fetch_video(product(own), tmp_path / "e.mp4", 100_000).read_bytes() == b"seed video"
    req = rec.requests[-1]
    assert req.url.path == "/storage/v1/object/korokoro_bucket/public/my mug.mp4" and req.headers["apikey"] == FAKE_KEY
    # ...and so are bare bucket paths (the seed's public/<file>).
    assert s.fetch_video(product("public/my mug.mp4"), tmp_path / "f.mp4", 100_000).read_bytes() == b"seed video"
    with pytest.raises(StoreError, match="invalid video path"):
        s.fetch_video(product("public/../secret"), tmp_path / "g.mp4", 100_000)


def test_supabase_needs_its_environment(tmp_path: Path) -> None:
    from tasks.storage.supabase import SupabaseStore

    settings = StorageSettings(backend="supabase", root=str(tmp_path))
    with pytest.raises(StoreError, match="SUPABASE_URL"):
        SupabaseStore(settings, environ={})
    with pytest.raises(StoreError, match="SUPABASE_SERVICE_KEY"):
        SupabaseStore(settings, environ={"SUPABASE_URL": URL})
    with pytest.raises(StoreError, match="must be an https URL"):
        SupabaseStore(settings, environ={"SUPABASE_URL": "http://proj.example", "SUPABASE_SERVICE_KEY": FAKE_KEY})


def _assert_no_key(texts: list[str]) -> None:
    for text in texts:
        assert FAKE_KEY not in text, text
        assert FAKE_KEY[10:30] not in text, text


def _exc_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


def test_the_key_never_leaks_from_failing_calls(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that echoes credentials into its errors, a closed port and a mock transport
    that fails: no exception text, traceback, log record, repr or pickle holds the key."""
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    fake = FakeSupabase(None)
    fake.leak_key_in_errors = True
    monkeypatch.setenv("SUPABASE_URL", fake.url)
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", FAKE_KEY)
    texts: list[str] = []
    (f := tmp_path / "f.bin").write_bytes(b"x")
    try:
        # Two quick attempts: the retry warnings (logged) must be scrubbed too.
        store = open_store({"backend": "supabase", "root": str(tmp_path), "retry": {"attempts": 2, "base_delay_s": 0}})
        texts += [repr(store), str(pickle.dumps(store))]
        calls = [
            lambda: store.claim_next("w", 60, 3), lambda: store.get("a1"), lambda: store.list_products(),
            lambda: store.mark_failed("a1", "r"), lambda: store.put_object("models/a1/x", f),
            lambda: store.object_exists("models/a1/x"), lambda: store.object_version("models/a1/x"),
            lambda: store.get_object("models/a1/x", tmp_path / "o"),
            lambda: store.fetch_video(Product(unique_id="a1", title="t", video_link="videos/a1/v.mp4"), tmp_path / "v", 10),
        ]
        for call in calls:
            with pytest.raises(StoreError) as err:
                call()
            texts += _exc_texts(err.value)
            assert err.value.__context__ is None and err.value.__cause__ is None
        assert len(fake.requests) >= len(calls)  # the calls did reach the server
        fake.close()
        with pytest.raises(StoreError) as err:  # nothing listens any more
            store.claim_next("w", 60, 3)
        texts += _exc_texts(err.value)
    finally:
        fake.close()

    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy said: {request.headers.get('authorization')}", request=request)

    from tasks.storage.supabase import SupabaseStore

    s = SupabaseStore(StorageSettings(backend="supabase", root=str(tmp_path)),
                      environ={"SUPABASE_URL": URL, "SUPABASE_SERVICE_KEY": FAKE_KEY},
                      http_client=httpx.Client(transport=httpx.MockTransport(boom)))
    for call in (lambda: s.claim_next("w", 60, 3), lambda: s.object_exists("models/a/b")):
        with pytest.raises(StoreError) as err:
            call()
        texts += _exc_texts(err.value)
    texts += [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    assert any("retry 1 of 1" in r.getMessage() for r in caplog.records), "the 500s should have been retried"
    assert any("***" in t for t in texts), "the echoing server's errors should show the scrubbed key"
    _assert_no_key(texts)


def test_supabase_object_version_falls_back_on_the_listing(mocked) -> None:
    s, rec = mocked
    rec.routes[("GET", f"{URL}/storage/v1/object/info/korokoro_bucket/models/a/")] = httpx.Response(200, content=b"")
    rec.routes[("POST", f"{URL}/storage/v1/object/list/korokoro_bucket")] = httpx.Response(200, json=[
        {"name": "x.bin.part-0000-of-0001", "updated_at": "2026-01-01T00:00:00Z", "metadata": {"eTag": '"e1"', "size": 3}},
        {"name": "x.bin", "updated_at": "2026-01-02T00:00:00Z", "metadata": {"eTag": '"e2"', "size": 4}},
    ])
    assert s.object_version("models/a/x.bin") == '"e2"-2026-01-02T00:00:00Z-4'
    assert json.loads(rec.requests[-1].content)["prefix"] == "models/a"
    rec.routes.clear()
    rec.routes[("GET", f"{URL}/storage/v1/object/info/")] = httpx.Response(
        400, json={"statusCode": "404", "error": "not_found", "message": "Object not found"})
    with pytest.raises(StoreError, match="not in the bucket"):
        s.object_version("models/a/gone.bin")
