"""A fault-injecting wrapper around any store: timeouts, dropped connections, HTTP errors and
crashes on a schedule, for tests and chaos runs.

``FaultyStore(inner, rules)`` makes the object calls of ``inner`` fail the way a flaky network
and a flaky Storage server make them fail, raising what a backend raises (a scrubbed
``TransientStoreError`` for timeouts, connection errors, 5xx and 429; a permanent
``StoreError`` for other 4xx). ``open_store`` puts it *beneath* the retries when
``storage.faults`` is set, e.g. a chaos run where every object's first two calls time out::

    korokoro run video=mug.mp4 'storage.faults=[{kind: timeout, first: 2}]'

Kind ``crash`` raises :class:`SimulatedCrash` (a BaseException: nothing retries or reports it),
standing in for a worker that dies at that call; in-process tests only. Calls a backend makes
on itself (``enqueue``'s video upload, ``mark_done``'s manifest check) bypass the wrapper.
"""

from __future__ import annotations

import fnmatch
import http
import random
import threading
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from tasks.storage.base import StoredObject, StoreError, TransientStoreError
from tasks.types import Product

T = TypeVar("T")

# Object calls that can fail, and the verb their error messages use.
OPS = {
    "put_object": "upload",
    "get_object": "download",
    "fetch_video": "download video",
    "object_exists": "look up",
    "object_version": "read the version of",
    "list_objects": "list",
    "delete_object": "delete",
}
_NETWORK = {"timeout": "ReadTimeout: timed out", "connection": "ConnectError: connection reset by peer"}


class SimulatedCrash(BaseException):
    """The worker 'died' at this call (kind ``crash``)."""


@dataclass(frozen=True)
class FaultRule:
    """One line of a fault schedule. A call of one of ``ops`` on a key matching ``keys`` (an
    fnmatch pattern; a video's link for ``fetch_video``, the prefix for ``list_objects``) fails
    when it is among the ``first`` calls on that key, or every ``every``-th call after those,
    or with probability ``rate`` (seeded by ``seed``).

    ``kind``: ``timeout`` | ``connection`` | ``http_<status>`` (5xx and 429 are transient, other
    4xx permanent) | ``crash``. ``after``: fail after the call went through (the answer was
    lost, the upload landed), as a timeout on the response does.
    """

    kind: str = "http_503"
    ops: tuple[str, ...] = ("put_object", "get_object", "fetch_video")
    keys: str = "*"
    first: int = 0
    every: int = 0
    rate: float = 0.0
    seed: int = 0
    after: bool = False
    _rng: random.Random = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        unknown = set(self.ops) - set(OPS)
        if unknown:
            raise StoreError(f"storage.faults: unknown ops {sorted(unknown)}; choose from {sorted(OPS)}")
        if self.kind not in (*_NETWORK, "crash") and not _http_status(self.kind):
            raise StoreError(
                f"storage.faults: unknown kind {self.kind!r}; use timeout, connection, crash or http_<status>"
            )
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def fires(self, call: int) -> bool:
        """Whether the ``call``-th call (1-based) on one key fails."""
        if call <= self.first:
            return True
        if self.every > 0 and (call - self.first) % self.every == 0:
            return True
        return self.rate > 0 and self._rng.random() < self.rate

    def error(self, op: str, key: str) -> BaseException:
        what = f"{OPS[op]} {key}"
        if self.kind == "crash":
            return SimulatedCrash(f"simulated crash during {what}")
        if self.kind in _NETWORK:
            return TransientStoreError(f"{what} failed: {_NETWORK[self.kind]} (injected fault)")
        status = _http_status(self.kind)
        cls = TransientStoreError if status >= 500 or status == 429 else StoreError
        return cls(f"{what} failed: HTTP {status} {http.HTTPStatus(status).phrase} (injected fault)")


def _http_status(kind: str) -> int:
    if kind.startswith("http_") and kind[5:].isdigit():
        status = int(kind[5:])
        if status in http.HTTPStatus._value2member_map_ and 400 <= status < 600:
            return status
    return 0


def fault_rules(values: Sequence[FaultRule | Mapping[str, Any]] | Mapping[str, Any] | None) -> tuple[FaultRule, ...]:
    """``storage.faults`` (one rule or a list of them, as mappings) as FaultRules."""
    if not values:
        return ()
    if isinstance(values, (Mapping, FaultRule)):
        values = [values]
    names = {f.name for f in fields(FaultRule) if f.init}
    rules = []
    for v in values:
        if isinstance(v, FaultRule):
            rules.append(v)
            continue
        unknown = set(v) - names
        if unknown:
            raise StoreError(f"storage.faults: unknown fields {sorted(unknown)}; use {sorted(names)}")
        rules.append(FaultRule(**v))
    return tuple(rules)


class FaultyStore:
    """``inner`` with faults injected into its object calls; everything else passes through.

    ``injected`` lists ``(op, key, kind)`` of every fault raised, for tests to check.
    """

    def __init__(self, inner: Any, rules: Sequence[FaultRule]) -> None:
        self.inner = inner
        self.rules = tuple(rules)
        self.injected: list[tuple[str, str, str]] = []
        self._calls: Counter[tuple[int, str, str]] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r}, {len(self.rules)} rules)"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (FaultyStore, (self.inner, self.rules))

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        fault: tuple[FaultRule, bool] | None = None
        with self._lock:
            for i, rule in enumerate(self.rules):
                if op in rule.ops and fnmatch.fnmatchcase(key, rule.keys):
                    self._calls[(i, op, key)] += 1
                    if fault is None and rule.fires(self._calls[(i, op, key)]):
                        fault = (rule, rule.after)
                        self.injected.append((op, key, rule.kind))
        if fault is not None and not fault[1]:
            raise fault[0].error(op, key)
        result = fn()
        if fault is not None:
            raise fault[0].error(op, key)
        return result

    def put_object(self, key: str, src: Path, content_type: str = "application/octet-stream") -> None:
        self._call("put_object", key, lambda: self.inner.put_object(key, src, content_type))

    def get_object(self, key: str, dest: Path) -> Path:
        return self._call("get_object", key, lambda: self.inner.get_object(key, dest))

    def fetch_video(self, product: Product, dest: Path, max_bytes: int) -> Path:
        return self._call("fetch_video", product.video_link, lambda: self.inner.fetch_video(product, dest, max_bytes))

    def object_exists(self, key: str) -> bool:
        return self._call("object_exists", key, lambda: self.inner.object_exists(key))

    def object_version(self, key: str) -> str:
        return self._call("object_version", key, lambda: self.inner.object_version(key))

    def list_objects(self, prefix: str) -> list[StoredObject]:
        return self._call("list_objects", prefix, lambda: self.inner.list_objects(prefix))

    def delete_object(self, key: str) -> None:
        self._call("delete_object", key, lambda: self.inner.delete_object(key))
