"""One contract for every storage backend that can run here.

* ``local``: SQLite + folder, always.
* ``postgres``: the SQL functions of infra/supabase/001_products_queue.sql on a throwaway
  PostgreSQL cluster (tests/pg_cluster.py) + a folder bucket.
* ``supabase``: the real supabase-py client (SupabaseStore) talking HTTP to a small loopback
  server (tests/supabase_standin.py, 127.0.0.1 only) that stands in for PostgREST and Storage:
  RPC calls run the same SQL functions on the throwaway cluster, objects live in memory.

Plus Supabase-only tests that assert the HTTP requests supabase-py builds (httpx MockTransport)
and that the service key never reaches an exception, a log record, a repr or a pickle.
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import pytest

from tasks.shard import MANIFEST_NAME, reassemble, split_file, write_manifest
from tasks.storage import StorageSettings, StoreError, open_store
from tasks.storage.base import ProductNotFound
from tasks.types import Product, ShardSet
from tasks.upload import publish_model
from tests.pg_cluster import pg_cluster  # noqa: F401  (fixture)
from tests.store_fixtures import backend, store, video  # noqa: F401  (fixtures)
from tests.supabase_standin import FAKE_KEY, FakeSupabase


def test_enqueue_claim_done(store, video: Path, tmp_path: Path) -> None:
    product = store.enqueue("red mug", "cup", video, "mug-1")
    assert isinstance(product, Product)
    assert product.status == "IDLE" and product.video_link == "videos/mug-1/my_mug_1_.mp4" and product.attempts == 0
    assert store.object_exists(product.video_link)
    claimed = store.claim_next("w1", lease_s=60, max_attempts=3)
    assert claimed is not None and claimed.unique_id == "mug-1"
    assert claimed.status == "PROCESSING" and claimed.claimed_by == "w1" and claimed.attempts == 1
    assert abs(claimed.claimed_at - time.time()) < 60 and claimed.created_at <= claimed.updated_at
    assert store.claim_next("w2", lease_s=60, max_attempts=3) is None
    with pytest.raises(StoreError, match="manifest"):
        store.mark_done("mug-1", "models/mug-1/manifest.json")
    (manifest := tmp_path / "manifest.json").write_text("{}")
    store.put_object("models/mug-1/manifest.json", manifest, "application/json")
    done = store.mark_done("mug-1", "models/mug-1/manifest.json")
    assert done.status == "DONE" and done.model_manifest == "models/mug-1/manifest.json" and done.error is None
    assert store.get("mug-1") == done


def test_expired_lease_returns_to_queue_and_attempts_stop(store, video: Path) -> None:
    store.enqueue("cup", "cup", video, "cup-1")
    first = store.claim_next("w1", lease_s=-1, max_attempts=2)
    second = store.claim_next("w2", lease_s=-1, max_attempts=2)
    assert first.unique_id == second.unique_id == "cup-1" and second.attempts == 2 and second.claimed_by == "w2"
    assert store.claim_next("w3", lease_s=60, max_attempts=2) is None
    gone = store.get("cup-1")
    assert gone.status == "FAILED" and "2 attempts" in gone.error


def test_failed_keeps_reason_and_video(store, video: Path) -> None:
    product = store.enqueue("cup", "cup", video, "cup-2")
    store.claim("cup-2", "w1", 60)
    failed = store.mark_failed("cup-2", "frames: my_mug_1_.mp4 is not a readable video")
    assert failed.status == "FAILED" and "not a readable video" in failed.error
    assert store.object_exists(product.video_link)
    assert store.claim_next("w2", 60, 3) is None  # FAILED is final for the queue


def test_claim_refuses_a_live_lease_of_another_worker(store, video: Path) -> None:
    store.enqueue("cup", "cup", video, "cup-3")
    store.claim("cup-3", "w1", 600)
    with pytest.raises(StoreError, match="being processed by w1"):
        store.claim("cup-3", "w2", 600)
    again = store.claim("cup-3", "w1", 600)  # the holder may renew
    assert again.attempts == 2 and again.claimed_by == "w1"


def test_concurrent_claims_take_each_product_once(store, video: Path) -> None:
    for i in range(30):
        store.enqueue(f"p{i}", "others", video, f"p{i}")
    taken: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            while (p := store.claim_next(name, 600, 3)) is not None:
                with lock:
                    taken.append(p.unique_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(taken) == sorted(f"p{i}" for i in range(30))


def test_missing_product_is_a_clear_error(store) -> None:
    for call in (lambda: store.get("nope"), lambda: store.mark_failed("nope", "x"),
                 lambda: store.claim("nope", "w", 60)):
        with pytest.raises(ProductNotFound, match="no product with unique_id 'nope'"):
            call()
    with pytest.raises(StoreError, match="invalid unique_id"):
        store.get("../etc")


def test_list_products_in_order_and_by_status(store, video: Path) -> None:
    for uid in ("a1", "b2", "c3"):
        store.enqueue(uid, "others", video, uid)
    store.claim_next("w", 60, 3)
    assert [p.unique_id for p in store.list_products()] == ["a1", "b2", "c3"]
    assert [p.unique_id for p in store.list_products("IDLE")] == ["b2", "c3"]
    assert [p.unique_id for p in store.list_products("PROCESSING")] == ["a1"]
    assert store.list_products("DONE") == []


def test_re_enqueue_resets_the_product(store, video: Path, tmp_path: Path) -> None:
    store.enqueue("cup", "cup", video, "cup-4")
    store.claim("cup-4", "w1", 60)
    store.mark_failed("cup-4", "bad video")
    (other := tmp_path / "retake.mp4").write_bytes(b"a better video")
    back = store.enqueue("cup v2", "cup", other, "cup-4")
    assert back.status == "IDLE" and back.attempts == 0 and back.error is None and back.title == "cup v2"
    assert back.video_link == "videos/cup-4/retake.mp4"
    assert store.claim_next("w2", 60, 3).unique_id == "cup-4"


def test_objects_round_trip_upsert_and_version(store, tmp_path: Path) -> None:
    (a := tmp_path / "a.bin").write_bytes(b"first")
    (b := tmp_path / "b.bin").write_bytes(b"second, longer")
    key = "models/x1/model.glb.part-0000-of-0001"
    assert not store.object_exists(key)
    store.put_object(key, a)
    v1 = store.object_version(key)
    assert store.get_object(key, tmp_path / "out" / "a").read_bytes() == b"first"
    store.put_object(key, b)  # upsert: replacing is fine
    assert store.object_version(key) != v1
    assert store.get_object(key, tmp_path / "out" / "b").read_bytes() == b"second, longer"
    with pytest.raises(StoreError):
        store.get_object("models/x1/missing.bin", tmp_path / "out" / "c")
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_object("../escape", a)


def test_list_and_delete_objects(store, tmp_path: Path) -> None:
    (a := tmp_path / "a.bin").write_bytes(b"abc")
    (b := tmp_path / "b.bin").write_bytes(b"")
    for key, src in (("models/l1/x.part-0001", a), ("models/l1/x.part-0000", b), ("models/l1/sub/deep.bin", a),
                     ("models/l10/other.bin", a)):
        store.put_object(key, src)
    # One folder level, by key; a sub-folder and a sibling folder sharing the prefix are not listed.
    assert [(o.key, o.size) for o in store.list_objects("models/l1")] == [
        ("models/l1/x.part-0000", 0), ("models/l1/x.part-0001", 3)]
    assert store.list_objects("models/l1/") == store.list_objects("models/l1")
    assert store.list_objects("models/none") == []
    store.delete_object("models/l1/x.part-0001")
    store.delete_object("models/l1/x.part-0001")  # deleting twice is fine
    assert [o.key for o in store.list_objects("models/l1")] == ["models/l1/x.part-0000"]
    assert not store.object_exists("models/l1/x.part-0001") and store.object_exists("models/l1/sub/deep.bin")
    with pytest.raises(StoreError, match="invalid object key"):
        store.delete_object("models/../videos")


def test_fetch_video_streams_and_refuses_over_limit(store, video: Path, tmp_path: Path) -> None:
    product = store.enqueue("mug", "cup", video, "mug-2")
    got = store.fetch_video(product, tmp_path / "work" / "v.mp4", max_bytes=1 << 20)
    assert got.read_bytes() == video.read_bytes()
    dest = tmp_path / "work" / "small.mp4"
    with pytest.raises(StoreError, match="limit"):
        store.fetch_video(product, dest, max_bytes=10)
    assert not dest.exists() and not list(dest.parent.glob(".part-*"))


def test_publish_then_reassemble_through_the_store(store, tmp_path: Path) -> None:
    """tasks.upload publishes parts then the manifest; reading back through the store rebuilds the file."""
    (glb := tmp_path / "model.glb").write_bytes(bytes(range(256)) * 40)
    shards = tmp_path / "shards"
    shards.mkdir()
    entry = split_file(glb, shards, part_bytes=3000)
    manifest = write_manifest([entry], "pub-1", shards / MANIFEST_NAME, {})
    pub = publish_model(ShardSet(dir=shards, manifests=(manifest,), parts=len(entry["parts"]), fingerprint="f"),
                        store, "pub-1", tmp_path / "out", "f")
    assert pub.manifest_key == "models/pub-1/manifest.json" and len(pub.object_keys) == 4
    back = json.loads(store.get_object(pub.manifest_key, tmp_path / "m.json").read_text())

    def read_part(name: str) -> bytes:
        return store.get_object(f"models/pub-1/{name}", tmp_path / "parts" / name).read_bytes()

    assert reassemble(back, "model.glb", read_part, tmp_path / "rebuilt.glb").read_bytes() == glb.read_bytes()


def test_supabase_calls_the_sql_functions(store, backend: str, video: Path) -> None:
    if backend != "supabase":
        pytest.skip("checks the HTTP calls of the supabase backend")
    store.enqueue("mug", "cup", video, "mug-9")
    store.claim_next("w1", 30, 3)
    calls = [(r["method"], r["path"]) for r in store.fake.requests]
    assert ("POST", "/storage/v1/object/korokoro_bucket/videos/mug-9/my_mug_1_.mp4") in calls
    assert ("POST", "/rest/v1/rpc/enqueue_product") in calls and ("POST", "/rest/v1/rpc/claim_next_product") in calls
    claim = next(r for r in store.fake.requests if r["path"].endswith("claim_next_product"))
    assert json.loads(claim["body"]) == {"worker": "w1", "lease": "30.000 seconds", "max_attempts": 3}


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
