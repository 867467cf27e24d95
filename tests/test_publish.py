"""Publishing through flaky storage: retries, no duplicate or orphan parts, never a half model.

Faults come from tasks/storage/faulty.py beneath the retries, on every backend of the contract
suite (local, postgres, the Supabase stand-in); the Supabase-only tests inject faults in the
stand-in's HTTP answers instead, so the backend's own classification of errors is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tasks.shard import MANIFEST_NAME, load_manifest, manifest_parts, reassemble, split_file, write_manifest
from tasks.storage import StorageSettings, StoreError
from tasks.storage.base import TransientStoreError
from tasks.storage.faulty import FaultRule, FaultyStore, SimulatedCrash, fault_rules
from tasks.storage.retry import RetrySettings, RetryingStore, backoff_delays, retry_settings, with_retries
from tasks.types import ShardSet
from tasks.upload import publish_model
from tests.pg_cluster import pg_cluster  # noqa: F401  (fixture)
from tests.store_fixtures import QUICK_RETRY, backend, store, video  # noqa: F401  (fixtures)
from tests.supabase_standin import FAKE_KEY, FakeSupabase

UID = "pub-7"


def make_shards(tmp: Path, name: str, data: bytes, part_bytes: int) -> ShardSet:
    """``data`` as ``name`` cut into parts, with its manifest, in a fresh folder."""
    folder = tmp / f"shards-{len(list(tmp.glob('shards-*')))}"
    folder.mkdir()
    (src := tmp / name).write_bytes(data)
    entry = split_file(src, folder, part_bytes)
    manifest = write_manifest([entry], UID, folder / MANIFEST_NAME, {})
    return ShardSet(dir=folder, manifests=(manifest,), parts=len(entry["parts"]), fingerprint="f")


def with_faults(store: Any, *rules: FaultRule, attempts: int = 4) -> RetryingStore:
    """The fixture's backend with faults beneath fresh retries (as open_store stacks them)."""
    return RetryingStore(FaultyStore(store.inner, rules), retry_settings({**QUICK_RETRY, "attempts": attempts}))


def published(store: Any, tmp: Path) -> tuple[list[str], dict[str, bytes]]:
    """What a reader sees: every key under models/UID, and each asset rebuilt from the manifest."""
    keys = [o.key for o in store.list_objects(f"models/{UID}")]
    if f"models/{UID}/{MANIFEST_NAME}" not in keys:
        return keys, {}
    path = store.get_object(f"models/{UID}/{MANIFEST_NAME}", tmp / "read" / MANIFEST_NAME)
    manifest = load_manifest(path.read_bytes(), "test")

    def read_part(name: str) -> bytes:
        return store.get_object(f"models/{UID}/{name}", tmp / "read" / name).read_bytes()

    assets = {a["name"]: reassemble(manifest, a["name"], read_part, tmp / "read" / "out" / a["name"]).read_bytes()
              for a in manifest["assets"]}
    return keys, assets


def expected_keys(shards: ShardSet) -> list[str]:
    manifest = load_manifest(shards.manifests[0].read_bytes(), "test")
    return sorted([f"models/{UID}/{p['name']}" for p in manifest_parts(manifest)] + [f"models/{UID}/{MANIFEST_NAME}"])


# ------------------------------------------------------------------------------------------
# Every backend
# ------------------------------------------------------------------------------------------
def test_transient_faults_are_retried_and_leave_no_extra_parts(store, tmp_path: Path) -> None:
    old = make_shards(tmp_path, "model.glb", b"old model " * 300, part_bytes=1000)  # 3 parts
    publish_model(old, store, UID, tmp_path / "o1", "f")
    new = make_shards(tmp_path, "model.glb", b"new, longer model " * 300, part_bytes=1000)  # 6 parts
    flaky = with_faults(
        store,
        FaultRule(kind="timeout", ops=("put_object",), first=1),  # every upload's first try times out...
        # ...and the manifest's second try lands but its answer is lost (each rule counts every call
        # on a key; the first rule that fires wins): the third try re-uploads the same bytes.
        FaultRule(kind="http_503", ops=("put_object",), keys="*manifest.json", first=2, after=True),
        FaultRule(kind="http_502", ops=("list_objects", "delete_object"), first=1),
    )
    pub = publish_model(new, flaky, UID, tmp_path / "o2", "f")
    injected = flaky.inner.injected
    assert sum(op == "put_object" for op, _, _ in injected) == len(pub.object_keys) + 2
    assert ("list_objects", f"models/{UID}", "http_502") in injected
    keys, assets = published(store, tmp_path)
    assert sorted(keys) == expected_keys(new)  # the 3 old parts are gone, nothing doubled
    assert assets == {"model.glb": b"new, longer model " * 300}
    record = json.loads((tmp_path / "o2" / "published.json").read_text())
    assert len(record["removed_stale_parts"]) == 3 and record["stale_parts_left"] == []


def test_republishing_the_same_model_is_idempotent(store, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, "model.glb", bytes(range(256)) * 20, part_bytes=2000)
    first = publish_model(shards, store, UID, tmp_path / "o1", "f")
    again = publish_model(shards, store, UID, tmp_path / "o2", "f")
    assert first.object_keys == again.object_keys
    keys, assets = published(store, tmp_path)
    assert sorted(keys) == expected_keys(shards) and assets == {"model.glb": bytes(range(256)) * 20}


def test_permanent_fault_fails_with_the_reason_and_keeps_the_old_model(store, tmp_path: Path) -> None:
    old = make_shards(tmp_path, "model.glb", b"A" * 2500, part_bytes=1000)
    publish_model(old, store, UID, tmp_path / "o1", "f")
    new = make_shards(tmp_path, "model.glb", b"B" * 2500, part_bytes=1000)  # same part count, new content
    flaky = with_faults(store, FaultRule(kind="http_403", ops=("put_object",), keys="*part-0001*", first=99))
    with pytest.raises(StoreError, match=r"upload models/pub-7/model\.glb\.part-0001-of-0003\.\w+ failed: HTTP 403"):
        publish_model(new, flaky, UID, tmp_path / "o2", "f")
    assert [op for op, _, _ in flaky.inner.injected] == ["put_object"]  # a 403 is not retried
    keys, assets = published(store, tmp_path)
    assert assets == {"model.glb": b"A" * 2500}  # old manifest, old parts intact
    assert set(expected_keys(old)) <= set(keys)


def test_transient_faults_that_outlast_the_attempts_fail_with_the_reason(store, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, "model.glb", b"C" * 100, part_bytes=1000)
    flaky = with_faults(store, FaultRule(kind="http_503", ops=("put_object",), first=99), attempts=3)
    with pytest.raises(StoreError, match=r"upload models/pub-7/model\.glb\.part-0000-of-0001\.\w+ failed: HTTP 503 "
                                         r"Service Unavailable \(injected fault\) \(gave up after 3 attempts\)"):
        publish_model(shards, flaky, UID, tmp_path / "o", "f")
    assert published(store, tmp_path) == ([], {})  # nothing was published


@pytest.mark.parametrize("crash_at", ["*part-0001*", "*manifest.json"])
def test_a_crash_mid_publish_leaves_the_old_model_whole(store, tmp_path: Path, crash_at: str) -> None:
    old = make_shards(tmp_path, "model.glb", b"old " * 700, part_bytes=1000)  # 3 parts
    publish_model(old, store, UID, tmp_path / "o1", "f")
    new = make_shards(tmp_path, "model.glb", b"NEW!" * 700, part_bytes=1000)  # 3 parts, other content
    dying = with_faults(store, FaultRule(kind="crash", ops=("put_object",), keys=crash_at, first=1))
    with pytest.raises(SimulatedCrash):
        publish_model(new, dying, UID, tmp_path / "o2", "f")
    keys, assets = published(store, tmp_path)
    assert assets == {"model.glb": b"old " * 700}  # a reader still gets the old model, whole
    # The next worker publishes again: new model in, the crash's leftovers and the old parts out.
    publish_model(new, store, UID, tmp_path / "o3", "f")
    keys, assets = published(store, tmp_path)
    assert sorted(keys) == expected_keys(new) and assets == {"model.glb": b"NEW!" * 700}


def test_fetch_video_and_get_object_retry_transient_faults(store, video: Path, tmp_path: Path) -> None:
    product = store.enqueue("mug", "cup", video, "mug-3")
    flaky = with_faults(store, FaultRule(kind="connection", ops=("fetch_video", "get_object"), first=2),
                        FaultRule(kind="timeout", ops=("fetch_video",), first=3, after=True))
    got = flaky.fetch_video(product, tmp_path / "work" / "v.mp4", max_bytes=1 << 20)
    assert got.read_bytes() == video.read_bytes()
    assert flaky.get_object(product.video_link, tmp_path / "o.mp4").read_bytes() == video.read_bytes()
    assert [k for _, _, k in flaky.inner.injected].count("connection") == 4
    # Over the size limit is permanent: one try, a reason naming the limit.
    with pytest.raises(StoreError, match="limit"):
        with_faults(store).fetch_video(product, tmp_path / "work" / "small.mp4", max_bytes=5)


def test_stale_parts_a_failed_publish_left_are_removed(store, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, "model.glb", b"D" * 1500, part_bytes=1000)
    (junk := tmp_path / "junk").write_bytes(b"left by a publish that died")
    store.put_object(f"models/{UID}/model.glb.part-0000-of-0009.0123456789abcdef", junk)
    store.put_object(f"models/{UID}/preview.png", junk)  # not a part: kept
    publish_model(shards, store, UID, tmp_path / "o", "f")
    keys, _ = published(store, tmp_path)
    assert sorted(keys) == sorted(expected_keys(shards) + [f"models/{UID}/preview.png"])


# ------------------------------------------------------------------------------------------
# The retry helper and the fault schedule
# ------------------------------------------------------------------------------------------
def test_backoff_doubles_caps_and_jitters() -> None:
    s = RetrySettings(attempts=6, base_delay_s=1.0, max_delay_s=5.0, jitter=0.5)
    assert list(backoff_delays(s, rng=lambda: 0.0)) == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert list(backoff_delays(s, rng=lambda: 1.0)) == [0.5, 1.0, 2.0, 2.5, 2.5]
    for bad in ({"attempts": 0}, {"jitter": 2}, {"base_delay_s": -1}, {"tries": 3}):
        with pytest.raises(StoreError, match="storage.retry"):
            retry_settings(bad)


def test_with_retries_sorts_transient_from_permanent() -> None:
    calls: list[str] = []
    waits: list[float] = []
    s = RetrySettings(attempts=4, base_delay_s=0.1, max_delay_s=1.0, jitter=0.0)

    def flaky() -> str:
        calls.append("x")
        if len(calls) == 1:
            raise TimeoutError("read timed out")
        if len(calls) == 2:
            raise TransientStoreError("HTTP 429")
        return "ok"

    assert with_retries("upload k", flaky, s, sleep=waits.append) == "ok" and waits == [0.1, 0.2]

    def forbidden() -> None:
        calls.append("y")
        raise StoreError("upload k failed: HTTP 403")

    with pytest.raises(StoreError, match="HTTP 403"):
        with_retries("upload k", forbidden, s, sleep=waits.append)
    def bad_input() -> None:
        calls.append("z")
        raise ValueError("bad input")

    with pytest.raises(StoreError, match=r"upload k failed: ValueError: bad input") as err:
        with_retries("upload k", bad_input, s, sleep=waits.append)
    assert isinstance(err.value.__cause__, ValueError)
    assert calls.count("y") == calls.count("z") == 1 and waits == [0.1, 0.2]


def test_fault_rules_from_config() -> None:
    rules = fault_rules([{"kind": "timeout", "first": 2}, {"kind": "http_429", "every": 3, "ops": ["get_object"]}])
    assert rules[0].ops == ("put_object", "get_object", "fetch_video") and rules[1].ops == ("get_object",)
    assert [rules[1].fires(n) for n in range(1, 7)] == [False, False, True, False, False, True]
    assert [rules[0].fires(n) for n in range(1, 4)] == [True, True, False]
    assert isinstance(rules[1].error("get_object", "k"), TransientStoreError)
    assert not isinstance(FaultRule(kind="http_404").error("get_object", "k"), TransientStoreError)
    for bad in ({"kind": "gremlins"}, {"kind": "http_999"}, {"ops": ["claim_next"]}, {"when": "now"}):
        with pytest.raises(StoreError, match="storage.faults"):
            fault_rules(bad)


def test_open_store_stacks_faults_beneath_retries(tmp_path: Path) -> None:
    from tasks.storage import open_store

    store = open_store({"backend": "local", "root": str(tmp_path), "retry": QUICK_RETRY,
                        "faults": [{"kind": "http_500", "first": 2}]})
    (f := tmp_path / "f.bin").write_bytes(b"x")
    store.put_object("models/a/f.bin", f)  # two 500s, then through
    assert store.inner.injected == [("put_object", "models/a/f.bin", "http_500")] * 2
    assert store.get_object("models/a/f.bin", tmp_path / "back").read_bytes() == b"x"


# ------------------------------------------------------------------------------------------
# Supabase: the stand-in answers 5xx, hangs, or refuses an object as too large
# ------------------------------------------------------------------------------------------
@pytest.fixture
def supa(tmp_path: Path):
    from tasks.storage.supabase import SupabaseStore

    fake = FakeSupabase(None)
    fake.hang_s = 1.0
    client = httpx.Client(timeout=httpx.Timeout(0.3))
    inner = SupabaseStore(StorageSettings(backend="supabase", root=str(tmp_path), retry=QUICK_RETRY),
                          environ={"SUPABASE_URL": fake.url, "SUPABASE_SERVICE_KEY": FAKE_KEY}, http_client=client)
    try:
        yield RetryingStore(inner, retry_settings(QUICK_RETRY)), fake
    finally:
        fake.close()


def test_supabase_http_5xx_429_and_timeouts_are_retried(supa, tmp_path: Path) -> None:
    store, fake = supa
    shards = make_shards(tmp_path, "model.glb", b"E" * 2500, part_bytes=1000)
    fake.fail_next += [("POST", "/storage/v1/object/korokoro_bucket/models", 503),
                       ("POST", "/storage/v1/object/korokoro_bucket/models", "hang"),
                       ("POST", "/storage/v1/object/list/", 429),
                       ("GET", "/storage/v1/object/korokoro_bucket/models", 500)]
    publish_model(shards, store, UID, tmp_path / "o", "f")
    keys, assets = published(store, tmp_path)
    assert sorted(keys) == expected_keys(shards) and assets == {"model.glb": b"E" * 2500}
    assert fake.fail_next == []  # every injected answer was met, and survived


def test_supabase_4xx_is_permanent(supa, tmp_path: Path) -> None:
    store, fake = supa
    (f := tmp_path / "f.bin").write_bytes(b"x")
    fake.fail_next.append(("POST", "/storage/v1/object/korokoro_bucket/models", 403))
    before = len(fake.requests)
    with pytest.raises(StoreError, match=r"upload models/a/f\.bin \(0\.0 MiB\) failed: injected 403"):
        store.put_object("models/a/f.bin", f)
    assert len(fake.requests) == before + 1


def test_supabase_video_over_the_project_limit_is_a_clear_error(supa, tmp_path: Path) -> None:
    store, fake = supa
    fake.max_object_bytes = 1000
    (big := tmp_path / "big.mp4").write_bytes(b"v" * 5000)
    before = len(fake.requests)
    with pytest.raises(StoreError) as err:
        store.enqueue("mug", "cup", big, "big-1")
    text = str(err.value)
    assert "upload videos/big-1/big.mp4" in text and "too large" in text and "infra/supabase/README.md" in text
    assert len(fake.requests) == before + 1  # not retried
