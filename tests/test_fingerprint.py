"""Content keys: the same inputs give the same key; settings, code and helpers change it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.fingerprint import _module_files, hash_file, source_digest, stage_fingerprint


def test_hash_file_reads_in_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    (p := tmp_path / "v.mp4").write_bytes(data)
    assert hash_file(p, chunk_bytes=7) == hashlib.sha256(data).hexdigest()


def test_key_follows_upstream_and_settings_not_their_order() -> None:
    a = stage_fingerprint("mesh", ["up1"], {"x": 1, "y": 2}, ("tasks.shard",))
    assert a == stage_fingerprint("mesh", ["up1"], {"y": 2, "x": 1}, ("tasks.shard",))
    assert a != stage_fingerprint("mesh", ["up2"], {"x": 1, "y": 2}, ("tasks.shard",))
    assert a != stage_fingerprint("mesh", ["up1"], {"x": 1, "y": 3}, ("tasks.shard",))
    assert a != stage_fingerprint("shard", ["up1"], {"x": 1, "y": 2}, ("tasks.shard",))


def test_code_digest_covers_helper_modules_a_stage_imports() -> None:
    # tasks.segment imports tasks.isolation_geometry: editing that helper must change the key.
    direct = hashlib.sha256()
    for file in _module_files("tasks.segment"):
        direct.update(file.name.encode())
        direct.update(file.read_bytes())
    assert source_digest(("tasks.segment",)) != direct.hexdigest()
    helper = _module_files("tasks.isolation_geometry")[0].read_bytes()
    assert helper  # the helper is part of what the digest reads (see fingerprint._project_imports)
    from tasks.fingerprint import _project_imports

    deps = _project_imports(_module_files("tasks.segment")[0], "tasks.")
    assert "tasks.isolation_geometry" in deps
