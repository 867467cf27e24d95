"""The products queue and object bucket, as one interface every backend implements.

The seed kept its queue in a Supabase table and its models in a Supabase bucket. KoroKoro's
embedded default is a SQLite table and a folder (``tasks.storage.local``); the Supabase backend
implements the same methods with the same meaning, so flows never know which one they talk to.

``open_store`` wraps the backend: object calls are retried on transient errors
(``tasks.storage.retry``, settings ``storage.retry``), and with ``storage.faults`` set, faults
are injected beneath the retries (``tasks.storage.faulty``, for tests and chaos runs).
"""

from __future__ import annotations

import mimetypes
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from tasks.types import Product

STATUSES = ("IDLE", "PROCESSING", "DONE", "FAILED")

# unique_ids become folder and object names: letters, digits, '-' and '_' only, so no id can
# climb out of its folder ("../../etc") or smuggle a separator.
_UNIQUE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Object keys are '/'-separated segments of the same safe alphabet plus '.'.
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class StoreError(RuntimeError):
    """The store refused or failed an operation; the message says which and why."""


class ProductNotFound(StoreError):
    pass


class TransientStoreError(StoreError):
    """A failure worth another try: a timeout, a dropped connection, HTTP 5xx or 429.

    Backends raise it (scrubbed, like any StoreError); every other StoreError is permanent.
    """


@dataclass(frozen=True)
class StoredObject:
    """One object of the bucket, as ``list_objects`` reports it (``size`` None: not reported)."""

    key: str
    size: int | None


def check_unique_id(unique_id: str) -> str:
    """Return ``unique_id`` if it is safe to use as a folder name, else raise with the rule."""
    if not isinstance(unique_id, str) or not _UNIQUE_ID.match(unique_id):
        raise StoreError(
            f"invalid unique_id {unique_id!r}: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return unique_id


def check_object_key(key: str) -> str:
    """Return ``key`` if every '/'-separated segment is safe (no '..', no absolute path)."""
    segments = key.split("/")
    if not key or any(not _KEY_SEGMENT.match(s) or s in (".", "..") for s in segments):
        raise StoreError(f"invalid object key {key!r}: use '/'-separated names of letters, digits, '.', '-', '_'")
    return key


def safe_file_name(name: str) -> str:
    """A seller's file name reduced to the safe alphabet (kept so errors can name the file)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name).lstrip("._") or "video"
    return stem[-100:]


def upload_video(store: "ProductStore", video: Path, unique_id: str | None) -> tuple[str, str]:
    """Check a seller's video, pick its unique_id and put it in the bucket; ``(uid, key)``.

    Every backend's ``enqueue`` starts here, so ids and video keys follow one rule. ``store`` is
    the bare backend (``enqueue`` runs inside it), so the upload is retried here.
    """
    from tasks.storage.retry import retry_settings, with_retries

    video = Path(video)
    if not video.is_file():
        raise StoreError(f"video {video} does not exist or is not a file")
    uid = check_unique_id(unique_id or uuid.uuid4().hex[:16])
    key = f"videos/{uid}/{safe_file_name(video.name)}"
    content_type = mimetypes.guess_type(video.name)[0] or "video/mp4"
    settings = getattr(store, "settings", None)
    with_retries(
        f"upload video {key}",
        lambda: store.put_object(key, video, content_type),
        retry_settings(settings.retry if settings is not None else {}),
    )
    return uid, key


@dataclass(frozen=True)
class StorageSettings:
    """``conf/storage/*.yaml``.

    ``retry``: :class:`tasks.storage.retry.RetrySettings` fields; ``faults``: None, or a list of
    :class:`tasks.storage.faulty.FaultRule` fields (chaos runs only); ``fetch_workers``: parallel
    part downloads of ``korokoro fetch``.
    """

    backend: str
    root: str = "./korokoro-data/store"
    bucket: str = "korokoro_bucket"
    max_video_bytes: int = 2 << 30
    part_bytes: int = 45 << 20
    retry: dict[str, Any] = field(default_factory=dict)
    faults: list[dict[str, Any]] | None = None
    fetch_workers: int = 4


class ProductStore(Protocol):
    """Queue + bucket. Every method is safe to call from several workers at once."""

    def enqueue(self, title: str, category: str, video: Path, unique_id: str | None = None) -> Product:
        """Upload ``video`` to the bucket and add an IDLE product row."""

    def get(self, unique_id: str) -> Product:
        """The product's row; :class:`ProductNotFound` if there is none."""

    def list_products(self, status: str | None = None) -> list[Product]:
        """All rows (optionally of one status), oldest first."""

    def claim_next(self, worker: str, lease_s: float, max_attempts: int) -> Product | None:
        """Atomically take the oldest claimable product (IDLE, or PROCESSING with an expired
        lease) and mark it PROCESSING for ``worker``; None when the queue is empty."""

    def claim(self, unique_id: str, worker: str, lease_s: float) -> Product:
        """Take one named product (any status but a live lease held by another worker)."""

    def fetch_video(self, product: Product, dest: Path, max_bytes: int) -> Path:
        """Stream the product's video to ``dest``; refuse files over ``max_bytes``."""

    def put_object(self, key: str, src: Path, content_type: str = "application/octet-stream") -> None:
        """Store ``src`` under ``key``, replacing what was there (upsert: re-uploads are safe)."""

    def get_object(self, key: str, dest: Path) -> Path:
        """Copy the object at ``key`` to ``dest``."""

    def object_exists(self, key: str) -> bool: ...

    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every object directly under the folder ``prefix`` (no sub-folders), by key."""

    def delete_object(self, key: str) -> None:
        """Remove the object at ``key``; removing a missing object is not an error."""

    def object_version(self, key: str) -> str:
        """A token that changes whenever the object at ``key`` is replaced (etag, or size + mtime)."""

    def mark_done(self, unique_id: str, manifest_key: str) -> Product: ...

    def mark_failed(self, unique_id: str, reason: str) -> Product: ...


_BACKENDS: dict[str, Callable[[StorageSettings], ProductStore]] = {}


def register_store(name: str) -> Callable[[Callable[[StorageSettings], Any]], Callable[[StorageSettings], Any]]:
    def deco(factory: Callable[[StorageSettings], Any]) -> Callable[[StorageSettings], Any]:
        _BACKENDS[name] = factory
        return factory

    return deco


def open_store(settings: StorageSettings | dict[str, Any]) -> ProductStore:
    """The store a ``storage=`` config group describes: the backend, with faults injected when
    ``faults`` is set, and object calls retried on transient errors."""
    import tasks.storage.local  # noqa: F401  (registers "local")
    from tasks.storage.faulty import FaultyStore, fault_rules
    from tasks.storage.retry import RetryingStore, retry_settings

    if isinstance(settings, dict):
        settings = StorageSettings(**settings)
    if settings.backend == "supabase": import tasks.storage.supabase  # noqa: E701,F401  (registers "supabase")
    if settings.backend == "postgres": import tasks.storage.postgres_queue  # noqa: E701,F401  (registers "postgres")
    if settings.backend not in _BACKENDS:
        raise StoreError(f"unknown storage backend {settings.backend!r}; choose one of: {', '.join(sorted(_BACKENDS))}")
    retry = retry_settings(settings.retry)  # checked before anything is opened
    store: Any = _BACKENDS[settings.backend](settings)
    if settings.faults:
        store = FaultyStore(store, fault_rules(settings.faults))
    return RetryingStore(store, retry)
