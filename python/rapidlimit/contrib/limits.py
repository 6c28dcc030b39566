"""rapidlimit's native store as a storage of the ``limits`` package.

Importing this module registers the ``rapidlimit+memory://`` scheme (and
``async+rapidlimit+memory://`` for ``limits.aio``), so an unchanged slowapi
application (or anything else built on ``limits``) can count in the C++
store by changing one line::

    import rapidlimit.contrib.limits  # noqa: F401  (registers the scheme)

    limiter = Limiter(key_func=get_remote_address,
                      storage_uri="rapidlimit+memory://")

All three ``limits`` strategies work: fixed window (``incr``/``get``/
``get_expiry``), moving window (``acquire_entry``/``get_moving_window``) and
sliding window counter (``acquire_sliding_window_entry``/
``get_sliding_window``/``clear_sliding_window``). Every call passes
``time.time()`` to the store, so freezegun-style clocks work.
URI query options (``?max_keys=100000&shards=64``) and keyword options
(``storage_options``) go to :func:`rapidlimit.storage.storage_from_string`.

Redis: ``rapidlimit+redis://host:6379/0`` (also ``rapidlimit+redis+unix://``,
``rapidlimit+unix://``, ``rapidlimit+valkey://`` and their ``async+``
forms) keeps the counters in Redis through the native client (one script
call per storage call, hiredis, GIL released while waiting). Options are
RedisStorage's (``timeout``/``socket_timeout``, ``on_error`` ...). The
``limits.aio`` class runs each Redis call in the loop's default executor, so
the event loop never waits on Redis. A Redis outage surfaces as
``RedisUnavailableError`` (one of ``base_exceptions``) when the storage's
policy is fail-closed, so slowapi's ``swallow_errors`` and
``in_memory_fallback`` apply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from limits.aio.storage import MovingWindowSupport as AsyncMovingWindowSupport
from limits.aio.storage import SlidingWindowCounterSupport as AsyncSlidingSupport
from limits.aio.storage import Storage as AsyncStorage
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage

from rapidlimit import _core
from rapidlimit.storage import storage_from_string

__all__ = ["AsyncRapidlimitStorage", "RapidlimitStorage"]

T = TypeVar("T")

# limits passes its own flags through **options; the native store ignores them.
_LIMITS_OPTIONS = frozenset({"wrap_exceptions", "implementation"})


_REDIS_SCHEMES = [
    "rapidlimit+redis",
    "rapidlimit+redis+unix",
    "rapidlimit+unix",
    "rapidlimit+valkey",
]


def _native(uri: str | None, options: dict[str, Any]) -> _core.Storage:
    source = uri or "rapidlimit+memory://"
    parsed = urlparse(source)
    scheme = parsed.scheme.removeprefix("async+")
    if scheme not in _REDIS_SCHEMES:
        scheme = "rapidlimit+memory"
    # (urlunparse would drop the "//" of "scheme:///path")
    native_uri = scheme + source[len(parsed.scheme) :]
    kept = {k: v for k, v in options.items() if k not in _LIMITS_OPTIONS}
    return storage_from_string(native_uri, **kept)


# A Redis outage, as limits' wrap_exceptions and slowapi's swallow_errors /
# in_memory_fallback expect to see it.
_ERRORS = (RuntimeError, MemoryError, _core.RedisUnavailableError)


def _checked(remote: bool, method: Callable[..., T], *args: Any) -> T:
    """``method(*args)``; on Redis, raises RedisUnavailableError when the
    answer came from the fail-closed policy (limits' storage calls return
    counts, which cannot say so)."""
    result = method(*args)
    if remote and _core.RedisStorage.last_status() == "fail-closed":
        raise _core.RedisUnavailableError(
            "redis is unavailable and the storage's policy is fail-closed"
        )
    return result


class RapidlimitStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """A ``limits`` storage backed by ``rapidlimit._core.MemoryStorage``."""

    STORAGE_SCHEME = ["rapidlimit+memory", *_REDIS_SCHEMES]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        **options: Any,
    ) -> None:
        self.native = _native(uri, options)
        self._remote = isinstance(self.native, _core.RedisStorage)
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    def _call(self, method: Callable[..., T], *args: Any) -> T:
        return _checked(self._remote, method, *args)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return _ERRORS

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._call(self.native.incr, key, expiry, amount, time.time())

    def get(self, key: str) -> int:
        return self._call(self.native.get, key, time.time())

    def get_expiry(self, key: str) -> float:
        return self._call(self.native.get_expiry, key, time.time())

    def check(self) -> bool:
        return self._call(
            self.native.check,
        )

    def reset(self) -> int | None:
        return self._call(
            self.native.reset,
        )

    def clear(self, key: str) -> None:
        self._call(self.native.clear, key)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self._call(
            self.native.acquire_entry, key, limit, expiry, amount, time.time()
        )

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self._call(
            self.native.get_moving_window, key, limit, expiry, time.time()
        )

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        return self._call(
            self.native.acquire_sliding_window_entry,
            key,
            limit,
            expiry,
            amount,
            time.time(),
        )

    def get_sliding_window(
        self, key: str, expiry: int
    ) -> tuple[int, float, int, float]:
        return self._call(self.native.get_sliding_window, key, expiry, time.time())

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self._call(self.native.clear_sliding_window, key, expiry)

    def __len__(self) -> int:
        return len(self.native)


class AsyncRapidlimitStorage(
    AsyncStorage, AsyncMovingWindowSupport, AsyncSlidingSupport
):
    """The same store for ``limits.aio`` (the calls never block)."""

    STORAGE_SCHEME = [
        "async+rapidlimit+memory",
        *(f"async+{scheme}" for scheme in _REDIS_SCHEMES),
    ]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        **options: Any,
    ) -> None:
        self.native = _native(uri, options)
        self._remote = isinstance(self.native, _core.RedisStorage)
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return _ERRORS

    async def _run(self, method: Callable[..., T], *args: Any) -> T:
        """The memory store answers at once; a Redis call waits (GIL
        released) in the loop's default executor, not on the loop."""
        if not self._remote:
            return method(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _checked, True, method, *args)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return await self._run(self.native.incr, key, expiry, amount, time.time())

    async def get(self, key: str) -> int:
        return await self._run(self.native.get, key, time.time())

    async def get_expiry(self, key: str) -> float:
        return await self._run(self.native.get_expiry, key, time.time())

    async def check(self) -> bool:
        return await self._run(self.native.check)

    async def reset(self) -> int | None:
        return await self._run(self.native.reset)

    async def clear(self, key: str) -> None:
        await self._run(self.native.clear, key)

    async def acquire_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        return await self._run(
            self.native.acquire_entry, key, limit, expiry, amount, time.time()
        )

    async def get_moving_window(
        self, key: str, limit: int, expiry: int
    ) -> tuple[float, int]:
        return await self._run(
            self.native.get_moving_window, key, limit, expiry, time.time()
        )

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        return await self._run(
            self.native.acquire_sliding_window_entry,
            key,
            limit,
            expiry,
            amount,
            time.time(),
        )

    async def get_sliding_window(
        self, key: str, expiry: int
    ) -> tuple[int, float, int, float]:
        return await self._run(self.native.get_sliding_window, key, expiry, time.time())

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        await self._run(self.native.clear_sliding_window, key, expiry)
