"""The embedded store: queue semantics, safe names, atomic objects."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tasks.storage import StorageSettings, StoreError, open_store
from tasks.storage.base import check_object_key, check_unique_id


@pytest.fixture
def store(tmp_path: Path):
    return open_store(StorageSettings(backend="local", root=str(tmp_path / "store")))


@pytest.fixture
def video(tmp_path: Path) -> Path:
    (p := tmp_path / "my mug (1).mp4").write_bytes(b"not really a video, the store does not care")
    return p


def test_enqueue_claim_done(store, video: Path) -> None:
    product = store.enqueue("red mug", "cup", video, "mug-1")
    assert product.status == "IDLE" and product.video_link == "videos/mug-1/my_mug_1_.mp4"
    assert store.object_exists(product.video_link)
    claimed = store.claim_next("w1", lease_s=60, max_attempts=3)
    assert claimed is not None and claimed.unique_id == "mug-1"
    assert claimed.status == "PROCESSING" and claimed.claimed_by == "w1" and claimed.attempts == 1
    assert store.claim_next("w2", lease_s=60, max_attempts=3) is None  # nobody else gets it
    with pytest.raises(StoreError, match="manifest"):
        store.mark_done("mug-1", "models/mug-1/manifest.json")  # not uploaded yet: refused
    manifest = video.parent / "manifest.json"
    manifest.write_text("{}")
    store.put_object("models/mug-1/manifest.json", manifest)
    done = store.mark_done("mug-1", "models/mug-1/manifest.json")
    assert done.status == "DONE" and done.model_manifest == "models/mug-1/manifest.json" and done.error is None


def test_expired_lease_returns_to_queue_and_attempts_stop(store, video: Path) -> None:
    store.enqueue("cup", "cup", video, "cup-1")
    first = store.claim_next("w1", lease_s=-1, max_attempts=2)  # lease already over: a dead worker
    second = store.claim_next("w2", lease_s=-1, max_attempts=2)
    assert first.unique_id == second.unique_id == "cup-1" and second.attempts == 2
    assert store.claim_next("w3", lease_s=60, max_attempts=2) is None
    gone = store.get("cup-1")
    assert gone.status == "FAILED" and "2 attempts" in gone.error


def test_failed_keeps_reason_and_video(store, video: Path) -> None:
    product = store.enqueue("cup", "cup", video, "cup-2")
    store.claim("cup-2", "w1", 60)
    failed = store.mark_failed("cup-2", "frames: my_mug_1_.mp4 is not a readable video")
    assert failed.status == "FAILED" and "not a readable video" in failed.error
    assert store.object_exists(product.video_link)  # inputs are kept for a retry


def test_claim_refuses_a_live_lease_of_another_worker(store, video: Path) -> None:
    store.enqueue("cup", "cup", video, "cup-3")
    store.claim("cup-3", "w1", 600)
    with pytest.raises(StoreError, match="being processed by w1"):
        store.claim("cup-3", "w2", 600)


def test_concurrent_claims_take_each_product_once(store, video: Path) -> None:
    for i in range(30):
        store.enqueue(f"p{i}", "others", video, f"p{i}")
    taken: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (p := store.claim_next(name, 600, 3)) is not None:
            with lock:
                taken.append(p.unique_id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(f"p{i}" for i in range(30))


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 65, "-lead", "semi;colon", "sp ace"])
def test_unsafe_unique_ids_are_refused(bad: str) -> None:
    with pytest.raises(StoreError, match="invalid unique_id"):
        check_unique_id(bad)


@pytest.mark.parametrize("bad", ["../x", "models/../../x", "/abs", "a//b", "models/x/"])
def test_unsafe_object_keys_are_refused(bad: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        check_object_key(bad)


def test_missing_product_is_a_clear_error(store) -> None:
    with pytest.raises(StoreError, match="no product with unique_id 'nope'"):
        store.get("nope")
