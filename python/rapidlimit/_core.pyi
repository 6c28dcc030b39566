"""Type stubs for the native module ``rapidlimit._core`` (hand-written).

Every ``now`` argument is epoch seconds as a float (``time.time()``); when it
is omitted the core reads the system clock.
"""

import asyncio
from collections.abc import Callable, Generator, MutableMapping, Sequence
from typing import Any, Final, Generic, TypeVar, overload

_T = TypeVar("_T")

__version__: str
# The largest amount per window a moving-window limit may have (it logs
# every hit); larger ones raise ValueError when checked.
MAX_MOVING_WINDOW_AMOUNT: Final[int]

class RateLimitItem:
    """A rate limit: ``amount`` hits per ``multiples`` units of ``granularity``.

    Mirrors ``limits.RateLimitItem``: same key layout, text and equality.
    """

    def __init__(
        self,
        amount: int,
        multiples: int | None = 1,
        namespace: str = "LIMITER",
        *,
        granularity: str = "second",
        burst: int = 0,
    ) -> None: ...
    @property
    def amount(self) -> int: ...
    @property
    def multiples(self) -> int: ...
    @property
    def granularity(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def burst(self) -> int:
        """Token bucket burst size; 0 means ``amount``."""
    def with_burst(self, burst: int, /) -> RateLimitItem: ...
    def get_expiry(self) -> int:
        """Window length in seconds."""
    def key_for(self, *identifiers: object) -> str: ...
    def __eq__(self, other: object) -> bool: ...
    def __lt__(self, other: RateLimitItem) -> bool:
        """Orders as ``limits`` orders items (by period)."""
    def __hash__(self) -> int: ...

def parse(text: str) -> RateLimitItem:
    """Parses a limit string and returns its first limit (``limits.parse``)."""

def parse_many(text: str) -> list[RateLimitItem]:
    """Parses ``"5/minute;100 per day"`` (``limits.parse_many``)."""

def granularity_seconds(name: str) -> int: ...

class Decision(tuple[bool, int, int, float, float]):
    """Everything a response needs about one limit after one request.

    A struct sequence: it also unpacks and indexes as the 5-tuple
    ``(allowed, limit, remaining, reset_time, retry_after)``, and
    ``Decision(sequence_of_5)`` builds one.
    """

    __match_args__: Final = (
        "allowed",
        "limit",
        "remaining",
        "reset_time",
        "retry_after",
    )
    def __new__(cls, fields: Sequence[object], /) -> Decision: ...
    @property
    def allowed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_time(self) -> float:
        """Epoch seconds at which the window resets."""
    @property
    def retry_after(self) -> float:
        """Seconds to wait before a retry can succeed; 0.0 when allowed."""

class Storage:
    """Base of native stores. Not constructible."""

    def check(self) -> bool: ...
    def reset(self) -> int:
        """Forgets every key; returns how many were dropped. On Redis,
        raises RedisUnavailableError when Redis did not answer every command
        (whatever ``on_error`` says: the reset may be partly done), after
        clearing what the storage keeps in process."""
    def __len__(self) -> int:
        """Live keys; on Redis, RedisUnavailableError as ``reset``."""
    def __bool__(self) -> bool: ...
    # limits' Storage interface, on raw keys (used by rapidlimit.contrib.limits).
    def incr(
        self, key: str, expiry: float, amount: int = 1, now: float | None = None
    ) -> int: ...
    def incr_expiry(
        self, key: str, expiry: float, amount: int = 1, now: float | None = None
    ) -> tuple[int, float]:
        """``incr``, with the counter's expiry (what ``get_expiry`` reads)."""
    def get(self, key: str, now: float | None = None) -> int: ...
    def get_expiry(self, key: str, now: float | None = None) -> float: ...
    def clear(self, key: str) -> None:
        """Forgets ``key``; on Redis, RedisUnavailableError as ``reset``."""
    def acquire_entry(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> bool: ...
    def acquire_entry_stats(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> tuple[bool, float, int, float]:
        """``acquire_entry``, with what ``get_moving_window`` reads right
        after it and until when: (allowed, window start, entries, until),
        entries -1 when the decision cannot tell (a refusal with no room
        left, an empty window, fail-open)."""
    def get_moving_window(
        self, key: str, limit: int, expiry: float, now: float | None = None
    ) -> tuple[float, int]: ...
    def acquire_sliding_window_entry(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> bool: ...
    def get_sliding_window(
        self, key: str, expiry: float, now: float | None = None
    ) -> tuple[int, float, int, float]: ...
    def clear_sliding_window(self, key: str, expiry: float) -> None: ...

class MemoryStorage(Storage):
    def __init__(self, max_keys: int = 1_000_000, shards: int = 64) -> None: ...
    @property
    def max_keys(self) -> int: ...
    def memory_bytes(self) -> int:
        """Heap bytes held by the tables (excluding moving-window logs' slack)."""

class RedisUnavailableError(ConnectionError):
    """Redis could not answer in time. From a decision: the storage's
    policy is fail-closed, answer 503 with ``Retry-After: retry_after``.
    From ``reset()``, ``clear()`` or ``len()``: whatever the policy, as
    redis-py raises there (``retry_after`` 0)."""

    retry_after: float

def redis_available() -> bool:
    """Whether this build has the Redis storage (hiredis was found)."""

class RedisStorage(Storage):
    """Limits shared through Redis (or Valkey): one atomic script call per
    decision, pipelined by a C++ I/O thread.

    ``uri``: ``redis://[[user]:password@]host:port/db``,
    ``redis+unix:///path.sock``, ``unix://``, ``valkey://``, optionally
    prefixed ``rapidlimit+``. Keyword options (override the URI's query):
    ``timeout`` (alias ``socket_timeout``, default 0.2 s),
    ``connect_timeout`` (``socket_connect_timeout``, 0.5 s), ``pool_size``
    (1), ``key_prefix`` ("rapidlimit:"), ``on_error`` ("fail-closed",
    "fail-open" or "fallback"), ``fail_closed_retry_after`` (1 s),
    ``blocked_cache`` (True), ``blocked_cache_size``, ``reconnect_min``,
    ``reconnect_max``, ``ttl_slack``, ``fallback_max_keys``, ``db``,
    ``username``, ``password``; redis-py options without a meaning here
    (``retry_on_timeout``, ``health_check_interval``, ...) are ignored.
    Raises ``ValueError`` naming the URI for unsupported schemes (TLS,
    cluster, sentinel), bad options, or a build without hiredis.
    """

    def __init__(self, uri: str, **options: object) -> None: ...
    @property
    def uri(self) -> str:
        """The URI, password redacted."""
    @property
    def on_error(self) -> str: ...
    @property
    def connected(self) -> bool: ...
    def ping(self) -> float:
        """Round trip of a PING in seconds; raises RedisUnavailableError."""
    def close(self) -> None:
        """Stops the I/O thread; later calls get the failure policy."""
    def stats(self) -> dict[str, int]:
        """Counters since creation: decisions, calls (requests' script
        calls), scripts (script commands: requests waiting together share
        one), writes, inline_calls, loop_writes (batches an event loop
        sent itself), cache_hits (requests and reads the blocked-key cache
        answered), fail_open, fail_closed,
        fallback, timeouts, errors, disconnects, reconnects, script_reloads,
        mismatches (must stay 0)."""
    @staticmethod
    def last_status() -> str:
        """Where the calling thread's last decision on a Redis storage came
        from: "redis", "cache", "fallback", "fail-open" or "fail-closed"."""
    @staticmethod
    def last_error() -> str:
        """When ``last_status()`` is a failure policy: the error Redis
        answered for that call (such as WRONGTYPE, with the key, for a key
        holding another type of value), or "" when Redis did not answer."""
    @staticmethod
    def last_timed_out() -> bool:
        """When ``last_status()`` is a failure policy: whether no reply came
        within the command timeout (a hung connection, a busy Redis, a
        reconnect outlasting it), rather than a connection that is down or
        an error Redis answered."""
    def decide_many(
        self,
        strategy: str | RateLimiter,
        requests: Sequence[tuple[RateLimitItem, str, int]],
        /,
        now: float | None = None,
        test: bool = False,
    ) -> list[Decision]:
        """``RateLimiter.decide_many`` on this storage, waiting with the GIL
        released; raises RedisUnavailableError when fail-closed applies."""
    def decide_many_async(
        self,
        strategy: str | RateLimiter,
        requests: Sequence[tuple[RateLimitItem, str, int]],
        /,
        now: float | None = None,
        test: bool = False,
    ) -> asyncio.Future[list[Decision]]:
        """The same as an awaitable that never blocks the running loop."""
    # The limits adapter's calls from an event loop (limits.aio): what the
    # synchronous method of the same name returns, awaited without a thread
    # and pipelined with the loop's other Redis calls; a fail-closed answer
    # raises RedisUnavailableError (``redis_error``: Redis's error, if it
    # answered one, such as WRONGTYPE for a key of another type;
    # ``timed_out``: no reply came within the command timeout).
    def incr_expiry_async(
        self, key: str, expiry: float, amount: int = 1, now: float | None = None
    ) -> RedisWaiter[tuple[int, float]]: ...
    def get_async(self, key: str, now: float | None = None) -> RedisWaiter[int]: ...
    def get_expiry_async(
        self, key: str, now: float | None = None
    ) -> RedisWaiter[float]: ...
    def acquire_entry_async(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> RedisWaiter[bool]: ...
    def acquire_entry_stats_async(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> RedisWaiter[tuple[bool, float, int, float]]: ...
    def get_moving_window_async(
        self, key: str, limit: int, expiry: float, now: float | None = None
    ) -> RedisWaiter[tuple[float, int]]: ...
    def acquire_sliding_window_entry_async(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> RedisWaiter[bool]: ...
    def get_sliding_window_async(
        self, key: str, expiry: float, now: float | None = None
    ) -> RedisWaiter[tuple[int, float, int, float]]: ...
    def acquire_sliding_window_entry_stats(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> tuple[bool, int, float, int, float, float]:
        """``acquire_sliding_window_entry``, with what ``get_sliding_window``
        reads right after it and until when: (allowed, previous count,
        previous ttl, current count, current ttl, until), the ttls to be
        shortened by the time since; current count -1 when the answer did
        not come from Redis's state (the blocked-key cache, a policy)."""
    def acquire_sliding_window_entry_stats_async(
        self,
        key: str,
        limit: int,
        expiry: float,
        amount: int = 1,
        now: float | None = None,
    ) -> RedisWaiter[tuple[bool, int, float, int, float, float]]: ...
    def clear_async(self, key: str) -> RedisWaiter[None]:
        """``clear`` awaited on the loop: one DEL for the key's states."""
    def clear_sliding_window_async(
        self, key: str, expiry: float
    ) -> RedisWaiter[None]: ...
    def check_async(self) -> RedisWaiter[bool]:
        """``check`` awaited on the loop: whether Redis answered a PING."""
    def forget_in_process(self) -> None:
        """What ``reset`` forgets before its scan: the blocked-key cache and
        the fallback store of this process."""
    def scan_async(self, cursor: str) -> RedisWaiter[tuple[str, list[bytes]]]:
        """One SCAN page of the store's keys, every strategy's, from
        ``cursor`` ("0" first): (the next cursor, "0" once complete; the
        page's keys). Raises RedisUnavailableError if Redis did not answer."""
    def unlink_async(self, keys: list[bytes]) -> RedisWaiter[int]:
        """One UNLINK of ``keys`` (at least one): how many Redis removed.
        Raises RedisUnavailableError if Redis did not answer."""
    @overload
    def decide_view_async(
        self,
        strategy: str | RateLimiter,
        item: RateLimitItem,
        key: str,
        scope: str,
        cost: int,
        now: float,
        names: HeaderNames,
        limit: object,
        prefix: str,
        /,
    ) -> RedisWaiter[Any]: ...
    @overload
    def decide_view_async(
        self,
        strategy: str | RateLimiter,
        item: RateLimitItem,
        key: str,
        scope: str,
        cost: int,
        now: float,
        names: HeaderNames,
        limit: object,
        prefix: str,
        state: dict[Any, Any],
        view_key: object,
        limiter: object,
        conn: object,
        plan: object,
        /,
    ) -> RedisWaiter[Any]:
        """``RateLimiter.decide_view`` on this storage, as an awaitable like
        :meth:`decide_many_async`: resolves to the view (``names.view_type``
        with ``_data`` = ``(limit, prefix, key, scope, result)``), or raises
        ``RedisUnavailableError`` when Redis cannot answer and the policy is
        fail-closed. TypeError when ``names`` has no view type.

        With ``state`` ... ``plan`` (the decorator's check), the view is
        stored as ``state[view_key]`` and an allowed view is the result;
        otherwise the result is what ``limiter._finish_endpoint(view, exc,
        conn, plan)`` returns or raises (view None for a storage error)."""

class RedisWaiter(Generic[_T]):
    """What ``RedisStorage.decide_view_async`` returns: awaitable, and
    future-like (``asyncio.isfuture`` is true) for asyncio's helpers. The
    event loop's reader wakes the awaiting task directly."""

    _asyncio_future_blocking: bool
    def __await__(self) -> Generator[Any, None, _T]: ...
    def __iter__(self) -> Generator[Any, None, _T]: ...
    def result(self) -> _T: ...
    def exception(self) -> BaseException | None: ...
    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def cancel(self, msg: Any | None = None) -> bool: ...
    def get_loop(self) -> asyncio.AbstractEventLoop: ...
    def add_done_callback(
        self, fn: Callable[[RedisWaiter[_T]], object], /, *, context: Any = None
    ) -> None: ...
    def remove_done_callback(
        self, fn: Callable[[RedisWaiter[_T]], object], /
    ) -> int: ...

class HeaderNames:
    """The four rate-limit header names for ``RateLimiter.decide_headers``
    (bytes, lower case for ASGI), shared by Limiters with the same names.
    Holds ready ``(name, b"<value>")`` pairs for the values 0 to 1023 of the
    limit, remaining and retry-after headers, so that most responses only
    take references to existing tuples. Immutable; ``repr`` shows the
    names."""

    def __init__(
        self,
        limit: bytes,
        remaining: bytes,
        reset: bytes,
        retry_after: bytes,
        view_type: type | None = None,
    ) -> None:
        """``view_type``, for ``RateLimiter.decide_view``: a class with
        ``__slots__ = ("_data",)`` whose instances are made without calling
        it (TypeError otherwise)."""
    @property
    def view_type(self) -> type | None: ...
    @property
    def limit(self) -> bytes: ...
    @property
    def remaining(self) -> bytes: ...
    @property
    def reset(self) -> bytes: ...
    @property
    def retry_after(self) -> bytes: ...

class RateLimiter:
    """A strategy bound to a storage; base of ``rapidlimit.strategies``."""

    def __init__(self, storage: Storage, strategy: str) -> None: ...
    @property
    def storage(self) -> Storage: ...
    @property
    def strategy(self) -> str: ...
    def hit(
        self,
        item: RateLimitItem,
        /,
        *identifiers: object,
        cost: int = 1,
        now: float | None = None,
    ) -> bool:
        """Consumes ``cost`` of the limit; True if it fit. Never raises for
        a Redis outage: the storage's policy answers (False when
        fail-closed)."""
    def test(
        self,
        item: RateLimitItem,
        /,
        *identifiers: object,
        cost: int = 1,
        now: float | None = None,
    ) -> bool:
        """Whether ``cost`` would fit now; consumes nothing. Answers by the
        policy during a Redis outage, like ``hit``."""
    def decide(
        self,
        item: RateLimitItem,
        /,
        *identifiers: object,
        cost: int = 1,
        now: float | None = None,
    ) -> Decision:
        """Like hit, returning the full decision. On a Redis storage whose
        policy is fail-closed, raises RedisUnavailableError (with
        ``retry_after``) when Redis cannot answer, instead of returning a
        rejection; fail-open and fallback answers are returned."""
    def decide_headers(
        self,
        item: RateLimitItem,
        identity: object,
        cost: int,
        now: float,
        names: HeaderNames,
        /,
    ) -> tuple[bool, int, int, float, float, tuple[tuple[bytes, bytes], ...]]:
        """``decide(item, identity, cost=cost, now=now)`` plus its headers,
        in one call for the per-request hot path (positional arguments
        only, all required; ``identity`` is keyed like ``decide_many``'s).

        Returns ``(allowed, limit, remaining, reset_time, retry_after,
        headers)``: the five fields of the Decision ``decide`` would return,
        then a tuple of four pairs::

            ((names.limit, b"%d" % limit),
             (names.remaining, b"%d" % remaining),
             (names.reset, b"%d" % int(1 + reset_time)),
             (names.retry_after, b"%d" % int(1 + reset_time - now)))

        computed in doubles exactly as that Python would, with the ``now``
        given; for a token bucket's refusal the last is ``b"%d" % int(1 +
        retry_after)`` (the bucket has room for the cost then, and is full
        again only at the reset). The pairs are shared immutable tuples
        where possible.
        Raises RedisUnavailableError like ``decide``, TypeError for
        arguments of the wrong type and ValueError for a negative or too
        large ``cost`` or a ``now`` that is not finite epoch seconds."""
    def decide_view(
        self,
        item: RateLimitItem,
        key: str,
        scope: str,
        cost: int,
        now: float,
        names: HeaderNames,
        limit: object,
        prefix: str,
        /,
    ) -> Any:
        """``decide_headers(item, identity, cost, now, names)`` for the
        identity ``f"{prefix}/{key}/{scope}"`` (``f"{key}/{scope}"`` when
        ``prefix`` is empty), returned in a new instance of
        ``names.view_type`` whose ``_data`` slot holds ``(limit, prefix,
        key, scope, result)``: the decorator's ``view_rate_limit`` made in
        the same call. TypeError when ``names`` has no view type."""
    def get_window_stats(
        self, item: RateLimitItem, /, *identifiers: object, now: float | None = None
    ) -> tuple[float, int]: ...
    def clear(self, item: RateLimitItem, /, *identifiers: object) -> None:
        """Forgets the limit's state for the identifiers; on Redis,
        RedisUnavailableError when Redis did not answer."""
    def decide_many(
        self,
        requests: Sequence[tuple[RateLimitItem, str, int]],
        /,
        now: float | None = None,
        test: bool = False,
    ) -> list[Decision]:
        """Decides several limits in one call, in order.

        Each request is ``(item, identity, cost)``; its storage key is
        ``item.key_for(identity)``. Without ``test`` each is charged and the
        call stops at the first rejection, so the list may be shorter than
        ``requests`` and its last element is then the rejection. With
        ``test`` nothing is charged and every request gets a decision.
        On a Redis storage whose policy is fail-closed, raises
        RedisUnavailableError when Redis cannot answer.
        """

def decide_scope(
    scope: MutableMapping[str, Any], spec: tuple[Any, ...], conn: Any = ..., /
) -> Any:
    """The decorator's check of one simple limit keyed by the peer's address,
    from the ASGI ``scope``.

    ``spec`` is ``(plan, limit, item, cost, names, scope_name,
    endpoint_name, done_key, by_key, view_key, core, prefix, by, filters,
    response_type, merge_names, headers, fused, merge_fallback,
    send_spec)`` (see ``Limiter._fast_spec``; ``send_spec`` is
    :class:`HeaderSend`'s): ``scope_name`` is the limit's static scope or
    None (the endpoint key is used), ``endpoint_name`` the endpoint key or
    None to use ``scope["path"]``. Sets ``state[done_key] = True`` and
    ``state[by_key] = by`` in ``scope["state"]``, then ``core.decide_view(
    item, key, name, cost, time.time(), names, limit, prefix)`` for the key
    ``scope["client"][0]`` (or ``"127.0.0.1"``), and stores the view under
    ``view_key``. Returns the view when the request is allowed, False when
    it is rejected (``scope["state"]`` is made if missing). ``time.time``
    is looked up on every call; while it is the builtin, the clock is read
    without making a float. Returns None, having changed nothing else, when
    the request needs the caller's general path: ``core`` is not a
    RateLimiter, ``filters`` is not an empty list, a state that is not a
    dict, ``done_key`` already in the state, an empty path, a peer address
    that is not a str. Errors of the decision are raised after the state
    was marked.

    When ``core``'s storage is a :class:`RedisStorage` the decision is
    awaited instead: given the request ``conn`` and a running asyncio
    loop, returns ``core``'s storage's ``decide_view_async(core, item, key,
    name, cost, time.time(), names, limit, prefix, state, view_key, by,
    conn, plan)`` (a :class:`RedisWaiter`: the view of an allowed request,
    else what ``by._finish_endpoint`` makes of it); without ``conn``, or
    with no asyncio loop running (trio), None."""

def merge_headers(
    returned: object, response: object, view: Any, spec: tuple[Any, ...], /
) -> None:
    """The rate-limit headers of ``view`` (a request ``decide_scope``
    allowed) for the response: when ``spec``'s ``headers`` is True, added
    to the raw headers of ``returned`` if it is a ``response_type``, else of
    ``response`` if that is one. The core's formatted pairs are appended
    when ``fused`` is True and no header named in ``merge_names`` is there
    yet; anything else is ``merge_fallback(carrier, view)``'s."""

def mw_decide(
    scope: MutableMapping[str, Any], spec: tuple[Any, ...], send: Any, /
) -> Any:
    """The middleware's :func:`decide_scope` (same ``spec``). When the
    request is allowed, returns the send to give the application: ``send``
    itself when ``spec``'s ``headers`` is False, else
    ``HeaderSend(send, scope["state"], send_spec)`` after setting
    ``state[mark_key] = mark_value``. False when the request is rejected,
    None when it needs the general path, as decide_scope."""

def mw_route(
    scope: MutableMapping[str, Any],
    receive: Any,
    send: Any,
    routes: tuple[Any, ...],
    /,
) -> Any:
    """SlowAPIASGIMiddleware's usual request in one call. ``routes`` is
    ``(app, routes_app, limiter, state_values, state_object, routes,
    routes_len, routers, endpoints, finisher)``
    (``SlowAPIASGIMiddleware._fast_state``): for an HTTP scope whose ``app``
    (or ``app`` when it has none) is ``routes_app`` and whose route is in
    ``endpoints`` under ``(type, method, root_path, path)``, while
    ``routes`` keeps ``routes_len`` items and no router of ``routers`` has
    a new ``_routes_version``, the plan ``limiter._endpoint_plans[endpoint]``
    (``limiter`` or ``state_values["limiter"]`` while ``app.state`` is
    ``state_object``) is looked up, and its ``fast`` spec, when it is one,
    is given to :func:`mw_decide`, whose result is returned. On a
    :class:`RedisStorage` with a running asyncio loop the decision is
    submitted instead and ``(waiter, send)`` returned: the
    :class:`RedisWaiter` resolves to the view of an allowed request, else
    to ``finisher._finish_endpoint(view, exc, (scope, receive, send),
    plan)``; ``send`` is what mw_decide would give the application. None,
    having changed nothing, when any of that fails: the caller's Python
    path looks again. Errors of the decision are raised after the state
    was marked."""

class HeaderSend:
    """An ASGI ``send`` that adds the rate-limit headers of the request's
    view, ``state[view_key]`` read when the response starts, to the
    ``http.response.start`` message, then calls ``send``.

    ``spec`` is ``(names, view_key, merge_names, fused, fallback, mark_key,
    mark_value)`` (``Limiter._send_spec``). The core's formatted pairs are
    appended to the message's header list when ``fused`` is True, the view
    is one of ``names``' view class carrying them and no header named in
    ``merge_names`` is there; with no view (or None) nothing is added, and
    every other case goes to ``fallback(message, view)``. Other messages,
    and messages that are not dicts, pass untouched."""

    def __init__(
        self, send: Any, state: dict[str, Any], spec: tuple[Any, ...], /
    ) -> None: ...
    def __call__(self, message: MutableMapping[str, Any], /) -> Any: ...
