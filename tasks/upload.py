"""Upload: publish the parts, then the manifest, last.

Parts go first (upserts: a re-upload replaces them), the manifest only after every part is
in; a reader that finds the manifest finds all its parts. The flow marks the row DONE only
after this returns.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.shard import MANIFEST_NAME, content_type
from tasks.storage.base import ProductStore, check_unique_id
from tasks.types import Publication, ShardSet


def model_prefix(unique_id: str) -> str:
    return f"models/{check_unique_id(unique_id)}"


def publish_model(
    shards: ShardSet, store: ProductStore, unique_id: str, out_dir: Path, fingerprint: str
) -> Publication:
    """Upload every part listed in the manifest, then the manifest; note what went where
    in ``out_dir/published.json``."""
    prefix = model_prefix(unique_id)
    manifest_path = Path(shards.manifests[0])
    manifest = json.loads(manifest_path.read_text())
    keys = []
    for asset in manifest["assets"]:
        for part in asset["parts"]:
            key = f"{prefix}/{part['name']}"
            store.put_object(key, Path(shards.dir) / part["name"], "application/octet-stream")
            keys.append(key)
    manifest_key = f"{prefix}/{MANIFEST_NAME}"
    store.put_object(manifest_key, manifest_path, content_type(manifest_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "published.json").write_text(json.dumps({"manifest": manifest_key, "parts": keys}, indent=1))
    return Publication(unique_id=unique_id, manifest_key=manifest_key, object_keys=tuple(keys), fingerprint=fingerprint)
