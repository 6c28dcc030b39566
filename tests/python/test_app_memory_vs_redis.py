"""rapidlimit on Redis answers as on memory, through whole applications.

Seeded random request sequences for each strategy and each way a limit is
checked (the decorator, both middlewares, the FastAPI dependency), sync and
async endpoints, several windows on a route, costs and a shared limit: the
same application on ``memory://`` and on a real redis-server, under one
frozen clock (both stores decide at the caller's time), must give the same
status, body and rate-limit headers for every request. This covers what the
store-level comparison (tests/cpp/redis_store_test.cc) does not: the
bindings' ways to Redis (the decorator's and the middlewares' waiters, the
blocked-key cache's refusals) and the headers formatted from their
decisions, the token bucket's Retry-After among them.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from freezegun import freeze_time
from starlette.requests import Request

from conftest import FROZEN, limited_app
from rapidlimit import Limiter
from rapidlimit.strategies import STRATEGIES
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

PATHS = ["decorator", "middleware", "asgi-middleware", "depends"]
MULTI = "2/10 seconds;4/minute"
CLIENTS = ["10.0.0.1", "10.0.0.2"]
ROUTES = ["/multi", "/multi", "/cost", "/shared1", "/shared2", "/free"]
TICKS = [0, 0, 0, 0, 0, 0, 0.25, 0.5, 1, 2.5, 7, 30]
HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
)


def cost_of(request: Request) -> int:
    return int(request.headers.get("x-cost", "1"))


def make_app(
    uri: str, strategy: str, path: str, sync: bool, retry_after: str | None
) -> FastAPI:
    limiter = Limiter(
        key_func=get_remote_address,
        headers_enabled=True,
        strategy=strategy,
        storage_uri=uri,
        # Generous: a loaded machine must not turn a slow reply into the
        # fail-closed policy on one side only.
        storage_options={"timeout": 5.0} if uri.startswith("redis") else {},
        retry_after=retry_after,
        default_limits=[MULTI] if path.endswith("middleware") else [],
    )
    app = limited_app(limiter, path)

    def endpoint(name: str) -> Any:
        if sync:

            def view_sync(request: Request) -> dict[str, str]:
                return {"route": name}

            return view_sync

        async def view(request: Request) -> dict[str, str]:
            return {"route": name}

        return view

    multi = endpoint("multi")
    if path == "decorator":
        multi = limiter.limit(MULTI)(multi)
    if path == "depends":
        app.get("/multi", dependencies=[Depends(limiter.depends(MULTI))])(multi)
        app.get(
            "/cost",
            dependencies=[Depends(limiter.depends("5/minute", cost=cost_of))],
        )(endpoint("cost"))
    else:
        app.get("/multi")(multi)
        app.get("/cost")(limiter.limit("5/minute", cost=cost_of)(endpoint("cost")))
    shared = limiter.shared_limit("3/30 seconds", scope="group")
    app.get("/shared1")(shared(endpoint("shared1")))
    app.get("/shared2")(shared(endpoint("shared2")))
    app.get("/free")(limiter.exempt(endpoint("free")))
    return app


def answer(response: httpx.Response) -> tuple[Any, ...]:
    headers = tuple(response.headers.get(name) for name in HEADERS)
    return (response.status_code, response.content, headers)


async def run_both(apps: dict[str, FastAPI], seed: int, frozen: Any) -> None:
    rnd = random.Random(seed)
    clients = {
        (side, ip): httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=(ip, 1234)),
            base_url="http://test",
        )
        for side, app in apps.items()
        for ip in CLIENTS
    }
    log: list[str] = []
    try:
        for step in range(120):
            frozen.tick(rnd.choice(TICKS))
            route = rnd.choice(ROUTES)
            ip = rnd.choice(CLIENTS)
            headers = {"x-cost": str(rnd.choice([0, 1, 1, 2, 3]))}
            got = {
                side: answer(await clients[(side, ip)].get(route, headers=headers))
                for side in apps
            }
            log.append(f"#{step} {route} {ip} {headers} {got['redis']}")
            assert got["memory"] == got["redis"], "\n".join(log)
    finally:
        for client in clients.values():
            await client.aclose()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_redis_answers_as_memory(
    server: RedisServer, strategy: str, path: str, seed: int
) -> None:
    sync = seed % 2 == 0
    retry_after = "http-date" if seed == 2 else None
    apps = {
        side: make_app(uri, strategy, path, sync, retry_after)
        for side, uri in (("memory", "memory://"), ("redis", server.uri))
    }
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        asyncio.run(run_both(apps, seed, frozen))
    for app in apps.values():
        app.state.limiter.close()
