"""The limiter on trio, as Starlette and FastAPI run under Hypercorn's trio
worker (``hypercorn --worker-class trio``): no asyncio loop runs there, so
a Redis decision cannot complete an asyncio future; it waits in a worker
thread instead (every Redis request used to be a 500). The memory store
needs no loop at all. A real hypercorn on trio is driven in
examples/redis_shared/test_app.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from rapidlimit import Limiter, _core, _rate_limit_exceeded_handler, parse
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware
from rapidlimit.storage import RedisStorage
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

trio = pytest.importorskip("trio")


def _app(uri: str, middleware: bool = True, **options: Any) -> FastAPI:
    """Routes limited each way; with ``middleware``, the middleware's
    application limit too (and /plain limited by it alone)."""
    options.setdefault("key_func", lambda request: request.headers.get("x-key", "k"))
    limiter = Limiter(
        storage_uri=uri,
        headers_enabled=True,
        application_limits=["3/minute"] if middleware else [],
        **options,
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    if middleware:
        app.add_middleware(SlowAPIASGIMiddleware)

    @app.get("/async")
    @limiter.limit("3/minute")
    async def decorated(request: Request) -> dict[str, str]:
        return {"view": "async"}

    @app.get("/sync")
    @limiter.limit("3/minute")
    def decorated_sync(request: Request) -> dict[str, str]:
        return {"view": "sync"}

    @app.get("/depends", dependencies=[Depends(limiter.depends("3/minute"))])
    async def with_dependency() -> dict[str, str]:
        return {"view": "depends"}

    @app.get("/plain")  # the middleware's application limit alone
    async def plain() -> dict[str, str]:
        return {"view": "plain"}

    return app


async def _get(app: FastAPI, path: str, n: int, key: str) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return [await c.get(path, headers={"x-key": key}) for _ in range(n)]


def _check_counts(app: FastAPI) -> None:
    for path in ("/async", "/sync", "/depends", "/plain"):
        got = trio.run(_get, app, path, 4, path)
        assert [r.status_code for r in got] == [200, 200, 200, 429], path
        assert [r.headers["x-ratelimit-remaining"] for r in got] == list("2100")
        assert got[3].json() == {"error": "Rate limit exceeded: 3 per 1 minute"}


@pytest.mark.skipif(not _core.redis_available(), reason="built without hiredis")
def test_redis_limits_on_trio(server: RedisServer) -> None:
    _check_counts(_app(server.uri))


@pytest.mark.skipif(not _core.redis_available(), reason="built without hiredis")
def test_redis_middleware_keyed_by_address_on_trio(server: RedisServer) -> None:
    # The middleware's own way for the usual limit (the peer's address, one
    # limit) on Redis awaits the storage's asyncio waiter: on trio it takes
    # the general way, through a worker thread.
    app = _app(server.uri, key_func=get_remote_address)
    got = trio.run(_get, app, "/plain", 4, "unused")
    assert [r.status_code for r in got] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in got] == list("2100")
    app.state.limiter.close()


@pytest.mark.skipif(not _core.redis_available(), reason="built without hiredis")
def test_redis_decorator_keyed_by_address_on_trio(server: RedisServer) -> None:
    # The decorator's usual request (one limit, the peer's address) on Redis
    # is decided by one core call that awaits an asyncio waiter: with no
    # asyncio loop it leaves the request unmarked to the general way.
    # (Without the middleware's application limit the route has one limit.)
    app = _app(server.uri, middleware=False, key_func=get_remote_address)
    got = trio.run(_get, app, "/async", 4, "unused")
    assert [r.status_code for r in got] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in got] == list("2100")
    app.state.limiter.close()


def test_memory_limits_on_trio() -> None:
    _check_counts(_app("memory://"))


@pytest.mark.skipif(not _core.redis_available(), reason="built without hiredis")
def test_slow_redis_on_trio_is_a_503_while_the_loop_runs(server: RedisServer) -> None:
    app = _app(server.uri, storage_options={"timeout": 0.2})

    async def main() -> tuple[list[httpx.Response], int, bool]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0.01)

        assert [r.status_code for r in await _get(app, "/async", 1, "slow")] == [200]
        with await trio.to_thread.run_sync(server.hold) as held:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                got = [
                    *(await _get(app, "/async", 1, "slow")),
                    *(await _get(app, "/depends", 1, "slow")),
                ]
                answered_while_held = held.held
                seen = ticks
                nursery.cancel_scope.cancel()
        return got, seen, answered_while_held

    got, ticks, answered_while_held = trio.run(main)
    assert [r.status_code for r in got] == [503, 503]
    assert got[0].json() == {"error": "Rate limit storage unavailable"}
    assert int(got[0].headers["retry-after"]) >= 1
    # Each waited for the timeout, not for Redis: both came while it was held.
    assert answered_while_held
    assert ticks >= 10  # trio ran its other tasks meanwhile


@pytest.mark.skipif(not _core.redis_available(), reason="built without hiredis")
def test_async_decisions_outside_asyncio_say_what_to_do(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    item = parse("1/second")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="asyncio event loop.*worker thread"):
            store.decide_many_async("fixed-window", [(item, "a", 1)])

    trio.run(main)
    store.close()
