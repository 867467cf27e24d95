"""The shop-page viewer's server: the built web app plus a read-only window on the local store.

Standard library only, one thread per request, bound to loopback by default. It answers GET
(and HEAD) on these paths and nothing else:

* ``/``, ``/index.html``, ``/product.html``, ``/style.css``, ``/assets/...``: the built viewer
  (``viewer/www``; ``npm ci && npm run build`` in ``viewer/`` makes ``assets/``);
* ``/config.json``: always ``{"mode": "local"}``, whatever file lies in ``viewer/www``: this server
  is the local store's (a Supabase ``config.json`` is for static hosting, and this server's
  Content-Security-Policy would block the page from reaching Supabase anyway);
* ``/api/products``: JSON list of the products (unique_id, title, status, error, thumbnail);
* ``/store/models/<unique_id>/<name>``: one bucket object, only under ``models/`` and only while
  that product's status is DONE (a reader never sees a model the flow has not published).

The store is never written: no claims, no uploads, no status changes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import shutil
import sys
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.storage.base import StorageSettings, StoreError, check_object_key, check_unique_id
from tasks.storage.local import LocalStore

log = logging.getLogger(__name__)

WWW_DIR = Path(__file__).resolve().parents[1] / "viewer" / "www"
BUILD_HINT = "cd viewer && npm ci && npm run build"

# The viewer's config.json (viewer/src/config.js): read this server's /api and /store.
LOCAL_CONFIG = json.dumps({"mode": "local"}).encode()

# Images next to a model that the gallery and the product page use as its thumbnail/poster.
THUMBNAIL_NAMES = ("preview.png", "preview.jpg", "thumbnail.png", "thumbnail.jpg", "poster.png", "poster.jpg")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".glb": "model/gltf-binary",
}

# Everything the pages load comes from this server; the model itself is a blob: URL.
# 'wasm-unsafe-eval' lets three's bundled meshopt decoder compile its WebAssembly (not JS eval).
_CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self' blob: data:; worker-src 'self' blob:; "
    "media-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _content_type(path: Path | str) -> str:
    suffix = Path(str(path)).suffix.lower()
    if suffix in _TYPES:
        return _TYPES[suffix]
    if ".part-" in Path(str(path)).name:
        return "application/octet-stream"
    return mimetypes.guess_type(str(path))[0] or "application/octet-stream"


class StoreView:
    """Read-only access to a :class:`LocalStore`: product rows and DONE products' model objects."""

    def __init__(self, store_root: Path, bucket: str) -> None:
        self.root = Path(store_root).expanduser().resolve()
        self.bucket_name = bucket
        self._store: LocalStore | None = None

    def _open(self) -> LocalStore | None:
        # An empty gallery, not a crash (nor a store created as a side effect), before any run.
        if self._store is None and (self.root / "products.sqlite3").is_file():
            self._store = LocalStore(StorageSettings(backend="local", root=str(self.root), bucket=self.bucket_name))
        return self._store

    def products(self) -> list[dict[str, object]]:
        store = self._open()
        if store is None:
            return []
        out = []
        for p in store.list_products():
            out.append(
                {
                    "unique_id": p.unique_id,
                    "title": p.title,
                    "status": p.status,
                    "error": p.error,
                    "thumbnail": self._thumbnail(store, p.unique_id) if p.status == "DONE" else None,
                }
            )
        return out

    @staticmethod
    def _thumbnail(store: LocalStore, unique_id: str) -> str | None:
        for name in THUMBNAIL_NAMES:
            key = f"models/{unique_id}/{name}"
            if store.object_path(key).is_file():
                return f"/store/{key}"
        return None

    def object_file(self, key: str) -> Path | None:
        """The file behind ``key`` if the viewer may serve it, else None (served as 404)."""
        store = self._open()
        if store is None:
            return None
        try:
            check_object_key(key)
            segments = key.split("/")
            if len(segments) < 3 or segments[0] != "models":
                return None
            if store.get(check_unique_id(segments[1])).status != "DONE":
                return None
            path = store.object_path(key)
        except StoreError:
            return None
        # No symlink may lead out of this product's folder.
        folder = store.object_path(f"models/{segments[1]}").resolve()
        real = path.resolve()
        if not real.is_file() or not real.is_relative_to(folder):
            return None
        return real


class ViewerHandler(BaseHTTPRequestHandler):
    server_version = "KoroKoroViewer/1"
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, view: StoreView, www_dir: Path, **kwargs) -> None:
        self.view = view
        self.www_dir = www_dir
        super().__init__(*args, **kwargs)

    # -- plumbing ---------------------------------------------------------------------------
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        log.debug("%s %s", self.address_string(), format % args)

    def _headers(self, status: int, content_type: str, length: int, cache: str, extra: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _send_bytes(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self._headers(status, content_type, len(body), cache)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_text(self, status: int, text: str) -> None:
        self._send_bytes(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _send_file(self, path: Path, content_type: str, cache: str) -> None:
        stat = path.stat()
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        if self.headers.get("If-None-Match") == etag:
            self._headers(HTTPStatus.NOT_MODIFIED, content_type, 0, cache, {"ETag": etag})
            return
        with open(path, "rb") as fh:
            self._headers(HTTPStatus.OK, content_type, stat.st_size, cache, {"ETag": etag})
            if self.command != "HEAD":
                shutil.copyfileobj(fh, self.wfile, 1 << 20)

    def _host_allowed(self) -> bool:
        """On loopback, answer only requests addressed to loopback (no DNS rebinding)."""
        if not self.server.loopback_only:  # type: ignore[attr-defined]
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    # -- requests ---------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # pragma: no cover - answered, logged, server keeps running
            log.exception("viewer request %s failed", self.path)
            try:
                self._send_text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server's log")
            except OSError:
                pass

    def _refuse_method(self) -> None:
        self.close_connection = True  # the request's body, if any, is never read
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _route(self) -> None:
        if not self._host_allowed():
            self._send_text(HTTPStatus.MISDIRECTED_REQUEST, "this viewer answers only on localhost / 127.0.0.1")
            return
        path = unquote(urlsplit(self.path).path)
        if path == "/config.json":
            self._send_bytes(HTTPStatus.OK, LOCAL_CONFIG, "application/json")
        elif path == "/api/products":
            body = json.dumps(self.view.products()).encode()
            self._send_bytes(HTTPStatus.OK, body, "application/json")
        elif path.startswith("/store/"):
            file = self.view.object_file(path[len("/store/"):])
            if file is None:
                self._send_text(HTTPStatus.NOT_FOUND, "no such object (or its product is not DONE)")
            else:
                self._send_file(file, _content_type(file), "no-cache")
        else:
            self._static(path)

    def _static(self, path: str) -> None:
        rel = "index.html" if path in ("/", "") else path.lstrip("/")
        parts = rel.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts):
            self._send_text(HTTPStatus.NOT_FOUND, "not found")
            return
        root = self.www_dir.resolve()
        file = (root / rel).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            if parts[0] == "assets" and not (root / "assets").is_dir():
                self._send_text(HTTPStatus.SERVICE_UNAVAILABLE, f"the viewer is not built; run: {BUILD_HINT}")
            else:
                self._send_text(HTTPStatus.NOT_FOUND, "not found")
            return
        self._send_file(file, _content_type(file), "no-cache")


def make_server(
    store_root: Path, bucket: str, host: str = "127.0.0.1", port: int = 0, www_dir: Path | None = None
) -> ThreadingHTTPServer:
    """A ready, not yet serving, viewer server (``port=0``: a free port; see ``server_address``)."""
    www = Path(www_dir) if www_dir is not None else WWW_DIR
    handler = partial(ViewerHandler, view=StoreView(Path(store_root), bucket), www_dir=www)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    try:
        server.loopback_only = ipaddress.ip_address(host).is_loopback  # type: ignore[attr-defined]
    except ValueError:
        server.loopback_only = host == "localhost"  # type: ignore[attr-defined]
    return server


def viewer_built(www_dir: Path | None = None) -> bool:
    www = Path(www_dir) if www_dir is not None else WWW_DIR
    return (www / "assets" / "product.js").is_file() and (www / "assets" / "gallery.js").is_file()


def serve(store_root: Path, bucket: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the viewer until interrupted (Ctrl-C)."""
    if not viewer_built():
        print(f"warning: the viewer is not built ({WWW_DIR / 'assets'} is missing); run: {BUILD_HINT}", file=sys.stderr)
    server = make_server(store_root, bucket, host, port)
    if not server.loopback_only:  # type: ignore[attr-defined]
        print(f"warning: serving on {host}, not loopback: anyone who can reach it sees every DONE model", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"KoroKoro viewer: http://{shown}:{server.server_address[1]}/  (store {Path(store_root).resolve()}; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
