"""The slowapi-compatible Limiter on a real redis-server: async endpoints
await their decision without blocking the event loop (decorator, both
middlewares, the FastAPI dependency), one command per request, and each
failure policy as a user of slowapi would configure it: a 503 with
Retry-After (the default), requests let through (``swallow_errors``), or
counting in memory (``in_memory_fallback_enabled`` / ``in_memory_fallback``).
Never a 500."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any
from uuid import uuid4

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from conftest import Ticker, limited_app
from rapidlimit import Limiter, _core, _rate_limit_exceeded_handler
from rapidlimit._core import RedisWaiter
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.extension import ViewRateLimit
from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from rapidlimit.storage import RedisStorage
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

FAST = {
    "timeout": 0.15,
    "connect_timeout": 0.3,
    "reconnect_min": 0.01,
    "reconnect_max": 0.1,
}
PATHS = ["decorator", "middleware", "asgi-middleware", "depends"]


@pytest.fixture
def server(own_server: RedisServer) -> RedisServer:
    """Tests here kill and restart Redis: a server of their own."""
    return own_server


def make_app(
    limiter: Limiter, path: str, limit: str = "3/minute", sync: bool = False
) -> FastAPI:
    """One route /r limited by ``limit`` through ``path``, and /free."""
    app: FastAPI = limited_app(limiter, path)

    def body() -> PlainTextResponse:
        return PlainTextResponse("ok")

    if path == "depends":
        dependencies = [Depends(limiter.depends(limit))]
        if sync:
            app.get("/r", dependencies=dependencies)(lambda: body())
        else:

            async def route_dep() -> PlainTextResponse:
                return body()

            app.get("/r", dependencies=dependencies)(route_dep)
    else:
        if sync:

            def route_sync(request: Request) -> PlainTextResponse:
                return body()

            route: Any = route_sync
        else:

            async def route_async(request: Request) -> PlainTextResponse:
                return body()

            route = route_async
        if path == "decorator":
            route = limiter.limit(limit)(route)
        app.get("/r")(route)

    @app.get("/free")
    @limiter.exempt
    async def free(request: Request) -> PlainTextResponse:
        return PlainTextResponse("free")

    return app


def limiter_for(
    server: RedisServer, path: str, uri: str | None = None, **kwargs: Any
) -> Limiter:
    """A limiter on ``server`` (or on ``uri``, another way to reach it)."""
    # With a middleware and no decorator, the route's limit is the default.
    options = kwargs.pop("storage_options", {})
    return Limiter(
        key_func=get_remote_address,
        headers_enabled=True,
        storage_uri=uri or server.uri,
        storage_options=options,
        default_limits=["3/minute"] if path.endswith("middleware") else None,
        **kwargs,
    )


def client_for(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def wait_recovered(store: RedisStorage, limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if store.check():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("path", PATHS)
def test_counts_through_redis(server: RedisServer, path: str) -> None:
    limiter = limiter_for(server, path)
    app = make_app(limiter, path)

    async def main() -> list[httpx.Response]:
        async with client_for(app) as client:
            return [await client.get("/r") for _ in range(5)]

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    if path != "depends":
        # (a dependency cannot add headers to a returned Response, and
        # FastAPI renders the dependency's exception itself)
        assert responses[0].headers["x-ratelimit-limit"] == "3"
        assert responses[2].headers["x-ratelimit-remaining"] == "0"
        assert responses[3].json() == {"error": "Rate limit exceeded: 3 per 1 minute"}
    # The counter lives in Redis: a second limiter (another app instance)
    # sees it.
    other = make_app(limiter_for(server, path), path)

    async def again() -> int:
        async with client_for(other) as client:
            return (await client.get("/r")).status_code

    assert asyncio.run(again()) == 429


def _api_key(request: Request) -> str:
    key = request.headers.get("x-api-key", "")
    if key == "boom":
        raise ValueError("no such API key")
    return key


def test_decorator_usual_request_decided_by_the_core(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decorator's usual request on Redis (one limit keyed by the peer's
    address) goes from the wrapper to the core in one call (decide_scope
    returns the storage's waiter): the Python check sees the first request
    only, which works out the route's plan. Headers, the 429 and the one
    command per request are the general path's."""
    limiter = limiter_for(server, "decorator")
    app = make_app(limiter, "decorator")
    seen: list[Any] = []
    general = Limiter._check_in_endpoint_async

    def counted(self: Limiter, conn: Any, target: Any) -> Any:
        seen.append(conn)
        return general(self, conn, target)

    monkeypatch.setattr(Limiter, "_check_in_endpoint_async", counted)

    async def main() -> list[httpx.Response]:
        async with client_for(app) as client:
            first = [await client.get("/r")]
            server.reset_stats()
            return first + [await client.get("/r") for _ in range(4)]

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert len(seen) == 1
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == list("21000")
    assert responses[3].json() == {"error": "Rate limit exceeded: 3 per 1 minute"}
    assert 0 < int(responses[3].headers["retry-after"]) <= 60
    # Two admitted, one refused by Redis; the last refusal is the
    # blocked-key cache's.
    assert server.command_calls()["evalsha"] == 3


def test_decide_scope_waiter_on_redis(server: RedisServer) -> None:
    """decide_scope on a Redis limiter's spec: the waiter given the request
    and a running asyncio loop, which marks the state and resolves to the
    view stored there; None, with the state left unmarked, without the
    request (the middlewares' call) or without a loop."""
    limiter = limiter_for(server, "decorator")
    app = make_app(limiter, "decorator")

    async def warm() -> int:
        async with client_for(app) as client:
            return (await client.get("/r")).status_code

    assert asyncio.run(warm()) == 200
    specs = [slot[0] for slot in limiter._fast_slots.values() if slot[0]]
    assert len(specs) == 1
    spec = specs[0]

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "method": "GET",
            "path": "/r",
            "headers": [],
            "query_string": b"",
            "client": ("10.1.2.3", 5000),
            "state": {},
        }

    bare = scope()
    assert _core.decide_scope(bare, spec) is None  # no request: no waiter
    assert bare["state"] == {}
    outside = scope()  # no asyncio loop runs here (as under trio)
    assert _core.decide_scope(outside, spec, Request(outside)) is None
    assert outside["state"] == {}

    async def decide() -> tuple[Any, Any, dict[str, Any]]:
        s = scope()
        waiter = _core.decide_scope(s, spec, Request(s))
        assert type(waiter) is RedisWaiter
        marked = dict(s["state"])
        view = await waiter
        again = _core.decide_scope(s, spec, Request(s))  # checked already
        assert again is None
        return view, marked, s["state"]

    view, marked, state = asyncio.run(decide())
    assert marked == {"_rate_limiting_complete": True, "_rapidlimit_by": limiter}
    assert state["view_rate_limit"] is view
    assert type(view) is ViewRateLimit
    assert view._data[2:4] == ("10.1.2.3", "/r")  # slowapi's key_style="url"
    assert view.decision is not None and view.decision.remaining == 2


@pytest.mark.parametrize("path", ["middleware", "asgi-middleware"])
def test_middleware_usual_request_decided_by_the_core(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The middleware's usual request on Redis (one limit keyed by the peer's
    address) is one core call (mw_route submits the decision and returns
    its waiter): the Python check sees the first request only, which fills
    the caches. Headers, the 429 and the one command per request are the
    general path's, and so is a storage error once Redis is gone (503)."""
    limiter = limiter_for(server, path, storage_options=FAST)
    app = make_app(limiter, path)
    seen: list[Any] = []
    general = Limiter._scope_check_async

    def counted(self: Limiter, scope: Any, *args: Any) -> Any:
        seen.append(scope)
        return general(self, scope, *args)

    monkeypatch.setattr(Limiter, "_scope_check_async", counted)

    async def main() -> tuple[list[httpx.Response], int, list[httpx.Response]]:
        async with client_for(app) as client:
            first = [await client.get("/r")]
            server.reset_stats()
            served = first + [await client.get("/r") for _ in range(4)]
            calls = server.command_calls()["evalsha"]
            server.kill()
            down = [await client.get("/r") for _ in range(2)]
            return served, calls, down

    responses, calls, down = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert len(seen) == 1
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == list("21000")
    assert responses[3].json() == {"error": "Rate limit exceeded: 3 per 1 minute"}
    assert 0 < int(responses[3].headers["retry-after"]) <= 60
    # Two admitted, one refused by Redis; the last refusal is the
    # blocked-key cache's.
    assert calls == 3
    # A new client (not blocked in the cache) while Redis is down: the
    # fail-closed 503 of the general path, through the waiter's finisher.
    assert [r.status_code for r in down] == [429, 429]  # still blocked

    async def other_client() -> list[httpx.Response]:
        transport = httpx.ASGITransport(
            app=app, raise_app_exceptions=False, client=("10.7.7.7", 1)
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.get("/r") for _ in range(2)]

    unavailable = asyncio.run(other_client())
    assert [r.status_code for r in unavailable] == [503, 503]
    assert unavailable[0].json() == {"error": "Rate limit storage unavailable"}
    assert int(unavailable[0].headers["retry-after"]) >= 1
    assert len(seen) == 1


def test_middleware_on_redis_fail_open_as_the_decorator(server: RedisServer) -> None:
    """swallow_errors (the storage's fail-open policy) through mw_route's
    waiter: Redis gone, requests are let through with the headers of the
    policy's view, as the decorator gives them."""

    def run(path: str) -> list[tuple[int, str, str | None]]:
        if server.proc is None:
            server.restart()
        limiter = limiter_for(
            server, path, storage_options=FAST, swallow_errors=True, key_prefix=path
        )
        app = make_app(limiter, path)

        async def main() -> list[httpx.Response]:
            async with client_for(app) as client:
                served = [await client.get("/r") for _ in range(2)]
                server.kill()
                return served + [await client.get("/r") for _ in range(3)]

        got = asyncio.run(main())
        limiter.close()
        return [
            (r.status_code, r.text, r.headers.get("x-ratelimit-remaining")) for r in got
        ]

    decorator = run("decorator")
    assert [status for status, _, _ in decorator] == [200] * 5
    assert run("middleware") == decorator
    assert run("asgi-middleware") == decorator


@pytest.mark.parametrize("middleware", [SlowAPIMiddleware, SlowAPIASGIMiddleware])
def test_middleware_keyed_by_api_key_as_on_memory(
    server: RedisServer, middleware: type
) -> None:
    # A key function of the app's own (an API key from a header) through
    # the middleware on Redis: each key counted apart, an empty key and a
    # key function that raises answered, all as on the memory store.
    keys = ["a", "a", "b", "a", "a", "", "boom", "b", "a"]

    def run(uri: str) -> list[tuple[int, str | None, str]]:
        limiter = Limiter(
            key_func=_api_key,
            headers_enabled=True,
            storage_uri=uri,
            default_limits=["3/minute"],
            key_prefix=f"api-{uuid4().hex}",
        )
        app = FastAPI()
        app.state.limiter = limiter
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
        app.add_middleware(middleware)

        @app.get("/r")
        async def route() -> PlainTextResponse:
            return PlainTextResponse("ok")

        async def main() -> list[httpx.Response]:
            async with client_for(app) as client:
                return [await client.get("/r", headers={"x-api-key": k}) for k in keys]

        got = asyncio.run(main())
        limiter.close()
        return [
            (r.status_code, r.headers.get("x-ratelimit-remaining"), r.text) for r in got
        ]

    on_redis = run(server.uri)
    assert on_redis == run("memory://")
    assert [status for status, _, _ in on_redis[:5]] == [200, 200, 200, 200, 429]


@pytest.mark.parametrize("path", PATHS)
def test_event_loop_keeps_serving_while_redis_is_slow(
    server: RedisServer, path: str
) -> None:
    """Redis held for at least 0.4 s: the limited request waits for its
    decision, the unlimited one and a ticker run meanwhile."""
    limiter = limiter_for(server, path, storage_options={"timeout": 3.0})
    app = make_app(limiter, path, limit="100/minute")

    async def main() -> tuple[int, int, bool, int]:
        async with client_for(app) as client:
            assert (await client.get("/r")).status_code == 200  # warm
            with await asyncio.to_thread(server.hold) as held:
                ticker = Ticker()
                start = time.monotonic()
                limited = asyncio.create_task(client.get("/r"))
                free = await client.get("/free")
                free_while_held = held.held
                await asyncio.sleep(max(0.0, start + 0.4 - time.monotonic()))
                held.release()
                response = await limited
                await ticker.stop()
            return (
                response.status_code,
                free.status_code,
                free_while_held,
                ticker.ticks,
            )

    limited_code, free_code, free_while_held, ticks = asyncio.run(main())
    assert limited_code == 200
    assert free_code == 200
    assert free_while_held  # answered while Redis was held
    assert ticks >= 10  # the loop ran during the >= 0.4 s wait


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("path", ["decorator", "middleware", "asgi-middleware"])
def test_token_bucket_retry_after_counts_to_room_for_the_request(
    server: RedisServer, path: str, sync: bool
) -> None:
    """As on memory (test_slowapi_clock.py): a token bucket's refusal says
    to come back when it has room, also when the refusal is the blocked-key
    cache's."""
    limiter = limiter_for(server, path, strategy="token-bucket")
    app = make_app(limiter, path, limit="3/minute", sync=sync)

    async def main() -> list[httpx.Response]:
        async with client_for(app) as client:
            return [await client.get("/r") for _ in range(5)]

    started = time.time()
    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    # Three hits of 20 s each fill the bucket: room again in 20 s, full
    # in 60 s (X-RateLimit-Reset); the headers truncate as slowapi's.
    for refused in responses[3:]:
        assert 59 <= int(refused.headers["x-ratelimit-reset"]) - started <= 62
        assert refused.headers["retry-after"] in ("19", "20", "21")
    # Three admitted and one refused by Redis: the last is the cache's.
    assert server.command_calls()["evalsha"] == 4


def test_one_command_per_request_async(server: RedisServer) -> None:
    """Several limits on the route, headers on: one EVALSHA per request."""
    limiter = limiter_for(server, "decorator")
    app = make_app(limiter, "decorator", limit="5/second;50/minute;500/hour")

    async def main() -> list[int]:
        async with client_for(app) as client:
            await client.get("/free")
            await client.get("/r")  # warm-up: connection, script cache
            server.reset_stats()
            return [(await client.get("/r")).status_code for _ in range(6)]

    codes = asyncio.run(main())
    assert codes == [200] * 4 + [429] * 2
    calls = server.command_calls()
    # 4 admitted + 1 rejected; the last rejection is answered from the
    # blocked-key cache.
    assert calls["evalsha"] == 5


@pytest.mark.parametrize("middleware", [SlowAPIMiddleware, SlowAPIASGIMiddleware])
def test_middleware_and_decorator_one_command_after_the_dependencies(
    server: RedisServer, middleware: type
) -> None:
    """A decorated route under a middleware is checked by its decorator,
    after FastAPI's dependencies (the key reads what one set), with the
    application limits in the same single EVALSHA."""
    limiter = Limiter(
        key_func=lambda request: request.state.user,
        application_limits=["100/minute"],
        storage_uri=server.uri,
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    def user(request: Request, u: str = "anon") -> str:
        request.state.user = u
        return u

    @app.get("/me")
    @limiter.limit("2/minute")
    async def me(request: Request, who: str = Depends(user)) -> dict[str, str]:
        return {"who": who}

    app.add_middleware(middleware)

    async def main() -> list[int]:
        async with client_for(app) as client:
            await client.get("/me?u=warm")  # connection, script cache
            server.reset_stats()
            return [
                (await client.get(f"/me?u={u}")).status_code
                for u in ("a", "a", "b", "a", "b")
            ]

    assert asyncio.run(main()) == [200, 200, 200, 429, 200]
    assert server.command_calls()["evalsha"] == 5


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_redis_down_gives_503_by_default(
    server: RedisServer, path: str, sync: bool
) -> None:
    limiter = limiter_for(server, path, storage_options=FAST)
    assert limiter._storage.on_error == "fail-closed"  # type: ignore[attr-defined]
    app = make_app(limiter, path, sync=sync)

    async def main() -> tuple[list[httpx.Response], int]:
        async with client_for(app) as client:
            assert (await client.get("/r")).status_code == 200
            server.kill()
            down = [await client.get("/r") for _ in range(3)]
            free = (await client.get("/free")).status_code
            return down, free

    down, free = asyncio.run(main())
    assert free == 200
    for response in down:
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        if path != "depends":
            assert response.json() == {"error": "Rate limit storage unavailable"}
        else:  # an HTTPException, rendered by FastAPI's handler
            assert response.json() == {"detail": "Rate limit storage unavailable"}
    server.restart()
    assert wait_recovered(limiter._storage)  # type: ignore[arg-type]

    async def after() -> int:
        async with client_for(app) as client:
            return (await client.get("/r")).status_code

    assert asyncio.run(after()) in (200, 429)


@pytest.mark.parametrize("path", ["decorator", "middleware"])
def test_swallow_errors_lets_requests_through(server: RedisServer, path: str) -> None:
    limiter = limiter_for(server, path, storage_options=FAST, swallow_errors=True)
    assert limiter._storage.on_error == "fail-open"  # type: ignore[attr-defined]
    app = make_app(limiter, path)

    async def main() -> list[int]:
        async with client_for(app) as client:
            await client.get("/r")
            server.kill()
            return [(await client.get("/r")).status_code for _ in range(6)]

    assert asyncio.run(main()) == [200] * 6


@pytest.mark.parametrize("path", ["decorator", "asgi-middleware"])
def test_in_memory_fallback_enabled_counts_in_memory(
    server: RedisServer, path: str
) -> None:
    limiter = limiter_for(
        server, path, storage_options=FAST, in_memory_fallback_enabled=True
    )
    assert limiter._storage.on_error == "fallback"  # type: ignore[attr-defined]
    app = make_app(limiter, path)

    async def main() -> list[int]:
        async with client_for(app) as client:
            await client.get("/r")
            server.kill()
            return [(await client.get("/r")).status_code for _ in range(5)]

    # The same limit, counted afresh in memory while Redis is down.
    assert asyncio.run(main()) == [200, 200, 200, 429, 429]


@pytest.mark.parametrize("path", ["decorator", "middleware", "asgi-middleware"])
def test_in_memory_fallback_keeps_its_counts_after_a_key_function_error(
    server: RedisServer, path: str
) -> None:
    # A key function's error while Redis is down is the request's own, not
    # an outage. It used to be taken for one: the limiter switched to a
    # second in-memory store of its own, which counted afresh (found by
    # seed 30134 of the Redis differential, beyond its seeds).
    def key(request: Request) -> str:
        if "x-boom" in request.headers:
            raise KeyError("boom")
        return "k"

    limiter = Limiter(
        key_func=key,
        headers_enabled=True,
        storage_uri=server.uri,
        storage_options=FAST,
        in_memory_fallback_enabled=True,
        default_limits=["3/minute"] if path.endswith("middleware") else None,
    )
    app = make_app(limiter, path)

    async def main() -> tuple[list[int], int, list[int]]:
        async with client_for(app) as client:
            await client.get("/r")
            server.kill()
            before = [(await client.get("/r")).status_code for _ in range(2)]
            boom = (await client.get("/r", headers={"x-boom": "1"})).status_code
            after = [(await client.get("/r")).status_code for _ in range(2)]
            return before, boom, after

    before, boom, after = asyncio.run(main())
    assert (before, boom) == ([200, 200], 500)
    assert after == [200, 429]  # the third of three in memory, then refused


def test_in_memory_fallback_limits_apply_while_down(server: RedisServer) -> None:
    limiter = limiter_for(
        server, "decorator", storage_options=FAST, in_memory_fallback=["1/minute"]
    )
    app = make_app(limiter, "decorator")

    async def main() -> list[int]:
        async with client_for(app) as client:
            await client.get("/r")
            server.kill()
            return [(await client.get("/r")).status_code for _ in range(3)]

    assert asyncio.run(main()) == [200, 429, 429]


@pytest.mark.parametrize("path", PATHS)
def test_in_memory_fallback_limits_for_requests_in_flight(
    server: RedisServer, path: str
) -> None:
    # Requests awaiting Redis together when it stops answering: the first
    # to fail switches to the fallback limits, and the others, failing
    # after the switch, are decided by them too (not a 500).
    limiter = limiter_for(
        server, path, storage_options=FAST, in_memory_fallback=["100/minute"]
    )
    app = make_app(limiter, path, limit="100/minute")

    async def main() -> list[int]:
        async with client_for(app) as client:
            assert (await client.get("/r")).status_code == 200
            with await asyncio.to_thread(server.hold) as held:
                responses = await asyncio.gather(*(client.get("/r") for _ in range(8)))
                assert held.held  # all answered without Redis
            return [r.status_code for r in responses]

    assert asyncio.run(main()) == [200] * 8


def test_in_memory_fallback_limits_when_redis_refuses_the_script(
    server: RedisServer,
) -> None:
    # Connected, but every script call is an error reply (OOM under
    # maxmemory): each request asks Redis once, then counts in memory.
    client = server.client()
    client.set("filler", "x" * 100_000)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    limiter = limiter_for(
        server, "decorator", storage_options=FAST, in_memory_fallback=["2/minute"]
    )
    app = make_app(limiter, "decorator")

    async def main() -> list[int]:
        async with client_for(app) as client:
            return [(await client.get("/r")).status_code for _ in range(3)]

    assert asyncio.run(main()) == [200, 200, 429]
    assert limiter._storage.stats()["errors"] <= 3  # type: ignore[attr-defined]


def test_in_memory_fallback_switches_back_when_redis_returns(
    server: RedisServer,
) -> None:
    # Back to Redis as soon as the engine has reconnected, not after
    # slowapi's back-off timer (1, 2, 4 ... 32 s between checks).
    limiter = limiter_for(
        server, "decorator", storage_options=FAST, in_memory_fallback=["1/minute"]
    )
    app = make_app(limiter, "decorator", limit="100/minute")
    storage = limiter._storage

    async def main() -> list[str]:
        remaining = []
        async with client_for(app) as client:
            r = await client.get("/r")
            remaining.append(r.headers["x-ratelimit-remaining"])
            server.kill()
            for _ in range(2):  # the fallback limit: 1/minute
                r = await client.get("/r")
                remaining.append(str(r.status_code))
            server.restart()
            deadline = time.monotonic() + 5
            while not storage.connected and time.monotonic() < deadline:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
            for _ in range(2):
                r = await client.get("/r")
                remaining.append(r.headers["x-ratelimit-remaining"])
        return remaining

    # 99 on Redis; 200 then 429 in memory; then Redis again (a fresh
    # server: its count starts over).
    assert asyncio.run(main()) == ["99", "200", "429", "99", "98"]


@pytest.mark.parametrize("path", PATHS)
def test_in_memory_fallback_back_on_redis_without_blocking_the_loop(
    server: RedisServer, path: str
) -> None:
    """The first request once Redis is back awaits its decision as any
    other: Redis is held 0.4 s and a ticker runs meanwhile.
    It was a synchronous decision, which stopped the event loop until
    Redis answered."""
    limiter = limiter_for(
        server,
        path,
        storage_options={**FAST, "timeout": 3.0},
        in_memory_fallback=["1/minute"],
    )
    app = make_app(limiter, path, limit="100/minute")
    storage = limiter._storage

    async def main() -> tuple[list[int], int, int]:
        codes = []
        async with client_for(app) as client:
            codes.append((await client.get("/r")).status_code)
            server.kill()
            for _ in range(2):  # in memory: the fallback limit, 1/minute
                codes.append((await client.get("/r")).status_code)
            server.restart()
            deadline = time.monotonic() + 5
            while not storage.connected and time.monotonic() < deadline:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
            assert server.client().dbsize() == 0
            held = server.hold(at_most=0.4)  # released by its timer
            ticker = Ticker()
            codes.append((await client.get("/r")).status_code)
            await ticker.stop()
            held.release()
        return codes, server.client().dbsize(), ticker.ticks

    codes, keys, ticks = asyncio.run(main())
    assert codes == [200, 200, 429, 200]
    assert keys == 1  # decided by the restarted Redis, not in memory
    assert ticks >= 10  # the loop ran during the ~0.4 s wait


def test_explicit_policy_wins(server: RedisServer) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        storage_uri=server.uri + "?on_error=fail-open",
        swallow_errors=False,
    )
    assert limiter._storage.on_error == "fail-open"  # type: ignore[attr-defined]
    limiter = Limiter(
        key_func=get_remote_address,
        storage_uri=server.uri,
        storage_options={"on_error": "fail-closed"},
        swallow_errors=True,
    )
    assert limiter._storage.on_error == "fail-closed"  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", PATHS)
def test_failover_reaches_the_new_primary(
    server: RedisServer, path: str, tmp_path: Any
) -> None:
    """The primary is demoted to a replica (it answers writes with
    READONLY) and the address now leads to the new primary, as a DNS name
    or a proxy would after a failover; here a unix socket path, repointed.
    One request gets the policy, then the limiter decides on the new
    primary, without a restart of the app."""
    primary = RedisServer()
    primary.start()
    try:
        link = str(tmp_path / "redis.sock")
        os.symlink(server.unix_path, link)
        limiter = limiter_for(
            server, path, uri=f"redis+unix://{link}", storage_options=FAST
        )
        app = make_app(limiter, path)

        async def main() -> tuple[int, list[int]]:
            async with client_for(app) as client:
                assert (await client.get("/r")).status_code == 200
                server.client().replicaof("127.0.0.1", primary.port)
                os.symlink(primary.unix_path, link + ".new")
                os.replace(link + ".new", link)
                met_readonly = (await client.get("/r")).status_code
                await anyio.to_thread.run_sync(wait_recovered, limiter._storage)
                return met_readonly, [
                    (await client.get("/r")).status_code for _ in range(4)
                ]

        met_readonly, after = asyncio.run(main())
        assert met_readonly == 503
        # Counted afresh on the new primary: 3 per minute.
        assert after == [200, 200, 200, 429]
    finally:
        # A primary with a replica waits for it at shutdown.
        server.client().replicaof("NO", "ONE")
        primary.cleanup()


def test_sync_check_request_limit_raises_503(server: RedisServer) -> None:
    """slowapi's _check_request_limit (sync) while Redis is down."""
    limiter = limiter_for(server, "decorator", storage_options=FAST)

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    limited = limiter.limit("3/minute")(endpoint)
    server.kill()
    request = Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/r",
            "client": ("1.2.3.4", 1),
            "headers": [],
        }
    )
    with pytest.raises(Exception) as info:
        limiter._check_request_limit(request, limited, in_middleware=False)
    assert getattr(info.value, "status_code", None) == 503


class _Deadline:
    """A timeout around the app, as timeout middlewares do: the request's
    task is cancelled while it awaits its decision."""

    def __init__(self, app: Any, how: str) -> None:
        self.app = app
        self.how = how

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        seconds = float(dict(scope["headers"]).get(b"x-deadline", b"10"))
        try:
            if self.how == "anyio":
                with anyio.fail_after(seconds):
                    await self.app(scope, receive, send)
            else:
                await asyncio.wait_for(self.app(scope, receive, send), seconds)
        except (TimeoutError, asyncio.TimeoutError):
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    ("path", "how"),
    [
        ("decorator", "wait_for"),
        ("decorator", "anyio"),
        ("middleware", "anyio"),
        ("asgi-middleware", "wait_for"),
        ("depends", "anyio"),
    ],
)
def test_requests_cancelled_while_awaiting_redis_count_once(
    server: RedisServer, path: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """20 requests wait together for a held Redis (their decisions share
    script calls); half are cancelled by a deadline meanwhile. Each
    decision is counted once (it was sent), the others are answered as
    usual, and nothing is logged or left behind."""
    limiter = Limiter(
        key_func=get_remote_address,
        storage_uri=server.uri,
        storage_options={"timeout": 3.0},
        # (a middleware's route limit is the default)
        default_limits=["21/minute"] if path.endswith("middleware") else None,
    )
    app = _Deadline(make_app(limiter, path, limit="21/minute"), how)

    async def main() -> tuple[list[int], list[int]]:
        async with client_for(app) as client:  # type: ignore[arg-type]
            await client.get("/free")  # connected, script loaded
            with await asyncio.to_thread(server.hold):
                requests = [
                    asyncio.create_task(
                        client.get(
                            "/r", headers={"x-deadline": "0.1" if i % 2 else "5"}
                        )
                    )
                    for i in range(20)
                ]
                await asyncio.wait(requests[1::2])  # past their deadline
            batch = await asyncio.gather(*requests)
            after = [(await client.get("/r")).status_code for _ in range(2)]
            return [r.status_code for r in batch], after

    with caplog.at_level(logging.WARNING):
        batch, after = asyncio.run(main())
    assert batch == [200, 504] * 10
    assert after == [200, 429]  # 20 counted, then the 21st, then refused
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, RedisWaiter)]


def _threads_and_fds() -> tuple[int, int]:
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("path", PATHS)
def test_close_releases_what_a_dropped_application_keeps(
    server: RedisServer, path: str
) -> None:
    """FastAPI's caches keep its last 4,096 endpoints, so an application per
    test kept its limiter, with the Redis connection and I/O thread, after
    it was dropped (about 750 of them reached the 1,024 open files limit).
    ``Limiter.close()`` releases them; the limiter then answers as while
    Redis is down (503 by default), and closing again does nothing."""
    gc.collect()
    before = _threads_and_fds()
    limiters = []
    for i in range(12):
        limiter = limiter_for(server, path, storage_options=FAST, key_prefix=f"{i}")
        app = make_app(limiter, path, limit="1000/minute")

        async def once(app: FastAPI = app) -> int:
            async with client_for(app) as client:
                return (await client.get("/r")).status_code

        assert asyncio.run(once()) == 200
        limiters.append(limiter)
    threads, fds = _threads_and_fds()
    assert threads >= before[0] + 12  # one I/O thread per storage
    assert len(server.client().client_list()) >= 12 + 1
    for limiter in limiters:
        limiter.close()
    limiters[0].close()
    gc.collect()
    assert _threads_and_fds()[0] <= before[0]
    assert _threads_and_fds()[1] <= before[1] + 1  # the redis-py client's
    assert len(server.client().client_list()) <= 2  # this probe (and its twin)

    async def after() -> httpx.Response:
        async with client_for(app) as client:
            return await client.get("/r")

    response = asyncio.run(after())
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1


def test_close_on_memory_is_harmless() -> None:
    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")
    limiter.close()
    limiter.close()
    app = make_app(limiter, "decorator", limit="1/minute")

    async def main() -> list[int]:
        async with client_for(app) as client:
            return [(await client.get("/r")).status_code for _ in range(2)]

    assert asyncio.run(main()) == [200, 429]
