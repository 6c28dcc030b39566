"""Limiter.depends() under a middleware, and beside a decorator.

The middleware checks the route's limits (application, defaults) before the
app runs, as slowapi's does: a request an auth dependency refuses still
counts. Each ``depends()`` limit is checked when FastAPI runs its
dependency, in FastAPI's order, inside the app: its key function may read
what an earlier dependency put in ``request.state``, and FastAPI's
``dependency_overrides``, its own refusals and the app's exception handlers
apply to it as to any dependency. A decorator checks its own limits when
it runs.
Without a middleware, or for another limiter's dependency, the dependency
checks its own limit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import slowapi
import slowapi.errors
import slowapi.middleware
import slowapi.util
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

from conftest import rate_headers
from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

MIDDLEWARES = [SlowAPIMiddleware, SlowAPIASGIMiddleware]
FAST = {"timeout": 0.15, "connect_timeout": 0.3}


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
def test_route_dependency_checked_after_the_defaults(
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
    assert core.calls == 6  # the middleware's, then the dependency's
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
    # Each dependency checks when FastAPI runs it: the router's, then the
    # nested one inside `user` (no route limit for the middleware).
    assert core.calls == 6
    fourth = client.get("/r/inner")
    assert fourth.json() == {"error": "Rate limit exceeded: 3 per 1 minute"}


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
def test_redis_commands_per_request(server: RedisServer, middleware: Any) -> None:
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
    # The default before the app, the dependency's limit when it runs.
    assert server.command_calls()["evalsha"] == 8


def auth(request: Request) -> None:
    token = request.headers.get("x-token")
    if token is None:
        raise HTTPException(status_code=401)
    request.state.user = token


def _auth_app(limiter: Limiter, middleware: Any) -> FastAPI:
    """An auth dependency sets request.state.user (401 without a token); the
    limit, declared after it, is keyed by that user."""
    app = make_app(limiter, middleware)

    def user_key(request: Request) -> str:
        return str(request.state.user)

    @app.get(
        "/me",
        dependencies=[
            Depends(auth),
            Depends(limiter.depends("2/minute", key_func=user_key)),
        ],
    )
    async def me() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_key_function_reads_state_set_by_an_earlier_dependency(
    middleware: Any, make_client: Any
) -> None:
    """Under a middleware this was a 500: the limit was checked before
    FastAPI ran the auth dependency."""
    limiter = Limiter(
        key_func=get_remote_address, default_limits=["4/minute"], headers_enabled=True
    )
    client = make_client(_auth_app(limiter, middleware))
    core = counting(limiter)
    alice = [client.get("/me", headers={"x-token": "alice"}) for _ in range(3)]
    assert [r.status_code for r in alice] == [200, 200, 429]
    assert alice[2].json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    # Under a middleware the default (4 per minute) and the user's limit
    # have the same window: the headers describe the first checked.
    first = rate_headers(alice[0])
    assert (first["x-ratelimit-limit"], first["x-ratelimit-remaining"]) == (
        ("2", "1") if middleware is None else ("4", "3")
    )
    # Another user has a bucket of their own (the default, keyed by the
    # address, is shared: 4 per minute in all under a middleware).
    bob = client.get("/me", headers={"x-token": "bob"})
    assert bob.status_code == 200
    # The middleware checks the default before the app, the dependency its
    # own limit after the auth: two calls per request.
    assert core.calls == (4 if middleware is None else 8)
    if middleware is not None:
        last = client.get("/me", headers={"x-token": "carol"})
        assert last.json() == {"error": "Rate limit exceeded: 4 per 1 minute"}


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_the_dependency_counts_only_requests_that_reach_it(
    middleware: Any, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address)
    client = make_client(_auth_app(limiter, middleware))
    assert [client.get("/me").status_code for _ in range(5)] == [401] * 5
    ok = [client.get("/me", headers={"x-token": "a"}).status_code for _ in range(3)]
    assert ok == [200, 200, 429]


@pytest.mark.parametrize("lib", ["slowapi", "rapidlimit"])
@pytest.mark.parametrize("asgi", [False, True])
def test_requests_an_auth_dependency_refuses_count_towards_the_defaults(
    lib: str, asgi: bool, make_client: Any
) -> None:
    """As under slowapi's middleware: the defaults are checked before the
    app, so a client hammering the auth is stopped (a rapidlimit route with
    a depends() limit after the auth used to leave them unchecked: 401
    forever)."""
    if lib == "slowapi":
        limiter: Any = slowapi.Limiter(
            key_func=slowapi.util.get_remote_address, default_limits=["3/minute"]
        )
        app = FastAPI()
        app.state.limiter = limiter
        app.add_exception_handler(
            slowapi.errors.RateLimitExceeded, slowapi._rate_limit_exceeded_handler
        )
        app.add_middleware(
            slowapi.middleware.SlowAPIASGIMiddleware
            if asgi
            else slowapi.middleware.SlowAPIMiddleware
        )

        @app.get("/me", dependencies=[Depends(auth)])
        async def me() -> dict[str, bool]:
            return {"ok": True}

    else:
        limiter = Limiter(key_func=get_remote_address, default_limits=["3/minute"])
        app = _auth_app(limiter, MIDDLEWARES[asgi])
    client = make_client(app)
    codes = [client.get("/me").status_code for _ in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    assert client.get("/me", headers={"x-token": "a"}).status_code == 429


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_a_dependency_that_runs_first_counts_what_the_auth_refuses(
    middleware: Any, make_client: Any
) -> None:
    """Declared before the auth, the limit counts refused requests too (in
    FastAPI's order, as without a middleware)."""
    limiter = Limiter(key_func=get_remote_address, default_limits=["10/minute"])
    app = make_app(limiter, middleware)

    @app.get("/me", dependencies=[Depends(limiter.depends("3/minute")), Depends(auth)])
    async def me() -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    core = counting(limiter)
    codes = [client.get("/me").status_code for _ in range(2)]
    codes += [client.get("/me", headers={"x-token": "a"}).status_code for _ in range(2)]
    assert codes == [401, 401, 200, 429]
    assert core.calls == (4 if middleware is None else 8)


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_a_first_dependency_keyed_otherwise_is_checked_when_it_runs(
    middleware: Any, make_client: Any
) -> None:
    """Its key function is not one the middleware calls anyway (it might
    read what an inner middleware sets): the dependency checks it."""
    limiter = Limiter(key_func=get_remote_address, default_limits=["10/minute"])
    app = make_app(limiter, middleware)
    seen: list[str] = []

    def by_header(request: Request) -> str:
        seen.append(request.scope["endpoint"].__name__)
        return request.headers.get("x-key", "anon")

    @app.get("/k", dependencies=[Depends(limiter.depends("2/minute", by_header))])
    async def keyed() -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    core = counting(limiter)
    codes = [client.get("/k", headers={"x-key": "a"}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert client.get("/k", headers={"x-key": "b"}).status_code == 200
    assert seen == ["keyed"] * 4  # called by the dependency, endpoint known
    assert core.calls == 8


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_decorator_and_dependency_on_one_route_both_apply(
    middleware: Any, make_client: Any
) -> None:
    """The dependency used to mark the request as checked: the decorator's
    limits (and the application limits owed to it) were skipped."""
    limiter = Limiter(
        key_func=get_remote_address,
        application_limits=["5/minute"],
        headers_enabled=True,
    )
    app = make_app(limiter, middleware)

    @app.get("/both", dependencies=[Depends(limiter.depends("4/minute"))])
    @limiter.limit("2/minute")
    async def both(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/dep", dependencies=[Depends(limiter.depends("4/minute"))])
    async def dep() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/plain")
    async def plain_route() -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    codes = [client.get("/both").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    third = client.get("/both")
    assert third.json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    # The dependency counted every request that reached it (4 of 4 now).
    assert client.get("/both").json() == {
        "error": "Rate limit exceeded: 4 per 1 minute"
    }
    dep_codes = [client.get("/dep").status_code for _ in range(5)]
    plain = client.get("/plain").status_code
    if middleware is None:  # application limits need a middleware
        assert dep_codes == [200, 200, 200, 200, 429]
        assert plain == 200
    else:
        # The application limit (5 per minute, every route) was charged by
        # the decorator on /both's 4 requests that reached it, then by the
        # middleware on /dep's: 1 left.
        assert dep_codes == [200, 429, 429, 429, 429]
        assert plain == 429


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_dependency_on_redis_after_auth(server: RedisServer, middleware: Any) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["10/minute"],
        headers_enabled=True,
        storage_uri=server.uri,
    )
    app = _auth_app(limiter, middleware)

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.get("/nothing")
            server.reset_stats()
            codes = [
                (await c.get("/me", headers={"x-token": t})).status_code
                for t in ["a", "a", "a", "b"]
            ]
            return [*codes, (await c.get("/me")).status_code]

    assert asyncio.run(main()) == [200, 200, 429, 200, 401]
    # The default before the app, the user's limit after the auth: two
    # round trips; the refused request one.
    assert server.command_calls()["evalsha"] == 9


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_dependency_overrides_replace_the_limit(
    middleware: Any, make_client: Any
) -> None:
    """Tests switch a limit off with FastAPI's dependency_overrides."""
    limiter = Limiter(key_func=get_remote_address, default_limits=["100/minute"])
    app = make_app(limiter, middleware)
    limit = limiter.depends("2/minute")

    @app.get("/x", dependencies=[Depends(limit)])
    async def x() -> dict[str, bool]:
        return {"ok": True}

    app.dependency_overrides[limit] = lambda: None
    client = make_client(app)
    assert [client.get("/x").status_code for _ in range(4)] == [200] * 4
    del app.dependency_overrides[limit]
    assert [client.get("/x").status_code for _ in range(3)] == [200, 200, 429]


class Item(BaseModel):
    a: int


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_a_body_fastapi_cannot_parse_is_not_counted(
    middleware: Any, make_client: Any
) -> None:
    """FastAPI answers 422 to malformed JSON before it runs any dependency."""
    limiter = Limiter(key_func=get_remote_address, default_limits=["100/minute"])
    app = make_app(limiter, middleware)

    @app.post("/x", dependencies=[Depends(limiter.depends("2/minute"))])
    async def x(item: Item) -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    bad = {"content": b"{bad", "headers": {"content-type": "application/json"}}
    assert [client.post("/x", **bad).status_code for _ in range(3)] == [422] * 3
    good = [client.post("/x", json={"a": 1}).status_code for _ in range(3)]
    assert good == [200, 200, 429]


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_the_apps_exception_handlers_answer_the_dependencys_429(
    middleware: Any, make_client: Any
) -> None:
    """An app with a handler for Starlette's HTTPException (none for
    RateLimitExceeded), and a mounted sub-app with its own handler."""

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse({"problem": exc.detail}, status_code=exc.status_code)

    async def on_limit(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"inner": True}, status_code=429)

    limiter = Limiter(key_func=get_remote_address, default_limits=["100/minute"])
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(StarletteHTTPException, on_http)
    if middleware is not None:
        app.add_middleware(middleware)

    @app.get("/first", dependencies=[Depends(limiter.depends("1/minute"))])
    async def first() -> dict[str, bool]:
        return {"ok": True}

    sub = FastAPI()
    sub.add_exception_handler(RateLimitExceeded, on_limit)

    @sub.get("/x", dependencies=[Depends(limiter.depends("1/minute"))])
    async def inner() -> dict[str, bool]:
        return {"ok": True}

    app.mount("/sub", sub)
    client = make_client(app)
    assert client.get("/first").status_code == 200
    refused = client.get("/first")
    assert (refused.status_code, refused.json()) == (429, {"problem": "1 per 1 minute"})
    assert client.get("/sub/x").status_code == 200
    refused = client.get("/sub/x")
    assert (refused.status_code, refused.json()) == (429, {"inner": True})


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_a_limit_used_twice_without_the_cache_counts_twice(
    middleware: Any, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address)
    app = make_app(limiter, middleware)
    limit = limiter.depends("3/minute")

    async def twice(
        a: None = Depends(limit, use_cache=False),
        b: None = Depends(limit, use_cache=False),
    ) -> None:
        return None

    @app.get("/t", dependencies=[Depends(twice)])
    async def t() -> dict[str, bool]:
        return {"ok": True}

    client = make_client(app)
    assert [client.get("/t").status_code for _ in range(3)] == [200, 429, 429]


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_fallback_limits_count_once_per_request(
    own_server: RedisServer, middleware: Any
) -> None:
    """While Redis is down the fallback limits stand in for every limit of
    the request: the middleware's check and the dependency's count them
    once between them."""
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["100/minute"],
        storage_uri=own_server.uri,
        storage_options=FAST,
        in_memory_fallback=["4/minute"],
    )
    app = _auth_app(limiter, middleware)

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/me", headers={"x-token": "a"})).status_code == 200
            own_server.kill()
            return [
                (await c.get("/me", headers={"x-token": t})).status_code
                for t in ["b", "c", "d", "e", "f"]
            ]

    assert asyncio.run(main()) == [200, 200, 200, 200, 429]


@pytest.mark.parametrize("middleware", [None, *MIDDLEWARES])
def test_a_websocket_route_limited_by_a_dependency(middleware: Any) -> None:
    """FastAPI gives a WebSocket route's dependencies no Request (this was a
    TypeError per connection); over the limit the connection is closed
    before it is accepted, code 1008, as a WebSocketException closes it."""
    limiter = Limiter(key_func=get_remote_address, default_limits=["100/minute"])
    app = make_app(limiter, middleware)

    @app.websocket("/ws", dependencies=[Depends(limiter.depends("2/minute"))])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    client = TestClient(app)
    for _ in range(2):
        with client.websocket_connect("/ws") as session:
            assert session.receive_text() == "hi"
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect("/ws") as session,
    ):
        session.receive_text()
    assert refused.value.code == 1008
    assert refused.value.reason == "Rate limit exceeded: 2 per 1 minute"


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_an_exempt_route_returning_a_response_gets_its_dependencys_headers(
    middleware: Any, make_client: Any
) -> None:
    """FastAPI drops the headers set on the dependency's response when the
    endpoint returns a Response: the middleware adds them."""
    limiter = Limiter(
        key_func=get_remote_address, default_limits=["1/minute"], headers_enabled=True
    )
    app = make_app(limiter, middleware)

    @app.get("/ex", dependencies=[Depends(limiter.depends("2/minute"))])
    @limiter.exempt
    async def ex(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    client = make_client(app)
    first = client.get("/ex")
    assert first.status_code == 200
    assert rate_headers(first)["x-ratelimit-limit"] == "2"
    assert rate_headers(first)["x-ratelimit-remaining"] == "1"


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_a_swallowed_error_of_the_default_keeps_the_dependencys_headers(
    middleware: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The middleware's usual check (a route it has seen) fails and
    swallow_errors lets the request through: the route's depends() limit
    still applies and its headers are sent, as on the general path."""
    import time

    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["5/minute"],
        headers_enabled=True,
        swallow_errors=True,
    )
    app = make_app(limiter, middleware)

    @app.get("/dep", dependencies=[Depends(limiter.depends("10/minute"))])
    async def dep() -> JSONResponse:
        # A Response of its own: only the middleware can add the
        # dependency's headers to it.
        return JSONResponse({"ok": True})

    real = time.time

    def broken() -> float:  # once: the middleware's decision
        monkeypatch.setattr(time, "time", real)
        raise RuntimeError("clock")

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        monkeypatch.setattr(time, "time", broken)
        try:
            await app(scope, receive, send)
        finally:
            monkeypatch.setattr(time, "time", real)

    async def get(asgi: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/dep")

    async def main() -> list[httpx.Response]:
        # The first request makes the route known to the middleware.
        return [await get(app), await get(outer)]

    first, failed = asyncio.run(main())
    assert first.status_code == 200
    assert rate_headers(first)["x-ratelimit-limit"] == "5"
    assert failed.status_code == 200
    # The default was not decided; the dependency's limit was, second hit.
    assert rate_headers(failed)["x-ratelimit-limit"] == "10"
    assert rate_headers(failed)["x-ratelimit-remaining"] == "8"
