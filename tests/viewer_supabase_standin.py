"""A loopback stand-in for the two Supabase APIs the shop-page viewer reads with the anon key.

(tests/supabase_standin.py is the storage contract's stand-in for the service-role side.)

* PostgREST: ``GET /rest/v1/products?select=a,b&col=eq.value&order=col.asc&limit=n``
* Storage:   ``GET /storage/v1/object/authenticated/<bucket>/<key>``

Rows and objects come from a :class:`LocalStore`'s files. Access follows
``infra/supabase/002_supabase_policies.sql``: the ``anon`` role reads DONE rows and objects under
``models/<unique_id>/`` of DONE products; ``service_role`` reads everything. Like the real thing,
a request needs ``apikey`` and ``Authorization: Bearer <JWT>`` headers (401 otherwise), a missing
or hidden object is HTTP 400 with ``{"statusCode": "404", "error": "not_found"}``, and CORS allows
any origin but only the request headers supabase-js sends. Every request is recorded so tests can
check what a browser sent.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from tasks.storage.base import StoreError, check_object_key
from tasks.storage.local import LocalStore
from tasks.types import Product

ALLOWED_HEADERS = ("authorization", "x-client-info", "apikey", "content-type")
_NOT_FOUND = {"statusCode": "404", "error": "not_found", "message": "Object not found"}
_TYPES = {".json": "application/json", ".png": "image/png", ".glb": "model/gltf-binary"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(role: str, ref: str = "standin") -> str:
    """A Supabase-shaped legacy API key for ``role`` (the signature is not checked by the stand-in)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    payload = _b64url(json.dumps({"iss": "supabase", "ref": ref, "role": role, "iat": now, "exp": now + 3600}).encode())
    return f"{header}.{payload}.{_b64url(b'stand-in signature, not checked')}"


class SupabaseStandIn:
    """Serve ``store`` as Supabase would to holders of ``keys`` ({api key: role}); a context manager."""

    def __init__(self, store: LocalStore, bucket: str, keys: dict[str, str]) -> None:
        self.store = store
        self.bucket = bucket
        self.keys = dict(keys)
        self.requests: list[dict[str, str | None]] = []
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SupabaseStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what a role may see (002_supabase_policies.sql) -------------------------------------
    def rows(self, role: str) -> list[dict]:
        products = self.store.list_products()
        visible = products if role == "service_role" else [p for p in products if p.status == "DONE"]
        return [dataclasses.asdict(p) for p in visible]

    def object_bytes(self, role: str, bucket: str, key: str) -> bytes | None:
        if bucket != self.bucket:
            return None
        try:
            check_object_key(key)
        except StoreError:
            return None
        segments = key.split("/")
        if role != "service_role":
            if len(segments) < 3 or segments[0] != "models":
                return None
            done = {p["unique_id"] for p in self.rows(role)}
            if segments[1] not in done:
                return None
        path = self.store.object_path(key)
        return path.read_bytes() if path.is_file() else None


class _Handler(BaseHTTPRequestHandler):
    standin: SupabaseStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj, default=str).encode())

    def _record(self) -> None:
        split = urlsplit(self.path)
        self.standin.requests.append(
            {
                "method": self.command,
                "path": unquote(split.path),
                "query": split.query,
                "apikey": self.headers.get("apikey"),
                "authorization": self.headers.get("Authorization"),
                "origin": self.headers.get("Origin"),
                "request_headers": self.headers.get("Access-Control-Request-Headers"),
            }
        )

    def do_OPTIONS(self) -> None:  # CORS preflight
        self._record()
        self._send(
            HTTPStatus.OK,
            b"",
            "text/plain",
            {
                "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
                "Access-Control-Allow-Headers": ", ".join(ALLOWED_HEADERS),
                "Access-Control-Max-Age": "0",
            },
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def _role(self) -> str | None:
        key = self.headers.get("apikey")
        role = self.standin.keys.get(key or "")
        if role is None or self.headers.get("Authorization") != f"Bearer {key}":
            return None
        return role

    def do_GET(self) -> None:
        self._record()
        split = urlsplit(self.path)
        path = unquote(split.path)
        role = self._role()
        if role is None:
            self._json(HTTPStatus.UNAUTHORIZED, {"message": "Invalid API key or Authorization header"})
        elif path == "/rest/v1/products":
            self._products(role, parse_qsl(split.query, keep_blank_values=True))
        elif path.startswith("/storage/v1/object/authenticated/"):
            bucket, _, key = path[len("/storage/v1/object/authenticated/"):].partition("/")
            data = self.standin.object_bytes(role, bucket, key)
            if data is None:
                self._json(HTTPStatus.BAD_REQUEST, _NOT_FOUND)
            else:
                suffix = key[key.rfind("."):] if "." in key.rsplit("/", 1)[-1] else ""
                self._send(HTTPStatus.OK, data, _TYPES.get(suffix, "application/octet-stream"))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"message": f"no route {path}"})

    def _products(self, role: str, params: list[tuple[str, str]]) -> None:
        rows = self.standin.rows(role)
        known = {f.name for f in dataclasses.fields(Product)}
        select, limit = None, None
        for name, value in params:
            if name == "select":
                select = value.split(",")
            elif name == "order":
                column, _, direction = value.partition(".")
                rows.sort(key=lambda r: (r.get(column) is None, r.get(column)), reverse=direction == "desc")
            elif name == "limit":
                limit = int(value)
            elif value.startswith("eq."):
                rows = [r for r in rows if str(r.get(name)) == value[3:]]
            else:
                self._json(HTTPStatus.BAD_REQUEST, {"code": "PGRST100", "message": f"the stand-in does not parse {name}={value}"})
                return
        unknown = [c for c in (select or []) if c not in known]
        if unknown:
            self._json(HTTPStatus.BAD_REQUEST, {"code": "42703", "message": f"column products.{unknown[0]} does not exist"})
            return
        if select:
            rows = [{c: r[c] for c in select} for r in rows]
        self._json(HTTPStatus.OK, rows[:limit] if limit is not None else rows)
