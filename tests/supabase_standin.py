"""A loopback stand-in for Supabase's PostgREST + Storage endpoints, for the storage contract tests.

The real supabase-py client (SupabaseStore) talks HTTP to it on 127.0.0.1 only. RPC calls run
the SQL functions of infra/supabase/001_products_queue.sql on a throwaway cluster
(tests/pg_cluster.py) when a DSN is given; objects live in memory. It is *not* Supabase: it
mimics only the endpoints SupabaseStore calls, as documented (PostgREST JSON errors, Storage's
400-with-statusCode-404 for missing objects, list with limit/offset and null-id folders,
DELETE with ``{"prefixes": [...]}``, 413 over the project's file size limit).

``fail_next`` injects server-side faults: ``fake.fail_next.append(("POST", "/storage/v1/object/", 503))``
makes the next matching request answer that status (or ``"hang"``: no answer for ``hang_s``).
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import re
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAKE_KEY = "sb_secret_FAKEkeyForTests_0123456789abcdefDONOTLEAK"
_COLS = {
    "id", "unique_id", "title", "category", "price", "video_link", "image_link", "status", "error", "attempts",
    "model_manifest", "claimed_by", "claimed_at", "lease_until", "created_at", "updated_at",
}
_RPCS = {"claim_next_product", "claim_product", "enqueue_product", "mark_product_done", "mark_product_failed"}


# ------------------------------------------------------------------------------------------
# A loopback stand-in for Supabase's PostgREST + Storage endpoints
# ------------------------------------------------------------------------------------------
class FakeSupabase:
    """PostgREST (``/rest/v1``) and Storage (``/storage/v1``) on 127.0.0.1 for one test."""

    def __init__(self, dsn: str | None, key: str = FAKE_KEY, bucket: str = "korokoro_bucket") -> None:
        self.dsn, self.key, self.bucket = dsn, key, bucket
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.leak_key_in_errors = False
        self.fail_next: list[tuple[str, str, int | str]] = []  # (method, path prefix, status | "hang")
        self.hang_s = 3.0
        self.max_object_bytes: int | None = None  # the project's file size limit (413 above it)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_POST(self) -> None:
                fake.handle(self, "POST")

            def do_PUT(self) -> None:
                fake.handle(self, "PUT")

            def do_DELETE(self) -> None:
                fake.handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- plumbing -----------------------------------------------------------------------------
    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: Any, ctype: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urllib.parse.urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append({"method": method, "path": parts.path, "query": parts.query,
                                  "headers": {k.lower(): v for k, v in h.headers.items()}, "body": body})
        if self.leak_key_in_errors:  # a misbehaving proxy that echoes credentials into errors
            auth = h.headers.get("Authorization", "")
            return self.send(h, 500, {"message": f"upstream rejected {auth} apikey={h.headers.get('apikey')}",
                                      "code": "XX000", "statusCode": "500", "error": f"bad {auth}"})
        if h.headers.get("apikey") != self.key or h.headers.get("Authorization") != f"Bearer {self.key}":
            return self.send(h, 401, {"message": "Invalid API key", "code": "PGRST301", "statusCode": "401",
                                      "error": "Unauthorized"})
        path = urllib.parse.unquote(parts.path)
        with self.lock:
            fault = next((f for f in self.fail_next if f[0] == method and path.startswith(f[1])), None)
            if fault is not None:
                self.fail_next.remove(fault)
        if fault is not None and fault[2] == "hang":
            time.sleep(self.hang_s)  # answer nothing until the client has given up
            h.close_connection = True
            return None
        if fault is not None:
            status = int(fault[2])
            return self.send(h, status, {"statusCode": str(status), "error": "Injected",
                                         "message": f"injected {status}", "code": str(status)})
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        try:
            if path.startswith("/rest/v1/rpc/") and method == "POST":
                return self.rpc(h, path.rsplit("/", 1)[1], json.loads(body or b"{}"))
            if path == "/rest/v1/products" and method == "GET":
                return self.select(h, query)
            prefix = "/storage/v1/object/"
            if path.startswith(prefix + "info/") and method == "GET":
                return self.info(h, path[len(prefix + "info/"):])
            if path.startswith(prefix + "list/") and method == "POST":
                return self.list(h, path[len(prefix + "list/"):], json.loads(body))
            if path.startswith(prefix) and method == "POST":
                return self.upload(h, path[len(prefix):], body)
            if path.startswith(prefix) and method == "GET":
                return self.download(h, path[len(prefix):])
            if path.startswith(prefix) and method == "DELETE":
                return self.remove(h, path[len(prefix):], json.loads(body))
        except Exception as exc:  # noqa: BLE001
            return self.send(h, 500, {"message": f"fake server error: {exc}"})
        return self.send(h, 404, {"message": f"no route {method} {path}"})

    # -- PostgREST ------------------------------------------------------------------------------
    def db(self):
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def pg_error(self, h: BaseHTTPRequestHandler, exc: Any) -> None:
        status = 404 if exc.sqlstate == "P0002" else 400
        self.send(h, status, {"code": exc.sqlstate, "message": exc.diag.message_primary,
                              "details": exc.diag.message_detail, "hint": exc.diag.message_hint})

    def rpc(self, h: BaseHTTPRequestHandler, fn: str, args: dict[str, Any]) -> None:
        import psycopg
        from psycopg import sql

        assert fn in _RPCS and all(re.fullmatch(r"[a-z_]+", k) for k in args)
        call = sql.SQL("SELECT coalesce(json_agg(t), '[]'::json) FROM public.{}({}) AS t").format(
            sql.Identifier(fn),
            sql.SQL(", ").join(sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in args),
        )
        try:
            with self.db() as conn:  # PostgREST runs each request in one transaction, as json
                rows = conn.execute(call, args).fetchone()[0]
        except psycopg.Error as exc:
            return self.pg_error(h, exc)
        self.send(h, 200, rows)

    def select(self, h: BaseHTTPRequestHandler, query: list[tuple[str, str]]) -> None:
        from psycopg import sql

        cols, where, params, order, limit, offset = ["*"], [], [], [], None, None
        for k, v in query:
            if k == "select":
                cols = v.split(",")
                assert set(cols) <= _COLS
            elif k == "order":
                for item in v.split(","):
                    col, direction = item.split(".")[:2]
                    assert col in _COLS and direction in ("asc", "desc")
                    order.append(sql.SQL("{} {}").format(sql.Identifier(col), sql.SQL(direction.upper())))
            elif k == "limit":
                limit = int(v)
            elif k == "offset":
                offset = int(v)
            else:
                assert k in _COLS and v.startswith("eq."), (k, v)
                where.append(sql.SQL("{} = %s").format(sql.Identifier(k)))
                params.append(v[3:])
        q = sql.SQL("SELECT {} FROM public.products").format(
            sql.SQL("*") if cols == ["*"] else sql.SQL(", ").join(map(sql.Identifier, cols)))
        if where:
            q += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        if order:
            q += sql.SQL(" ORDER BY ") + sql.SQL(", ").join(order)
        if limit is not None:
            q += sql.SQL(f" LIMIT {limit}")
        if offset is not None:
            q += sql.SQL(f" OFFSET {offset}")
        with self.db() as conn:
            rows = conn.execute(sql.SQL("SELECT coalesce(json_agg(t), '[]'::json) FROM ({}) AS t").format(q),
                                params).fetchone()[0]
        self.send(h, 200, rows)

    # -- Storage --------------------------------------------------------------------------------
    def split(self, rest: str) -> str:
        bucket, _, key = rest.partition("/")
        assert bucket == self.bucket, bucket
        return key

    def not_found(self, h: BaseHTTPRequestHandler) -> None:
        # Supabase Storage answers a missing object with HTTP 400 and statusCode "404" in the body.
        self.send(h, 400, {"statusCode": "404", "error": "not_found", "message": "Object not found"})

    def upload(self, h: BaseHTTPRequestHandler, rest: str, body: bytes) -> None:
        key = self.split(rest)
        ctype = h.headers["Content-Type"]
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + body)
        fields = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
        part = fields["file"]
        data = part.get_payload(decode=True)
        if self.max_object_bytes is not None and len(data) > self.max_object_bytes:
            return self.send(h, 413, {"statusCode": "413", "error": "Payload too large",
                                      "message": "The object exceeded the maximum allowed size"})
        if key in self.objects and h.headers.get("x-upsert") != "true":
            return self.send(h, 400, {"statusCode": "409", "error": "Duplicate", "message": "The resource already exists"})
        self.objects[key] = {
            "data": data, "etag": f'"{hashlib.md5(data).hexdigest()}"', "version": str(uuid.uuid4()),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z",
            "content_type": part.get_content_type(), "cache_control": fields["cacheControl"].get_payload(),
        }
        self.send(h, 200, {"Key": f"{self.bucket}/{key}", "Id": self.objects[key]["version"]})

    def download(self, h: BaseHTTPRequestHandler, rest: str) -> None:
        obj = self.objects.get(self.split(rest))
        if obj is None:
            return self.not_found(h)
        self.send(h, 200, obj["data"], obj["content_type"], {"ETag": obj["etag"]})

    def info(self, h: BaseHTTPRequestHandler, rest: str) -> None:
        key = self.split(rest)
        obj = self.objects.get(key)
        if obj is None:
            return self.not_found(h)
        self.send(h, 200, {"id": obj["version"], "name": key, "version": obj["version"], "bucket_id": self.bucket,
                           "size": len(obj["data"]), "content_type": obj["content_type"],
                           "cache_control": obj["cache_control"], "etag": obj["etag"], "metadata": None,
                           "last_modified": obj["updated_at"], "created_at": obj["updated_at"]})

    def list(self, h: BaseHTTPRequestHandler, bucket: str, body: dict[str, Any]) -> None:
        """One folder level, as Storage lists it: objects, and sub-folders with a null id."""
        assert bucket == self.bucket
        prefix = (body.get("prefix") or "").rstrip("/")
        entries: dict[str, dict[str, Any]] = {}
        for key, obj in self.objects.items():
            if prefix and not key.startswith(prefix + "/"):
                continue
            rest = key[len(prefix) + 1:] if prefix else key
            name, sep, _ = rest.partition("/")
            if not name.startswith(body.get("search", "")):
                continue
            if sep:
                entries[name] = {"name": name, "id": None, "updated_at": None, "metadata": None}
            else:
                entries[name] = {"name": name, "id": obj["version"], "updated_at": obj["updated_at"],
                                 "metadata": {"eTag": obj["etag"], "size": len(obj["data"])}}
        out = [entries[n] for n in sorted(entries)]
        offset, limit = int(body.get("offset", 0)), int(body.get("limit", 100))
        self.send(h, 200, out[offset:offset + limit])

    def remove(self, h: BaseHTTPRequestHandler, bucket: str, body: dict[str, Any]) -> None:
        assert bucket == self.bucket and isinstance(body.get("prefixes"), list)
        gone = []
        for key in body["prefixes"]:
            obj = self.objects.pop(key, None)
            if obj is not None:
                gone.append({"name": key, "bucket_id": self.bucket, "id": obj["version"]})
        self.send(h, 200, gone)
