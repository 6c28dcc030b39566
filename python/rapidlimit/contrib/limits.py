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
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlparse, urlunparse

from limits.aio.storage import MovingWindowSupport as AsyncMovingWindowSupport
from limits.aio.storage import SlidingWindowCounterSupport as AsyncSlidingSupport
from limits.aio.storage import Storage as AsyncStorage
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage

from rapidlimit import _core
from rapidlimit.storage import storage_from_string

__all__ = ["AsyncRapidlimitStorage", "RapidlimitStorage"]

# limits passes its own flags through **options; the native store ignores them.
_LIMITS_OPTIONS = frozenset({"wrap_exceptions", "implementation"})


def _native(uri: str | None, options: dict[str, Any]) -> _core.Storage:
    parsed = urlparse(uri or "rapidlimit+memory://")
    native_uri = urlunparse(parsed._replace(scheme="rapidlimit+memory"))
    kept = {k: v for k, v in options.items() if k not in _LIMITS_OPTIONS}
    return storage_from_string(native_uri, **kept)


class RapidlimitStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """A ``limits`` storage backed by ``rapidlimit._core.MemoryStorage``."""

    STORAGE_SCHEME = ["rapidlimit+memory"]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        **options: Any,
    ) -> None:
        self.native = _native(uri, options)
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (RuntimeError, MemoryError)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self.native.incr(key, expiry, amount, time.time())

    def get(self, key: str) -> int:
        return self.native.get(key, time.time())

    def get_expiry(self, key: str) -> float:
        return self.native.get_expiry(key, time.time())

    def check(self) -> bool:
        return self.native.check()

    def reset(self) -> int | None:
        return self.native.reset()

    def clear(self, key: str) -> None:
        self.native.clear(key)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.native.acquire_entry(key, limit, expiry, amount, time.time())

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self.native.get_moving_window(key, limit, expiry, time.time())

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        return self.native.acquire_sliding_window_entry(
            key, limit, expiry, amount, time.time()
        )

    def get_sliding_window(
        self, key: str, expiry: int
    ) -> tuple[int, float, int, float]:
        return self.native.get_sliding_window(key, expiry, time.time())

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self.native.clear_sliding_window(key, expiry)

    def __len__(self) -> int:
        return len(self.native)


class AsyncRapidlimitStorage(
    AsyncStorage, AsyncMovingWindowSupport, AsyncSlidingSupport
):
    """The same store for ``limits.aio`` (the calls never block)."""

    STORAGE_SCHEME = ["async+rapidlimit+memory"]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        **options: Any,
    ) -> None:
        self.native = _native(uri, options)
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (RuntimeError, MemoryError)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self.native.incr(key, expiry, amount, time.time())

    async def get(self, key: str) -> int:
        return self.native.get(key, time.time())

    async def get_expiry(self, key: str) -> float:
        return self.native.get_expiry(key, time.time())

    async def check(self) -> bool:
        return self.native.check()

    async def reset(self) -> int | None:
        return self.native.reset()

    async def clear(self, key: str) -> None:
        self.native.clear(key)

    async def acquire_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        return self.native.acquire_entry(key, limit, expiry, amount, time.time())

    async def get_moving_window(
        self, key: str, limit: int, expiry: int
    ) -> tuple[float, int]:
        return self.native.get_moving_window(key, limit, expiry, time.time())

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        return self.native.acquire_sliding_window_entry(
            key, limit, expiry, amount, time.time()
        )

    async def get_sliding_window(
        self, key: str, expiry: int
    ) -> tuple[int, float, int, float]:
        return self.native.get_sliding_window(key, expiry, time.time())

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        self.native.clear_sliding_window(key, expiry)
