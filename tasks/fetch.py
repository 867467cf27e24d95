"""Fetch: a published product's model back out of any store, every byte verified.

The reverse of ``tasks.upload``: read the product's row, its manifest, download the parts (a
few at a time), and join each asset with ``tasks.shard.reassemble``, which checks the sha256
of every part and of the whole. ``korokoro fetch unique_id=<id> out=<dir>`` runs it.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tasks.shard import MANIFEST_NAME, ManifestError, load_manifest, manifest_parts, reassemble
from tasks.storage.base import ProductStore, StoreError, check_unique_id


@dataclass(frozen=True)
class FetchedModel:
    """What ``fetch_model`` wrote: one file per manifest asset, and the manifest beside them."""

    unique_id: str
    manifest_key: str
    manifest: Path
    files: tuple[Path, ...]


def fetch_model(store: ProductStore, unique_id: str, out_dir: Path, workers: int = 4) -> FetchedModel:
    """Reassemble the DONE product ``unique_id``'s model into ``out_dir``.

    Raises StoreError when the product is missing or not DONE, ManifestError when its manifest
    or a part is missing, unreadable or corrupt; nothing is left in ``out_dir`` but whole,
    verified files.
    """
    uid = check_unique_id(unique_id)
    product = store.get(uid)
    if product.status != "DONE" or not product.model_manifest:
        why = f" ({product.error})" if product.error else ""
        raise StoreError(
            f"product {uid} is {product.status}{why}, not DONE: it has no published model to fetch"
            + ("; see `korokoro list`" if product.status != "FAILED" else "; fix the cause and add it again")
        )
    manifest_key = product.model_manifest
    prefix = manifest_key.rsplit("/", 1)[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out_dir) as scratch:
        tmp = Path(scratch)
        try:
            raw = store.get_object(manifest_key, tmp / MANIFEST_NAME).read_bytes()
        except StoreError as exc:
            raise ManifestError(f"the manifest {manifest_key} of DONE product {uid} cannot be read: {exc}") from None
        manifest = load_manifest(raw, manifest_key)
        if manifest.get("unique_id") not in (None, uid):
            raise ManifestError(f"the manifest {manifest_key} belongs to {manifest['unique_id']!r}, not {uid!r}")

        def download(part: dict) -> None:
            key = f"{prefix}/{part['name']}"
            try:
                store.get_object(key, tmp / part["name"])
            except StoreError as exc:
                raise ManifestError(f"part {key} of {uid} is missing or unreadable: {exc}") from None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(download, manifest_parts(manifest)))
        files = []
        for asset in manifest["assets"]:
            dest = out_dir / asset["name"]
            reassemble(manifest, asset["name"], lambda name: (tmp / name).read_bytes(), dest)
            files.append(dest)
        shutil.copyfile(tmp / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    return FetchedModel(uid, manifest_key, out_dir / MANIFEST_NAME, tuple(files))
