"""rapidlimit's native store as a storage of the ``limits`` package.

Importing this module registers ``rapidlimit+`` schemes with ``limits``, so
an unchanged slowapi application (or anything else built on ``limits``) can
count in the C++ store by changing one line::

    import rapidlimit.contrib.limits  # noqa: F401  (registers the schemes)

    limiter = Limiter(key_func=get_remote_address,
                      storage_uri="rapidlimit+memory://")

Schemes (each also as ``async+<scheme>://`` for ``limits.aio``):

* ``rapidlimit+memory://`` -- the in-process store. URI query options
  (``?max_keys=100000&shards=64``) and keyword options (slowapi's
  ``storage_options``) go to :func:`rapidlimit.storage.storage_from_string`.
* ``rapidlimit+redis://[[user]:password@]host:6379/0``,
  ``rapidlimit+redis+unix:///path.sock``, ``rapidlimit+unix://``,
  ``rapidlimit+valkey://``, ``rapidlimit+valkey+unix://`` -- counters kept
  in Redis or Valkey by :class:`rapidlimit.storage.RedisStorage` (hiredis,
  one script call per storage call, GIL released while waiting), shared by
  every process and host that names the same server. Options come from the
  query string or keywords and are RedisStorage's: ``timeout`` (or redis-py's
  ``socket_timeout``), ``connect_timeout`` (``socket_connect_timeout``),
  ``key_prefix``, ``on_error`` (``fail-closed``, ``fail-open``,
  ``fallback``) ...; redis-py options without a meaning for this client
  (``retry_on_timeout``, ``health_check_interval``, ``decode_responses``,
  ``max_connections`` ...) are accepted and ignored, and limits' own
  ``wrap_exceptions`` and ``implementation`` are handled here.
  ``rapidlimit+rediss://`` and ``rapidlimit+valkeys://`` are registered too,
  but this build has no TLS: they raise RedisStorage's ``ValueError`` naming
  the URI.

All three ``limits`` strategies work: fixed window (``incr``/``get``/
``get_expiry``), moving window (``acquire_entry``/``get_moving_window``) and
sliding window counter (``acquire_sliding_window_entry``/
``get_sliding_window``/``clear_sliding_window``). Every call passes
``time.time()`` to the store, so freezegun-style clocks work, on Redis too.
Sliding windows are aligned to the clock (multiples of the period), as in
``limits``' memory storage (a ``TimestampedSlidingWindow``), on Redis too;
``limits``' own Redis storage starts them at the first hit instead.

On Redis, a key rejected until time T is answered in process until T
without a Redis command (the blocked-key cache): a ``clear()`` or
``reset()`` made by another process reaches this one's ``hit()`` only then
(``test()`` and ``get_window_stats()`` read Redis and see it at once).
``?blocked_cache=false`` asks Redis every time. A ``get()`` and a
``get_expiry()`` of a key right after the storage's ``incr()`` of it (what
slowapi reads for its headers) get that ``incr()``'s answer, once each,
until the window ends: one script call per fixed-window request with
headers on. Likewise a ``get_moving_window()`` after an
``acquire_entry()`` that left room in the window, until its oldest entry
leaves it.

``limits.aio``: on the memory store the async class calls the store directly
(it never blocks). On Redis its counting calls are awaited on the event loop
(``RedisStorage.get_async`` and the like: no thread), so the loop keeps
serving other tasks while Redis answers, and the calls its tasks make
together share one script call; ``check()``, ``clear()`` and ``reset()``
are awaited on the loop too (a PING; one DEL for a key's states; a SCAN
over the prefix, one UNLINK per page of keys).

Redis outage: with the storage's default policy, ``on_error="fail-closed"``,
a call Redis cannot answer in time raises ``RedisUnavailableError`` (a
``ConnectionError``, listed in ``base_exceptions``; when the process has
loaded the client library ``limits``' own storage would use for the URI,
also an instance of that library's ``ConnectionError``: redis-py's for
``rapidlimit+redis://``, valkey-py's for the valkey schemes, and for
``limits.aio`` the ``implementation``'s, coredis by default, as
``async+redis://`` would raise; that library's ``TimeoutError`` instead
when no reply came within the command timeout, as its client raises on a
socket timeout, the message saying so): ``limits`` wraps it in
``StorageError`` when ``wrap_exceptions=True``, and slowapi's
``in_memory_fallback`` applies. ``check()`` returns False then, it never
raises. With ``on_error="fail-open"`` (admit) or ``"fallback"`` (count in
process) the calls answer without raising, which is what an app using
slowapi's ``swallow_errors`` wants: slowapi 0.1.10 itself answers 500 when a
storage raises under ``swallow_errors``, with ``limits``' own ``redis://``
as well. ``clear()`` and ``reset()`` Redis does not confirm raise the same
error, whatever the policy (a clear must not pass for done).

A key holding a value of another type (a list an application pushed under
the same name, say) is refused by Redis for that call alone and left as it
is: the call gets the policy like an outage, and with ``fail-closed``
raises ``RedisUnavailableError`` with Redis's error and the key, an
instance of the client library's ``ResponseError`` as well when it is loaded
(limits' own ``RedisStorage`` raises Redis's ``WRONGTYPE`` error as one).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from limits.aio.storage import MovingWindowSupport as AsyncMovingWindowSupport
from limits.aio.storage import SlidingWindowCounterSupport as AsyncSlidingSupport
from limits.aio.storage import Storage as AsyncStorage
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from rapidlimit import _core
from rapidlimit.storage import storage_from_string

__all__ = ["AsyncRapidlimitStorage", "RapidlimitStorage"]

T = TypeVar("T")

# Keys whose last answer a storage keeps for the reads after it.
_ANSWERS_KEPT = 1024

# limits passes its own flags through **options; the native store ignores them.
_LIMITS_OPTIONS = frozenset({"wrap_exceptions", "implementation"})


# Redis and Valkey schemes as limits names them, behind "rapidlimit+". The
# TLS ones reach RedisStorage, whose ValueError names the URI (no TLS here).
_REDIS_SCHEMES = [
    "rapidlimit+redis",
    "rapidlimit+redis+unix",
    "rapidlimit+unix",
    "rapidlimit+valkey",
    "rapidlimit+valkey+unix",
    "rapidlimit+rediss",
    "rapidlimit+valkeys",
]


def _client_library(uri: str | None, options: dict[str, Any], aio: bool) -> str:
    """The package whose exceptions ``limits``' own storage for this URI
    raises: valkey-py for the valkey schemes, for ``limits.aio`` the
    ``implementation`` it would use (coredis by default), else redis-py."""
    if "+valkey" in (uri or "").partition("://")[0]:
        return "valkey"
    if not aio:
        return "redis"
    implementation = options.get("implementation", "coredis")
    return {"redispy": "redis", "valkey": "valkey"}.get(implementation, "coredis")


def _native(uri: str | None, options: dict[str, Any]) -> _core.Storage:
    """The native store for a ``[async+]rapidlimit+...://`` URI (memory when
    none is given). Unknown schemes raise ValueError naming the URI; they are
    never taken for the memory store."""
    source = uri or "rapidlimit+memory://"
    if source.startswith("async+"):
        source = source[len("async+") :]
    kept = {k: v for k, v in options.items() if k not in _LIMITS_OPTIONS}
    return storage_from_string(source, **kept)


# A Redis outage, as limits' wrap_exceptions and slowapi's swallow_errors /
# in_memory_fallback expect to see it.
_ERRORS = (RuntimeError, MemoryError, _core.RedisUnavailableError)

# RedisUnavailableError joined with a client library's class, by that class.
_JOINED: dict[type[Exception], type[_core.RedisUnavailableError]] = {}


def _join(base: type[Exception]) -> type[_core.RedisUnavailableError] | None:
    def __init__(self: Exception, *args: Any) -> None:
        _core.RedisUnavailableError.__init__(self, *args)
        # redis-py's RedisError sets the attributes its __repr__ reads;
        # OSError's __init__ does not pass the call on.
        base.__init__(self, *args)

    try:
        joined = type(
            "RedisUnavailableError",
            (_core.RedisUnavailableError, base),
            # redis-py's __repr__ leaves the message out. No module holds
            # the class by its name: pickled (for another process, which
            # may not have the library loaded), it is the plain class.
            {
                "__init__": __init__,
                "__repr__": _core.RedisUnavailableError.__repr__,
                "__reduce__": lambda self: (_core.RedisUnavailableError, self.args),
                "__module__": __name__,
            },
        )
    except TypeError:  # a base whose layout cannot join OSError's
        return None
    return joined


def _unavailable(
    library: str, message: str, kind: str = "ConnectionError"
) -> _core.RedisUnavailableError:
    """RedisUnavailableError, also an instance of ``library``'s exception
    ``kind`` when the process has loaded that library, so that code written
    for ``limits``' own storage catches it: ConnectionError, ResponseError
    for a key Redis refused, TimeoutError for a reply that did not come in
    time (as its client raises on a socket timeout). Never imports the
    library: code that names its classes has imported it."""
    module = sys.modules.get(f"{library}.exceptions")
    base = getattr(module, kind, None)
    if not (isinstance(base, type) and issubclass(base, Exception)):
        return _core.RedisUnavailableError(message)
    joined = _JOINED.get(base)
    if joined is None:
        joined = _JOINED.setdefault(base, _join(base) or _core.RedisUnavailableError)
    return joined(message)


def _checked(library: str | None, method: Callable[..., T], *args: Any) -> T:
    """``method(*args)``; on Redis (``library`` names its client package,
    None for memory), raises RedisUnavailableError when the answer came from
    the fail-closed policy (limits' storage calls return counts, which cannot
    say so). Only for the calls that record where their answer came from
    (incr, get, get_expiry, acquire_*, get_*_window)."""
    result = method(*args)
    if library and _core.RedisStorage.last_status() == "fail-closed":
        raise _fail_closed(
            library,
            _core.RedisStorage.last_error(),
            _core.RedisStorage.last_timed_out(),
        )
    return result


def _fail_closed(
    library: str, redis_error: str, timed_out: bool
) -> _core.RedisUnavailableError:
    """The error for a call the fail-closed policy answered, blocking or
    awaited: Redis may have answered, refusing the call's key (WRONGTYPE for
    a key holding another type of value; limits' own RedisStorage raises
    Redis's error), or not within the command timeout, or not at all."""
    if redis_error:
        return _unavailable(
            library,
            f"redis answered an error: {redis_error}; the storage's policy is "
            "fail-closed",
            "ResponseError",
        )
    if timed_out:
        return _unavailable(
            library,
            "redis did not answer within the command timeout and the storage's "
            "policy is fail-closed",
            "TimeoutError",
        )
    return _unavailable(
        library, "redis is unavailable and the storage's policy is fail-closed"
    )


def _admin(library: str | None, method: Callable[..., T], *args: Any) -> T:
    """clear/reset: the store raises RedisUnavailableError itself when Redis
    does not confirm; raised again as :func:`_unavailable`'s class."""
    try:
        return method(*args)
    except _core.RedisUnavailableError as e:
        if not library or type(e) is not _core.RedisUnavailableError:
            raise
        raise _unavailable(library, str(e)) from None


def _close(native: Any) -> None:
    if isinstance(native, _core.RedisStorage):
        native.close()


def _no_elastic_expiry(elastic_expiry: bool) -> None:
    """limits < 5 passes ``elastic_expiry`` to every ``incr`` (False from the
    fixed window; True only from its ``fixed-window-elastic-expiry``
    strategy, deprecated in 4.1 and removed in 5, which the native store does
    not implement). limits 4 is the newest for Python 3.9."""
    if elastic_expiry:
        raise NotImplementedError(
            "rapidlimit's storage has no elastic expiry: limits' "
            "fixed-window-elastic-expiry strategy (deprecated in limits 4.1, "
            "removed in 5) is not supported, use fixed-window"
        )


class _Answers:
    """On Redis, the answers of a storage's last counting call on each key,
    for the reads right after it: slowapi reads a window's stats for its
    headers right after the hit (from another thread for a 429), as limits'
    get_window_stats does, round trips that would read what the hit just
    wrote, less what other processes counted meanwhile. Each part is given
    once, until the answer expires (a fixed window's end, a moving window's
    oldest entry leaving it). Thread-safe under the GIL (OrderedDict's
    operations are single calls)."""

    COUNT, EXPIRY, WINDOW = 1, 2, 4

    def __init__(self) -> None:
        # key -> [value, until, unread parts]
        self._last: OrderedDict[Any, list[Any]] = OrderedDict()

    def forget(self, key: Any = None) -> None:
        """Drops ``key``'s answer (every answer: None), before the call
        that may fail, a clear or a reset."""
        if key is None:
            self._last.clear()
        else:
            self._last.pop(key, None)

    def keep(self, key: Any, value: Any, until: float, parts: int) -> None:
        last = self._last
        last[key] = [value, until, parts]
        if len(last) > _ANSWERS_KEPT:
            with contextlib.suppress(KeyError):  # emptied meanwhile
                last.popitem(last=False)

    def take(self, key: Any, part: int) -> Any:
        """``key``'s answer if ``part`` is unread (then read) and it has
        not expired, else None."""
        last = self._last.get(key)
        if last is None or not last[2] & part or not time.time() < last[1]:
            return None
        last[2] &= ~part
        return last[0]

    def kept_incr(self, key: str, count: int, expiry: float) -> int:
        self.keep(key, (count, expiry), expiry, self.COUNT | self.EXPIRY)
        return count

    def count(self, key: str) -> int | None:
        last = self.take(key, self.COUNT)
        return None if last is None else int(last[0])

    def expiry(self, key: str) -> float | None:
        last = self.take(key, self.EXPIRY)
        return None if last is None else float(last[1])

    @staticmethod
    def _moving(key: str, limit: int, expiry: int) -> tuple[str, str, int, int]:
        return ("moving", key, limit, expiry)

    def forget_window(self, key: str, limit: int, expiry: int) -> None:
        self.forget(self._moving(key, limit, expiry))

    def kept_acquire(
        self, key: str, limit: int, expiry: int, stats: tuple[bool, float, int, float]
    ) -> bool:
        allowed, start, count, until = stats
        moving = self._moving(key, limit, expiry)
        if count >= 0:
            self.keep(moving, (start, count), until, self.WINDOW)
        else:  # nor an earlier call's, answered before this one
            self.forget(moving)
        return allowed

    def window(self, key: str, limit: int, expiry: int) -> tuple[float, int] | None:
        last = self.take(self._moving(key, limit, expiry), self.WINDOW)
        return None if last is None else (float(last[0]), int(last[1]))

    @staticmethod
    def _sliding(key: str, expiry: int) -> tuple[str, str, int]:
        return ("sliding", key, expiry)

    def forget_sliding(self, key: str, expiry: int) -> None:
        self.forget(self._sliding(key, expiry))

    def kept_sliding(
        self,
        key: str,
        expiry: int,
        now: float,
        stats: tuple[bool, int, float, int, float, float],
    ) -> bool:
        """Keeps what a sliding window's read gets right after its hit at
        ``now``, until the window ends (its ttls then shortened by the time
        since, as Redis's would be)."""
        allowed, previous, previous_ttl, current, current_ttl, until = stats
        sliding = self._sliding(key, expiry)
        if current >= 0:
            value = (previous, previous_ttl, current, current_ttl, now)
            self.keep(sliding, value, until, self.WINDOW)
        else:  # nor an earlier call's, answered before this one
            self.forget(sliding)
        return allowed

    def sliding(self, key: str, expiry: int) -> tuple[int, float, int, float] | None:
        last = self.take(self._sliding(key, expiry), self.WINDOW)
        if last is None:
            return None
        previous, previous_ttl, current, current_ttl, at = last
        since = time.time() - at
        # A window with no previous hits has a previous ttl of 0.
        return (
            int(previous),
            max(0.0, previous_ttl - since),
            int(current),
            current_ttl - since,
        )


class RapidlimitStorage(
    Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow
):
    """A ``limits`` storage backed by rapidlimit's native ``MemoryStorage``
    or ``RedisStorage`` (the latter waits with the GIL released)."""

    STORAGE_SCHEME = ["rapidlimit+memory", *_REDIS_SCHEMES]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        **options: Any,
    ) -> None:
        self.native = _native(uri, options)
        # The client package of limits' own storage for the URI (None: memory).
        self._library = (
            _client_library(uri, options, aio=False)
            if isinstance(self.native, _core.RedisStorage)
            else None
        )
        self._answers = _Answers()
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    def _call(self, method: Callable[..., T], *args: Any) -> T:
        return _checked(self._library, method, *args)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return _ERRORS

    def incr(
        self, key: str, expiry: int, amount: int = 1, *, elastic_expiry: bool = False
    ) -> int:
        _no_elastic_expiry(elastic_expiry)
        if not self._library:
            return self.native.incr(key, expiry, amount, time.time())
        self._answers.forget(key)  # a failed incr leaves no answer behind
        return self._answers.kept_incr(
            key, *self._call(self.native.incr_expiry, key, expiry, amount, time.time())
        )

    def get(self, key: str) -> int:
        if self._library and (count := self._answers.count(key)) is not None:
            return count
        return self._call(self.native.get, key, time.time())

    def get_expiry(self, key: str) -> float:
        if self._library and (at := self._answers.expiry(key)) is not None:
            return at
        return self._call(self.native.get_expiry, key, time.time())

    def check(self) -> bool:
        # RedisStorage.check() PINGs: False, never an exception, when down.
        return self.native.check()

    def reset(self) -> int | None:
        self._answers.forget()
        return _admin(self._library, self.native.reset)

    def clear(self, key: str) -> None:
        self._answers.forget()  # the key's moving windows too
        _admin(self._library, self.native.clear, key)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if not self._library:
            return self.native.acquire_entry(key, limit, expiry, amount, time.time())
        self._answers.forget_window(key, limit, expiry)
        return self._answers.kept_acquire(
            key,
            limit,
            expiry,
            self._call(
                self.native.acquire_entry_stats, key, limit, expiry, amount, time.time()
            ),
        )

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        if self._library and (window := self._answers.window(key, limit, expiry)):
            return window
        return self._call(
            self.native.get_moving_window, key, limit, expiry, time.time()
        )

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        now = time.time()
        if not self._library:
            return self.native.acquire_sliding_window_entry(
                key, limit, expiry, amount, now
            )
        self._answers.forget_sliding(key, expiry)
        native = cast(_core.RedisStorage, self.native)
        stats = self._call(
            native.acquire_sliding_window_entry_stats, key, limit, expiry, amount, now
        )
        return self._answers.kept_sliding(key, expiry, now, stats)

    def get_sliding_window(
        self, key: str, expiry: int
    ) -> tuple[int, float, int, float]:
        if self._library and (window := self._answers.sliding(key, expiry)):
            return window
        return self._call(self.native.get_sliding_window, key, expiry, time.time())

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self._answers.forget_sliding(key, expiry)
        _admin(self._library, self.native.clear_sliding_window, key, expiry)

    def __len__(self) -> int:
        return len(self.native)

    def __bool__(self) -> bool:
        # limits' storages are always true; without this, __len__ makes an
        # empty store false, and code written for limits such as
        # ``storage = storage or MemoryStorage()`` would drop it.
        return True

    def close(self) -> None:
        """Releases a Redis store's connections and I/O threads (see
        ``Limiter.close``); later calls get its ``on_error`` policy."""
        _close(self.native)


class AsyncRapidlimitStorage(
    AsyncStorage,
    AsyncMovingWindowSupport,
    AsyncSlidingSupport,
    TimestampedSlidingWindow,
):
    """The same store for ``limits.aio``: memory calls answer at once; Redis
    calls are awaited on the loop (no thread), pipelined with the loop's
    other Redis calls."""

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
        self._library = (
            _client_library(uri, options, aio=True)
            if isinstance(self.native, _core.RedisStorage)
            else None
        )
        self._answers = _Answers()
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return _ERRORS

    def close(self) -> None:
        """As :meth:`RapidlimitStorage.close`."""
        _close(self.native)

    async def _run(
        self, method: Callable[..., T], *args: Any, admin: bool = False
    ) -> T:
        """The call ``method``: on Redis through the store's awaitable of the
        same name (``get_async`` for ``get``, answered on the loop without a
        thread). Its RedisUnavailableError is raised again as one of the
        client library's classes too: a counting call's fail-closed answer;
        for check and clear (``admin``), a clear Redis did not confirm, as
        the blocking call raises it."""
        if not self._library:
            return method(*args)
        native_async = getattr(self.native, f"{method.__name__}_async")
        try:
            return await cast(Awaitable[T], native_async(*args))
        except _core.RedisUnavailableError as e:
            if type(e) is not _core.RedisUnavailableError:
                raise
            if admin:
                raise _unavailable(self._library, str(e)) from None
            raise _fail_closed(
                self._library,
                getattr(e, "redis_error", ""),
                getattr(e, "timed_out", False),
            ) from None

    async def incr(
        self, key: str, expiry: int, amount: int = 1, *, elastic_expiry: bool = False
    ) -> int:
        _no_elastic_expiry(elastic_expiry)
        if not self._library:
            return self.native.incr(key, expiry, amount, time.time())
        self._answers.forget(key)
        return self._answers.kept_incr(
            key,
            *await self._run(self.native.incr_expiry, key, expiry, amount, time.time()),
        )

    async def get(self, key: str) -> int:
        if self._library and (count := self._answers.count(key)) is not None:
            return count
        return await self._run(self.native.get, key, time.time())

    async def get_expiry(self, key: str) -> float:
        if self._library and (at := self._answers.expiry(key)) is not None:
            return at
        return await self._run(self.native.get_expiry, key, time.time())

    async def check(self) -> bool:
        return await self._run(self.native.check, admin=True)

    async def reset(self) -> int | None:
        """On Redis a SCAN over the prefix, each page's keys removed with
        one UNLINK, every command awaited on the loop."""
        self._answers.forget()
        if not self._library:
            return self.native.reset()
        native = cast(_core.RedisStorage, self.native)  # as _library says
        native.forget_in_process()
        dropped = 0
        try:
            cursor = "0"
            while True:
                cursor, keys = await native.scan_async(cursor)
                if keys:
                    dropped += await native.unlink_async(keys)
                if cursor == "0":
                    break
        except _core.RedisUnavailableError as e:
            if type(e) is not _core.RedisUnavailableError:
                raise
            raise _unavailable(self._library, str(e)) from None
        return dropped

    async def clear(self, key: str) -> None:
        self._answers.forget()  # the key's moving windows too
        await self._run(self.native.clear, key, admin=True)

    async def acquire_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        if not self._library:
            return self.native.acquire_entry(key, limit, expiry, amount, time.time())
        self._answers.forget_window(key, limit, expiry)
        stats = await self._run(
            self.native.acquire_entry_stats, key, limit, expiry, amount, time.time()
        )
        return self._answers.kept_acquire(key, limit, expiry, stats)

    async def get_moving_window(
        self, key: str, limit: int, expiry: int
    ) -> tuple[float, int]:
        if self._library and (window := self._answers.window(key, limit, expiry)):
            return window
        return await self._run(
            self.native.get_moving_window,
            key,
            limit,
            expiry,
            time.time(),
        )

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        now = time.time()
        if not self._library:
            return self.native.acquire_sliding_window_entry(
                key, limit, expiry, amount, now
            )
        self._answers.forget_sliding(key, expiry)
        native = cast(_core.RedisStorage, self.native)
        stats = await self._run(
            native.acquire_sliding_window_entry_stats, key, limit, expiry, amount, now
        )
        return self._answers.kept_sliding(key, expiry, now, stats)

    async def get_sliding_window(
        self, key: str, expiry: int
    ) -> tuple[int, float, int, float]:
        if self._library and (window := self._answers.sliding(key, expiry)):
            return window
        return await self._run(
            self.native.get_sliding_window,
            key,
            expiry,
            time.time(),
        )

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        self._answers.forget_sliding(key, expiry)
        await self._run(self.native.clear_sliding_window, key, expiry, admin=True)
