"""The products queue on plain PostgreSQL, through the SQL functions of
``infra/supabase/001_products_queue.sql`` (the same ones the Supabase backend calls over HTTP).

:class:`PostgresStore` pairs that queue with a folder bucket (the local backend's), for a
self-hosted PostgreSQL shared by several workers on one machine (or one shared folder), and for
tests of the SQL. ``storage=postgres`` opens it; the connection string comes from the
environment only (``KOROKORO_PG_DSN``, libpq syntax: ``host=... dbname=... user=...`` or
``postgresql://...``), never from conf, and never appears in a repr or an error message.
Needs ``psycopg`` (v3).

:func:`product_from_row` turns a row (from psycopg or from PostgREST's JSON) into a
:class:`~tasks.types.Product`; the Supabase backend uses it too.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, Mapping

from tasks.storage.base import (
    ProductNotFound,
    StorageSettings,
    StoreError,
    TransientStoreError,
    check_object_key,
    check_unique_id,
    register_store,
    upload_video,
)
from tasks.storage.local import LocalStore
from tasks.types import Product

_PRODUCT_FIELDS = (
    "unique_id", "title", "category", "video_link", "status", "error", "attempts", "model_manifest",
    "claimed_by", "claimed_at", "created_at", "updated_at",
)
_TIMES = ("claimed_at", "created_at", "updated_at")
ENV_DSN = "KOROKORO_PG_DSN"


def _epoch(value: Any) -> float | None:
    """timestamptz (datetime, or PostgREST's ISO text) → seconds since the epoch."""
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.timestamp()
    raise StoreError(f"unexpected timestamp {value!r} in a products row")


def product_from_row(row: Mapping[str, Any]) -> Product:
    """A products row (any extra seed columns ignored) as a :class:`Product`."""
    values = {k: row.get(k) for k in _PRODUCT_FIELDS}
    for k in _TIMES:
        values[k] = _epoch(values[k])
    values["status"] = str(values["status"]) if values["status"] is not None else "IDLE"
    values["attempts"] = int(values["attempts"] or 0)
    values["title"] = values["title"] or ""
    values["category"] = values["category"] or "others"
    values["video_link"] = values["video_link"] or ""
    return Product(**values)


def lease_text(lease_s: float) -> str:
    """A lease in seconds as PostgreSQL interval text (negative = already expired)."""
    return f"{float(lease_s):.3f} seconds"


class PostgresQueue:
    """Queue methods of :class:`~tasks.storage.base.ProductStore` over psycopg. One short
    connection per call (thread- and fork-safe); every call is one atomic SQL function call."""

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StoreError('the PostgreSQL queue needs psycopg: pip install "psycopg[binary]"') from exc
        self.dsn = dsn
        self._secrets = _dsn_secrets(dsn)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<dsn hidden>)"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _run(self, what: str, sql: str, params: Mapping[str, Any] | tuple = ()) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        err: StoreError | None = None
        try:
            with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row, connect_timeout=10) as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.errors.NoDataFound as exc:
            err = ProductNotFound(exc.diag.message_primary or f"{what}: not found")
        except psycopg.errors.RaiseException as exc:  # P0001
            err = StoreError(exc.diag.message_primary or str(exc))
        except psycopg.Error as exc:
            # Client-side errors (no server, a bad DSN) have no diag; their text may quote the
            # DSN, so it goes through the scrubber.
            primary = getattr(exc.diag, "message_primary", None) or f"{type(exc).__name__}: {str(exc).strip()}"
            cls = TransientStoreError if _is_transient(exc) else StoreError
            err = cls(f"{what} failed: {primary} (SQLSTATE {exc.sqlstate or 'none'})")
        # Raised outside the except block: the psycopg exception (and the DSN it may hold) is not chained.
        raise type(err)(self._scrub(str(err)))

    def _one(self, rows: list[dict[str, Any]], uid: str) -> Product:
        if not rows:
            raise ProductNotFound(f"no product with unique_id {uid!r} in the products table")
        return product_from_row(rows[0])

    def enqueue_row(self, unique_id: str, title: str, category: str, video_link: str) -> Product:
        rows = self._run(
            "enqueue",
            "SELECT * FROM public.enqueue_product(uid => %s, title => %s, category => %s, video_link => %s)",
            (check_unique_id(unique_id), title, category, video_link),
        )
        return self._one(rows, unique_id)

    def get(self, unique_id: str) -> Product:
        uid = check_unique_id(unique_id)
        return self._one(self._run("get", "SELECT * FROM public.products WHERE unique_id = %s", (uid,)), uid)

    def list_products(self, status: str | None = None) -> list[Product]:
        if status is None:
            rows = self._run("list", "SELECT * FROM public.products ORDER BY created_at, unique_id")
        else:
            rows = self._run(
                "list", "SELECT * FROM public.products WHERE status = %s ORDER BY created_at, unique_id", (status,)
            )
        return [product_from_row(r) for r in rows]

    def claim_next(self, worker: str, lease_s: float, max_attempts: int) -> Product | None:
        rows = self._run(
            "claim_next",
            "SELECT * FROM public.claim_next_product(worker => %s, lease => %s::interval, max_attempts => %s)",
            (worker, lease_text(lease_s), int(max_attempts)),
        )
        return product_from_row(rows[0]) if rows else None

    def claim(self, unique_id: str, worker: str, lease_s: float) -> Product:
        uid = check_unique_id(unique_id)
        rows = self._run(
            "claim",
            "SELECT * FROM public.claim_product(uid => %s, worker => %s, lease => %s::interval)",
            (uid, worker, lease_text(lease_s)),
        )
        return self._one(rows, uid)

    def _mark_done_row(self, unique_id: str, manifest_key: str) -> Product:
        uid = check_unique_id(unique_id)
        rows = self._run(
            "mark_done", "SELECT * FROM public.mark_product_done(uid => %s, manifest => %s)", (uid, manifest_key)
        )
        return self._one(rows, uid)

    def mark_failed(self, unique_id: str, reason: str) -> Product:
        uid = check_unique_id(unique_id)
        rows = self._run(
            "mark_failed", "SELECT * FROM public.mark_product_failed(uid => %s, reason => %s)", (uid, reason[:2000])
        )
        return self._one(rows, uid)


# Worth another try: the connection failed (no SQLSTATE, or class 08), the server is shutting
# down or starting (57P01-57P03), or a transaction lost a race (40001, 40P01). SQL errors and
# the queue's own refusals (P0001, P0002, 55P03, 22023) are not.
_TRANSIENT_SQLSTATES = {"57P01", "57P02", "57P03", "40001", "40P01"}


def _is_transient(exc: Any) -> bool:
    import psycopg

    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in _TRANSIENT_SQLSTATES


def _dsn_secrets(dsn: str) -> list[str]:
    """The strings no message may show: the whole DSN and its password, longest first."""
    secrets = [dsn] if dsn else []
    try:
        from psycopg.conninfo import conninfo_to_dict

        password = conninfo_to_dict(dsn).get("password")
    except Exception:  # noqa: BLE001 - a malformed DSN is reported (scrubbed) when it is used
        password = None
    if password:
        secrets.append(str(password))
    return sorted(secrets, key=len, reverse=True)


class PostgresStore(PostgresQueue, LocalStore):
    """PostgreSQL queue + the local backend's folder bucket under ``settings.root``."""

    def __init__(self, settings: StorageSettings, dsn: str) -> None:
        PostgresQueue.__init__(self, dsn)
        # The folder bucket only: no SQLite file is created.
        self.settings = settings
        self.root = Path(settings.root).expanduser().resolve()
        self.bucket = self.root / settings.bucket
        self.bucket.mkdir(parents=True, exist_ok=True)

    def enqueue(self, title: str, category: str, video: Path, unique_id: str | None = None) -> Product:
        uid, key = upload_video(self, video, unique_id)
        return self.enqueue_row(uid, title, category, key)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickles carry the settings only, never the DSN: the receiving process reads its own environment.
        return (_open_postgres, (self.settings,))

    def mark_done(self, unique_id: str, manifest_key: str) -> Product:
        check_object_key(manifest_key)
        if not self.object_exists(manifest_key):
            raise StoreError(f"cannot mark {unique_id} DONE: manifest {manifest_key} is not in the bucket")
        return self._mark_done_row(unique_id, manifest_key)


@register_store("postgres")
def _open_postgres(settings: StorageSettings) -> PostgresStore:
    """``storage=postgres``: the DSN from ``$KOROKORO_PG_DSN``, the bucket folder from conf."""
    dsn = (os.environ.get(ENV_DSN) or "").strip()
    if not dsn:
        raise StoreError(
            f"storage backend 'postgres' needs {ENV_DSN} in the environment: a libpq connection string "
            "such as 'host=/var/run/postgresql dbname=korokoro' or 'postgresql://user@host/korokoro', "
            "to a database holding infra/supabase/001_products_queue.sql"
        )
    return PostgresStore(settings, dsn)
