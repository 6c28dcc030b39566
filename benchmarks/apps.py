"""The FastAPI application every request benchmark uses, and a raw ASGI driver.

One factory builds the same app with no limiter, with slowapi or with
rapidlimit: the two packages have the same API, so the only difference is
which one is imported. The endpoint has the same signature in every variant
(``request`` and ``response`` parameters, a small JSON body), so the no-limiter
baseline pays for the same FastAPI work.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response

from common import BrokenBenchmark

PACKAGES = ("none", "slowapi", "rapidlimit")
PATHS = ("decorator", "middleware", "asgi-middleware")
# Never reached in a benchmark run / reached by the first request.
ALLOWED_LIMIT = "100000000/day"
# A moving window logs every hit: rapidlimit allows at most 2^20 a window.
MOVING_ALLOWED_LIMIT = "1000000/day"
REJECT_LIMIT = "1/day"
ROUTE = "/a"


@dataclass(frozen=True)
class Variant:
    package: str = "none"  # "none", "slowapi" or "rapidlimit"
    path: str = "decorator"  # "decorator", "middleware", "asgi-middleware"
    headers: bool = False
    traffic: str = "allowed"  # "allowed" or "rejected"
    storage_uri: str = "memory://"
    endpoint: str = "async"  # "async" or "sync"
    key_prefix: str = ""
    # bench_http: a no-limiter server started and measured exactly as a
    # limited variant is (the method's own A/A check).
    control: bool = False
    # serve.py's uvicorn protocol: "h11" (every suite figure) or "httptools"
    # (uvicorn[standard]'s; by-hand comparisons through bench_callgrind.py).
    http: str = "h11"
    # "none" only: the endpoint awaits asyncio.sleep(0) once, suspending the
    # request as awaiting a Redis decision does (bench_callgrind's floor).
    awaits: bool = False
    # With ``awaits``: the endpoint awaits one Redis PING instead (the server
    # ``storage_uri`` names) through a minimal pipelined client: what
    # awaiting any reply from Redis costs, before a limiter's own work.
    awaits_redis: bool = False
    # The Limiter's strategy (bench_redis's per-request costs of the others).
    strategy: str = "fixed-window"

    @property
    def limit(self) -> str:
        if self.traffic == "rejected":
            return REJECT_LIMIT
        if self.strategy == "moving-window":
            return MOVING_ALLOWED_LIMIT
        return ALLOWED_LIMIT

    @property
    def expected_status(self) -> int:
        if self.package != "none" and self.traffic == "rejected":
            return 429
        return 200

    def to_args(self) -> list[str]:
        return [
            f"--package={self.package}",
            f"--path={self.path}",
            f"--headers={int(self.headers)}",
            f"--traffic={self.traffic}",
            f"--storage-uri={self.storage_uri}",
            f"--endpoint={self.endpoint}",
            f"--key-prefix={self.key_prefix}",
            f"--http={self.http}",
            f"--awaits={int(self.awaits)}",
            f"--awaits-redis={int(self.awaits_redis)}",
            f"--strategy={self.strategy}",
        ]


def make_app(v: Variant) -> Any:
    """A FastAPI app with one GET route, limited as ``v`` says."""
    # Request and Response are module globals: FastAPI resolves the string
    # annotations (PEP 563) in the endpoint's globals.
    app = FastAPI()

    if v.endpoint == "async":

        async def endpoint(request: Request, response: Response) -> dict[str, bool]:
            return {"ok": True}

    else:

        def endpoint(request: Request, response: Response) -> dict[str, bool]:  # type: ignore[misc]
            return {"ok": True}

    if v.package == "none":
        if v.awaits and v.awaits_redis:
            endpoint = _awaiting_redis(v.storage_uri, v.headers)
        elif v.awaits:
            endpoint = _awaiting_once(v.headers)
        elif v.headers:
            endpoint = _sending_limit_headers(v)
        app.get(ROUTE)(endpoint)
        return app

    pkg = importlib.import_module(v.package)
    util = importlib.import_module(f"{v.package}.util")
    errors = importlib.import_module(f"{v.package}.errors")
    middleware = importlib.import_module(f"{v.package}.middleware")

    in_middleware = v.path != "decorator"
    limiter = pkg.Limiter(
        key_func=util.get_remote_address,
        default_limits=[v.limit] if in_middleware else [],
        headers_enabled=v.headers,
        storage_uri=v.storage_uri,
        key_prefix=v.key_prefix,
        strategy=v.strategy,
    )
    app.state.limiter = limiter
    app.add_exception_handler(
        errors.RateLimitExceeded, pkg._rate_limit_exceeded_handler
    )
    if v.path == "middleware":
        app.add_middleware(middleware.SlowAPIMiddleware)
    elif v.path == "asgi-middleware":
        app.add_middleware(middleware.SlowAPIASGIMiddleware)
    elif v.path != "decorator":
        raise ValueError(f"unknown path {v.path!r}")
    if not in_middleware:
        endpoint = limiter.limit(v.limit)(endpoint)
    app.get(ROUTE)(endpoint)
    return app


# What a limiter with headers on adds to this app's responses (as rapidlimit
# sends them for ALLOWED_LIMIT: names, order and value lengths).
LIMIT_HEADERS = [
    (b"x-ratelimit-limit", b"100000000"),
    (b"x-ratelimit-remaining", b"99999997"),
    (b"x-ratelimit-reset", b"1796502906"),
    (b"retry-after", b"86400"),
]


def _sending_limit_headers(v: Variant) -> Any:
    """The no-limiter endpoint with headers on: it adds the four headers
    itself in the cheapest way FastAPI allows (no wrapper around it), so
    that what the server and the framework spend on carrying them, which any
    limiter sending them pays, can be told apart from the limiter's own."""
    if v.endpoint == "async":

        async def endpoint(request: Request, response: Response) -> dict[str, bool]:
            response.headers.raw.extend(LIMIT_HEADERS)
            return {"ok": True}

    else:

        def endpoint(request: Request, response: Response) -> dict[str, bool]:  # type: ignore[misc]
            response.headers.raw.extend(LIMIT_HEADERS)
            return {"ok": True}

    return endpoint


def _awaiting_once(headers: bool) -> Any:
    """The no-limiter async endpoint suspended once, as every request whose
    decision waits for Redis is: what suspending and resuming the request's
    coroutines costs (and the garbage collections that requests suspended
    together bring), which any limiter that awaits I/O pays. With
    ``headers`` it also sets the four headers itself: the floor under a
    limiter on Redis with headers on, which pays both."""
    if headers:

        async def endpoint(request: Request, response: Response) -> dict[str, bool]:
            await asyncio.sleep(0)
            response.headers.raw.extend(LIMIT_HEADERS)
            return {"ok": True}

    else:

        async def endpoint(request: Request, response: Response) -> dict[str, bool]:
            await asyncio.sleep(0)
            return {"ok": True}

    return endpoint


class _PingClient(asyncio.Protocol):
    """The least an endpoint awaiting Redis can do: the PINGs one turn of
    the loop asks for leave in one write at its end, and each reply
    resolves the oldest waiting future. No script, no parsing beyond line
    ends (every reply is ``+PONG``)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.queued = 0
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiting:
            f = self.waiting.popleft()
            if not f.done():
                f.set_exception(ConnectionError("redis closed the connection"))

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        replies = data.count(b"\r\n")
        self.tail = data[data.rfind(b"\r\n") + 2 :] if replies else data
        for _ in range(replies):
            f = self.waiting.popleft()
            if not f.done():
                f.set_result(None)

    def _flush(self) -> None:
        assert self.transport is not None
        self.transport.write(b"PING\r\n" * self.queued)
        self.queued = 0

    def ping(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        f: asyncio.Future[None] = loop.create_future()
        self.waiting.append(f)
        self.queued += 1
        if self.queued == 1:
            loop.call_soon(self._flush)
        return f


def _awaiting_redis(uri: str, headers: bool) -> Any:
    """The no-limiter async endpoint awaiting one Redis PING: the floor
    under a limiter on Redis that counts the real wait (the reply comes
    after other requests have run), which ``asyncio.sleep(0)`` does not.
    With ``headers`` it also sets the four headers."""
    parts = urllib.parse.urlsplit(uri)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    connected: list[asyncio.Future[_PingClient]] = []

    async def connect() -> _PingClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(_PingClient, host, port)
        return client

    async def client() -> _PingClient:
        # The first request connects; the others await the same connection
        # (a done future returns at once, without suspending).
        if not connected:
            connected.append(asyncio.ensure_future(connect()))
        return await connected[0]

    async def endpoint(request: Request, response: Response) -> dict[str, bool]:
        await (await client()).ping()
        if headers:
            response.headers.raw.extend(LIMIT_HEADERS)
        return {"ok": True}

    return endpoint


# ------------------------------------------------------------------ driver

_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": ROUTE,
    "raw_path": ROUTE.encode(),
    "root_path": "",
    "query_string": b"",
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
_HEADERS = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench")]
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


def close_rapidlimit(thing: Any) -> None:
    """``thing.close()`` if ``thing`` is rapidlimit's (a limiter or a
    storage): its Redis connection would otherwise outlive the benchmark's
    redis-server and log its reconnects. Others' objects are left alone."""
    close = getattr(thing, "close", None)
    if callable(close) and type(thing).__module__.startswith("rapidlimit"):
        close()


class Driver:
    """Calls an ASGI app directly: no sockets, no HTTP parsing, no httpx."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.statuses: Counter[int] = Counter()
        self.last_headers: list[tuple[bytes, bytes]] = []

    def close(self) -> None:
        """Closes the app's limiter where it can be (rapidlimit's, or
        slowapi's storage when it is rapidlimit's limits adapter): FastAPI
        keeps a dropped app's endpoints in its caches, and with them a Redis
        limiter's connection, whose reconnects log once its server stops."""
        limiter = getattr(self.app.state, "limiter", None)
        close_rapidlimit(limiter)
        close_rapidlimit(getattr(limiter, "_storage", None))

    async def _receive(self) -> dict[str, Any]:
        return _REQUEST

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.statuses[message["status"]] += 1
            self.last_headers = message.get("headers", [])

    async def one(self) -> None:
        # As uvicorn builds it: fresh headers and a copy of the (empty)
        # lifespan state, which Starlette's request.state then uses.
        scope = dict(_SCOPE)
        scope["headers"] = list(_HEADERS)
        scope["state"] = {}
        await self.app(scope, self._receive, self._send)

    async def run(self, n: int, concurrency: int = 1) -> None:
        if concurrency <= 1:
            one = self.one
            for _ in range(n):
                await one()
            return
        per_task, extra = divmod(n, concurrency)

        async def worker(count: int) -> None:
            one = self.one
            for _ in range(count):
                await one()

        await asyncio.gather(
            *(worker(per_task + (1 if i < extra else 0)) for i in range(concurrency))
        )

    def diagnostics(self) -> str:
        """The limiter storage's own counters, when it keeps any (rapidlimit's
        RedisStorage.stats(): timeouts, fail-closed decisions...)."""
        limiter = getattr(getattr(self.app, "state", None), "limiter", None)
        stats = getattr(getattr(limiter, "_storage", None), "stats", None)
        if not callable(stats):
            return ""
        try:
            return f"; storage stats: {stats()}"
        except Exception as exc:  # diagnostics must not hide the failure
            return f"; storage stats unavailable: {exc!r}"

    def header(self, name: bytes) -> bytes | None:
        for k, val in self.last_headers:
            if k.lower() == name:
                return val
        return None


def check_statuses(
    what: str,
    statuses: Counter[int],
    expected: int,
    n: int,
    driver: Driver | None = None,
) -> None:
    """Raises BrokenBenchmark unless all n responses had the expected code."""
    if statuses.get(expected, 0) != n or len(statuses) != 1:
        extra = driver.diagnostics() if driver is not None else ""
        raise BrokenBenchmark(
            f"{what}: expected {n} responses {expected}, got {dict(statuses)}{extra}"
        )


def prime(loop: asyncio.AbstractEventLoop, v: Variant, driver: Driver) -> None:
    """First requests: fill caches, use up the 1/day limit of the reject path,
    and check the app answers as the variant expects."""
    loop.run_until_complete(driver.run(3))
    driver.statuses.clear()
    loop.run_until_complete(driver.run(5))
    check_statuses(f"{v}", driver.statuses, v.expected_status, 5, driver)
    if (
        v.headers
        and v.package != "none"
        and driver.header(b"x-ratelimit-limit") is None
    ):
        raise BrokenBenchmark(f"{v}: headers on but no X-RateLimit-Limit header")
    driver.statuses.clear()


def run_timed(
    loop: asyncio.AbstractEventLoop,
    driver: Driver,
    n: int,
    concurrency: int = 1,
    clock: Callable[[], int] | None = None,
) -> int:
    """Drives n requests, returns elapsed ns."""
    import time

    clock = clock or time.perf_counter_ns
    coro: Awaitable[None] = driver.run(n, concurrency)
    start = clock()
    loop.run_until_complete(coro)
    return clock() - start
