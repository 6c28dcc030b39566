"""Limiter.depends() under a middleware: one check, one core call.

The middleware finds the route's ``depends()`` dependencies (route, router
and nested ones) and checks their limits with the route's limits and the
defaults, in one core call (one Redis round trip); the dependency then lets
the request through without a second check. Without a middleware, or for
another limiter's dependency, the dependency checks as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request

from conftest import rate_headers
from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

MIDDLEWARES = [SlowAPIMiddleware, SlowAPIASGIMiddleware]


class CountingCore:
    """Stands in for Limiter._limiter and counts the calls into the core."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name.startswith("decide") or name in ("hit", "test"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls += 1
                return found(*args, **kwargs)

            return counted
        return found


def make_app(limiter: Limiter, middleware: Any) -> FastAPI:
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    if middleware is not None:
        app.add_middleware(middleware)
    return app


def counting(limiter: Limiter) -> CountingCore:
    core = CountingCore(limiter._limiter)
    limiter._limiter = core  # type: ignore[assignment]
    return core


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_route_dependency_checked_with_the_defaults_in_one_call(
    middleware: Any, make_client: Any
) -> None:
    limiter = Limiter(
        key_func=get_remote_address, default_limits=["5/minute"], headers_enabled=True
    )
    app = make_app(limiter, middleware)

    @app.get("/dep", dependencies=[Depends(limiter.depends("2/minute"))])
    async def dep() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    core = counting(limiter)
    first = client.get("/dep")
    assert first.status_code == 200
    # Both limits have the same granularity: the headers describe the first
    # checked (the default), as slowapi picks among a route's limits.
    assert rate_headers(first)["x-ratelimit-limit"] == "5"
    assert rate_headers(first)["x-ratelimit-remaining"] == "4"
    assert client.get("/dep").status_code == 200
    rejected = client.get("/dep")
    assert rejected.status_code == 429
    assert rejected.json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    assert core.calls == 3  # one per request, dependency included
    # The default was charged by each of the three requests (in order,
    # before the dependency's limit): two more pass it, then it rejects.
    assert [client.get("/plain").status_code for _ in range(6)] == [200] * 5 + [429]


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_router_and_nested_dependencies(middleware: Any, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    app = make_app(limiter, middleware)
    router_limit = limiter.depends("3/minute", scope="router")
    nested_limit = limiter.depends("2/minute", scope="nested")

    def user(request: Request, _: None = Depends(nested_limit)) -> str:
        return request.client.host if request.client else ""

    router = APIRouter(dependencies=[Depends(router_limit)])

    @router.get("/inner")
    async def inner(who: str = Depends(user)) -> dict[str, str]:
        return {"who": who}

    app.include_router(router, prefix="/r")
    client = make_client(app)
    core = counting(limiter)
    assert client.get("/r/inner").status_code == 200
    assert client.get("/r/inner").status_code == 200
    third = client.get("/r/inner")
    assert third.status_code == 429
    assert third.json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    assert core.calls == 3


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_dependency_of_another_limiter_checks_itself(
    middleware: Any, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["10/minute"])
    other = Limiter(key_func=get_remote_address)
    app = make_app(limiter, middleware)

    @app.get("/x", dependencies=[Depends(other.depends("1/minute"))])
    async def x() -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    ours, theirs = counting(limiter), counting(other)
    assert client.get("/x").status_code == 200
    assert client.get("/x").status_code == 429
    assert theirs.calls == 2
    assert ours.calls == (2 if middleware is not None else 0)


def test_without_a_middleware_the_dependency_checks_itself(make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    app = make_app(limiter, None)

    @app.get("/dep", dependencies=[Depends(limiter.depends("2/minute"))])
    async def dep() -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    core = counting(limiter)
    first = client.get("/dep")
    assert rate_headers(first)["x-ratelimit-limit"] == "2"
    assert client.get("/dep").status_code == 200
    assert client.get("/dep").status_code == 429
    assert core.calls == 3


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_exempt_route_keeps_its_dependency_limit(
    middleware: Any, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    app = make_app(limiter, middleware)

    @app.get("/ex", dependencies=[Depends(limiter.depends("2/minute"))])
    @limiter.exempt
    async def ex(request: Request) -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    assert [client.get("/ex").status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_one_redis_command_per_request(server: RedisServer, middleware: Any) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["10/minute"],
        headers_enabled=True,
        storage_uri=server.uri,
    )
    app = make_app(limiter, middleware)

    @app.get("/dep", dependencies=[Depends(limiter.depends("3/minute"))])
    async def dep() -> dict[str, bool]:
        return {"ok": True}

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.get("/nothing")  # warm-up: connection, script cache
            server.reset_stats()
            return [(await c.get("/dep")).status_code for _ in range(4)]

    assert asyncio.run(main()) == [200, 200, 200, 429]
    assert server.command_calls()["evalsha"] == 4
