"""Streaming responses, background tasks and generator endpoints with the
rate-limit headers on, on memory and on Redis: the headers ride on the one
``http.response.start``, a background task runs once, and a refused request
runs none (as with slowapi)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import slowapi
import slowapi.errors
from fastapi import BackgroundTasks, Depends, FastAPI, Request, Response
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

import rapidlimit
import rapidlimit.errors
from rapidlimit import Limiter, _core
from rapidlimit.errors import ConfigurationError
from rapidlimit.middleware import SlowAPIASGIMiddleware
from redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
def uri(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
        return
    if not _core.redis_available():
        pytest.skip("built without hiredis")
    server: RedisServer = request.getfixturevalue("server")
    server.client().flushall()
    yield server.uri


def _lib(name: str) -> types.SimpleNamespace:
    if name == "slowapi":
        return types.SimpleNamespace(
            Limiter=slowapi.Limiter,
            handler=slowapi._rate_limit_exceeded_handler,
            RateLimitExceeded=slowapi.errors.RateLimitExceeded,
        )
    return types.SimpleNamespace(
        Limiter=rapidlimit.Limiter,
        handler=rapidlimit._rate_limit_exceeded_handler,
        RateLimitExceeded=rapidlimit.errors.RateLimitExceeded,
    )


def _get(app: Any, path: str, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.get(path) for _ in range(n)]

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("lib_name", "uri"),
    [("slowapi", "memory"), ("rapidlimit", "memory"), ("rapidlimit", "redis")],
    indirect=["uri"],
)
@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_refused_request_runs_no_background_task(
    lib_name: str, kind: str, uri: str
) -> None:
    """The decorator answers a refused request by returning the 429 from the
    endpoint; FastAPI hands a returned response with no background the
    request's BackgroundTasks, so what a dependency queued ran for a
    request that was refused. slowapi raises there, and runs none."""
    lib = _lib(lib_name)
    limiter = lib.Limiter(key_func=lambda: "k", storage_uri=uri, headers_enabled=True)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(lib.RateLimitExceeded, lib.handler)
    ran: list[str] = []

    def audit(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(ran.append, "dependency")

    if kind == "async":

        @app.get("/r", dependencies=[Depends(audit)])
        @limiter.limit("2/minute")
        async def endpoint(
            request: Request, response: Response, background_tasks: BackgroundTasks
        ) -> Any:
            background_tasks.add_task(ran.append, "endpoint")
            return {"ok": True}

    else:

        @app.get("/r", dependencies=[Depends(audit)])
        @limiter.limit("2/minute")
        def endpoint_sync(
            request: Request, response: Response, background_tasks: BackgroundTasks
        ) -> Any:
            background_tasks.add_task(ran.append, "endpoint")
            return {"ok": True}

    seen = []
    for response in _get(app, "/r", 3):
        seen.append((response.status_code, response.headers["x-ratelimit-remaining"]))
    assert seen == [(200, "1"), (200, "0"), (429, "0")]
    assert ran == ["dependency", "endpoint"] * 2


@pytest.mark.parametrize("middleware", [False, True])
def test_streaming_response_with_headers(uri: str, middleware: bool) -> None:
    limiter = Limiter(
        key_func=lambda: "k",
        storage_uri=uri,
        headers_enabled=True,
        # (the headers describe the shortest window: the route's)
        application_limits=["10/hour"] if middleware else [],
    )
    app = FastAPI()
    app.state.limiter = limiter
    if middleware:
        app.add_middleware(SlowAPIASGIMiddleware)
    ran: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0)
            yield f"chunk {i}\n".encode()

    @app.get("/stream")
    @limiter.limit("5/minute")
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(
            chunks(), background=BackgroundTask(ran.append, "after")
        )

    messages: list[dict[str, Any]] = []

    async def drive() -> None:
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/stream",
            "raw_path": b"/stream",
            "root_path": "",
            "query_string": b"",
            "headers": [],
            "client": ("127.0.0.1", 1),
            "server": ("t", 80),
        }

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(1)  # no disconnect meanwhile
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        await app(scope, receive, send)

    asyncio.run(drive())
    assert [m["type"] for m in messages] == ["http.response.start"] + [
        "http.response.body"
    ] * 4
    headers = dict(messages[0]["headers"])
    assert headers[b"x-ratelimit-limit"] == b"5"
    assert headers[b"x-ratelimit-remaining"] == b"4"
    assert b"".join(m.get("body", b"") for m in messages) == (
        b"chunk 0\nchunk 1\nchunk 2\n"
    )
    assert ran == ["after"]


def test_a_generator_endpoint_is_refused_at_decoration() -> None:
    """FastAPI streams what a generator endpoint yields (JSON lines,
    server-sent events): it calls the endpoint without awaiting it, so the
    decorator's check never ran, and the endpoint answered an empty 200,
    unlimited. A 429 would come after the 200 anyway."""
    limiter = Limiter(key_func=lambda: "k")

    async def events() -> AsyncIterator[dict[str, int]]:
        yield {"n": 1}

    def lines() -> Iterator[dict[str, int]]:
        yield {"n": 1}

    for endpoint in (events, lines):
        with pytest.raises(ConfigurationError, match="generator.*depends"):
            limiter.limit("2/minute")(endpoint)


def test_a_generator_endpoint_is_limited_by_a_dependency(uri: str) -> None:
    pytest.importorskip("fastapi.sse")  # FastAPI streams generator endpoints
    limiter = Limiter(key_func=lambda: "k", storage_uri=uri, headers_enabled=True)
    app = FastAPI()
    app.state.limiter = limiter

    @app.get("/lines", dependencies=[Depends(limiter.depends("2/minute"))])
    async def lines() -> AsyncIterator[dict[str, int]]:
        yield {"n": 1}

    got = _get(app, "/lines", 3)
    assert [r.status_code for r in got] == [200, 200, 429]
    assert [r.text for r in got[:2]] == ['{"n":1}\n'] * 2
    assert [r.headers["x-ratelimit-remaining"] for r in got[:2]] == ["1", "0"]
