"""Rate limiting for Starlette and FastAPI with the API of slowapi 0.1.10.

``from slowapi import X`` becomes ``from rapidlimit import X`` (and the same
for ``rapidlimit.errors``, ``.middleware``, ``.util``, ``.wrappers`` and
``.extension``); the counting itself runs in the C++ core
(``rapidlimit._core``). Settings, storage keys
(``LIMITER/<prefix>/<key>/<scope>/<amount>/<multiples>/<granularity>``),
evaluation order (application, route, dynamic, default limits; the first
failure stops the check, earlier limits stay charged), header names and
values, and the 429 body ``{"error": "Rate limit exceeded: 5 per 1 minute"}``
are slowapi's. Time is read with ``time.time()`` on every request, so
freezegun- and hiro-style clocks work.

Intended differences from slowapi 0.1.10
----------------------------------------

Speed

* Limit strings, the signatures of key functions and other callables, and
  the list of limits of each route are worked out once (at decoration, or on
  the first request of a route), never per request. A request is decided by
  one call into the core, which returns everything the headers need: no
  second storage round trip for the headers, nor a third in the 429 handler.
* Both middlewares are pure ASGI (``SlowAPIMiddleware`` is no longer a
  ``BaseHTTPMiddleware``). They add the headers to ``http.response.start`` as
  it passes and forward every other message untouched, so streaming
  responses, file responses (``http.response.pathsend``) and websockets work
  (#249, #260). Both accept ``limiter=`` to use a limiter other than
  ``app.state.limiter``.
* A rejection is cheaper than an allowed request: when the application's
  handler for ``RateLimitExceeded`` is ``_rate_limit_exceeded_handler``, the
  middleware sends the 429 itself and the decorator returns it from the
  endpoint (same status, body and headers; the background tasks the
  request's dependencies queued do not run, as after slowapi's exception),
  without raising; with any other
  handler (or one registered for status 429) the exception is raised
  (decorator) or the handler called (middleware) as in slowapi. The
  "ratelimit exceeded" log line is at DEBUG, not WARNING, and never carries
  a traceback. The logger is named ``rapidlimit``.
* A decorated sync view gets an async wrapper: the check runs on the event
  loop, then the view runs in the thread pool exactly as Starlette or
  FastAPI would run it. A rejected request never takes a thread. (Calling a
  decorated sync function directly therefore returns a coroutine.) The
  wrapper is compiled per view with the view's own parameters, so FastAPI's
  keyword call binds straight to them (tracebacks show its frame as
  ``<rapidlimit wrapper of module.view>``); views with ``*args``,
  ``**kwargs`` or positional-only parameters get a ``*args, **kwargs``
  wrapper.

Correctness

* Limits are registered per function object, not per ``module.name``, so
  views with the same name keep their own limits (#75, #173, #191).
  ``_route_limits``, ``_dynamic_route_limits`` and ``_exempt_routes`` are
  still filled by name for code that reads them, but are not consulted.
* The middlewares find the endpoint as the router will: inside
  ``include_router`` (also FastAPI >= 0.137 included routers, #281), in
  mounted routers and sub-applications, first match wins (slowapi took the
  last). Mounts of applications without routes (``StaticFiles``...) are not
  limited, as in slowapi. With a middleware, a ``@limit`` placed above
  ``@app.get`` (which slowapi silently ignored) is applied too.
* With a middleware, application limits apply to every routed request,
  decorated routes included (slowapi skipped decorated routes). As in
  slowapi, the middleware leaves a decorated route to its decorator, so the
  route is checked after FastAPI has resolved its dependencies (a key
  function may read what they set; a request they refuse, 401 or 422, uses
  up no quota) and its 429 passes back through the middlewares inside the
  limiter's (CORS); the decorator checks the application limits with the
  route's limits and defaults, in one pass (one core call, one Redis round
  trip).
* A callable ``shared_limit`` scope works (#163): it is called with the
  request when it has a ``request`` parameter, else with the endpoint key
  (the path, or ``module.name`` with ``key_style="endpoint"``).
  ``Limit.scope`` returns "" for a callable scope.
* A storage error or a bad dynamic limit never reaches the 429 handler
  (#239, #253). With ``swallow_errors=True`` the request goes through
  without rate-limit headers, also when the key function that a dynamic
  limit taking the key (``limit(lambda key: ...)``) is given raises: slowapi
  called it before the part of its check that swallows errors (a 500
  whatever the setting). With ``swallow_errors=False`` (the default)
  the original exception propagates (a 500 from the server error middleware,
  or the application's own handler for it): fail-closed is that explicit
  choice. ``auto_check=False`` never breaks a decorated endpoint.
* Redis storages (``redis://`` and the like) are native and never raise for
  an outage: their ``on_error`` policy follows slowapi's settings unless
  given (``swallow_errors`` -> fail-open, ``in_memory_fallback_enabled``
  without limits -> the same limits in memory, otherwise fail-closed), and
  fail-closed answers 503 with ``Retry-After`` (raised as
  :class:`~rapidlimit.errors.RateLimitStorageUnavailable` where slowapi
  raises), never 500. Fail-open lets requests through with the headers of
  a fresh window (the count is unknown meanwhile). Async paths await the
  decision without blocking the event loop (slowapi issue #3); on trio
  (Hypercorn's trio worker), which runs no asyncio loop, it waits in a
  worker thread (anyio's pool) instead. ``Limiter.close()`` (new) releases
  a Redis storage's connections and I/O threads once the application is
  done: FastAPI's caches keep decorated views, and so their limiter, after
  the application is dropped.
* ``_rate_limit_exceeded_handler`` finds the limiter on the exception when
  ``app.state.limiter`` is missing, and never fails for want of
  ``request.state.view_rate_limit``.
* A bad limit string in ``limit``, ``shared_limit``, ``default_limits``,
  ``application_limits``, ``in_memory_fallback`` or the ``RATELIMIT_*``
  settings raises ``ConfigurationError`` (a ``ValueError``) at decoration or
  construction; slowapi logged it and left the route unlimited, or failed on
  every request. So does an unknown strategy or storage URI (``ValueError``
  naming the URI).
* ``default_limits`` (and the other limit lists) may be one string, taken
  as one limit group, not split into characters. Duplicates in
  ``default_limits`` are dropped keeping their order (slowapi used a set, so
  the order in which defaults were charged depended on the hash seed). No
  mutable default is shared between ``Limiter`` instances.
* ``RATELIMIT_*`` booleans are parsed (``false``, ``0``, ``no`` are false;
  slowapi took any non-empty string as true for settings whose default is
  false). ``RATELIMIT_STORAGE_OPTIONS`` is a JSON object or ``k=v`` pairs
  separated by ``,``, ``;`` or ``&``.
* ``X-RateLimit-Reset`` is an integer epoch, ``int(1 + reset)`` (slowapi on
  ``limits`` >= 4 prints the float, e.g. ``1700000061.25``). The same
  formula is used for ``token-bucket``, where the reset is when the bucket
  is full again. ``Retry-After`` is ``int(1 + reset - now)`` with ``now``
  read after the hit, as in slowapi (60 on the request that opens a
  one-minute window; 61 under a frozen clock), except on a token bucket's
  refusal, which counts to when the bucket has room for the refused cost
  instead of the reset (``int(1 + wait)``, and ``1 + now + wait`` as an
  HTTP date): a client that obeys it gets through then.
* Rate-limit headers are added once per response (no duplicates from
  ``SlowAPIMiddleware``, stacked decorators or dynamic routes). An endpoint
  with ``headers_enabled`` that returns a plain value without a ``response:
  Response`` parameter still gets them (the decorator adds a hidden
  ``Response`` parameter for FastAPI); slowapi raised.
* Stacked ``@limit`` decorators are checked in one pass. Decorators of
  different ``Limiter`` instances on one view each apply (slowapi skipped
  every limiter after the first).
* A generator endpoint (FastAPI streams what it yields as JSON lines or
  server-sent events) cannot take the decorator: ``ConfigurationError`` at
  decoration, since FastAPI sends the 200 before a check could run (slowapi
  answered 500). ``Depends(limiter.depends(...))`` limits it.
* The decorator also accepts FastAPI endpoints without a ``request``
  parameter (a hidden ``HTTPConnection`` parameter is added; it stays out of
  the OpenAPI schema), Starlette views whose request parameter has another
  name, ``HTTPEndpoint`` methods, and websocket endpoints. A ``request`` (or
  ``response``) parameter annotated with another class, such as ``request:
  str``, is the endpoint's own (a query parameter for FastAPI): the hidden
  parameters are added and the limit and headers apply (slowapi raised on
  every request).
* Costs are whole numbers of hits: a float with no fraction (``2.0``) counts
  as that integer; a fraction (``1.5``) or a negative cost raises
  ``ConfigurationError`` at decoration, and a cost callable returning one
  raises ``ValueError`` naming the value when the request is checked (a 500
  unless ``swallow_errors``). slowapi handed any cost to ``limits``, whose
  memory storage counted fractions and whose Redis storage refused them.
* WebSocket connections are limited by the middlewares (default and
  application limits) and by the decorator. A rejected handshake gets an
  HTTP 429 with the JSON body when the server supports the
  ``websocket.http.response`` extension, else it is closed with code 1008
  before being accepted.
* ``Limiter.depends()`` gives a FastAPI dependency
  (``Depends(limiter.depends("5/minute"))``) for routes that should not take
  a ``request`` parameter (#23, #177). Its limit is checked when FastAPI
  runs the dependency, in FastAPI's order: its key function may read what
  an earlier dependency (authentication) put in ``request.state``, and a
  request an earlier dependency refuses uses up none of it. A route limited
  this way still gets the default and application limits, which a
  middleware checks before the app runs, as slowapi's does (a request the
  authentication then refuses counts towards them). The ``depends()``
  limit is then a second core call (a second Redis round trip), made inside
  the app when FastAPI runs the dependency, so that
  ``dependency_overrides``, FastAPI's own refusals (a body it cannot parse)
  and the app's exception handlers apply to it as to any dependency. A
  decorator on the same route checks its own limits when it runs. While
  the storage is down the ``in_memory_fallback`` limits stand in for all of
  a request's limits and are counted once per request. On a WebSocket
  route a ``depends()`` limit over its count closes the connection before
  accepting it (code 1008, 1013 when the storage is unavailable), as a
  ``WebSocketException`` does; the decorator and the middlewares send the
  429 response instead where the server supports it.
  Refusing a request while the storage is unavailable, it raises
  ``RateLimitStorageUnavailable``, an ``HTTPException`` that FastAPI
  renders as ``{"detail": "Rate limit storage unavailable"}`` with
  status 503.
* ``get_ipaddr`` reads the real ``X-Forwarded-For`` header and returns its
  first address (slowapi read a header named ``X_FORWARDED_FOR`` and
  returned all of it). ``rapidlimit.util.trusted_proxy_key_func`` reads
  ``X-Forwarded-For`` / ``Forwarded`` only when the peer is a trusted proxy.
* A key function with one required parameter not named ``request`` is given
  the request (slowapi called it without arguments, which failed). Within
  one request a key function is called once even if several limits use it.
* The strategy ``token-bucket`` is available besides ``fixed-window``,
  ``moving-window`` and ``sliding-window-counter``.
* ``request.state.view_rate_limit`` is a :class:`ViewRateLimit`: it indexes,
  unpacks and compares as slowapi's ``(limit, [prefix, key, scope])`` pair
  and also carries the core's decision; its ``limit`` is a
  ``rapidlimit.RateLimitItem`` and its key the key function's value as a
  string (the storage key it names; slowapi kept e.g. an ``int`` as it came).
  ``request.state._rate_limiting_complete`` is
  still set (and honoured) once a request was checked.
* Headers never touch the storage, so a storage failure can no longer break
  a response after its endpoint ran. ``in_memory_fallback`` works as in
  slowapi (same exponential back-off before retrying the main storage),
  except on Redis, whose engine reconnects by itself: the limiter goes back
  to Redis as soon as it is connected again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import math
import os
import sys
import time
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, Literal, TypeVar, Union, cast, get_type_hints
from urllib.parse import parse_qsl, urlsplit

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.config import Config
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException, WebSocketException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from rapidlimit import _core
from rapidlimit._core import (
    MAX_MOVING_WINDOW_AMOUNT as _MAX_MOVING_WINDOW_AMOUNT,
)
from rapidlimit._core import (
    Decision,
    HeaderNames,
    RateLimiter,
    RateLimitItem,
    RedisStorage,
    RedisUnavailableError,
    Storage,
    decide_scope,
    merge_headers,
)
from rapidlimit.errors import (
    ConfigurationError,
    RateLimitExceeded,
    RateLimitStorageUnavailable,
    retry_after_seconds,
)
from rapidlimit.storage import _is_redis_scheme, storage_from_string
from rapidlimit.strategies import STRATEGIES
from rapidlimit.wrappers import (
    CostType,
    Limit,
    LimitGroup,
    StrOrCallableStr,
    whole_cost,
)

__all__ = [
    "HEADERS",
    "MAX_BACKEND_CHECKS",
    "C",
    "Limiter",
    "ViewRateLimit",
    "_rate_limit_exceeded_handler",
]

T = TypeVar("T")

# asyncio.iscoroutinefunction is deprecated from Python 3.14 (removed in
# 3.16). From 3.12 inspect's sees inspect.markcoroutinefunction too, and
# asyncio's adds only the legacy _is_coroutine marker; before 3.12 that
# marker is how asgiref's markcoroutinefunction and AsyncMock say it.
if sys.version_info >= (3, 12):
    _iscoroutinefunction = inspect.iscoroutinefunction
else:
    _iscoroutinefunction = asyncio.iscoroutinefunction
F = TypeVar("F", bound=Callable[..., Any])
LimitSpec = Union[str, Callable[..., str]]


class C:
    """Names of the settings read from the environment or the ``.env`` file."""

    ENABLED = "RATELIMIT_ENABLED"
    HEADERS_ENABLED = "RATELIMIT_HEADERS_ENABLED"
    STORAGE_URL = "RATELIMIT_STORAGE_URL"
    STORAGE_OPTIONS = "RATELIMIT_STORAGE_OPTIONS"
    STRATEGY = "RATELIMIT_STRATEGY"
    GLOBAL_LIMITS = "RATELIMIT_GLOBAL"
    DEFAULT_LIMITS = "RATELIMIT_DEFAULT"
    APPLICATION_LIMITS = "RATELIMIT_APPLICATION"
    HEADER_LIMIT = "RATELIMIT_HEADER_LIMIT"
    HEADER_REMAINING = "RATELIMIT_HEADER_REMAINING"
    HEADER_RESET = "RATELIMIT_HEADER_RESET"
    SWALLOW_ERRORS = "RATELIMIT_SWALLOW_ERRORS"
    IN_MEMORY_FALLBACK = "RATELIMIT_IN_MEMORY_FALLBACK"
    IN_MEMORY_FALLBACK_ENABLED = "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"
    HEADER_RETRY_AFTER = "RATELIMIT_HEADER_RETRY_AFTER"
    HEADER_RETRY_AFTER_VALUE = "RATELIMIT_HEADER_RETRY_AFTER_VALUE"
    KEY_PREFIX = "RATELIMIT_KEY_PREFIX"


class HEADERS:
    """Keys of ``Limiter._header_mapping``."""

    RESET = 1
    REMAINING = 2
    LIMIT = 3
    RETRY_AFTER = 4


MAX_BACKEND_CHECKS = 5

# Keys this module keeps in the per-request state (scope["state"]).
_VIEW = "view_rate_limit"
_DONE = "_rate_limiting_complete"
_BY = "_rapidlimit_by"  # the Limiter that checked the request
_HEADERS_BY = "_rapidlimit_headers"  # "mw": the middleware adds them; "done"
# The Limiter that counted this request against its in_memory_fallback
# limits: they stand in for every limit of the request, so a second check
# (a depends() limit after a middleware's) must not count them again.
_FALLBACK_BY = "_rapidlimit_fallback"

# The Limiter whose middleware left a decorated route's application limits
# to the decorator (the request's _DONE is then False, which sends the
# decorator to its general path).
_OWED = "_rapidlimit_application_owed"
# On the function Limiter.depends() returns: (Limiter, LimitGroup).
_DEPENDS_ATTR = "__rapidlimit_depends__"

_REQUEST_PARAM = "_rapidlimit_connection"
_RESPONSE_PARAM = "_rapidlimit_response"
_TARGET_ATTR = "__rapidlimit_target__"

_JSON = b"application/json"
_NO_PEER = ("",)
_LOCALHOST = "127.0.0.1"  # get_remote_address without a peer
_RETRY_AFTER = b"retry-after"

# Header values are mostly small numbers: format them once.
_TABLE_SIZE = 4096
_NUMBERS = tuple(b"%d" % i for i in range(_TABLE_SIZE))
_floor = math.floor


@functools.lru_cache(maxsize=64)
def _pair_table(name: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """(name, number) header pairs for 0 <= number < _TABLE_SIZE."""
    return tuple((name, number) for number in _NUMBERS)


@functools.lru_cache(maxsize=64)
def _core_header_names(
    limit: bytes, remaining: bytes, reset: bytes, retry_after: bytes
) -> HeaderNames:
    """The core's header names, shared by limiters (immutable): their ready
    pairs take about 220 KB, which a limiter per application (per test) kept
    paying, and FastAPI's caches of endpoints keep thousands alive."""
    return HeaderNames(limit, remaining, reset, retry_after, ViewRateLimit)


class ViewRateLimit:
    """``request.state.view_rate_limit``: the limit the headers describe.

    Behaves as slowapi's ``(limit, [prefix, key, scope])`` pair (index it,
    unpack it, compare it to a tuple) and also carries the core's
    :class:`~rapidlimit.Decision` so headers need no storage access.
    """

    # One slot holding (Limit, prefix, key, scope, Decision): built per
    # request, so it is made with a single assignment (see _make_view). The
    # decorator's fast path stores the tuple of RateLimiter.decide_headers
    # in place of the Decision: its last item holds the ready header pairs.
    __slots__ = ("_data",)

    _data: tuple[Limit, str, Any, str, Any]

    def __init__(
        self,
        limit_wrapper: Limit,
        prefix: str,
        key: str,
        scope: str,
        decision: Decision | None,
    ) -> None:
        self._data = (limit_wrapper, prefix, key, scope, decision)

    @property
    def limit_wrapper(self) -> Limit:
        return self._data[0]

    @property
    def decision(self) -> Decision | None:
        found = self._data[4]
        if type(found) is tuple:  # decide_headers' (allowed, ..., headers)
            return Decision(found[:5])
        return cast("Decision | None", found)

    @property
    def limit(self) -> RateLimitItem:
        return self._data[0].limit

    @property
    def args(self) -> list[str]:
        _, prefix, key, scope, _ = self._data
        if prefix:
            return [prefix, str(key), scope]
        return [str(key), scope]

    def _as_tuple(self) -> tuple[RateLimitItem, list[str]]:
        return (self._data[0].limit, self.args)

    def __getitem__(self, index: int) -> Any:
        return self._as_tuple()[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._as_tuple())

    def __len__(self) -> int:
        return 2

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ViewRateLimit):
            return self._as_tuple() == other._as_tuple()
        if isinstance(other, (tuple, list)):
            return self._as_tuple() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ViewRateLimit({self._data[0]._text!r}, {self.args!r})"


_new_object = object.__new__
_CONNECTION_TYPES = frozenset((Request, WebSocket))
_SKIP: Any = object()
_UNSET: Any = object()  # not worked out yet


def _make_view(
    lim: Limit, prefix: str, key: Any, scope: str, decision: Decision
) -> ViewRateLimit:
    view: ViewRateLimit = _new_object(ViewRateLimit)
    view._data = (lim, prefix, key, scope, decision)
    return view


class _PartlyPrepared(Exception):
    """A callable of one of a request's limits (key function, scope,
    cost, exempt_when) raised after earlier limits were prepared. slowapi
    charges a request's limits one by one, calling each limit's callables
    just before its hit: it charges the limits before the one that fails
    (stopping at a refusal, which is the answer then) and only then meets
    the error. The limits before carry that order here."""

    def __init__(
        self,
        requests: list[tuple[RateLimitItem, str, int]],
        used: list[tuple[Limit, str, str]],
        error: Exception,
    ) -> None:
        super().__init__()
        self.requests = requests
        self.used = used
        self.error = error


class _Unavailable:
    """The outcome of a check the storage refused to answer (a Redis
    storage whose policy is fail-closed): the request gets a 503."""

    __slots__ = ("retry_after",)

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after

    def describe_error(self) -> str:
        return "Rate limit storage unavailable"


Failure = Union[Limit, _Unavailable]
_UNAVAILABLE_BODY = b'{"error":"Rate limit storage unavailable"}'


class _Plan:
    """Everything needed to check one endpoint, worked out once.

    When no limit involved is a callable, ``static`` is the whole ordered
    list (application, route, then defaults) and the request path just
    reads it.

    ``deferred``: a middleware's plan for a decorated endpoint, which holds
    only the application limits; the decorator checks the rest once
    FastAPI has resolved the endpoint's dependencies (as in slowapi, whose
    middleware leaves decorated routes to the decorator), so the request
    is not marked as checked.
    """

    __slots__ = (
        "default_groups",
        "deferred",
        "dynamic",
        "endpoint_name",
        "exempt",
        "head_groups",
        "route_dynamic",
        "route_static",
        "single",
        "static",
        "fast",
    )

    def __init__(
        self,
        *,
        exempt: bool = False,
        endpoint_name: str = "",
        head_groups: Sequence[LimitGroup] = (),
        route_static: Sequence[Limit] = (),
        route_dynamic: Sequence[LimitGroup] = (),
        default_groups: Sequence[LimitGroup] = (),
        deferred: bool = False,
    ) -> None:
        self.exempt = exempt
        # The middlewares' decide_scope spec (Limiter._fast_spec), worked
        # out on first use: a plan is made again when a setting it depends
        # on changes (Limiter._invalidate).
        self.fast: Any = _UNSET
        self.deferred = deferred
        self.endpoint_name = endpoint_name
        self.head_groups = tuple(head_groups)
        self.route_static = tuple(route_static)
        self.route_dynamic = tuple(route_dynamic)
        self.default_groups = tuple(default_groups)
        self.dynamic = bool(self.route_dynamic) or any(
            group.is_dynamic for group in (*self.head_groups, *self.default_groups)
        )
        static: list[Limit] = []
        if not self.dynamic:
            for group in self.head_groups:
                static.extend(group.limits_for(None))
            static.extend(self.route_static)
            if all(not lim.override_defaults for lim in self.route_static):
                for group in self.default_groups:
                    static.extend(group.limits_for(None))
        self.static: tuple[Limit, ...] = tuple(static)
        self.single: Limit | None = (
            static[0] if len(static) == 1 and static[0]._simple else None
        )


class _Registration:
    """The limits one function was decorated with (per Limiter)."""

    __slots__ = ("dynamic", "exempt", "name", "static")

    def __init__(self, name: str) -> None:
        self.name = name
        self.static: list[Limit] = []
        self.dynamic: list[LimitGroup] = []
        self.exempt = False


_EXEMPT_PLAN = _Plan(exempt=True)

# The Limiter attributes Limiter._fast_spec reads: setting one empties the
# wrappers' specs (Limiter.__setattr__).
_SPEC_INPUTS = frozenset(
    (
        "enabled",
        "_storage_dead",
        "_auto_check",
        "_request_filters",
        "_headers_enabled",
        "_retry_after",
        "_remote",
        "_url_keys",
        "_limiter",
        "_key_prefix",
        "_core_names",
        "_header_names_and_retry",
    )
)


def _func_name(func: Any) -> str:
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__name__", None) or type(func).__name__
    return f"{module}.{name}"


def _limiter_of(request: HTTPConnection) -> Limiter | None:
    app = request.scope.get("app")
    state = getattr(app, "state", None)
    limiter = getattr(state, "limiter", None)
    return limiter if isinstance(limiter, Limiter) else None


def _websocket_close(failed: Failure) -> tuple[int, str]:
    """The close code and reason refusing a WebSocket connection."""
    if type(failed) is _Unavailable:  # 1013: try again later
        return 1013, failed.describe_error()
    return 1008, f"Rate limit exceeded: {failed.describe_error()}"[:120]


async def _nothing() -> None:
    return None


_NO_BACKGROUND = BackgroundTask(_nothing)


class _TooManyRequests(Response):
    """The default 429 (the bytes ``_rate_limit_exceeded_handler`` would
    produce), built from precomputed parts and sent by itself."""

    media_type = "application/json"

    def __init__(
        self, body: bytes, headers: list[tuple[bytes, bytes]], status: int = 429
    ) -> None:
        self.status_code = status
        # Not None: FastAPI gives a returned response whose background is
        # None the request's BackgroundTasks, and those its dependencies
        # queued would then run for a request that was refused (slowapi
        # raises there, and FastAPI runs no background task after an
        # exception).
        self.background = _NO_BACKGROUND
        self.body = body
        self.raw_headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": self.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": self.body})
        if self.background is not None and self.background is not _NO_BACKGROUND:
            await self.background()


def _rate_limit_exceeded_handler(request: Request, exc: RateLimitExceeded) -> Response:
    """Builds the 429 JSON response, with the rate-limit headers if enabled.

    ``{"error": "Rate limit exceeded: 5 per 1 minute"}``.
    """
    response: Response = JSONResponse(
        {"error": f"Rate limit exceeded: {exc.detail}"}, status_code=429
    )
    limiter = getattr(exc, "_limiter", None) or _limiter_of(request)
    if limiter is not None:
        view = request.scope.get("state", {}).get(_VIEW)
        if view is not None:
            response = limiter._inject_headers(response, view)
    return response


def _as_limit_list(value: Any, what: str) -> list[LimitSpec]:
    """Accepts a list of strings/callables, or a single one."""
    if value is None:
        return []
    if isinstance(value, str) or callable(value):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise ConfigurationError(
            f"{what} must be a limit string, a callable returning one, or a "
            f"list of those; got {type(value).__name__}"
        ) from None
    for item in items:
        if not (isinstance(item, str) or callable(item)):
            raise ConfigurationError(
                f"{what} must contain limit strings or callables; got {item!r}"
            )
    return items


def _dedupe(items: list[LimitSpec]) -> list[LimitSpec]:
    seen: list[LimitSpec] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"{name}={value!r} is not a boolean")


def _parse_options(name: str, value: str) -> dict[str, Any]:
    text = value.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"{name} is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigurationError(f"{name} must be a JSON object")
        return parsed
    return dict(
        parse_qsl(text.replace(",", "&").replace(";", "&"), strict_parsing=True)
    )


def _request_factory() -> Callable[[Scope, Receive, Send], Request]:
    """``Request(scope, receive, send)``, without the constructor's call
    overhead when this Starlette's Request is known to hold exactly what
    the shortcut sets (checked here, once); the constructor otherwise."""
    expected = {
        "scope",
        "_receive",
        "_send",
        "_stream_consumed",
        "_is_disconnected",
        "_form",
    }
    try:
        sample = Request({"type": "http"})
        # (vars() succeeding means instances keep a __dict__: the
        # collections.abc bases give Request an empty __slots__ only)
        known = set(vars(sample)) == expected
    except Exception:  # pragma: no cover - a very different Starlette
        known = False
    if not known:  # pragma: no cover
        return Request

    def make(scope: Scope, receive: Receive, send: Send) -> Request:
        request: Request = _new_object(Request)
        request.scope = scope
        request._receive = receive
        request._send = send
        request._stream_consumed = False
        request._is_disconnected = False
        request._form = None
        return request

    return make


_make_request = _request_factory()


class _ScopeFinish:
    """Limiter._scope_check_async's end of the check, which the storage's
    waiter calls for a request it did not allow (as it calls the Limiter's
    own _finish_endpoint for the decorator's). ``conn``: the Request the
    key function was given, if one was made."""

    __slots__ = ("limiter", "receive", "send", "conn")

    def __init__(
        self,
        limiter: Limiter,
        receive: Receive,
        send: Send,
        conn: HTTPConnection | None,
    ) -> None:
        self.limiter = limiter
        self.receive = receive
        self.send = send
        self.conn = conn

    def _finish_endpoint(
        self,
        view: ViewRateLimit | None,
        exc: Exception | None,
        scope: Scope,
        plan: _Plan,
    ) -> Failure | None:
        return self.limiter._single_failure(
            view, exc, scope, plan, self.conn, (self.receive, self.send)
        )


async def _ready(value: Any) -> Any:
    """An awaitable of ``value``."""
    return value


def _decide_in_thread(
    storage: RedisStorage, limiter: RateLimiter, requests: Any, now: float
) -> Awaitable[list[Decision]]:
    """``storage.decide_many`` in a worker thread, for event loops other than
    asyncio's (trio, under Hypercorn or anyio), where the storage has no
    asyncio loop to complete its future: the call waits for Redis with the
    GIL released and the event loop keeps running meanwhile."""
    return run_in_threadpool(storage.decide_many, limiter, requests, now=now)


def _annotations(func: Any) -> dict[str, Any]:
    """``func``'s resolved annotations, or none if they cannot be resolved."""
    try:
        return get_type_hints(func)
    except Exception:  # forward references, odd callables: names decide
        return {}


def _foreign(hints: dict[str, Any], param: inspect.Parameter, kind: type) -> bool:
    """Whether ``param`` is annotated with a class other than ``kind``."""
    ann = hints.get(param.name, param.annotation)
    return (
        isinstance(ann, type)
        and ann is not inspect.Parameter.empty
        and not issubclass(ann, kind)
    )


def _leave_to_decorator(state: dict[str, Any]) -> None:
    """After a deferred plan's check (of the application limits alone):
    the decorator checks the route's limits."""
    state.pop(_DONE, None)
    state.pop(_BY, None)


def _owe_application_limits(state: dict[str, Any], limiter: Limiter) -> None:
    """A middleware's deferred plan: the decorator checks the application
    limits with the route's, unless the request was checked already."""
    if not (state.get(_DONE) and state.get(_BY, limiter) is limiter):
        state[_DONE] = False
        state[_OWED] = limiter


def _configured_cost(cost: CostType | float) -> CostType:
    """:func:`whole_cost` at decoration: a bad cost is a ConfigurationError."""
    try:
        return whole_cost(cost)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid cost {cost!r}: {exc}") from exc


def _refuse_generator(func: Any) -> None:
    """A generator endpoint (FastAPI streams what it yields, as JSON lines
    or server-sent events) cannot be limited by a wrapper: FastAPI calls it
    without awaiting anything and sends the 200 before its first item, so
    the wrapper's check never ran (the endpoint answered an empty 200,
    unlimited) and a 429 would come too late anyway."""
    for candidate in (func, inspect.unwrap(func)):
        if inspect.isasyncgenfunction(candidate) or inspect.isgeneratorfunction(
            candidate
        ):
            raise ConfigurationError(
                f"{_func_name(func)} is a generator: FastAPI streams what it "
                "yields after sending the status, too late to refuse it. "
                "Limit it with dependencies=[Depends(limiter.depends(...))], "
                "checked before the response starts."
            )


def _find_connection(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    for value in (*args, *kwargs.values()):
        if isinstance(value, HTTPConnection):
            return value
    return None


# The type of RedisStorage.decide_view_async's waiter (absent from a build
# without Redis, where no decide_scope returns one).
_WAITER_TYPE: Any = getattr(_core, "RedisWaiter", None)

# The decorator's wrapper, generated per endpoint (as dataclasses generate
# __init__): with the endpoint's own parameters FastAPI's keyword call binds
# straight to locals and the endpoint is called without packing an
# ``*args``/``**kwargs`` pair, which cost about 2,000 instructions of the
# ~13,500 a 5 us budget allows. Endpoints with ``*args``, ``**kwargs`` or
# positional-only parameters get the same body over ``*args, **kwargs``.
# Sync views get an async wrapper too: the check runs on the event loop (a
# rejection never costs a thread hop), then the view runs in the thread pool
# as Starlette and FastAPI would run it.
#
# The usual request (one simple limit keyed by get_remote_address, not
# checked yet) is checked by one core call, _core.decide_scope, from the
# scope, and its headers added by another, _core.merge_headers: the same
# work in Python cost as much as the decision. On Redis decide_scope
# returns the storage's waiter, awaited here, which resolves to the view or
# else to the outcome Limiter._finish_endpoint gives it. ``_rl_slot[0]`` holds
# what those calls need about the route and the limiter (see
# Limiter._fast_spec) while they apply: Limiter._invalidate empties it, also
# when a setting they depend on changes (Limiter.__setattr__), so no flag is
# read per request. decide_scope returns the view of an allowed request,
# False for a rejected one (its view is in the state), or None, having
# changed nothing but a missing scope["state"], for anything unusual (a
# request checked already, an odd peer, request filters, a stand-in core):
# every such request goes through Limiter._check_in_endpoint (or, on Redis,
# _check_in_endpoint_async).
_WRAPPER_TEMPLATE = """\
async def wrapper({params}):
{bind}
    _rl_spec = _rl_slot[0]
    if _rl_spec is not None and type(_rl_conn) is _rl_Request:
        try:
            _rl_view = _rl_decide(_rl_conn.scope, _rl_spec, _rl_conn)
        except Exception as _rl_exc:
            _rl_view = _rl_limiter._failed_in_endpoint(_rl_exc, _rl_conn, _rl_spec[0])
        if type(_rl_view) is _rl_View:
            # The usual request, allowed: every test below is the general
            # path's.
            _rl_response = await {call}
            _rl_merge(_rl_response, _rl_resp, _rl_view, _rl_spec)
            return _rl_response
        if type(_rl_view) is _rl_Waiter:
            # On Redis: the view of an allowed request, else the outcome
            # (Limiter._finish_endpoint) of this HTTP request.
            _rl_view = await _rl_view
            if type(_rl_view) is _rl_View:
                _rl_response = await {call}
                _rl_merge(_rl_response, _rl_resp, _rl_view, _rl_spec)
                return _rl_response
            if _rl_view is not None:
                return _rl_view  # the 429 (or 503)
            return await {call}
    else:
        # isinstance against HTTPConnection (an ABC) is slow: try the usual
        # classes first.
        if type(_rl_conn) not in _rl_types and not isinstance(
            _rl_conn, _rl_HTTPConnection
        ):
            _rl_conn = _rl_find({values})
            if _rl_conn is None:
                return await {call}
        if not _rl_limiter.enabled:
            return await {call}
        _rl_view = None
    if _rl_view is None:  # not for decide_scope: the general path
        if _rl_limiter._remote:
            _rl_view = await _rl_limiter._check_in_endpoint_async(
                _rl_conn, _rl_target
            )
        else:
            _rl_view = _rl_limiter._check_in_endpoint(_rl_conn, _rl_target)
    elif _rl_view is False:  # rejected by decide_scope
        _rl_view = _rl_limiter._rejected_in_endpoint(
            _rl_conn, _rl_conn.scope["state"][_rl_VIEW]
        )
    else:  # the storage failed: (what _on_error returned,)
        _rl_view = _rl_limiter._outcome(
            _rl_conn, _rl_view[0], _rl_conn.scope["state"]
        )
    if _rl_view is not None and type(_rl_view) is not _rl_View:
        if _rl_conn.scope["type"] == "websocket":
            await _rl_limiter._reject_websocket(_rl_conn, _rl_view)
            return None
        return _rl_view  # the 429
    _rl_response = await {call}
    if _rl_view is None and not _rl_limiter._auto_check:
        _rl_view = _rl_limiter._view_checked_in(_rl_conn)
    if _rl_view is not None and _rl_limiter._headers_enabled:
        {merge}
    return _rl_response
"""

# Adds the headers of ``_rl_view`` (``_rl_headers`` when not None) to the
# response returned, or else to the ``response`` parameter that FastAPI
# merges into it; _inject_headers when the response has rate-limit headers
# of its own already.
_MERGE_TEMPLATE = """\
if isinstance(_rl_response, _rl_Response):
    _rl_carrier = _rl_response
else:
    _rl_carrier = _rl_resp
if isinstance(_rl_carrier, _rl_Response):
    _rl_raw = _rl_carrier.raw_headers
    for _rl_pair in _rl_raw:  # usually content-length, content-type
        if _rl_pair[0] in _rl_names:
            _rl_limiter._inject_headers(_rl_carrier, _rl_view)
            break
    else:
        _rl_raw.extend({headers})
"""


def _indented(block: str, spaces: int) -> str:
    """``block`` for a place indented by ``spaces``, its first line's
    indentation excluded (the template has it)."""
    return ("\n" + " " * spaces).join(block.rstrip("\n").split("\n"))


def _build_wrapper(
    func: Any,
    limiter: Limiter,
    target: Any,
    params: list[inspect.Parameter],
    has_signature: bool,
    conn_name: str | None,
    conn_index: int,
    response_name: str | None,
    pop_conn: bool,
    pop_response: bool,
    is_async: bool,
) -> Any:
    """The decorator's wrapper of ``func`` (see _WRAPPER_TEMPLATE)."""
    pok = inspect.Parameter.POSITIONAL_OR_KEYWORD
    kw_only = inspect.Parameter.KEYWORD_ONLY
    # The signature seen through ``__wrapped__`` or ``__signature__`` (a
    # decorator of the app's below ours) is not the callable's own: such a
    # ``*args, **kwargs`` wrapper gets its arguments exactly as they came
    # (FastAPI's by keyword, Starlette's request by position), as slowapi
    # forwards them. Our own wrappers (stacked limits) take the explicit
    # call.
    own_signature = getattr(func, _TARGET_ATTR, None) is not None or not (
        hasattr(func, "__wrapped__") or "__signature__" in getattr(func, "__dict__", {})
    )
    explicit = (
        has_signature
        and own_signature
        and all(
            p.kind in (pok, kw_only) and not p.name.startswith("_rl_") for p in params
        )
    )
    defaults: list[Any] = []
    if explicit:
        positional = [p for p in params if p.kind == pok]
        keywords = [p for p in params if p.kind == kw_only]

        def declare(p: inspect.Parameter) -> str:
            if p.name in (_REQUEST_PARAM, _RESPONSE_PARAM):
                return f"{p.name}=None"  # an inner wrapper's, absent outside FastAPI
            if p.default is inspect.Parameter.empty:
                return p.name
            defaults.append(p.default)
            return f"{p.name}=_rl_d[{len(defaults) - 1}]"

        decl = [declare(p) for p in positional]
        hidden = [_REQUEST_PARAM] if pop_conn else []
        if pop_response:
            hidden.append(_RESPONSE_PARAM)
        if keywords or hidden:
            decl += ["*", *(declare(p) for p in keywords)]
            decl += [f"{name}=None" for name in hidden]
        args = [p.name for p in positional] + [f"{p.name}={p.name}" for p in keywords]
        bind = [
            f"    _rl_conn = {conn_name or 'None'}",
            f"    _rl_resp = {response_name or 'None'}",
        ]
        every = [p.name for p in params] + hidden
        values = f"({''.join(name + ', ' for name in every)}), {{}}"
        call_args = ", ".join(args)
    else:
        decl = ["*_rl_args", "**_rl_kwargs"]
        if pop_response:
            bind = [f"    _rl_resp = _rl_kwargs.pop({_RESPONSE_PARAM!r}, None)"]
        elif response_name is not None:
            bind = [f"    _rl_resp = _rl_kwargs.get({response_name!r})"]
        else:
            bind = ["    _rl_resp = None"]
        if pop_conn:
            bind.append(f"    _rl_conn = _rl_kwargs.pop({_REQUEST_PARAM!r}, None)")
        elif conn_index >= 0:  # Starlette: view(request); FastAPI: keywords
            bind += [
                f"    if {conn_index} < len(_rl_args):",
                f"        _rl_conn = _rl_args[{conn_index}]",
                "    else:",
                f"        _rl_conn = _rl_kwargs.get({conn_name!r})",
            ]
        elif conn_name is not None:
            bind.append(f"    _rl_conn = _rl_kwargs.get({conn_name!r})")
        else:
            bind.append("    _rl_conn = None")
        values = "_rl_args, _rl_kwargs"
        call_args = "*_rl_args, **_rl_kwargs"
    if is_async:
        call = f"_rl_func({call_args})"
    elif explicit and "func" not in {p.name for p in params if p.kind == kw_only}:
        call = f"_rl_threadpool(_rl_func{', ' if call_args else ''}{call_args})"
    else:  # a keyword ``func`` would collide with run_in_threadpool's own
        call = f"_rl_threadpool(_rl_partial(_rl_func, {call_args}))"
    source = _WRAPPER_TEMPLATE.format(
        params=", ".join(decl),
        bind="\n".join(bind),
        values=values,
        call=call,
        merge=_indented(
            _MERGE_TEMPLATE.format(headers="_rl_limiter._fast_items(_rl_view)"), 8
        ),
    )
    namespace: dict[str, Any] = {
        "_rl_func": func,
        "_rl_limiter": limiter,
        "_rl_target": target,
        "_rl_slot": limiter._fast_slot(target),
        "_rl_names": limiter._header_names_and_retry,
        "_rl_decide": decide_scope,
        "_rl_merge": merge_headers,
        "_rl_threadpool": run_in_threadpool,
        "_rl_partial": functools.partial,
        "_rl_Response": Response,
        "_rl_find": _find_connection,
        "_rl_types": _CONNECTION_TYPES,
        "_rl_Request": Request,  # (a websocket takes the general path)
        "_rl_HTTPConnection": HTTPConnection,
        "_rl_View": ViewRateLimit,
        "_rl_Waiter": _WAITER_TYPE,
        "_rl_VIEW": _VIEW,
        "_rl_d": defaults,
    }
    filename = f"<rapidlimit wrapper of {_func_name(func)}>"
    exec(compile(source, filename, "exec"), namespace)
    return namespace["wrapper"]


class Limiter:
    """The rate limiter (same constructor and defaults as slowapi's).

    * **key_func**: returns the key to limit by (e.g. the client address);
      called with the request when it takes one.
    * **default_limits**: limits for every route that has no decorator limit
      (needs one of the middlewares); each route gets its own counters.
    * **application_limits**: limits shared by all routes (middleware only).
    * **headers_enabled**: add ``X-RateLimit-*`` and ``Retry-After`` headers.
    * **strategy**: ``fixed-window`` (default), ``moving-window``,
      ``sliding-window-counter`` or ``token-bucket``.
    * **storage_uri** / **storage_options**: where counters live
      (``memory://`` by default).
    * **auto_check**: check limits automatically (default ``True``).
    * **swallow_errors**: let requests through when the storage fails.
    * **in_memory_fallback** / **in_memory_fallback_enabled**: use an
      in-memory store while the main storage is down.
    * **retry_after**: ``"http-date"`` for an HTTP-date ``Retry-After``,
      otherwise seconds.
    * **key_prefix**: prepended to every key.
    * **enabled**: set ``False`` to turn the limiter off.
    * **config_filename**: settings file (default ``.env`` when present).
    * **key_style**: ``"url"`` (scope by request path) or ``"endpoint"``
      (by ``module.function``).
    """

    def __init__(
        self,
        key_func: Callable[..., str],
        default_limits: Sequence[LimitSpec] | str | None = None,
        application_limits: Sequence[LimitSpec] | str | None = None,
        headers_enabled: bool = False,
        strategy: str | None = None,
        storage_uri: str | None = None,
        storage_options: dict[str, Any] | None = None,
        auto_check: bool = True,
        swallow_errors: bool = False,
        in_memory_fallback: Sequence[LimitSpec] | str | None = None,
        in_memory_fallback_enabled: bool = False,
        retry_after: str | None = None,
        key_prefix: str = "",
        enabled: bool = True,
        config_filename: str | None = None,
        key_style: Literal["endpoint", "url"] = "url",
    ) -> None:
        self.logger = logging.getLogger("rapidlimit")
        dotenv_file_exists = os.path.isfile(".env")
        self.app_config = Config(
            ".env"
            if dotenv_file_exists and config_filename is None
            else config_filename
        )
        if key_style not in ("url", "endpoint"):
            raise ConfigurationError(
                f"key_style must be 'url' or 'endpoint', not {key_style!r}"
            )
        if not callable(key_func):
            raise ConfigurationError("key_func must be a callable")

        self._key_func = key_func
        self._key_style = key_style
        self._url_keys = key_style == "url"
        self._auto_check = auto_check
        self._request_filters: list[Callable[..., bool]] = []

        self.enabled: bool = _parse_bool(C.ENABLED, self._setting(C.ENABLED, enabled))
        self._swallow_errors: bool = _parse_bool(
            C.SWALLOW_ERRORS, self._setting(C.SWALLOW_ERRORS, swallow_errors)
        )
        self._headers_enabled: bool = bool(headers_enabled) or _parse_bool(
            C.HEADERS_ENABLED, self._setting(C.HEADERS_ENABLED, False)
        )
        self._retry_after: str | None = retry_after or self._setting(
            C.HEADER_RETRY_AFTER_VALUE, None
        )
        self._key_prefix: str = key_prefix or self._setting(C.KEY_PREFIX, "") or ""

        strategy_name = strategy or self._setting(C.STRATEGY, "fixed-window")
        if strategy_name not in STRATEGIES:
            raise ConfigurationError(
                f"Invalid rate limiting strategy {strategy_name!r}; expected one "
                f"of {', '.join(sorted(STRATEGIES))}"
            )
        self._strategy = strategy_name

        # Header names.
        self._header_mapping: dict[int, str] = {
            HEADERS.RESET: self._setting(C.HEADER_RESET, "X-RateLimit-Reset"),
            HEADERS.REMAINING: self._setting(
                C.HEADER_REMAINING, "X-RateLimit-Remaining"
            ),
            HEADERS.LIMIT: self._setting(C.HEADER_LIMIT, "X-RateLimit-Limit"),
            HEADERS.RETRY_AFTER: self._setting(C.HEADER_RETRY_AFTER, "Retry-After"),
        }
        self._encode_header_names()

        # Limits given to the constructor (or, failing that, the settings).
        defaults = _dedupe(_as_limit_list(default_limits, "default_limits"))
        if not defaults:
            defaults = _as_limit_list(
                self._setting(C.DEFAULT_LIMITS, None), C.DEFAULT_LIMITS
            )
        application = _as_limit_list(application_limits, "application_limits")
        if not application:
            application = _as_limit_list(
                self._setting(C.APPLICATION_LIMITS, None), C.APPLICATION_LIMITS
            )
        fallback = _as_limit_list(in_memory_fallback, "in_memory_fallback")
        if not fallback:
            fallback = _as_limit_list(
                self._setting(C.IN_MEMORY_FALLBACK, None), C.IN_MEMORY_FALLBACK
            )
        self._default_limits: list[LimitGroup] = [
            self._group(lim, None) for lim in defaults
        ]
        self._application_limits: list[LimitGroup] = [
            self._group(lim, "global") for lim in application
        ]
        self._in_memory_fallback: list[LimitGroup] = [
            self._group(lim, None) for lim in fallback
        ]
        self._in_memory_fallback_enabled: bool = (
            bool(in_memory_fallback_enabled)
            or bool(self._in_memory_fallback)
            or _parse_bool(
                C.IN_MEMORY_FALLBACK_ENABLED,
                self._setting(C.IN_MEMORY_FALLBACK_ENABLED, False),
            )
        )

        # Storage (after the fallback settings: they choose a Redis
        # storage's failure policy).
        options = dict(storage_options or {})
        env_options = self._setting(C.STORAGE_OPTIONS, None)
        if env_options:
            options.update(_parse_options(C.STORAGE_OPTIONS, env_options))
        self._storage_options = options
        self._storage_uri = storage_uri or self._setting(C.STORAGE_URL, "memory://")
        try:
            self._storage: Storage = storage_from_string(
                self._storage_uri, **self._redis_policy(self._storage_uri, options)
            )
        except (TypeError, ValueError) as exc:  # each names the URI
            raise ConfigurationError(str(exc)) from exc
        self._limiter: RateLimiter = STRATEGIES[strategy_name](self._storage)
        # A Redis storage is asked without blocking the event loop.
        self._remote = isinstance(self._storage, RedisStorage)
        self._storage_dead = False
        self._fallback_storage: Storage | None = None
        self._fallback_limiter: RateLimiter | None = None
        if self._in_memory_fallback_enabled:
            self._fallback_storage = storage_from_string("memory://")
            self._fallback_limiter = STRATEGIES[strategy_name](self._fallback_storage)
        self._check_backend_count = 0
        self._last_check_backend = time.time()

        # Registrations (keyed by function object) and the plans built from
        # them; slowapi's name-keyed dicts are kept for code that reads them.
        self._registry: dict[Any, _Registration] = {}
        self._route_limits: dict[str, list[Limit]] = {}
        self._dynamic_route_limits: dict[str, list[LimitGroup]] = {}
        self._exempt_routes: set[str] = set()
        self._plans: dict[tuple[Any, bool, bool], _Plan] = {}
        self._endpoint_plans: dict[Any, _Plan] = {}  # middleware, per endpoint
        self._deco_plans: dict[Any, _Plan] = {}  # decorators, per function
        # Per decorated function: [its _fast_spec while the wrappers' single
        # core call applies to it, else None] (see _WRAPPER_TEMPLATE).
        self._fast_slots: dict[Any, list[tuple[Any, ...] | None]] = {}
        # The middlewares' HeaderSend spec (_send_spec), made on first use.
        self._send_spec_made: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------
    # configuration helpers

    def _setting(self, key: str, default: Any) -> Any:
        return self.app_config(key, default=default)

    def _redis_policy(self, uri: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with a Redis storage's ``on_error`` derived from
        slowapi's settings, unless the URI or the options set it:
        ``in_memory_fallback_enabled`` without fallback limits counts in
        memory with the same limits ("fallback"; with fallback limits the
        limiter switches to them itself), ``swallow_errors`` lets requests
        through ("fail-open"), and otherwise requests get a 503 with
        ``Retry-After`` ("fail-closed")."""
        if not isinstance(uri, str) or not _is_redis_scheme(urlsplit(uri).scheme):
            return options  # (storage_from_string explains a bad uri)
        if "on_error" in options or "on_error" in dict(parse_qsl(urlsplit(uri).query)):
            return options
        if self._in_memory_fallback_enabled and not self._in_memory_fallback:
            policy = "fallback"
        elif self._in_memory_fallback_enabled:
            policy = "fail-closed"  # raised, then handled by _on_error
        elif self._swallow_errors:
            policy = "fail-open"
        else:
            policy = "fail-closed"
        return {**options, "on_error": policy}

    def get_app_config(self, key: str, default_value: T | None = None) -> T | None:
        """Reads a ``RATELIMIT_*`` setting (environment, then config file)."""
        if default_value is None:
            return cast("T | None", self.app_config(key, default=None))
        if isinstance(default_value, bool):
            raw: Any = self.app_config(key, default=default_value)
            return cast(T, _parse_bool(key, raw))
        value: T = self.app_config(key, cast=type(default_value), default=default_value)
        return value

    def _encode_header_names(self) -> None:
        mapping = self._header_mapping
        self._h_limit = mapping[HEADERS.LIMIT].lower().encode("latin-1")
        self._h_remaining = mapping[HEADERS.REMAINING].lower().encode("latin-1")
        self._h_reset = mapping[HEADERS.RESET].lower().encode("latin-1")
        self._h_retry = mapping[HEADERS.RETRY_AFTER].lower().encode("latin-1")
        self._header_names = frozenset(
            (self._h_limit, self._h_remaining, self._h_reset, self._h_retry)
        )
        # The core formats the headers with the decision (seconds only).
        self._core_names = _core_header_names(
            self._h_limit, self._h_remaining, self._h_reset, self._h_retry
        )
        self._header_names_and_retry = self._header_names | {_RETRY_AFTER}
        # (name, value) pairs for small numbers, shared by limiters.
        self._remaining_pairs = _pair_table(self._h_remaining)
        self._retry_pairs = _pair_table(self._h_retry)

    def _refuse_too_large(self, limits: Iterable[Limit]) -> None:
        """Raises ValueError for a limit the strategy cannot take, at
        decoration for static limits (as a bad limit string is: each
        request would fail otherwise) and when a callable's are loaded."""
        if self._strategy != "moving-window":
            return
        for lim in limits:
            if lim.limit.amount > _MAX_MOVING_WINDOW_AMOUNT:
                raise ValueError(
                    f"moving-window limit '{lim.limit}' is too large: the "
                    "moving window logs every hit and allows at most "
                    f"{_MAX_MOVING_WINDOW_AMOUNT} per window; use "
                    "sliding-window-counter for large quotas"
                )

    def _refuse_too_large_static(self, group: LimitGroup) -> None:
        if not group.is_dynamic:
            self._refuse_too_large(group.limits_for(None))

    def _group(self, limit: LimitSpec, scope: str | None) -> LimitGroup:
        try:
            group = LimitGroup(
                limit, self._key_func, scope, False, None, None, None, 1, False
            )
            self._refuse_too_large_static(group)
            return group
        except ValueError as exc:
            raise ConfigurationError(f"invalid rate limit {limit!r}: {exc}") from exc

    # ------------------------------------------------------------------
    # slowapi API

    @property
    def limiter(self) -> RateLimiter:
        """The strategy in use (the in-memory fallback while storage is down)."""
        if self._storage_dead and self._fallback_limiter is not None:
            return self._fallback_limiter
        return self._limiter

    def reset(self) -> None:
        """Clears every counter (and the fallback store's). Raises, as
        slowapi does, when the storage cannot: a Redis storage that did not
        answer raises ``RedisUnavailableError`` (a ``ConnectionError``),
        whatever the failure policy, the in-process counts cleared first."""
        try:
            if self._fallback_storage is not None:
                self._fallback_storage.reset()
            self._storage.reset()
            self.logger.info("Storage has been reset and all limits cleared")
        except NotImplementedError:
            self.logger.warning("This storage type does not support being reset")

    def close(self) -> None:
        """Releases the storage's connections and I/O thread (a Redis
        storage; the memory store holds neither). Idempotent.

        Not in slowapi, whose storages hold no thread. Call it when a
        limiter's application is done before the process is, e.g. at
        lifespan shutdown or in a test fixture creating an application per
        test: FastAPI keeps its last 4,096 endpoints in caches, and with
        them the decorated views and their limiter, so dropping the
        application alone frees nothing. Afterwards the limiter answers
        as while Redis is down (its ``on_error`` policy)."""
        if isinstance(self._storage, RedisStorage):
            self._storage.close()

    def limit(
        self,
        limit_value: StrOrCallableStr,
        key_func: Callable[..., str] | None = None,
        per_method: bool = False,
        methods: list[str] | None = None,
        error_message: StrOrCallableStr | None = None,
        exempt_when: Callable[..., bool] | None = None,
        cost: CostType = 1,
        override_defaults: bool = True,
    ) -> Callable[[F], F]:
        """Decorator limiting one route.

        * **limit_value**: a limit string (``"5/minute;100/day"``) or a
          callable returning one (given the key if it has a ``key`` argument).
        * **key_func**: overrides the limiter's key function.
        * **per_method**: separate counters per HTTP method.
        * **methods**: only limit these methods.
        * **error_message**: 429 detail (string or callable).
        * **exempt_when**: callable (optionally taking the request); a true
          result exempts the request.
        * **cost**: hits charged per request, or a callable of the request.
        * **override_defaults**: when false, the default limits apply too.
        """
        return self._limit_decorator(
            limit_value,
            key_func,
            per_method=per_method,
            methods=methods,
            error_message=error_message,
            exempt_when=exempt_when,
            cost=cost,
            override_defaults=override_defaults,
        )

    def shared_limit(
        self,
        limit_value: StrOrCallableStr,
        scope: StrOrCallableStr,
        key_func: Callable[..., str] | None = None,
        error_message: StrOrCallableStr | None = None,
        exempt_when: Callable[..., bool] | None = None,
        cost: CostType = 1,
        override_defaults: bool = True,
    ) -> Callable[[F], F]:
        """Decorator for a limit shared by every route using the same scope.

        ``scope`` is a string or a callable (given the request if it has a
        ``request`` parameter, else the endpoint key).
        """
        return self._limit_decorator(
            limit_value,
            key_func,
            shared=True,
            scope=scope,
            error_message=error_message,
            exempt_when=exempt_when,
            cost=cost,
            override_defaults=override_defaults,
        )

    def exempt(self, obj: F) -> F:
        """Decorator exempting a route from every limit of this limiter."""
        target = getattr(obj, _TARGET_ATTR, obj)
        self._registration(target, obj).exempt = True
        self._exempt_routes.add(_func_name(obj))
        self._invalidate()
        return obj

    # ------------------------------------------------------------------
    # registration

    def _registration(self, target: Any, func: Any) -> _Registration:
        reg = self._registry.get(target)
        if reg is None:
            reg = _Registration(_func_name(func))
            self._registry[target] = reg
        return reg

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        # The wrappers' specs hold these: they are worked out again.
        if name in _SPEC_INPUTS and "_fast_slots" in self.__dict__:
            self._invalidate()

    def _invalidate(self) -> None:
        self._send_spec_made = None
        self._plans.clear()
        self._endpoint_plans.clear()
        self._deco_plans.clear()
        for slot in self._fast_slots.values():
            slot[0] = None

    def _fast_slot(self, target: Any) -> list[tuple[Any, ...] | None]:
        """The wrappers' cell for ``target``'s spec (shared by the wrappers of
        one function: stacked decorators)."""
        try:
            return self._fast_slots.setdefault(target, [None])
        except TypeError:  # unhashable: never filled, always the full check
            return [None]

    def _limit_decorator(
        self,
        limit_value: StrOrCallableStr,
        key_func: Callable[..., str] | None = None,
        shared: bool = False,
        scope: StrOrCallableStr | None = None,
        per_method: bool = False,
        methods: list[str] | None = None,
        error_message: StrOrCallableStr | None = None,
        exempt_when: Callable[..., bool] | None = None,
        cost: CostType = 1,
        override_defaults: bool = True,
    ) -> Callable[[F], F]:
        if shared and not scope:
            raise ConfigurationError("shared_limit needs a scope")
        group_scope = scope if shared else None
        cost = _configured_cost(cost)
        try:
            group = LimitGroup(
                limit_value,
                key_func or self._key_func,
                group_scope,
                per_method,
                methods,
                error_message,
                exempt_when,
                cost,
                override_defaults,
            )
            self._refuse_too_large_static(group)
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid rate limit {limit_value!r}: {exc}"
            ) from exc

        def decorator(func: F) -> F:
            _refuse_generator(func)
            target = getattr(func, _TARGET_ATTR, func)
            name = _func_name(func)
            reg = self._registration(target, func)
            if group.is_dynamic:
                reg.dynamic.append(group)
                self._dynamic_route_limits.setdefault(name, []).append(group)
            else:
                static = list(group.limits_for(None))
                reg.static.extend(static)
                self._route_limits.setdefault(name, []).extend(static)
            self._invalidate()
            return self._wrap(func, target)

        return decorator

    def _wrap(self, func: F, target: Any) -> F:
        """Wraps an endpoint so that it checks its limits when called."""
        try:
            signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None
        conn_name: str | None = None
        conn_index = -1
        response_name: str | None = None
        has_var_kw = False
        params = list(signature.parameters.values()) if signature is not None else []
        positional = (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        hints = _annotations(func) if params else {}
        for index, param in enumerate(params):
            # A ``request`` or ``response`` annotated with another class (a
            # query parameter, say) is the endpoint's own: FastAPI injects
            # nothing there, so the wrapper asks for hidden ones instead.
            if (
                conn_name is None
                and param.name in ("request", "websocket", _REQUEST_PARAM)
                and not _foreign(hints, param, HTTPConnection)
            ):
                conn_name = param.name
                if param.kind in positional:
                    conn_index = index
            elif (
                response_name is None
                and param.name in ("response", _RESPONSE_PARAM)
                and not _foreign(hints, param, Response)
            ):
                response_name = param.name
            elif param.kind == inspect.Parameter.VAR_KEYWORD:
                has_var_kw = True
        if conn_name is None:
            for index, param in enumerate(params):
                ann = param.annotation
                if isinstance(ann, type) and issubclass(ann, HTTPConnection):
                    conn_name = param.name
                    if param.kind in positional:
                        conn_index = index
                    break
        can_inject = signature is not None and not has_var_kw
        pop_conn = conn_name is None and can_inject
        pop_response = response_name is None and can_inject and conn_name != "websocket"
        if pop_conn:
            conn_name = _REQUEST_PARAM
        if pop_response:
            response_name = _RESPONSE_PARAM
        is_async = _iscoroutinefunction(func)
        wrapper = _build_wrapper(
            func,
            self,
            target,
            params,
            signature is not None,
            conn_name,
            conn_index,
            response_name,
            pop_conn,
            pop_response,
            is_async,
        )
        functools.update_wrapper(wrapper, func)

        if signature is not None and (pop_conn or pop_response):
            extra: list[inspect.Parameter] = []
            if pop_conn:
                extra.append(
                    inspect.Parameter(
                        _REQUEST_PARAM,
                        inspect.Parameter.KEYWORD_ONLY,
                        annotation=HTTPConnection,
                    )
                )
            if pop_response:
                extra.append(
                    inspect.Parameter(
                        _RESPONSE_PARAM,
                        inspect.Parameter.KEYWORD_ONLY,
                        annotation=Response,
                    )
                )
            wrapper.__signature__ = signature.replace(parameters=[*params, *extra])
        setattr(wrapper, _TARGET_ATTR, target)
        return cast(F, wrapper)

    # ------------------------------------------------------------------
    # plans

    def _plan(self, target: Any, in_middleware: bool, defer: bool = False) -> _Plan:
        """The plan for a registered function (or an unregistered one);
        ``defer``: deferred (see _Plan) when the function is decorated."""
        key = (target, in_middleware, defer)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        reg = self._registry.get(target) if target is not None else None
        if reg is not None and reg.exempt:
            plan = _EXEMPT_PLAN
        else:
            if reg is not None:
                name = reg.name
            else:
                name = _func_name(target) if target is not None else ""
            if defer and reg is not None and (reg.static or reg.dynamic):
                plan = _Plan(
                    endpoint_name=name,
                    head_groups=self._application_limits,
                    deferred=True,
                )
            else:
                plan = _Plan(
                    endpoint_name=name,
                    head_groups=self._application_limits if in_middleware else (),
                    route_static=reg.static if reg is not None else (),
                    route_dynamic=reg.dynamic if reg is not None else (),
                    default_groups=self._default_limits,
                )
        self._plans[key] = plan
        return plan

    def _target_of(self, endpoint: Any) -> Any:
        """The registered function behind an endpoint (itself if none)."""
        seen = 0
        current = endpoint
        while current is not None and seen < 32:
            if current in self._registry:
                return current
            target = getattr(current, _TARGET_ATTR, None)
            if target is not None and target in self._registry:
                return target
            current = getattr(current, "__wrapped__", None)
            seen += 1
        return endpoint

    def _plan_for_endpoint(self, endpoint: Any) -> _Plan:
        """Middleware plan for a routed endpoint (cached per endpoint):
        deferred when the route calls a decorator's wrapper, not when it
        calls the bare function (``@limit`` above ``@app.get``)."""
        plan = self._endpoint_plans.get(endpoint)
        if plan is None:
            try:
                target = self._target_of(endpoint)
                plan = self._plan(target, True, target is not endpoint)
            except TypeError:  # unhashable endpoint
                plan = self._plan(None, True)
            with contextlib.suppress(TypeError):
                self._endpoint_plans[endpoint] = plan
        return plan

    # ------------------------------------------------------------------
    # checking

    def _endpoint_plan(
        self, conn: HTTPConnection, target: Any
    ) -> tuple[_Plan, dict[str, Any]] | None:
        """The decorator's plan and the request state, or None when this
        request needs no check (checked already, exempt, auto_check off)."""
        scope = conn.scope
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        elif state.get(_DONE) and state.get(_BY, self) is self:
            return None  # checked already (middleware, stacked decorator)
        if not self._auto_check:
            return None
        if state.get(_OWED) is self:
            # A middleware left this request to the decorator: its
            # application limits are checked here, in the same core call.
            del state[_OWED]
            plan = self._plan(target, True)
            return None if plan.exempt else (plan, state)
        plan = self._deco_plans.get(target)
        if plan is None:
            plan = self._plan(target, False)
            self._deco_plans[target] = plan
            slot = self._fast_slots.get(target)
            if slot is not None:
                slot[0] = self._fast_spec(plan)
        if plan.exempt:
            return None
        return plan, state

    def _fast_spec(self, plan: _Plan) -> tuple[Any, ...] | None:
        """decide_scope's and merge_headers' ``spec`` for a decorator plan,
        or None when the wrappers must use the general path for it. It holds
        the settings the wrappers would otherwise read per request: a change
        to any of them (_SPEC_INPUTS) empties the slots."""
        single = plan.single
        if (
            single is None
            or not single._peer_key
            or not self.enabled
            or self._storage_dead
            or not self._auto_check
        ):
            return None
        if not self._url_keys and not plan.endpoint_name:
            return None
        return (
            plan,
            single,
            single.limit,
            single.cost,
            self._core_names,
            single._static_scope or None,
            None if self._url_keys else plan.endpoint_name,
            _DONE,
            _BY,
            _VIEW,
            self._limiter,
            self._key_prefix,
            self,
            self._request_filters,  # decide_scope: a general path unless empty
            Response,
            self._header_names_and_retry,
            bool(self._headers_enabled),
            self._retry_after != "http-date",  # the core's Retry-After applies
            self._merge_into,
            self._send_spec(),
        )

    def _send_spec(self) -> tuple[Any, ...]:
        """The middlewares' ``HeaderSend`` spec: what adds the headers of
        the request's view when the response starts (the same for every
        request until a setting it holds changes, _SPEC_INPUTS)."""
        spec = self._send_spec_made
        if spec is None:
            spec = self._send_spec_made = (
                self._core_names,
                _VIEW,
                self._header_names_and_retry,
                self._retry_after != "http-date",  # the core's Retry-After applies
                self._merge_message,
                _HEADERS_BY,
                "mw",
            )
        return spec

    def _merge_message(self, message: dict[str, Any], view: Any) -> None:
        """``HeaderSend``'s general case: ``view``'s headers added to the
        response's start ``message`` (replacing ones of the same names)."""
        headers = message.get("headers") or ()
        for pair in headers:
            if pair[0] in self._header_names_and_retry:
                message["headers"] = self._merge_headers(headers, view)
                return
        if type(view) is ViewRateLimit and view._data[4] is not None:
            items = self._fast_items(view)
        else:
            items = self._merge_headers((), view)
        # In place, as Starlette's own middlewares do.
        if type(headers) is list:
            headers.extend(items)
        else:
            message["headers"] = [*headers, *items]

    def _view_checked_in(self, conn: HTTPConnection) -> ViewRateLimit | None:
        """With auto_check=False, the view a ``_check_request_limit`` call
        made inside the endpoint left: slowapi's decorator adds the headers
        of ``request.state.view_rate_limit`` after the endpoint whether or
        not it checked itself, so a view that checks itself gets them."""
        state = conn.scope.get("state") or {}
        view = state.get(_VIEW)
        if type(view) is ViewRateLimit and state.get(_BY) is self:
            return view
        return None

    def _merge_into(self, carrier: Response, view: ViewRateLimit) -> None:
        """merge_headers' general case: ``_MERGE_TEMPLATE`` for a response."""
        raw = carrier.raw_headers
        for pair in raw:
            if pair[0] in self._header_names_and_retry:
                self._inject_headers(carrier, view)
                return
        raw.extend(self._fast_items(view))

    def _failed_in_endpoint(
        self, exc: Exception, conn: HTTPConnection, plan: _Plan
    ) -> tuple[Failure | None]:
        """:meth:`_on_error` for an error of decide_scope (raised once the
        request was marked as checked)."""
        scope = conn.scope
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        endpoint_key = scope.get("path") if self._url_keys else plan.endpoint_name
        return (self._on_error(exc, conn, plan, state, endpoint_key or ""),)

    def _rejected_by_core(self, view: ViewRateLimit) -> Limit:
        """The limit a decide_scope call found exceeded (``view`` is the
        rejection's), logged as the general path logs it."""
        lim, _, key, name, _ = view._data
        if self.logger.isEnabledFor(logging.DEBUG):
            self._log_rejection(lim, key, name)
        return lim

    def _rejected_in_endpoint(self, conn: HTTPConnection, view: ViewRateLimit) -> Any:
        """:meth:`_outcome` for a request decide_scope rejected."""
        return self._outcome(conn, self._rejected_by_core(view), conn.scope["state"])

    def _check_in_endpoint(self, conn: HTTPConnection, target: Any) -> Any:
        """The decorator's check.

        Returns None when there is nothing more to do (checked already,
        exempt, nothing applied), the :class:`ViewRateLimit` when the request
        may go on and the headers are this wrapper's to add, or else the
        rejection: a ready 429 (or 503) response when the app's handler is
        ``_rate_limit_exceeded_handler`` (with another handler the exception
        is raised here), or the failure for a websocket.
        """
        scope = conn.scope
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        plan = self._deco_plans.get(target)
        if (
            plan is None
            or plan.single is None
            or _DONE in state
            or self._storage_dead
            or self._request_filters
            or not self._auto_check
        ):
            found = self._endpoint_plan(conn, target)
            if found is None:
                return None
            plan, state = found
            return self._outcome(conn, self._check(conn, plan, state), state)
        # _endpoint_plan, _begin and _decide_single, inlined: the hot path.
        single = plan.single
        state[_DONE] = True
        state[_BY] = self
        endpoint_key = scope.get("path") if self._url_keys else plan.endpoint_name
        if not endpoint_key:
            state[_VIEW] = None
            return None
        failed: Failure | None
        try:
            if single._peer_key:  # get_remote_address, inlined
                key = (scope.get("client") or _NO_PEER)[0] or _LOCALHOST
            else:
                func = single.key_func
                key = func(conn) if single._key_takes_request else func()
            if key:
                if key.__class__ is not str:  # keyed as f"{key}" elsewhere
                    key = f"{key}"
                name = single._static_scope or endpoint_key
                view: ViewRateLimit = self._limiter.decide_view(
                    single.limit,
                    key,
                    name,
                    single.cost,  # type: ignore[arg-type]
                    time.time(),
                    self._core_names,
                    single,
                    self._key_prefix,
                )
                state[_VIEW] = view
                if view._data[4][0]:
                    return view
                if self.logger.isEnabledFor(logging.DEBUG):
                    self._log_rejection(single, key, name)
                failed = single
            else:
                failed = self._evaluate(conn, plan, state, endpoint_key, self._limiter)
        except Exception as exc:
            failed = self._on_error(exc, conn, plan, state, endpoint_key)
        return self._outcome(conn, failed, state)

    def _check_in_endpoint_async(
        self, conn: HTTPConnection, target: Any
    ) -> Awaitable[Any]:
        """:meth:`_check_in_endpoint` for a Redis storage (non-blocking): an
        awaitable of what that returns.

        The usual request is the storage's waiter itself, which finishes
        the check when awaited (see :meth:`_finish_endpoint`): a coroutine
        here would be one more frame for the event loop to suspend and
        resume per request, and the check's last steps run in C++.
        """
        scope = conn.scope
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        plan = self._deco_plans.get(target)
        if (
            plan is None
            or plan.single is None
            or _DONE in state
            or self._storage_dead
            or self._request_filters
            or not self._auto_check
        ):
            return self._check_in_endpoint_general(conn, target)
        # _check_in_endpoint's hot path, the decision handed to the storage's
        # waiter: the view and its headers come from the core.
        single = plan.single
        state[_DONE] = True
        state[_BY] = self
        endpoint_key = scope.get("path") if self._url_keys else plan.endpoint_name
        if not endpoint_key:
            state[_VIEW] = None
            return _ready(None)
        failed: Failure | None
        try:
            if single._peer_key:  # get_remote_address, inlined
                key = (scope.get("client") or _NO_PEER)[0] or _LOCALHOST
            else:
                func = single.key_func
                key = func(conn) if single._key_takes_request else func()
            if not key:  # the general path logs it
                return self._checked_async(conn, plan, state)
            if key.__class__ is not str:  # keyed as f"{key}" elsewhere
                key = f"{key}"
            storage: RedisStorage = self._storage  # type: ignore[assignment]
            name = single._static_scope or endpoint_key
            now = time.time()
            try:
                return storage.decide_view_async(
                    self._limiter,
                    single.limit,
                    key,
                    name,
                    single.cost,  # type: ignore[arg-type]
                    now,
                    self._core_names,
                    single,
                    self._key_prefix,
                    state,
                    _VIEW,
                    self,
                    conn,
                    plan,
                )
            except RuntimeError:
                if _get_running_loop() is not None:
                    raise
            return self._view_in_thread(conn, plan, state, key, name, now)
        except Exception as exc:
            failed = self._on_error(exc, conn, plan, state, endpoint_key)
        return _ready(self._outcome(conn, failed, state))

    async def _view_in_thread(
        self,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        key: str,
        name: str,
        now: float,
    ) -> Any:
        """:meth:`_check_in_endpoint_async`'s decision where no asyncio
        loop runs (see :func:`_decide_in_thread`)."""
        single = plan.single
        assert single is not None
        try:
            view: ViewRateLimit = await run_in_threadpool(
                self._limiter.decide_view,
                single.limit,
                key,
                name,
                single.cost,  # type: ignore[arg-type]
                now,
                self._core_names,
                single,
                self._key_prefix,
            )
        except Exception as exc:
            return self._finish_endpoint(None, exc, conn, plan)
        state[_VIEW] = view
        if view._data[4][0]:
            return view
        return self._finish_endpoint(view, None, conn, plan)

    def _finish_endpoint(
        self,
        view: ViewRateLimit | None,
        exc: Exception | None,
        conn: HTTPConnection,
        plan: _Plan,
    ) -> Any:
        """The end of :meth:`_check_in_endpoint_async`'s check for anything
        but an allowed request: ``view`` was rejected (and is the state's
        view already), or the storage raised ``exc``."""
        state = conn.scope["state"]
        failed = self._single_failure(view, exc, conn.scope, plan, conn)
        return self._outcome(conn, failed, state)

    def _single_failure(
        self,
        view: ViewRateLimit | None,
        exc: Exception | None,
        scope: Scope,
        plan: _Plan,
        conn: HTTPConnection | None = None,
        parts: tuple[Receive, Send] | None = None,
    ) -> Failure | None:
        """What failed a single-limit check that was not allowed: the limit
        (``view`` rejected), or what the storage's error ``exc`` comes to
        (:meth:`_on_error`, given ``conn`` or one made from ``scope`` and
        ``parts``)."""
        single = plan.single
        assert single is not None
        try:
            if exc is not None:
                raise exc
            assert view is not None
            if self.logger.isEnabledFor(logging.DEBUG):
                self._log_rejection(single, view._data[2], view._data[3])
            return single
        except Exception as error:
            if conn is None:
                assert parts is not None
                conn = _make_request(scope, *parts)
            endpoint_key = scope.get("path") if self._url_keys else plan.endpoint_name
            return self._on_error(error, conn, plan, scope["state"], endpoint_key or "")

    def _scope_check_async(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        plan: _Plan,
        state: dict[str, Any],
    ) -> Awaitable[Any] | None:
        """The ASGI middleware's check of an HTTP request on Redis for the
        usual plan (one limit): the storage's waiter, resolving to the view
        when the request is allowed, else to what failed it (the limit, or
        :class:`_Unavailable`; None when the storage's error lets it
        through). Keyed by the peer's address, no Request is made unless the
        storage fails. None: use :meth:`_check_async`.

        The middleware awaits this before the framework builds the
        request's objects, which a request suspended inside the endpoint
        keeps alive meanwhile: with many requests waiting on Redis
        together, those objects alone set off CPython's garbage
        collections."""
        single = plan.single
        if single is None or self._storage_dead or self._request_filters:
            return None
        endpoint_key = scope.get("path") if self._url_keys else plan.endpoint_name
        if not endpoint_key:
            return None
        state[_DONE] = True
        state[_BY] = self
        conn: HTTPConnection | None = None
        storage: RedisStorage = self._storage  # type: ignore[assignment]
        try:
            if single._peer_key:  # get_remote_address, inlined
                key = (scope.get("client") or _NO_PEER)[0] or _LOCALHOST
            else:
                conn = _make_request(scope, receive, send)
                func = single.key_func
                key = func(conn) if single._key_takes_request else func()
                if not key:  # the general path logs it
                    return None
                if key.__class__ is not str:  # keyed as f"{key}" elsewhere
                    key = f"{key}"
            try:
                return storage.decide_view_async(
                    self._limiter,
                    single.limit,
                    key,
                    single._static_scope or endpoint_key,
                    single.cost,  # type: ignore[arg-type]
                    time.time(),
                    self._core_names,
                    single,
                    self._key_prefix,
                    state,
                    _VIEW,
                    _ScopeFinish(self, receive, send, conn),
                    scope,
                    plan,
                )
            except RuntimeError:
                if _get_running_loop() is not None:
                    raise
            return None  # no asyncio loop: _check_async decides in a thread
        except Exception as exc:
            failed = self._single_failure(None, exc, scope, plan, conn, (receive, send))
            return _ready(failed)

    async def _check_in_endpoint_general(
        self, conn: HTTPConnection, target: Any
    ) -> Any:
        """:meth:`_check_in_endpoint_async` for the requests that are not its
        usual one (checked already, no single limit, request filters...)."""
        found = self._endpoint_plan(conn, target)
        if found is None:
            return None
        plan, state = found
        return await self._checked_async(conn, plan, state)

    async def _checked_async(
        self, conn: HTTPConnection, plan: _Plan, state: dict[str, Any]
    ) -> Any:
        return self._outcome(conn, await self._check_async(conn, plan, state), state)

    def _outcome(
        self, conn: HTTPConnection, failed: Failure | None, state: dict[str, Any]
    ) -> Any:
        if failed is None:
            return state.get(_VIEW)
        if conn.scope["type"] == "websocket":
            return failed
        return self._rejection_response(conn, failed, state)

    def _log_rejection(self, lim: Limit, key: Any, scope: str) -> None:
        # DEBUG, not WARNING: a flood of rejections must stay cheap.
        self.logger.debug(
            "ratelimit %s (%s) exceeded at endpoint: %s", lim._text, key, scope
        )

    def _begin(
        self,
        scope: Scope,
        state: dict[str, Any],
        plan: _Plan,
        endpoint_name: str | None,
        mark: bool = True,
    ) -> str | None:
        """Marks the request as checked (unless not ``mark``: a
        ``depends()`` limit alone, after which the route's own limits are
        still due); returns the endpoint key, or None when there is nothing
        to check."""
        if mark:
            state[_DONE] = True
            state[_BY] = self
        if self._request_filters and any(fn() for fn in self._request_filters):
            return None
        if self._url_keys:
            endpoint_key = scope.get("path") or ""
        elif endpoint_name is not None:
            endpoint_key = endpoint_name
        else:
            endpoint_key = plan.endpoint_name
        if not endpoint_key:
            state[_VIEW] = None
            return None
        return endpoint_key

    def _check(
        self,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        endpoint_name: str | None = None,
        mark: bool = True,
    ) -> Failure | None:
        """Checks ``plan`` for ``conn``; records the outcome in ``state``.

        Returns the failed limit (or :class:`_Unavailable`), or None when
        the request may go on.
        """
        endpoint_key = self._begin(conn.scope, state, plan, endpoint_name, mark)
        if endpoint_key is None:
            return None
        if self._storage_dead:
            return self._check_while_dead(conn, plan, state, endpoint_key)
        try:
            single = plan.single
            if single is not None:  # _evaluate's first step, one call less
                failed = self._decide_single(
                    conn.scope, conn, single, state, endpoint_key, self._limiter
                )
                if failed is not _SKIP:
                    return failed  # type: ignore[no-any-return]
            return self._evaluate(conn, plan, state, endpoint_key, self._limiter)
        except Exception as exc:
            return self._on_error(exc, conn, plan, state, endpoint_key)

    def _check_http(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        plan: _Plan,
        state: dict[str, Any],
    ) -> Failure | None:
        """:meth:`_check` for the middlewares' HTTP requests: for one limit
        keyed by the peer's address no ``Request`` is made (building one
        cost about a third of the check), unless an error needs it."""
        single = plan.single
        if single is None or not single._peer_key or self._storage_dead:
            return self._check(_make_request(scope, receive, send), plan, state)
        endpoint_key = self._begin(scope, state, plan, None)
        if endpoint_key is None:
            return None
        try:
            return self._decide_single(  # type: ignore[no-any-return]
                scope, None, single, state, endpoint_key, self._limiter
            )
        except Exception as exc:
            conn = _make_request(scope, receive, send)
            return self._on_error(exc, conn, plan, state, endpoint_key)

    async def _check_async(
        self,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        endpoint_name: str | None = None,
        mark: bool = True,
    ) -> Failure | None:
        """:meth:`_check` for a Redis storage: the event loop keeps running
        while Redis answers."""
        endpoint_key = self._begin(conn.scope, state, plan, endpoint_name, mark)
        if endpoint_key is None:
            return None
        # Back on Redis the way below: _check_while_dead's decision would
        # wait for Redis on the event loop.
        if self._storage_dead and not self._recovered():
            return self._check_in_fallback(conn, plan, state, endpoint_key)
        try:
            partial: _PartlyPrepared | None = None
            try:
                prepared = self._prepare(conn, plan, state, endpoint_key)
            except _PartlyPrepared as cut:
                partial = cut
                prepared = cut.requests, cut.used
            if prepared is None:
                return None
            requests, used = prepared
            storage = cast(RedisStorage, self._storage)
            now = time.time()
            pending: Awaitable[list[Decision]]
            try:
                pending = storage.decide_many_async(self._limiter, requests, now=now)
            except RuntimeError:
                if _get_running_loop() is not None:
                    raise
                pending = _decide_in_thread(storage, self._limiter, requests, now)
            failed = self._conclude(await pending, used, state)
            if partial is not None and failed is None:
                raise partial.error
            return failed
        except Exception as exc:
            return self._on_error(exc, conn, plan, state, endpoint_key)

    def _on_error(
        self,
        exc: Exception,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        endpoint_key: str,
    ) -> Failure | None:
        state[_VIEW] = None
        unavailable = isinstance(exc, RedisUnavailableError)
        if unavailable and not self._in_memory_fallback_enabled:
            # The storage's own policy is fail-closed: refuse with a 503.
            # The outage itself is reported once (rapidlimit.redis, WARNING).
            self.logger.debug("Rate limit storage unavailable: %s", exc)
            return _Unavailable(getattr(exc, "retry_after", 1.0))
        if self._in_memory_fallback_enabled:
            redis = cast(RedisStorage, self._storage) if self._remote else None
            if redis is not None and (
                redis.connected or (not unavailable and redis.on_error == "fallback")
            ):
                # No outage declared: Redis is up and refused this request
                # alone (a key holding another type of value;
                # rapidlimit.redis logs it), so the next request would find
                # the storage "recovered" at once; or Redis is down, the
                # store's own fallback is counting the same limits in
                # memory, and only the request's own key or cost function
                # failed: a switch to this limiter's store would forget
                # those counts. Decided in memory.
                return self._check_in_fallback(conn, plan, state, endpoint_key)
            if not self._storage_dead:
                self.logger.warning(
                    "Rate limit storage unreachable - falling back to in-memory storage"
                )
                self._storage_dead = True
                self._check_backend_count = 0
                self._last_check_backend = time.time()
            # Also when another request, awaiting the storage at the same
            # time, switched first (a 500 before). Decided in memory at
            # once: asking the storage again could fail again, recursively.
            return self._check_while_dead(
                conn, plan, state, endpoint_key, recheck=False
            )
        if self._swallow_errors:
            self.logger.exception("Failed to rate limit. Swallowing error")
            return None
        raise exc

    def _should_check_backend(self) -> bool:
        if self._check_backend_count > MAX_BACKEND_CHECKS:
            self._check_backend_count = 0
        now = time.time()
        if now - self._last_check_backend > pow(2, self._check_backend_count):
            self._last_check_backend = now
            self._check_backend_count += 1
            return True
        return False

    def _check_while_dead(
        self,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        endpoint_key: str,
        recheck: bool = True,
    ) -> Failure | None:
        if recheck and self._recovered():
            try:
                return self._evaluate(conn, plan, state, endpoint_key, self._limiter)
            except Exception as exc:
                return self._on_error(exc, conn, plan, state, endpoint_key)
        return self._check_in_fallback(conn, plan, state, endpoint_key)

    def _recovered(self) -> bool:
        """Whether the storage, found dead, answers again; if so it is the
        storage from now on."""
        try:
            if self._remote:
                # The Redis engine reconnects by itself, with a backoff of
                # its own: back to Redis as soon as it is up (a read, not a
                # PING on the event loop; slowapi's timer of up to 32 s
                # would keep counting in memory long after).
                recovered = bool(getattr(self._storage, "connected", False))
            else:
                recovered = self._should_check_backend() and self._storage.check()
        except Exception:
            recovered = False
        if recovered:
            self.logger.info("Rate limit storage recovered")
            self._storage_dead = False
            self._check_backend_count = 0
        return recovered

    def _check_in_fallback(
        self,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        endpoint_key: str,
    ) -> Failure | None:
        """The check in memory: while the storage is dead, or for one
        request the storage did not decide (see _on_error)."""
        fallback = self._fallback_limiter
        assert fallback is not None
        if self._in_memory_fallback and not plan.exempt:
            if state.get(_FALLBACK_BY) is self:
                return None
            state[_FALLBACK_BY] = self
            limits: list[Limit] = []
            for group in self._in_memory_fallback:
                limits.extend(group.limits_for(conn))
            plan = _Plan(endpoint_name=plan.endpoint_name, route_static=limits)
        try:
            return self._evaluate(conn, plan, state, endpoint_key, fallback)
        except Exception:
            # A limit decided before the one whose key or cost function
            # failed leaves no view, as the check on the storage leaves none.
            state[_VIEW] = None
            if self._swallow_errors:
                self.logger.exception("Failed to rate limit. Swallowing error")
                return None
            raise

    def _load(
        self, conn: HTTPConnection, groups: Iterable[LimitGroup], plan: _Plan
    ) -> list[Limit]:
        found: list[Limit] = []
        for group in groups:
            try:
                loaded = group.limits_for(conn)
                self._refuse_too_large(loaded)
                found.extend(loaded)
            except ValueError as exc:
                self.logger.error(
                    "failed to load ratelimit for view function %s (%s)",
                    plan.endpoint_name,
                    exc,
                )
        return found

    def _limits_of(self, conn: HTTPConnection, plan: _Plan) -> Sequence[Limit]:
        """The ordered limits for this request: application, route static,
        route dynamic, then defaults unless the route limits override them."""
        if not plan.dynamic:
            return plan.static
        limits = self._load(conn, plan.head_groups, plan)
        limits.extend(plan.route_static)
        dynamic = self._load(conn, plan.route_dynamic, plan)
        limits.extend(dynamic)
        if all(not lim.override_defaults for lim in plan.route_static) and all(
            not lim.override_defaults for lim in dynamic
        ):
            limits.extend(self._load(conn, plan.default_groups, plan))
        return limits

    def _decide_single(
        self,
        scope: Scope,
        conn: HTTPConnection | None,
        single: Limit,
        state: dict[str, Any],
        endpoint_key: str,
        limiter: RateLimiter,
    ) -> Any:
        """:meth:`_evaluate` for the common plan of one simple limit.

        The hot path: one key function call, one core call, one object.
        Returns ``_SKIP`` when the key is empty (the general path logs it).
        ``conn`` may be None when the key is the peer's address.
        """
        if single._peer_key:  # get_remote_address, inlined
            key = (scope.get("client") or _NO_PEER)[0] or _LOCALHOST
        else:
            func = single.key_func
            key = func(conn) if single._key_takes_request else func()
        if not key:
            return _SKIP
        if key.__class__ is not str:  # keyed as f"{key}" elsewhere
            key = f"{key}"
        name = single._static_scope or endpoint_key
        view: ViewRateLimit = limiter.decide_view(
            single.limit,
            key,
            name,
            single.cost,  # type: ignore[arg-type]
            time.time(),
            self._core_names,
            single,
            self._key_prefix,
        )
        state[_VIEW] = view
        if view._data[4][0]:
            return None
        if self.logger.isEnabledFor(logging.DEBUG):
            self._log_rejection(single, key, name)
        return single

    def _evaluate(
        self,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        endpoint_key: str,
        limiter: RateLimiter,
    ) -> Limit | None:
        if plan.single is not None:
            failed = self._decide_single(
                conn.scope, conn, plan.single, state, endpoint_key, limiter
            )
            if failed is not _SKIP:
                return failed  # type: ignore[no-any-return]
        try:
            prepared = self._prepare(conn, plan, state, endpoint_key)
        except _PartlyPrepared as partial:
            failed = self._conclude(
                limiter.decide_many(partial.requests, now=time.time()),
                partial.used,
                state,
            )
            if failed is None:
                raise partial.error from None
            return failed
        if prepared is None:
            return None
        requests, used = prepared
        return self._conclude(
            limiter.decide_many(requests, now=time.time()), used, state
        )

    def _prepare(
        self,
        conn: HTTPConnection,
        plan: _Plan,
        state: dict[str, Any],
        endpoint_key: str,
    ) -> (
        tuple[list[tuple[RateLimitItem, str, int]], list[tuple[Limit, str, str]]] | None
    ):
        """The core requests for ``plan`` and the limit behind each; None
        (with no view recorded) when no limit applies."""
        prefix = self._key_prefix
        key: Any = None
        scope: str | None
        limits = plan.static if not plan.dynamic else self._limits_of(conn, plan)
        requests: list[tuple[RateLimitItem, str, int]] = []
        used: list[tuple[Limit, str, str]] = []
        method = ""
        last_func: Any = None
        try:
            for lim in limits:
                if not lim._simple:
                    if not method:
                        method = conn.scope.get("method") or "GET"
                    exempt_when = lim.exempt_when
                    if exempt_when is not None and (
                        exempt_when(conn)
                        if lim._exempt_when_takes_request
                        else exempt_when()
                    ):
                        continue
                    if (
                        lim._methods_upper is not None
                        and method not in lim._methods_upper
                    ):
                        continue
                func = lim.key_func
                if func is not last_func:
                    key = func(conn) if lim._key_takes_request else func()
                    last_func = func
                scope = lim._static_scope
                if scope is None:
                    scope_func = lim._scope_func
                    if scope_func is None:
                        scope = endpoint_key
                    elif lim._scope_takes_request:
                        scope = scope_func(conn)
                    else:
                        scope = scope_func(endpoint_key)
                if lim.per_method:
                    scope = f"{scope}:{method}"
                if not key or not scope:
                    self.logger.error(
                        "Skipping limit: %s. Empty value found in parameters.",
                        lim._text,
                    )
                    continue
                cost_value = lim.cost
                cost = cost_value(conn) if callable(cost_value) else cost_value
                requests.append(
                    (
                        lim.limit,
                        f"{prefix}/{key}/{scope}" if prefix else f"{key}/{scope}",
                        cost,
                    )
                )
                used.append((lim, key, scope))
        except Exception as exc:
            if requests:
                raise _PartlyPrepared(requests, used, exc) from None
            raise
        if not requests:
            state[_VIEW] = None
            return None
        return requests, used

    def _conclude(
        self,
        decisions: Sequence[Decision],
        used: list[tuple[Limit, str, str]],
        state: dict[str, Any],
    ) -> Limit | None:
        """Records the view the headers describe; returns the failed limit."""
        prefix = self._key_prefix
        last = len(decisions) - 1
        decision = decisions[last]
        if not decision.allowed:
            lim, key, scope = used[last]
            state[_VIEW] = _make_view(lim, prefix, key, scope, decision)
            if self.logger.isEnabledFor(logging.DEBUG):
                self._log_rejection(lim, key, scope)
            return lim
        best = 0
        if last:
            seconds = used[0][0]._granularity_seconds
            for index in range(1, last + 1):
                if used[index][0]._granularity_seconds < seconds:
                    seconds = used[index][0]._granularity_seconds
                    best = index
            decision = decisions[best]
            # slowapi reads the headers' counter once the whole request was
            # counted: when a later limit of this request charged the same
            # counter (a route limit also among the defaults), its decision
            # is the counter's final state.
            lim, key, scope = used[best]
            for index in range(last, best, -1):
                other = used[index]
                if (
                    other[1] == key
                    and other[2] == scope
                    and other[0].limit == lim.limit
                ):
                    decision = decisions[index]
                    break
        lim, key, scope = used[best]
        state[_VIEW] = _make_view(lim, prefix, key, scope, decision)
        return None

    def _check_request_limit(
        self,
        request: HTTPConnection,
        endpoint_func: Callable[..., Any] | None,
        in_middleware: bool = True,
    ) -> None:
        """slowapi API: checks ``request`` against the limits of
        ``endpoint_func``; raises :class:`RateLimitExceeded` when over.

        Sets ``request.state.view_rate_limit``.
        """
        if not self.enabled:
            return
        state = request.scope.setdefault("state", {})
        if endpoint_func is None:
            if self._key_style == "endpoint":
                return
            plan = self._plan(None, in_middleware)
        elif in_middleware:
            plan = self._plan_for_endpoint(endpoint_func)
        else:
            plan = self._plan(self._target_of(endpoint_func), False)
        if plan.exempt:
            return
        failed = self._check(request, plan, state)
        if failed is not None:
            raise self._exception(failed)
        if plan.deferred:
            _leave_to_decorator(state)

    def _exception(self, failed: Failure) -> HTTPException:
        if type(failed) is _Unavailable:
            return RateLimitStorageUnavailable(failed.retry_after)
        exc = RateLimitExceeded(cast(Limit, failed))
        exc._limiter = self  # type: ignore[attr-defined]
        return exc

    # ------------------------------------------------------------------
    # rejections

    def _uses_default_handler(self, scope: Scope) -> bool:
        """Whether a RateLimitExceeded raised in an endpoint of this app ends
        up in ``_rate_limit_exceeded_handler``."""
        handlers = scope.get("starlette.exception_handlers")
        if handlers is None:
            return False
        exception_handlers, status_handlers = handlers
        if 429 in status_handlers:
            return False
        return exception_handlers.get(RateLimitExceeded) is _rate_limit_exceeded_handler

    def _error_headers(
        self, failed: Limit, body: bytes, state: dict[str, Any]
    ) -> list[tuple[bytes, bytes]]:
        """Headers of the default 429: what JSONResponse sets, then ours."""
        if body is failed._body:
            headers = list(failed._body_headers)
        else:
            headers = [(b"content-length", b"%d" % len(body)), (b"content-type", _JSON)]
        if self._headers_enabled:
            view = state.get(_VIEW)
            if view is not None:
                if type(view) is ViewRateLimit and view._data[4] is not None:
                    headers.extend(self._fast_items(view))
                else:
                    headers.extend(self._header_items(view, headers))
        return headers

    def _rejection_response(
        self, conn: HTTPConnection, failed: Failure, state: dict[str, Any]
    ) -> Response:
        """A 429 (or 503) ready to return from the endpoint; raises when the
        app uses another handler for RateLimitExceeded."""
        if type(failed) is _Unavailable:
            start, _ = self._error_messages(failed, state)
            return _TooManyRequests(_UNAVAILABLE_BODY, start["headers"], 503)
        failed = cast(Limit, failed)
        if not self._uses_default_handler(conn.scope):
            raise self._exception(failed)
        body = failed.error_body()
        return _TooManyRequests(body, self._error_headers(failed, body, state))

    def _error_messages(self, failed: Failure, state: dict[str, Any]) -> list[Any]:
        if type(failed) is _Unavailable:
            body = _UNAVAILABLE_BODY
            seconds = retry_after_seconds(failed.retry_after)
            return [
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-length", b"%d" % len(body)),
                        (b"content-type", _JSON),
                        (_RETRY_AFTER, b"%d" % seconds),
                    ],
                },
                {"type": "http.response.body", "body": body},
            ]
        failed = cast(Limit, failed)
        body = failed.error_body()
        return [
            {
                "type": "http.response.start",
                "status": 429,
                "headers": self._error_headers(failed, body, state),
            },
            {"type": "http.response.body", "body": body},
        ]

    async def _send_rejection(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        failed: Failure,
        state: dict[str, Any],
    ) -> None:
        """The middleware's 429: the app's handler for RateLimitExceeded if
        it has one, else the default (sent without building a Response).
        A 503 when the storage refused to answer."""
        app = scope.get("app")
        handlers = getattr(app, "exception_handlers", None) or {}
        handler = handlers.get(RateLimitExceeded, _rate_limit_exceeded_handler)
        if handler is _rate_limit_exceeded_handler or type(failed) is _Unavailable:
            for message in self._error_messages(failed, state):
                await send(message)
            return
        request = Request(scope, receive, send)
        result = handler(request, self._exception(failed))
        if inspect.isawaitable(result):
            result = await result
        await result(scope, receive, send)

    async def _reject_websocket(self, websocket: WebSocket, failed: Failure) -> None:
        await self._reject_websocket_raw(
            websocket.scope, websocket.send, failed, websocket.scope.get("state", {})
        )

    async def _reject_websocket_raw(
        self, scope: Scope, send: Send, failed: Failure, state: dict[str, Any]
    ) -> None:
        extensions = scope.get("extensions") or {}
        if "websocket.http.response" in extensions:
            start, body = self._error_messages(failed, state)
            start["type"] = "websocket.http.response.start"
            body["type"] = "websocket.http.response.body"
            await send(start)
            await send(body)
        else:
            code, reason = _websocket_close(failed)
            await send({"type": "websocket.close", "code": code, "reason": reason})

    def _websocket_exception(self, failed: Failure) -> WebSocketException:
        """A depends() limit's refusal on a WebSocket route: Starlette closes
        the connection before accepting it (the app's handlers run, and the
        denial response would leave nothing for them to do)."""
        code, reason = _websocket_close(failed)
        return WebSocketException(code=code, reason=reason)

    # ------------------------------------------------------------------
    # headers

    def _fast_items(self, view: ViewRateLimit) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers of a view that carries its decision.

        Header pairs are cached (per limit, per number) rather than built:
        this runs for every response.
        """
        lim, _, _, _, decision = view._data
        assert decision is not None
        if type(decision) is tuple:
            if self._retry_after != "http-date":
                return list(decision[5])
            decision = view.decision
            assert decision is not None
        reset_time = decision.reset_time
        cached = lim._reset_cache
        if cached[0] == reset_time and cached[1][0] is self._h_reset:
            reset_pair = cached[1]
        else:
            reset_pair = (self._h_reset, b"%d" % int(1 + reset_time))
            lim._reset_cache = (reset_time, reset_pair)
        limit_pair = lim._limit_pair
        if limit_pair[0] is not self._h_limit:
            limit_pair = lim._limit_pair = (self._h_limit, lim._amount_header)
        retry_time = self._retry_time(decision)
        if self._retry_after == "http-date":
            retry_pair = (self._h_retry, formatdate(1 + retry_time).encode("latin-1"))
        else:
            delta = 1 + retry_time - time.time()
            # floor is int() for the usual positive values, and cheaper.
            seconds = _floor(delta) if delta >= 0 else int(delta)
            if 0 <= seconds < _TABLE_SIZE:
                retry_pair = self._retry_pairs[seconds]
            else:
                retry_pair = (self._h_retry, b"%d" % seconds)
        remaining = decision.remaining
        if 0 <= remaining < _TABLE_SIZE:
            remaining_pair = self._remaining_pairs[remaining]
        else:
            remaining_pair = (self._h_remaining, b"%d" % remaining)
        return [limit_pair, remaining_pair, reset_pair, retry_pair]

    def _retry_time(self, decision: Decision) -> float:
        """The time ``Retry-After`` counts to: the reset, as in slowapi,
        except for a token bucket's refusal: the time it has room for the
        refused cost (its reset, when it is full again, comes much later).
        The core's header pairs count the same way."""
        if decision.allowed or self._strategy != "token-bucket":
            return decision.reset_time
        return time.time() + decision.retry_after

    def _header_items(
        self,
        view: Any,
        existing: Iterable[tuple[bytes, bytes]] = (),
    ) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers for ``view`` as raw ASGI pairs.

        ``existing`` are the response's headers: a ``Retry-After`` there
        pushes ours later, as in slowapi.
        """
        existing_retry = None
        for name, value in existing:
            if name == _RETRY_AFTER:
                existing_retry = value
                break
        decision = getattr(view, "decision", None)
        if decision is not None:
            if existing_retry is None:
                return self._fast_items(view)
            reset_time = decision.reset_time
            reset_in = 1 + self._retry_time(decision)
            remaining = decision.remaining
            amount = view.limit_wrapper._amount_header
        else:  # a plain (limit, args) pair: ask the storage
            item, args = view[0], view[1]
            reset_time, remaining = self.limiter.get_window_stats(item, *args)
            reset_in = 1 + reset_time
            amount = b"%d" % item.amount
        if existing_retry is not None:
            reset_in = max(
                self._determine_retry_time(existing_retry.decode("latin-1")), reset_in
            )
        if self._retry_after == "http-date":
            retry = formatdate(reset_in).encode("latin-1")
        else:
            retry = b"%d" % int(reset_in - time.time())
        return [
            (self._h_limit, amount),
            (self._h_remaining, b"%d" % remaining),
            (self._h_reset, b"%d" % int(1 + reset_time)),
            (self._h_retry, retry),
        ]

    def _merge_headers(
        self, raw: Iterable[tuple[bytes, bytes]], view: Any
    ) -> list[tuple[bytes, bytes]]:
        """``raw`` with the rate-limit headers set (replacing same names)."""
        existing = list(raw)
        items = self._header_items(view, existing)
        names = self._header_names
        for pair in existing:
            if pair[0].lower() in names:
                existing = [p for p in existing if p[0].lower() not in names]
                break
        existing.extend(items)
        return existing

    def _inject_headers(self, response: Response, current_limit: Any) -> Response:
        """slowapi API: adds the rate-limit headers of ``current_limit``
        (``request.state.view_rate_limit``) to ``response``."""
        if self.enabled and self._headers_enabled and current_limit is not None:
            if not isinstance(response, Response):
                raise TypeError(
                    "parameter `response` must be an instance of "
                    "starlette.responses.Response"
                )
            try:
                raw = response.raw_headers
                items = self._header_items(current_limit, raw)
                names = self._header_names
                for pair in raw:
                    if pair[0] in names:
                        raw[:] = [p for p in raw if p[0] not in names]
                        break
                raw.extend(items)
            except Exception:
                if self._swallow_errors:
                    self.logger.exception(
                        "Failed to update rate limit headers. Swallowing error"
                    )
                else:
                    raise
        return response

    def _inject_asgi_headers(
        self, headers: MutableHeaders, current_limit: Any
    ) -> MutableHeaders:
        """slowapi API: the same for a ``MutableHeaders``."""
        if self.enabled and self._headers_enabled and current_limit is not None:
            try:
                items = self._header_items(current_limit, headers.raw)
                for name, value in items:
                    headers[name.decode("latin-1")] = value.decode("latin-1")
            except Exception:
                if self._swallow_errors:
                    self.logger.exception(
                        "Failed to update rate limit headers. Swallowing error"
                    )
                else:
                    raise
        return headers

    def _determine_retry_time(self, retry_header_value: str) -> float:
        try:
            retry_after_date = parsedate_to_datetime(retry_header_value)
        except (TypeError, ValueError):
            retry_after_date = None
        if retry_after_date is not None:
            return float(retry_after_date.timestamp())
        try:
            return time.time() + int(retry_header_value)
        except ValueError:
            return 0.0

    # ------------------------------------------------------------------
    # FastAPI dependency

    def depends(
        self,
        limit_value: StrOrCallableStr,
        key_func: Callable[..., str] | None = None,
        *,
        scope: StrOrCallableStr | None = None,
        per_method: bool = False,
        methods: list[str] | None = None,
        error_message: StrOrCallableStr | None = None,
        exempt_when: Callable[..., bool] | None = None,
        cost: CostType = 1,
    ) -> Callable[..., Any]:
        """A FastAPI dependency that applies a limit to a route.

        ``@app.get("/x", dependencies=[Depends(limiter.depends("5/minute"))])``
        needs no ``request`` parameter in the endpoint. ``scope`` makes the
        counter shared (as ``shared_limit``); by default each route counts
        apart. Over the limit, it raises :class:`RateLimitExceeded`. Headers
        are added when the endpoint returns a plain value (FastAPI merges
        them) or when a middleware is installed. The limit is checked when
        FastAPI runs the dependency, so its key function may read what
        earlier dependencies put in ``request.state``. Default and
        application limits still apply to the route: a middleware checks
        them before the app runs (as slowapi's), in a core call (a Redis
        round trip) of their own.
        """
        cost = _configured_cost(cost)
        try:
            group = LimitGroup(
                limit_value,
                key_func or self._key_func,
                scope,
                per_method,
                methods,
                error_message,
                exempt_when,
                cost,
                True,
            )
            self._refuse_too_large_static(group)
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid rate limit {limit_value!r}: {exc}"
            ) from exc
        if group.is_dynamic:
            own = _Plan(route_dynamic=[group])
        else:
            own = _Plan(route_static=group.limits_for(None))
        limiter = self

        marker = (limiter, group)

        async def rate_limit_dependency(
            request: HTTPConnection, response: Response
        ) -> None:
            if not limiter.enabled:
                return
            scope_ = request.scope
            state = scope_.get("state")
            if state is None:
                state = scope_["state"] = {}
            # Checked when FastAPI runs it, after the dependencies before
            # it (an auth dependency setting request.state.user), apart
            # from the route's limits (a middleware checked those before
            # the app; a decorator checks them after). Inside the app, so
            # that dependency_overrides, FastAPI's own refusals (a body it
            # cannot parse) and the app's exception handlers apply to it.
            endpoint = scope_.get("endpoint")
            name = _func_name(endpoint) if endpoint is not None else ""
            before = state.get(_VIEW)
            failed: Failure | None
            if limiter._remote:
                failed = await limiter._check_async(request, own, state, name, False)
            else:
                failed = limiter._check(request, own, state, name, False)
            if failed is not None:
                if scope_["type"] == "websocket":
                    raise limiter._websocket_exception(failed)
                raise limiter._exception(failed)
            # The headers describe the limit with the shortest window, the
            # first checked among equals, as for one core call.
            if type(before) is ViewRateLimit:
                after = state.get(_VIEW)
                if (
                    type(after) is not ViewRateLimit
                    or before._data[0]._granularity_seconds
                    <= after._data[0]._granularity_seconds
                ):
                    state[_VIEW] = before
            if limiter._headers_enabled and state.get(_HEADERS_BY) is None:
                view = state.get(_VIEW)
                if view is not None:
                    limiter._inject_headers(response, view)

        setattr(rate_limit_dependency, _DEPENDS_ATTR, marker)
        rate_limit_dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                # HTTPConnection: FastAPI gives it on WebSocket routes too.
                inspect.Parameter(
                    "request",
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    annotation=HTTPConnection,
                ),
                inspect.Parameter(
                    "response",
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    annotation=Response,
                ),
            ],
            return_annotation=None,
        )
        return rate_limit_dependency
