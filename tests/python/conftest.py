"""Shared helpers for the slowapi-compatibility tests."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import weakref
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import pytest

from rapidlimit.storage import RedisStorage
from redis_server import RedisServer


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap() -> None:
    """Takes what imports, collection and the modules before made (about
    450,000 objects by the end of a run: the web frameworks, Redis
    clients, thousands of parametrised items, what tests keep) out of the
    garbage collector's reach: each full collection scanned them all, 0.3
    to 0.66 s by the end, 33 times a run, a stall that a test timing a
    request within a timeout could fall into (by hand: 0.09 s at most with
    this, 1 s of full collections a run instead of 8 to 11). Objects made
    from here on are collected as usual."""
    gc.collect()
    gc.freeze()


# The far future: limits' memory storage expires keys from a timer thread
# that freezegun leaves on the real clock, so frozen dates must lie ahead of
# it for slowapi to count correctly under a frozen clock.
FROZEN = "2100-01-01 00:00:00"
FROZEN_EPOCH = 4102444800

# The reference behaviour is limits 5's, which needs Python >= 3.10: on 3.9
# pip installs limits 4 (error messages, the moving window's memory storage
# and the strategies' clear() differ there).
LIMITS_5 = int(version("limits").split(".")[0]) >= 5


def needs_limits_5(why: str) -> pytest.MarkDecorator:
    """Skips a test that compares against limits 5 when limits 4 is installed."""
    return pytest.mark.skipif(not LIMITS_5, reason=f"limits < 5: {why}")


class Ticker:
    """A task counting its turns on the running event loop, one every
    ``interval`` seconds: how much the loop ran other tasks meanwhile."""

    def __init__(self, interval: float = 0.01) -> None:
        self.ticks = 0
        self._interval = interval
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture(autouse=True)
def _close_redis_storages(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Closes every RedisStorage a test made, passed or failed, when it
    ends. One left open keeps its I/O thread reconnecting to the test's
    stopped server for the rest of the session (a FastAPI app's routes,
    and so their Limiter and its storage, stay referenced by FastAPI's
    caches), and would connect to a later test's server that got the
    same port."""
    made: list[weakref.ref[RedisStorage]] = []
    init = RedisStorage.__init__

    def tracked(self: RedisStorage, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(RedisStorage, "__init__", tracked)
    yield
    for ref in made:
        store = ref()
        if store is not None:
            store.close()


def _started_redis() -> Iterator[RedisServer]:
    srv = RedisServer()  # skips the test when redis-server is not installed
    srv.start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A redis-server shared by a module's tests, emptied before each test
    (see _flush_redis); tests that kill or restart it take own_server."""
    yield from _started_redis()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A redis-server for one test, which may kill or restart it."""
    yield from _started_redis()


@pytest.fixture(autouse=True)
def _flush_redis(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        request.getfixturevalue("server").client().flushall()


@pytest.fixture(autouse=True)
def _no_ratelimit_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests start without RATELIMIT_* variables and outside any .env."""
    for name in list(os.environ):
        if name.startswith("RATELIMIT_"):
            monkeypatch.delenv(name)
    yield


def limited_app(limiter: Any, path: str) -> Any:
    """A FastAPI application holding ``limiter`` with slowapi's 429 handler
    and, when ``path`` names one ("middleware", "asgi-middleware"), that
    middleware."""
    from fastapi import FastAPI

    from rapidlimit import _rate_limit_exceeded_handler
    from rapidlimit.errors import RateLimitExceeded
    from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware

    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    if path == "middleware":
        app.add_middleware(SlowAPIMiddleware)
    elif path == "asgi-middleware":
        app.add_middleware(SlowAPIASGIMiddleware)
    return app


def rate_headers(response: object) -> dict[str, str]:
    """The rate-limit headers of an httpx response, X-RateLimit-Reset as int."""
    headers = response.headers  # type: ignore[attr-defined]
    found = {}
    for name in (
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
    ):
        if name in headers:
            value = headers[name]
            if name == "x-ratelimit-reset":
                value = str(int(float(value)))
            found[name] = value
    return found


class AsyncClientAdapter:
    """httpx's ASGI transport behind TestClient's synchronous interface."""

    def __init__(
        self,
        app: object,
        client: tuple[str, int] = ("127.0.0.1", 123),
        raise_server_exceptions: bool = True,
    ) -> None:
        self.app = app
        self.client = client
        self.raise_server_exceptions = raise_server_exceptions

    def request(self, method: str, url: str, **kwargs: object) -> object:
        import asyncio

        import httpx

        async def go() -> object:
            transport = httpx.ASGITransport(
                app=self.app,  # type: ignore[arg-type]
                client=self.client,
                raise_app_exceptions=self.raise_server_exceptions,
            )
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver"
            ) as client:
                return await client.request(method, url, **kwargs)  # type: ignore[arg-type]

        return asyncio.run(go())

    def get(self, url: str, **kwargs: object) -> object:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: object) -> object:
        return self.request("POST", url, **kwargs)


@pytest.fixture(params=["testclient", "httpx"])
def make_client(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Builds a client for an app: Starlette's TestClient or httpx ASGI."""

    def make(app: object, raise_server_exceptions: bool = True) -> object:
        if request.param == "testclient":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from starlette.testclient import TestClient

            return TestClient(
                app,  # type: ignore[arg-type]
                raise_server_exceptions=raise_server_exceptions,
            )
        return AsyncClientAdapter(app, raise_server_exceptions=raise_server_exceptions)

    return make
