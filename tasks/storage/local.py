"""The embedded store: a SQLite ``products`` table and a folder bucket under one root.

Same semantics as the Supabase backend: atomic claims with leases and attempts, upserted
objects written atomically (temp file + rename), so a reader never sees half an object.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.storage.base import (
    ProductNotFound,
    StorageSettings,
    StoredObject,
    StoreError,
    check_object_key,
    check_unique_id,
    upload_video,
    register_store,
)
from tasks.types import Product

_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    unique_id      TEXT PRIMARY KEY,
    title          TEXT NOT NULL,
    category       TEXT NOT NULL DEFAULT 'others',
    price          REAL,
    video_link     TEXT NOT NULL,
    image_link     TEXT,
    status         TEXT NOT NULL DEFAULT 'IDLE'
                   CHECK (status IN ('IDLE', 'PROCESSING', 'DONE', 'FAILED')),
    error          TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    model_manifest TEXT,
    claimed_by     TEXT,
    claimed_at     REAL,
    lease_until    REAL,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS products_queue ON products (status, created_at);
"""

_COLUMNS = (
    "unique_id, title, category, video_link, status, error, attempts, model_manifest, "
    "claimed_by, claimed_at, created_at, updated_at"
)

# A row may be claimed when it waits (IDLE) or its worker's lease ran out (PROCESSING).
_CLAIMABLE = "(status = 'IDLE' OR (status = 'PROCESSING' AND lease_until < :now))"


def _row_to_product(row: sqlite3.Row) -> Product:
    return Product(**{k: row[k] for k in row.keys()})


class LocalStore:
    """SQLite + folder implementation of :class:`tasks.storage.base.ProductStore`."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.root = Path(settings.root).expanduser().resolve()
        self.bucket = self.root / settings.bucket
        self.bucket.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "products.sqlite3"
        with self._db() as db:
            db.executescript(_SCHEMA)

    # -- database ---------------------------------------------------------------------------
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        try:
            yield db
        finally:
            db.close()

    def _select(self, db: sqlite3.Connection, unique_id: str) -> Product:
        row = db.execute(f"SELECT {_COLUMNS} FROM products WHERE unique_id = ?", (unique_id,)).fetchone()
        if row is None:
            raise ProductNotFound(f"no product with unique_id {unique_id!r} in {self.db_path}")
        return _row_to_product(row)

    def _update(self, unique_id: str, sql_set: str, **params: object) -> Product:
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                f"UPDATE products SET {sql_set}, updated_at = :now WHERE unique_id = :uid",
                {"uid": unique_id, "now": now, **params},
            )
            if cur.rowcount == 0:
                db.execute("ROLLBACK")
                raise ProductNotFound(f"no product with unique_id {unique_id!r} in {self.db_path}")
            db.execute("COMMIT")
            return self._select(db, unique_id)

    # -- queue ------------------------------------------------------------------------------
    def enqueue(self, title: str, category: str, video: Path, unique_id: str | None = None) -> Product:
        uid, key = upload_video(self, video, unique_id)
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            exists = db.execute("SELECT 1 FROM products WHERE unique_id = ?", (uid,)).fetchone()
            if exists:
                # Re-adding a product resets it to the queue with its new video.
                db.execute(
                    "UPDATE products SET title=?, category=?, video_link=?, status='IDLE', error=NULL, "
                    "attempts=0, claimed_by=NULL, claimed_at=NULL, lease_until=NULL, updated_at=? "
                    "WHERE unique_id=?",
                    (title, category, key, now, uid),
                )
            else:
                db.execute(
                    "INSERT INTO products (unique_id, title, category, video_link, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (uid, title, category, key, now, now),
                )
            db.execute("COMMIT")
            return self._select(db, uid)

    def get(self, unique_id: str) -> Product:
        with self._db() as db:
            return self._select(db, check_unique_id(unique_id))

    def list_products(self, status: str | None = None) -> list[Product]:
        with self._db() as db:
            if status is None:
                rows = db.execute(f"SELECT {_COLUMNS} FROM products ORDER BY created_at").fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM products WHERE status = ? ORDER BY created_at", (status,)
                ).fetchall()
            return [_row_to_product(r) for r in rows]

    def claim_next(self, worker: str, lease_s: float, max_attempts: int) -> Product | None:
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            # Rows whose attempts are used up leave the queue for good, with the reason kept.
            db.execute(
                f"UPDATE products SET status='FAILED', updated_at=:now, "
                f"error=COALESCE(error, 'gave up after ' || attempts || ' attempts') "
                f"WHERE {_CLAIMABLE} AND attempts >= :max",
                {"now": now, "max": max_attempts},
            )
            row = db.execute(
                f"UPDATE products SET status='PROCESSING', claimed_by=:worker, claimed_at=:now, "
                f"lease_until=:until, attempts=attempts+1, updated_at=:now "
                f"WHERE unique_id = (SELECT unique_id FROM products WHERE {_CLAIMABLE} "
                f"ORDER BY created_at LIMIT 1) RETURNING unique_id",
                {"worker": worker, "now": now, "until": now + lease_s},
            ).fetchone()
            db.execute("COMMIT")
            return self._select(db, row["unique_id"]) if row else None

    def claim(self, unique_id: str, worker: str, lease_s: float) -> Product:
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            current = self._select(db, check_unique_id(unique_id))
            row = db.execute(
                "SELECT lease_until FROM products WHERE unique_id = ?", (unique_id,)
            ).fetchone()
            if current.status == "PROCESSING" and current.claimed_by != worker and (row[0] or 0) > now:
                db.execute("ROLLBACK")
                raise StoreError(
                    f"product {unique_id} is being processed by {current.claimed_by} "
                    f"(lease ends in {row[0] - now:.0f} s); wait or use another unique_id"
                )
            db.execute(
                "UPDATE products SET status='PROCESSING', claimed_by=?, claimed_at=?, lease_until=?, "
                "attempts=attempts+1, error=NULL, updated_at=? WHERE unique_id=?",
                (worker, now, now + lease_s, now, unique_id),
            )
            db.execute("COMMIT")
            return self._select(db, unique_id)

    def mark_done(self, unique_id: str, manifest_key: str) -> Product:
        check_object_key(manifest_key)
        if not self.object_exists(manifest_key):
            raise StoreError(f"cannot mark {unique_id} DONE: manifest {manifest_key} is not in the bucket")
        return self._update(
            unique_id,
            "status='DONE', model_manifest=:manifest, error=NULL, lease_until=NULL",
            manifest=manifest_key,
        )

    def mark_failed(self, unique_id: str, reason: str) -> Product:
        return self._update(unique_id, "status='FAILED', error=:reason, lease_until=NULL", reason=reason[:2000])

    # -- bucket -----------------------------------------------------------------------------
    def _object_path(self, key: str) -> Path:
        return self.bucket / check_object_key(key)

    def fetch_video(self, product: Product, dest: Path, max_bytes: int) -> Path:
        src = self._object_path(product.video_link)
        if not src.is_file():
            raise StoreError(f"video {product.video_link} of product {product.unique_id} is not in the bucket")
        size = src.stat().st_size
        if size > max_bytes:
            raise StoreError(
                f"video {product.video_link} is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit "
                "(storage.max_video_bytes); upload a shorter or lower-resolution video"
            )
        return self._copy_atomic(src, dest)

    def put_object(self, key: str, src: Path, content_type: str = "application/octet-stream") -> None:
        self._copy_atomic(Path(src), self._object_path(key))

    def get_object(self, key: str, dest: Path) -> Path:
        src = self._object_path(key)
        if not src.is_file():
            raise StoreError(f"object {key} is not in the bucket {self.bucket}")
        return self._copy_atomic(src, Path(dest))

    def object_exists(self, key: str) -> bool:
        return self._object_path(key).is_file()

    def list_objects(self, prefix: str) -> list[StoredObject]:
        folder = self._object_path(prefix.rstrip("/"))
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(folder.iterdir()):
            # Temp files of writes in progress start with '.', which no key may: they are not objects.
            if path.name.startswith(".") or not path.is_file():
                continue
            try:
                found.append(StoredObject(f"{prefix.rstrip('/')}/{path.name}", path.stat().st_size))
            except FileNotFoundError:  # deleted by another worker meanwhile
                pass
        return found

    def delete_object(self, key: str) -> None:
        self._object_path(key).unlink(missing_ok=True)

    def object_version(self, key: str) -> str:
        """Changes whenever the object is replaced (size and modification time)."""
        stat = self._object_path(key).stat()
        return f"{stat.st_size}-{stat.st_mtime_ns}"

    def object_path(self, key: str) -> Path:
        """Where an object lives on disk (local backend only: for viewers and reports)."""
        return self._object_path(key)

    @staticmethod
    def _copy_atomic(src: Path, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 8 << 20)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest


@register_store("local")
def _open_local(settings: StorageSettings) -> LocalStore:
    return LocalStore(settings)
