"""One contract for every storage backend that can run here.

* ``local``: SQLite + folder, always.
* ``postgres``: the SQL functions of infra/supabase/001_products_queue.sql on a throwaway
  PostgreSQL cluster (tests/pg_cluster.py) + a folder bucket.
* ``supabase``: the real supabase-py client (SupabaseStore) talking HTTP to a small loopback
  server (tests/supabase_standin.py, 127.0.0.1 only) that stands in for PostgREST and Storage:
  RPC calls run the same SQL functions on the throwaway cluster, objects live in memory.

Supabase-only tests (the HTTP requests supabase-py builds, the key never leaking) are in
tests/test_storage_supabase.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tasks.shard import MANIFEST_NAME, reassemble, split_file, write_manifest
from tasks.storage import StoreError
from tasks.storage.base import ProductNotFound
from tasks.types import Product, ShardSet
from tasks.upload import publish_model
from tests.pg_cluster import pg_cluster  # noqa: F401  (fixture)
from tests.store_fixtures import backend, store, video  # noqa: F401  (fixtures)


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
