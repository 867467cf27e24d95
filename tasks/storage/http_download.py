"""HTTP helpers of the Supabase backend: secret scrubbing, URLs fit for messages, and a
streamed, size-limited download into a temp file.

Kept apart from ``tasks.storage.supabase`` so that file stays about the Supabase API.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import tempfile
import urllib.parse
from pathlib import Path
from typing import Mapping

import httpx

from tasks.storage.base import StoreError, TransientStoreError

# Anything that looks like a Supabase key, even one we were not given (defence in depth).
_KEYLIKE = re.compile(r"(sb_(secret|publishable)_[A-Za-z0-9_-]{8,}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})")


class Scrubber:
    """Replaces the secret (raw and URL-quoted) and anything key-shaped by ``***``."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scrubber) and other._secret == self._secret

    def __hash__(self) -> int:
        return hash(self._secret)

    def __call__(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
            text = text.replace(urllib.parse.quote(self._secret, safe=""), "***")
        return _KEYLIKE.sub("***", text)

    def __repr__(self) -> str:
        return "Scrubber(***)"


# The HTTP stack's own loggers. At DEBUG, httpcore logs response headers as they arrive: a
# proxy that echoes the Authorization header back would put the key in a log line.
_HTTP_LOGGERS = (
    "httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy", "httpcore.socks",
    "hpack.hpack", "hpack.table",
)


class _ScrubLogRecords(logging.Filter):
    """Rewrites log records of the HTTP loggers through every registered Scrubber."""

    def __init__(self) -> None:
        super().__init__()
        self.scrubbers: list[Scrubber] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.scrubbers:
            text = record.getMessage()
            clean = text
            for scrub in self.scrubbers:
                clean = scrub(clean)
            if clean != text:
                record.msg, record.args = clean, ()
        return True


_LOG_FILTER = _ScrubLogRecords()
_LOG_LOCK = threading.Lock()


def scrub_http_logs(scrubber: Scrubber) -> None:
    """Make the HTTP stack's log records pass through ``scrubber`` (from now on, process-wide).

    A logger's filters see only records made on that very logger, so each leaf logger gets it.
    """
    with _LOG_LOCK:
        if scrubber not in _LOG_FILTER.scrubbers:
            _LOG_FILTER.scrubbers.append(scrubber)
        for name in _HTTP_LOGGERS:
            logger = logging.getLogger(name)
            if _LOG_FILTER not in logger.filters:
                logger.addFilter(_LOG_FILTER)


def display_url(url: str) -> str:
    """A URL for messages: no query string (signed URLs carry tokens), no user info."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def is_transient_status(status: int) -> bool:
    """HTTP answers worth another try: any 5xx, and 429 (rate limited)."""
    return status >= 500 or status == 429


def stream_to_file(
    http: httpx.Client,
    url: str,
    dest: Path,
    max_bytes: int | None,
    what: str,
    headers: Mapping[str, str],
    follow_redirects: bool,
    missing: str | None,
) -> Path:
    """GET ``url`` into ``dest`` (temp file + rename), refusing bodies over ``max_bytes``.

    ``missing``: the message for Storage's 'object not found' (HTTP 404, or 400 with a 404 in
    the body), or None when the URL is not ours. 5xx and 429 raise TransientStoreError.
    """
    limit = mib(max_bytes) if max_bytes is not None else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with http.stream("GET", url, headers=dict(headers), follow_redirects=follow_redirects) as resp:
        if resp.status_code in (400, 404) and missing is not None:
            body = resp.read()[:2000].decode("utf-8", "replace")
            if resp.status_code == 404 or "not_found" in body or "404" in body:
                raise StoreError(missing)
        if resp.status_code >= 400:
            cls = TransientStoreError if is_transient_status(resp.status_code) else StoreError
            raise cls(f"{what}: HTTP {resp.status_code} from {display_url(url)}")
        length = resp.headers.get("content-length")
        if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
            raise StoreError(
                f"{what} is {mib(int(length))}, over the {limit} limit "
                "(storage.max_video_bytes); upload a shorter or lower-resolution video"
            )
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
        try:
            total = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in resp.iter_bytes(1 << 20):
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise StoreError(
                            f"{what} is over the {limit} limit (storage.max_video_bytes): "
                            "stopped reading; upload a shorter or lower-resolution video"
                        )
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest
