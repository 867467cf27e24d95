"""``korokoro fetch``: a DONE product's model back from any store, every part verified."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from flows import cli
from tasks.fetch import fetch_model
from tasks.shard import MANIFEST_NAME, ManifestError, split_file, write_manifest
from tasks.storage import StoreError, open_store
from tasks.types import ShardSet
from tasks.upload import publish_model
from tests.pg_cluster import new_database, pg_cluster  # noqa: F401  (fixture)
from tests.store_fixtures import backend, store, video  # noqa: F401  (fixtures)
from tests.supabase_standin import FAKE_KEY, FakeSupabase

GLB = bytes(range(251)) * 37  # 9287 bytes: 10 parts of 1000
MTL = b"newmtl material0\nKd 0.8 0.2 0.2\n"


def publish_done(store: Any, video: Path, tmp: Path, uid: str = "mug-5") -> dict[str, bytes]:
    """Enqueue, claim, publish a two-asset model and mark it DONE; the assets' bytes."""
    store.enqueue("mug", "cup", video, uid)
    store.claim(uid, "w1", 60)
    shards = tmp / "shards"
    shards.mkdir()
    assets = {"model.glb": GLB, "model.mtl": MTL}
    entries = []
    for name, data in assets.items():
        (tmp / name).write_bytes(data)
        entries.append(split_file(tmp / name, shards, part_bytes=1000))
    manifest = write_manifest(entries, uid, shards / MANIFEST_NAME, {})
    pub = publish_model(ShardSet(shards, (manifest,), 11, "f"), store, uid, tmp / "pub", "f")
    store.mark_done(uid, pub.manifest_key)
    return assets


def test_fetch_reassembles_and_verifies(store, video: Path, tmp_path: Path) -> None:
    assets = publish_done(store, video, tmp_path)
    got = fetch_model(store, "mug-5", tmp_path / "out", workers=3)
    assert {p.name: p.read_bytes() for p in got.files} == assets
    assert got.manifest == tmp_path / "out" / MANIFEST_NAME and got.manifest_key == "models/mug-5/manifest.json"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.glb", "model.mtl"]


def test_fetch_refuses_a_product_that_is_not_done(store, video: Path, tmp_path: Path) -> None:
    store.enqueue("mug", "cup", video, "mug-6")
    with pytest.raises(StoreError, match="product mug-6 is IDLE, not DONE"):
        fetch_model(store, "mug-6", tmp_path / "out")
    store.claim("mug-6", "w", 60)
    store.mark_failed("mug-6", "frames: the video has one frame")
    with pytest.raises(StoreError, match=r"is FAILED \(frames: the video has one frame\), not DONE"):
        fetch_model(store, "mug-6", tmp_path / "out")
    with pytest.raises(StoreError, match="no product with unique_id 'nope'"):
        fetch_model(store, "nope", tmp_path / "out")


def test_fetch_names_a_missing_or_corrupt_part(store, video: Path, tmp_path: Path) -> None:
    publish_done(store, video, tmp_path)
    parts = [o.key for o in store.list_objects("models/mug-5") if ".part-" in o.key]
    store.delete_object(parts[3])
    with pytest.raises(ManifestError, match=rf"part {parts[3]} of mug-5 is missing or unreadable: .*not in the bucket"):
        fetch_model(store, "mug-5", tmp_path / "out1")
    (wrong := tmp_path / "wrong").write_bytes(b"x" * 1000)  # right size, wrong bytes
    store.put_object(parts[3], wrong)
    with pytest.raises(ManifestError, match=r"part model\.glb\.part-0003-of-0010\.\w+ of model\.glb is corrupt"):
        fetch_model(store, "mug-5", tmp_path / "out2")
    assert not (tmp_path / "out2" / "model.glb").exists()  # nothing half-written
    assert not [p for p in (tmp_path / "out2").iterdir() if p.name.startswith(".")]


def test_korokoro_fetch_on_the_local_store(tmp_path: Path, video: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KOROKORO_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(sys, "argv", ["korokoro"])
    store = open_store({"backend": "local", "root": str(tmp_path / "data" / "store")})
    assets = publish_done(store, video, tmp_path)
    with pytest.raises(SystemExit) as done:
        cli.main(["fetch", "unique_id=mug-5", f"out={tmp_path / 'got'}"])
    assert done.value.code == 0
    assert (tmp_path / "got" / "model.glb").read_bytes() == assets["model.glb"]
    assert "every part's sha256 verified" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:  # default out: <data_dir>/fetched/<unique_id>
        cli.main(["fetch", "unique_id=mug-5"])
    assert done.value.code == 0 and (tmp_path / "data" / "fetched" / "mug-5" / "model.mtl").read_bytes() == MTL
    with pytest.raises(SystemExit) as done:
        cli.main(["fetch", "unique_id=ghost"])
    assert done.value.code == 1 and "no product with unique_id 'ghost'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="give the product: unique_id=<id>"):
        cli.main(["fetch"])


def test_korokoro_fetch_from_supabase(pg_cluster, tmp_path: Path, video: Path,  # noqa: F811
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """storage=supabase from the command line, against the loopback stand-in (SQL on PostgreSQL)."""
    fake = FakeSupabase(new_database(pg_cluster))
    try:
        monkeypatch.setenv("SUPABASE_URL", fake.url)
        monkeypatch.setenv("SUPABASE_SERVICE_KEY", FAKE_KEY)
        monkeypatch.setenv("KOROKORO_DATA", str(tmp_path / "data"))
        monkeypatch.setattr(sys, "argv", ["korokoro"])
        assets = publish_done(open_store({"backend": "supabase", "root": str(tmp_path)}), video, tmp_path)
        with pytest.raises(SystemExit) as done:
            cli.main(["fetch", "storage=supabase", "unique_id=mug-5", f"out={tmp_path / 'got'}"])
        assert done.value.code == 0
        assert {p.name: p.read_bytes() for p in (tmp_path / "got").glob("model.*")} == assets
        downloads = [r["path"] for r in fake.requests if r["method"] == "GET" and "/object/korokoro_bucket/" in r["path"]]
        assert len(downloads) == 12  # the manifest and 11 parts, each once
    finally:
        fake.close()
