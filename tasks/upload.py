"""Upload: publish the parts, then the manifest, last; then remove parts no manifest needs.

Order is what keeps readers safe:

1. every part is uploaded (upserts, each retried on transient errors by the store);
2. the listing must show every part, whole, before anything else happens;
3. the manifest replaces the old one in one atomic object write: a reader finds either the old
   manifest (whose parts are untouched: part names carry their content hash, tasks/shard.py)
   or the new one, whose parts are all in;
4. parts under ``models/<uid>/`` that the new manifest does not list (an earlier model's, or a
   crashed publish's) are deleted.

A crash before 3 leaves the old published state (plus unreferenced parts, removed by the next
publish); a crash after 3 leaves the new one. The flow marks the row DONE only after this returns.
One publisher per product at a time is assumed (the queue's lease): a second, concurrent
publisher of the same product could have its fresh parts removed in step 4.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tasks.shard import MANIFEST_NAME, content_type, load_manifest, manifest_parts
from tasks.storage.base import ProductStore, StoreError, check_unique_id
from tasks.types import Publication, ShardSet

log = logging.getLogger(__name__)


def model_prefix(unique_id: str) -> str:
    return f"models/{check_unique_id(unique_id)}"


def is_part_key(key: str) -> bool:
    """Whether an object key names a model part (``<file>.part-NNNN-of-NNNN[.<hash>]``)."""
    return ".part-" in key.rsplit("/", 1)[-1]


def publish_model(
    shards: ShardSet, store: ProductStore, unique_id: str, out_dir: Path, fingerprint: str
) -> Publication:
    """Upload every part listed in the manifest, check they are all in, upload the manifest,
    delete parts it does not list; note what went where in ``out_dir/published.json``."""
    prefix = model_prefix(unique_id)
    manifest_path = Path(shards.manifests[0])
    parts = manifest_parts(load_manifest(manifest_path.read_bytes(), str(manifest_path)))
    keys = [f"{prefix}/{part['name']}" for part in parts]
    for key, part in zip(keys, parts):
        store.put_object(key, Path(shards.dir) / part["name"], "application/octet-stream")

    listed = store.list_objects(prefix)
    sizes = {obj.key: obj.size for obj in listed}
    missing = [k for k, p in zip(keys, parts) if k not in sizes or sizes[k] not in (None, p["size"])]
    if missing:
        raise StoreError(
            f"publish of {unique_id} stopped before its manifest: {len(missing)} of {len(keys)} parts are not "
            f"in the store whole after their upload ({', '.join(missing[:3])}); the old model stays published"
        )

    manifest_key = f"{prefix}/{MANIFEST_NAME}"
    store.put_object(manifest_key, manifest_path, content_type(manifest_path))

    wanted = set(keys)
    removed, left = [], []
    for obj in listed:
        if is_part_key(obj.key) and obj.key not in wanted:
            try:
                store.delete_object(obj.key)
                removed.append(obj.key)
            except StoreError as exc:  # the model is published; the next publish retries the clean-up
                log.warning("published %s but could not delete the stale part %s: %s", unique_id, obj.key, exc)
                left.append(obj.key)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"manifest": manifest_key, "parts": keys, "removed_stale_parts": removed, "stale_parts_left": left}
    (out_dir / "published.json").write_text(json.dumps(record, indent=1))
    return Publication(unique_id=unique_id, manifest_key=manifest_key, object_keys=tuple(keys), fingerprint=fingerprint)
