"""Ingest: bring the product's video from the store to local disk and hash its content.

The sha256 computed here seeds every later stage's cache key, so a new video under the
same link reruns everything and the same video never reruns anything.
"""

from __future__ import annotations

from pathlib import Path

from tasks.fingerprint import hash_file
from tasks.storage.base import ProductStore, check_unique_id
from tasks.types import Product, VideoInput


def fetch_video(product: Product, store: ProductStore, out_dir: Path, max_bytes: int) -> VideoInput:
    """Stream the product's video into ``out_dir`` and describe it.

    The returned record's fingerprint is the video's sha256: content, not the path.
    """
    check_unique_id(product.unique_id)
    if not product.video_link:
        raise ValueError(f"product {product.unique_id} has no video_link; upload a video for it")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Keep the uploaded file's name: errors about the video then name the seller's file.
    local = store.fetch_video(product, out_dir / Path(product.video_link).name, max_bytes)
    digest = hash_file(local)
    return VideoInput(
        unique_id=product.unique_id,
        title=product.title,
        category=product.category,
        video=local,
        sha256=digest,
        size_bytes=local.stat().st_size,
        fingerprint=digest,
    )
