"""The Supabase backend: the ``products`` table as the queue, a Storage bucket for objects.

Queue operations are single calls of the SQL functions in
``infra/supabase/001_products_queue.sql`` (``client.rpc(...)``), so claims are atomic on the
server (``FOR UPDATE SKIP LOCKED``) whatever the number of workers. Objects go through
supabase-py's storage client (upserts); large downloads are streamed with httpx.

Credentials come from the environment only: ``SUPABASE_URL`` and ``SUPABASE_SERVICE_KEY`` (the
service role key: workers must write rows and objects that anon may only read). The key never
appears in a repr, a log line or an exception message: client errors are re-raised as
:class:`~tasks.storage.base.StoreError` with the key scrubbed and the original exception dropped.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import httpx

from tasks.storage.base import (
    ProductNotFound,
    StorageSettings,
    StoredObject,
    StoreError,
    TransientStoreError,
    check_object_key,
    check_unique_id,
    register_store,
    upload_video,
)
from tasks.storage.http_download import (
    Scrubber,
    display_url,
    is_transient_status,
    mib,
    scrub_http_logs,
    stream_to_file,
)
from tasks.storage.postgres_queue import lease_text, product_from_row
from tasks.types import Product

log = logging.getLogger(__name__)

ENV_URL = "SUPABASE_URL"
ENV_KEY = "SUPABASE_SERVICE_KEY"
TABLE = "products"
_COLUMNS = (
    "unique_id,title,category,video_link,status,error,attempts,model_manifest,"
    "claimed_by,claimed_at,created_at,updated_at"
)
_PAGE = 1000  # Supabase's default PostgREST max-rows
# Short CDN cache for the manifest (it is replaced on every publish); parts carry their
# content's hash in their names (tasks/shard.py), so a part never changes under its name.
_CACHE_CONTROL = "60"
_PART_CACHE_CONTROL = "31536000"
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
T = TypeVar("T")


def _lenient_key(key: str) -> str:
    """A bucket path written by someone else (the seed's ``public/<file name>``): any characters
    but no empty, '.' or '..' segment, no backslash, no control character."""
    segments = key.split("/")
    if (
        not key
        or any(s in ("", ".", "..") for s in segments)
        or "\\" in key
        or any(ord(c) < 32 or ord(c) == 127 for c in key)
    ):
        raise StoreError(f"invalid video path {key!r} in the products table")
    return key


class SupabaseStore:
    """:class:`~tasks.storage.base.ProductStore` on Supabase (PostgREST RPC + Storage)."""

    def __init__(
        self,
        settings: StorageSettings,
        *,
        environ: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        """``environ`` (default ``os.environ``) supplies the URL and key; ``http_client`` lets
        tests inject a transport. Both are for tests and embedding; flows use ``open_store``."""
        env = os.environ if environ is None else environ
        url = (env.get(ENV_URL) or "").strip().rstrip("/")
        key = (env.get(ENV_KEY) or "").strip()
        if not url:
            raise StoreError(f"storage backend 'supabase' needs {ENV_URL} (https://<project>.supabase.co) in the environment")
        if not key:
            raise StoreError(
                f"storage backend 'supabase' needs {ENV_KEY} in the environment: the project's service role "
                "(secret) key, not the anon key"
            )
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" and not (parsed.scheme == "http" and parsed.hostname in _LOOPBACK):
            raise StoreError(
                f"{ENV_URL} must be an https URL (http only for a local Supabase on localhost), got {display_url(url)}"
            )
        self.settings = settings
        self.url = url
        self.bucket_name = settings.bucket
        self._scrub = Scrubber(key)
        scrub_http_logs(self._scrub)
        self._host = parsed.hostname
        # Our own client, with no default headers: supabase-py adds the key per request, and
        # foreign video URLs are fetched with it too (so they never see the key).
        self._http = http_client or httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=False
        )
        self._client = self._guard("connect to Supabase", lambda: self._make_client(url, key))

    def _make_client(self, url: str, key: str) -> Any:
        from supabase import ClientOptions, create_client

        options = ClientOptions(
            httpx_client=self._http,
            auto_refresh_token=False,
            persist_session=False,
        )
        return create_client(url, key, options)

    # -- safety ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"SupabaseStore(url={self.url!r}, bucket={self.bucket_name!r})"

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        # Pickles (Prefect parameters, process pools) carry the settings only, never the key:
        # the receiving process reads its own environment.
        return (SupabaseStore, (self.settings,))

    def _translate(self, what: str, exc: BaseException) -> StoreError:
        from postgrest.exceptions import APIError
        from storage3.exceptions import StorageApiError

        if isinstance(exc, StoreError):
            return type(exc)(self._scrub(str(exc)))
        if isinstance(exc, APIError):
            detail = exc.message or "no message"
            if exc.code == "P0002":
                return ProductNotFound(self._scrub(detail))
            if exc.code in ("P0001", "55P03", "22023"):
                return StoreError(self._scrub(detail))
            extra = f"; hint: {exc.hint}" if exc.hint else ""
            return StoreError(self._scrub(f"{what} failed: {detail} (code {exc.code}){extra}"))
        if isinstance(exc, StorageApiError):
            status = int(exc.status) if str(exc.status).isdigit() else 0
            if status == 413:
                return StoreError(self._scrub(
                    f"{what} failed: Supabase Storage refused it as too large ({exc.message}). Standard uploads "
                    "stop at the project's file size limit (50 MB on the Free plan) and supabase-py 2.34 has no "
                    "resumable upload: raise the limit in the project's Storage settings, or upload a smaller "
                    "video (see infra/supabase/README.md)"
                ))
            cls = TransientStoreError if is_transient_status(status) else StoreError
            return cls(self._scrub(f"{what} failed: {exc.message} (storage {exc.code}, status {exc.status})"))
        if isinstance(exc, httpx.HTTPError):
            where = ""
            try:
                where = f" ({exc.request.method} {display_url(str(exc.request.url))})"
            except RuntimeError:
                pass
            # No answer at all (timeout, refused or dropped connection): worth another try.
            cls = TransientStoreError if isinstance(exc, httpx.TransportError) else StoreError
            return cls(self._scrub(f"{what} failed: {type(exc).__name__}: {exc}{where}"))
        return StoreError(self._scrub(f"{what} failed: {type(exc).__name__}: {exc}"))

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; re-raise any failure as a scrubbed StoreError *outside* the except
        block, so the original exception (which may hold headers) is not chained."""
        try:
            return fn()
        except BaseException as exc:  # noqa: BLE001
            if not isinstance(exc, Exception):
                raise
            err = self._translate(what, exc)
        raise err

    def _auth_headers(self) -> dict[str, str]:
        headers = self._client.options.headers
        return {k: v for k, v in headers.items() if k.lower() in ("apikey", "authorization")}

    def _rpc(self, what: str, fn: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            data = self._client.rpc(fn, params).execute().data
            if data is None:
                return []
            return data if isinstance(data, list) else [data]

        return self._guard(what, call)

    @staticmethod
    def _one(rows: list[dict[str, Any]], uid: str) -> Product:
        if not rows:
            raise ProductNotFound(f"no product with unique_id {uid!r} in the Supabase table {TABLE}")
        return product_from_row(rows[0])

    # -- queue ------------------------------------------------------------------------------
    def enqueue(self, title: str, category: str, video: Path, unique_id: str | None = None) -> Product:
        uid, key = upload_video(self, video, unique_id)
        rows = self._rpc(
            f"enqueue {uid}", "enqueue_product",
            {"uid": uid, "title": title, "category": category, "video_link": key},
        )
        return self._one(rows, uid)

    def get(self, unique_id: str) -> Product:
        uid = check_unique_id(unique_id)
        rows = self._guard(
            f"read product {uid}",
            lambda: self._client.table(TABLE).select(_COLUMNS).eq("unique_id", uid).execute().data,
        )
        return self._one(rows, uid)

    def list_products(self, status: str | None = None) -> list[Product]:
        out: list[Product] = []
        start = 0
        while True:
            def page(start: int = start) -> list[dict[str, Any]]:
                q = self._client.table(TABLE).select(_COLUMNS)
                if status is not None:
                    q = q.eq("status", status)
                return q.order("created_at").order("unique_id").range(start, start + _PAGE - 1).execute().data

            rows = self._guard("list products", page)
            out += [product_from_row(r) for r in rows]
            if len(rows) < _PAGE:
                return out
            start += _PAGE

    def claim_next(self, worker: str, lease_s: float, max_attempts: int) -> Product | None:
        rows = self._rpc(
            "claim the next product", "claim_next_product",
            {"worker": worker, "lease": lease_text(lease_s), "max_attempts": int(max_attempts)},
        )
        if not rows:
            return None
        product = product_from_row(rows[0])
        log.info("worker %s claimed %s (attempt %d)", worker, product.unique_id, product.attempts)
        return product

    def claim(self, unique_id: str, worker: str, lease_s: float) -> Product:
        uid = check_unique_id(unique_id)
        rows = self._rpc(
            f"claim {uid}", "claim_product", {"uid": uid, "worker": worker, "lease": lease_text(lease_s)}
        )
        return self._one(rows, uid)

    def mark_done(self, unique_id: str, manifest_key: str) -> Product:
        uid = check_unique_id(unique_id)
        check_object_key(manifest_key)
        if not self.object_exists(manifest_key):
            raise StoreError(f"cannot mark {uid} DONE: manifest {manifest_key} is not in the bucket")
        rows = self._rpc(f"mark {uid} DONE", "mark_product_done", {"uid": uid, "manifest": manifest_key})
        return self._one(rows, uid)

    def mark_failed(self, unique_id: str, reason: str) -> Product:
        uid = check_unique_id(unique_id)
        rows = self._rpc(f"mark {uid} FAILED", "mark_product_failed", {"uid": uid, "reason": reason[:2000]})
        return self._one(rows, uid)

    # -- bucket -----------------------------------------------------------------------------
    def _bucket(self) -> Any:
        return self._client.storage.from_(self.bucket_name)

    def _object_url(self, key: str) -> str:
        """The authenticated download URL of ``key`` in our bucket (as storage3 builds it)."""
        return str(self._client.storage_url.joinpath("object", self.bucket_name, *key.split("/")))

    def _own_object_key(self, link: str) -> str | None:
        """The bucket path of a URL that points into our own bucket, else None."""
        parts = urllib.parse.urlsplit(link)
        own = urllib.parse.urlsplit(self.url)
        if (parts.scheme, parts.netloc) != (own.scheme, own.netloc):
            return None
        prefix = own.path.rstrip("/") + "/storage/v1/object/"
        if not parts.path.startswith(prefix):
            return None
        rest = urllib.parse.unquote(parts.path[len(prefix):]).split("/")
        if rest and rest[0] in ("public", "authenticated"):
            rest = rest[1:]
        if len(rest) < 2 or rest[0] != self.bucket_name:
            return None  # signed URLs and other buckets are fetched as they are
        return "/".join(rest[1:])

    def fetch_video(self, product: Product, dest: Path, max_bytes: int) -> Path:
        link = (product.video_link or "").strip()
        if not link:
            raise StoreError(f"product {product.unique_id} has no video_link")
        if "://" in link:
            key = self._own_object_key(link)
            if key is None:
                scheme = urllib.parse.urlsplit(link).scheme
                if scheme != "https":
                    raise StoreError(f"video link of {product.unique_id} must be https or a bucket path, got {display_url(link)}")
                # A foreign URL: fetched without our key, redirects followed.
                return self._stream(link, Path(dest), max_bytes, what=f"video of {product.unique_id}", authed=False)
        else:
            key = link.lstrip("/")
        key = _lenient_key(key)
        return self._stream(self._object_url(key), Path(dest), max_bytes, what=f"video {key}", authed=True)

    def _stream(self, url: str, dest: Path, max_bytes: int | None, what: str, authed: bool) -> Path:
        """GET ``url`` into ``dest``, refusing bodies over ``max_bytes``; our key only for our URLs."""
        missing = f"{what} is not in the bucket {self.bucket_name}" if authed else None
        return self._guard(
            f"download {what}",
            lambda: stream_to_file(
                self._http, url, dest, max_bytes, what,
                headers=self._auth_headers() if authed else {}, follow_redirects=not authed, missing=missing,
            ),
        )

    def put_object(self, key: str, src: Path, content_type: str = "application/octet-stream") -> None:
        check_object_key(key)
        src = Path(src)
        if not src.is_file():
            raise StoreError(f"cannot upload {key}: {src} is not a file")
        cache = _PART_CACHE_CONTROL if ".part-" in key.rsplit("/", 1)[-1] else _CACHE_CONTROL
        options = {"upsert": "true", "content-type": content_type, "cache-control": cache}
        what = f"upload {key} ({mib(src.stat().st_size)})"
        self._guard(what, lambda: self._bucket().upload(key, str(src), options))

    def get_object(self, key: str, dest: Path) -> Path:
        check_object_key(key)
        return self._stream(self._object_url(key), Path(dest), None, what=f"object {key}", authed=True)

    def object_exists(self, key: str) -> bool:
        check_object_key(key)
        return self._guard(f"look up {key}", lambda: self._bucket().exists(key))

    def list_objects(self, prefix: str) -> list[StoredObject]:
        """One folder of the bucket, a page of ``_PAGE`` at a time (folders themselves skipped)."""
        folder = check_object_key(prefix.rstrip("/"))

        def read() -> list[StoredObject]:
            found: list[StoredObject] = []
            offset = 0
            while True:
                page = self._bucket().list(folder, {"limit": _PAGE, "offset": offset}) or []
                for entry in page:
                    if entry.get("id") is None:  # a sub-folder: Storage lists it with id null
                        continue
                    size = (entry.get("metadata") or {}).get("size")
                    found.append(StoredObject(f"{folder}/{entry['name']}", int(size) if size is not None else None))
                if len(page) < _PAGE:
                    return sorted(found, key=lambda o: o.key)
                offset += _PAGE

        return self._guard(f"list {folder}/", read)

    def delete_object(self, key: str) -> None:
        check_object_key(key)
        # Storage answers 200 with the removed objects; a missing key is simply not among them.
        self._guard(f"delete {key}", lambda: self._bucket().remove([key]))

    def object_version(self, key: str) -> str:
        """The object's etag and version/last-modified from Storage; changes on every replace."""
        check_object_key(key)
        from storage3.exceptions import StorageApiError

        def read() -> str:
            try:
                info = self._bucket().info(key) or {}
            except StorageApiError as exc:
                if str(exc.status) == "404":
                    raise StoreError(f"object {key} is not in the bucket {self.bucket_name}") from None
                info = {}  # older Storage servers answer info without a JSON body
            except ValueError:
                info = {}
            token = "-".join(str(info[k]) for k in ("etag", "version", "last_modified") if info.get(k))
            if token:
                return token
            # Fall back on the listing, whose metadata carries the etag.
            folder, _, name = key.rpartition("/")
            for entry in self._bucket().list(folder or None, {"search": name, "limit": 100}) or []:
                if entry.get("name") == name:
                    meta = entry.get("metadata") or {}
                    parts = (meta.get("eTag"), entry.get("updated_at"), meta.get("size"))
                    token = "-".join(str(v) for v in parts if v)
                    if token:
                        return token
            raise StoreError(f"object {key} is not in the bucket {self.bucket_name} (no version to read)")

        return self._guard(f"read the version of {key}", read)


@register_store("supabase")
def _open_supabase(settings: StorageSettings) -> SupabaseStore:
    return SupabaseStore(settings)
