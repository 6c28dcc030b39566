"""rapidlimit+redis:// as a ``limits`` storage, against a real redis-server:
the three ``limits`` strategies answer as ``limits``' own redis:// storage,
an unchanged slowapi app shares its limits through Redis, the async class
keeps the event loop free, and an outage follows slowapi's settings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import limits
import limits.aio.strategies
import limits.storage
import limits.strategies
import pytest
import slowapi
import slowapi.errors
import slowapi.util
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import rapidlimit.contrib.limits  # noqa: F401  (registers the schemes)
from redis_server import RedisServer

STRATEGIES = {
    "fixed-window": limits.strategies.FixedWindowRateLimiter,
    "moving-window": limits.strategies.MovingWindowRateLimiter,
    "sliding-window-counter": limits.strategies.SlidingWindowCounterRateLimiter,
}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.cleanup()


@pytest.fixture(autouse=True)
def _flush(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        request.getfixturevalue("server").client().flushall()


def ours(server: RedisServer, scheme: str = "rapidlimit+redis") -> Any:
    return limits.storage.storage_from_string(f"{scheme}://127.0.0.1:{server.port}/0")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_same_answers_as_limits_redis(server: RedisServer, strategy: str) -> None:
    item = limits.parse("4/minute")
    mine = STRATEGIES[strategy](ours(server))
    theirs = STRATEGIES[strategy](
        limits.storage.storage_from_string(f"redis://127.0.0.1:{server.port}/1")
    )
    for lim in (mine, theirs):
        answers = [lim.hit(item, "a") for _ in range(6)]
        assert answers == [True] * 4 + [False] * 2
        assert lim.test(item, "b")
        assert not lim.test(item, "a")
        assert lim.get_window_stats(item, "a").remaining == 0
        assert lim.get_window_stats(item, "b").remaining == 4
        lim.clear(item, "a")
        assert lim.hit(item, "a")


def test_other_schemes_reach_the_same_counters(server: RedisServer) -> None:
    item = limits.parse("2/minute")
    first = limits.strategies.FixedWindowRateLimiter(ours(server))
    unix = limits.storage.storage_from_string(
        f"rapidlimit+redis+unix://{server.unix_path}"
    )
    second = limits.strategies.FixedWindowRateLimiter(unix)
    assert first.hit(item, "k")
    assert second.hit(item, "k")
    assert not first.hit(item, "k")
    assert unix.check()


def test_async_class_keeps_the_loop_free(server: RedisServer) -> None:
    item = limits.parse("10/minute")
    storage = limits.storage.storage_from_string(
        f"async+rapidlimit+redis://127.0.0.1:{server.port}/0", timeout=3.0
    )
    lim = limits.aio.strategies.MovingWindowRateLimiter(storage)
    sleeper = server.client()

    async def main() -> tuple[bool, int]:
        assert await lim.hit(item, "a")  # warm
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.01)

        thread = threading.Thread(
            target=sleeper.execute_command, args=("DEBUG", "SLEEP", "0.4")
        )
        thread.start()
        await asyncio.sleep(0.05)
        task = asyncio.create_task(ticker())
        allowed = await lim.hit(item, "a")
        stop = True
        await task
        thread.join()
        return allowed, ticks

    allowed, ticks = asyncio.run(main())
    assert allowed
    assert ticks >= 10
    assert asyncio.run(storage.check())


def slowapi_app(server: RedisServer, **kwargs: Any) -> Starlette:
    """An unchanged slowapi app; only storage_uri names our scheme."""
    limiter = slowapi.Limiter(
        key_func=slowapi.util.get_remote_address,
        storage_uri=f"rapidlimit+redis://127.0.0.1:{server.port}/0",
        **{"headers_enabled": True, **kwargs},
    )

    @limiter.limit("3/minute")
    async def view(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/r", view)])
    app.state.limiter = limiter
    app.add_exception_handler(
        slowapi.errors.RateLimitExceeded,
        slowapi._rate_limit_exceeded_handler,  # type: ignore[arg-type]
    )
    return app


def test_unchanged_slowapi_app_shares_limits(server: RedisServer) -> None:
    one = TestClient(slowapi_app(server))
    two = TestClient(slowapi_app(server))  # another instance, same Redis
    codes = [one.get("/r").status_code, two.get("/r").status_code]
    codes += [one.get("/r").status_code, two.get("/r").status_code]
    assert codes == [200, 200, 200, 429]
    response = one.get("/r")
    assert response.status_code == 429
    assert response.headers["x-ratelimit-limit"] == "3"


def test_slowapi_in_memory_fallback_when_redis_is_down() -> None:
    """The outage reaches slowapi as an exception (the storage's policy is
    fail-closed), so its in_memory_fallback applies. (slowapi's
    swallow_errors cannot be shown here: its decorator then reads the
    missing request.state.view_rate_limit and fails by itself.)"""
    srv = RedisServer()
    srv.start()
    try:
        client = TestClient(
            slowapi_app(
                srv,
                in_memory_fallback_enabled=True,
                storage_options={"timeout": 0.15, "on_error": "fail-closed"},
            ),
            raise_server_exceptions=False,
        )
        assert client.get("/r").status_code == 200
        srv.kill()
        codes = [client.get("/r").status_code for _ in range(5)]
        # counted afresh in slowapi's in-memory fallback: 3/minute
        assert codes == [200, 200, 200, 429, 429]
        assert not ours(srv).check()
    finally:
        srv.cleanup()
