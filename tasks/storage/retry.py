"""Retries with capped, jittered exponential backoff for the store's object calls.

A publish uploads a dozen objects and a worker downloads a video of up to 2 GiB over networks
that drop connections and answer 503 now and then; one such hiccup must not fail a product
that took an hour to reconstruct. Transient failures (``TransientStoreError``: timeouts,
connection errors, HTTP 5xx and 429, and the builtin ``TimeoutError``/``ConnectionError``) are
retried; every other error is permanent and raised at once. Re-running an object call is safe:
uploads are upserts and downloads go through a temp file.

:class:`RetryingStore` wraps any backend (``open_store`` does it): object calls are retried,
as are the idempotent queue calls (``get``, ``list_products``, ``mark_done``, ``mark_failed``);
claims and enqueues pass through untouched (a claim is not idempotent: it counts an attempt).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from tasks.storage.base import StoredObject, StoreError, TransientStoreError
from tasks.types import Product

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetrySettings:
    """``storage.retry``: how often and how patiently an object call is retried.

    The n-th retry waits ``min(max_delay_s, base_delay_s * 2**(n-1))``, of which a random
    ``jitter`` fraction is drawn uniformly (so workers that failed together do not retry together).
    """

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise StoreError(f"storage.retry.attempts must be at least 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise StoreError("storage.retry delays must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise StoreError(f"storage.retry.jitter is a fraction in [0, 1], got {self.jitter}")


def retry_settings(values: RetrySettings | Mapping[str, Any] | None) -> RetrySettings:
    """``storage.retry`` (a mapping, possibly partial) as :class:`RetrySettings`."""
    if isinstance(values, RetrySettings):
        return values
    values = dict(values or {})
    unknown = set(values) - {f.name for f in fields(RetrySettings)}
    if unknown:
        raise StoreError(f"unknown storage.retry settings: {', '.join(sorted(unknown))}")
    return RetrySettings(**values)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientStoreError, TimeoutError, ConnectionError))


def backoff_delays(settings: RetrySettings, rng: Callable[[], float] = random.random) -> Iterator[float]:
    """The waits before retry 1, 2, ... (``attempts - 1`` of them), in seconds."""
    for n in range(settings.attempts - 1):
        delay = min(settings.max_delay_s, settings.base_delay_s * 2.0**n)
        yield delay * (1.0 - settings.jitter * rng())


def with_retries(
    what: str,
    fn: Callable[[], T],
    settings: RetrySettings,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """``fn()``, retried on transient errors.

    A permanent :class:`StoreError` is raised at once, as the backend worded it (it names the
    object); any other permanent error becomes a StoreError naming ``what``; transient errors
    that outlast ``settings.attempts`` become one StoreError naming ``what`` and the last error.
    """
    delays = backoff_delays(settings, rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except StoreError as exc:
            if not is_transient(exc):
                raise
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001
            if not is_transient(exc):
                raise StoreError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
            reason = f"{type(exc).__name__}: {exc}"
        # Out of the except block: the transient exception is not chained to what is raised.
        said = reason if reason.startswith(what) else f"{what}: {reason}"  # backends often name it already
        if attempt >= settings.attempts:
            raise StoreError(f"{said} (gave up after {attempt} attempts)")
        delay = next(delays)
        log.warning("%s; retry %d of %d in %.1f s", said, attempt, settings.attempts - 1, delay)
        sleep(delay)


class RetryingStore:
    """A :class:`~tasks.storage.base.ProductStore` whose object calls are retried.

    Anything else (queue calls, a backend's extras such as ``object_path``) goes to the wrapped
    store unchanged; ``inner`` is the wrapped store.
    """

    def __init__(self, inner: Any, settings: RetrySettings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner = inner
        self.retry = settings
        self._sleep = sleep

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "inner":  # never forward private or special names
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"RetryingStore({self.inner!r})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (RetryingStore, (self.inner, self.retry))

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(what, fn, self.retry, self._sleep)

    def put_object(self, key: str, src: Path, content_type: str = "application/octet-stream") -> None:
        self._retry(f"upload {key}", lambda: self.inner.put_object(key, src, content_type))

    def get_object(self, key: str, dest: Path) -> Path:
        return self._retry(f"download {key}", lambda: self.inner.get_object(key, dest))

    def fetch_video(self, product: Product, dest: Path, max_bytes: int) -> Path:
        what = f"download video {product.video_link} of {product.unique_id}"
        return self._retry(what, lambda: self.inner.fetch_video(product, dest, max_bytes))

    def object_exists(self, key: str) -> bool:
        return self._retry(f"look up {key}", lambda: self.inner.object_exists(key))

    def object_version(self, key: str) -> str:
        return self._retry(f"read the version of {key}", lambda: self.inner.object_version(key))

    def list_objects(self, prefix: str) -> list[StoredObject]:
        return self._retry(f"list {prefix}/", lambda: self.inner.list_objects(prefix))

    def delete_object(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.inner.delete_object(key))

    # Idempotent queue calls: setting a final status twice is the same as once.
    def get(self, unique_id: str) -> Product:
        return self._retry(f"read product {unique_id}", lambda: self.inner.get(unique_id))

    def list_products(self, status: str | None = None) -> list[Product]:
        return self._retry("list products", lambda: self.inner.list_products(status))

    def mark_done(self, unique_id: str, manifest_key: str) -> Product:
        return self._retry(f"mark {unique_id} DONE", lambda: self.inner.mark_done(unique_id, manifest_key))

    def mark_failed(self, unique_id: str, reason: str) -> Product:
        return self._retry(f"mark {unique_id} FAILED", lambda: self.inner.mark_failed(unique_id, reason))
