"""SlowAPIMiddleware and SlowAPIASGIMiddleware: default and application
limits, route resolution, streaming, files and websockets."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Optional

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from conftest import rate_headers
from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from rapidlimit.util import get_remote_address

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

MIDDLEWARES = [SlowAPIMiddleware, SlowAPIASGIMiddleware]


@pytest.fixture(params=MIDDLEWARES, ids=["BaseMW", "ASGIMW"])
def middleware(request: pytest.FixtureRequest) -> type:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=["fastapi", "starlette"])
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def text_view(body: str) -> Callable[..., Any]:
    async def view(request: Request) -> Response:
        return PlainTextResponse(body)

    view.__name__ = f"view_{body}"
    return view


def make_app(
    framework: str, limiter: Limiter, middleware: type, routes: list[Any]
) -> Starlette:
    app: Starlette = FastAPI() if framework == "fastapi" else Starlette()
    for path, view in routes:
        app.add_route(path, view) if framework == "starlette" else app.add_api_route(  # type: ignore[attr-defined]
            path, view
        )
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    app.add_middleware(middleware)
    return app


def codes(client: Any, path: str, n: int) -> list[int]:
    return [client.get(path).status_code for _ in range(n)]


# --------------------------------------------------------------------------
# default and application limits


def test_default_limits_per_route(
    framework: str, middleware: type, make_client: Any
) -> None:
    limiter = Limiter(
        key_func=get_remote_address, default_limits=["2/minute"], headers_enabled=True
    )
    app = make_app(
        framework, limiter, middleware, [("/a", text_view("a")), ("/b", text_view("b"))]
    )
    client = make_client(app)
    responses = [client.get("/a") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert [rate_headers(r)["x-ratelimit-remaining"] for r in responses] == [
        "1",
        "0",
        "0",
    ]
    assert responses[2].json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    assert codes(client, "/b", 3) == [200, 200, 429]


def test_application_limits_are_shared(
    framework: str, middleware: type, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address, application_limits=["3/minute"])
    decorated = limiter.limit("10/minute")(text_view("d"))
    app = make_app(
        framework,
        limiter,
        middleware,
        [("/a", text_view("a")), ("/b", text_view("b")), ("/d", decorated)],
    )
    client = make_client(app)
    assert codes(client, "/a", 1) + codes(client, "/b", 1) + codes(client, "/d", 2) == [
        200,
        200,
        200,
        429,
    ]


def test_application_then_route_then_default_order(
    middleware: type, make_client: Any
) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        application_limits=["100/minute"],
        default_limits=["2/minute"],
        headers_enabled=True,
    )
    adding = limiter.limit("5/hour", override_defaults=False)(text_view("x"))
    client = make_client(make_app("starlette", limiter, middleware, [("/x", adding)]))
    responses = [client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    # The default failed, and the earlier limits were charged before it.
    assert responses[2].json()["error"] == "Rate limit exceeded: 2 per 1 minute"
    assert limiter._storage.get(_key(client, "global", 100, "minute")) == 3
    assert limiter._storage.get(_key(client, "/x", 5, "hour")) == 3
    # The header shows the first limit with the shortest period (slowapi
    # compares granularities only): the application limit.
    assert rate_headers(responses[0])["x-ratelimit-limit"] == "100"


# --------------------------------------------------------------------------
# decorated routes: the decorator checks them, after FastAPI's dependencies


def _user_app(middleware: type, limiter: Limiter, **app_kwargs: Any) -> FastAPI:
    """A FastAPI app whose limited route depends on an auth dependency that
    sets ``request.state.user`` (which the key function may read)."""
    from fastapi import Depends, Header, HTTPException

    # FastAPI evaluates the annotation: "str | None" fails on Python 3.9.
    async def current_user(
        request: Request,
        x_user: Optional[str] = Header(None),  # noqa: UP045
    ) -> str:
        if x_user is None:
            raise HTTPException(401, "no user")
        request.state.user = x_user
        return x_user

    app = FastAPI(**app_kwargs)
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    @app.get("/me")
    @limiter.limit("2/minute")
    async def me(
        request: Request, user: str = Depends(current_user), n: int = 0
    ) -> dict[str, Any]:
        return {"user": user}

    app.add_middleware(middleware)
    return app


def test_a_decorated_route_is_checked_after_its_dependencies(
    middleware: type, make_client: Any
) -> None:
    # As in slowapi, whose middleware leaves decorated routes to the
    # decorator: the key function sees what the dependencies set, and
    # requests the app refuses (401, 422) use up nobody's quota.
    limiter = Limiter(
        key_func=lambda request: getattr(request.state, "user", "nobody"),
        headers_enabled=True,
    )
    client = make_client(_user_app(middleware, limiter))
    assert client.get("/me").status_code == 401
    assert client.get("/me").status_code == 401
    assert client.get("/me?n=x", headers={"x-user": "alice"}).status_code == 422
    statuses = [
        client.get("/me", headers={"x-user": user}).status_code
        for user in ("alice", "alice", "bob", "alice", "bob", "bob")
    ]
    assert statuses == [200, 200, 200, 429, 200, 429]
    r = client.get("/me", headers={"x-user": "carol"})
    assert rate_headers(r)["x-ratelimit-remaining"] == "1"


def test_a_429_of_a_decorated_route_passes_through_inner_middleware(
    middleware: type, make_client: Any
) -> None:
    # The decorator answers inside the app, so a CORS middleware added
    # before the limiter's (inner to it) still sees the 429.
    from fastapi.middleware.cors import CORSMiddleware

    limiter = Limiter(key_func=get_remote_address, application_limits=["100/minute"])
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    @app.get("/x")
    @limiter.limit("1/minute")
    async def x(request: Request) -> dict[str, int]:
        return {"ok": 1}

    app.add_middleware(CORSMiddleware, allow_origins=["https://a.example"])
    app.add_middleware(middleware)
    client = make_client(app)
    origin = {"origin": "https://a.example"}
    assert client.get("/x", headers=origin).status_code == 200
    r = client.get("/x", headers=origin)
    assert r.status_code == 429
    assert r.headers["access-control-allow-origin"] == "https://a.example"
    # The application limit was charged once per request, with the route's.
    assert limiter._storage.get(_key(client, "global", 100, "minute")) == 2


def test_a_status_429_handler_answers_for_a_decorated_route(
    middleware: type, make_client: Any
) -> None:
    from fastapi.responses import JSONResponse

    limiter = Limiter(key_func=get_remote_address)
    app = FastAPI()
    app.state.limiter = limiter

    async def by_status(request: Request, exc: Exception) -> Response:
        return JSONResponse({"by": "status"}, status_code=429)

    app.add_exception_handler(429, by_status)

    @app.get("/x")
    @limiter.limit("1/minute")
    async def x(request: Request) -> dict[str, int]:
        return {"ok": 1}

    app.add_middleware(middleware)
    client = make_client(app)
    assert client.get("/x").status_code == 200
    assert client.get("/x").json() == {"by": "status"}


def _key(client: Any, scope: str, amount: int, granularity: str) -> str:
    from conftest import AsyncClientAdapter

    host = "127.0.0.1" if isinstance(client, AsyncClientAdapter) else "testclient"
    return f"LIMITER/{host}/{scope}/{amount}/1/{granularity}"


def test_unmatched_routes_are_not_limited(
    framework: str, middleware: type, make_client: Any
) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["1/minute"],
        application_limits=["1/minute"],
    )
    client = make_client(
        make_app(framework, limiter, middleware, [("/a", text_view("a"))])
    )
    assert codes(client, "/missing", 3) == [404, 404, 404]
    assert [client.post("/a").status_code for _ in range(2)] == [405, 405]
    assert codes(client, "/a", 2) == [200, 429]


def test_disabled_limiter_passes_through(
    framework: str, middleware: type, make_client: Any
) -> None:
    limiter = Limiter(
        key_func=get_remote_address, default_limits=["1/minute"], enabled=False
    )
    client = make_client(
        make_app(framework, limiter, middleware, [("/a", text_view("a"))])
    )
    assert codes(client, "/a", 3) == [200, 200, 200]


def test_no_limiter_on_the_app_passes_through(make_client: Any) -> None:
    app = Starlette(routes=[Route("/a", text_view("a"))])
    app.add_middleware(SlowAPIASGIMiddleware)
    assert codes(make_client(app), "/a", 2) == [200, 200]


def test_limiter_argument(make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    app = Starlette(routes=[Route("/a", text_view("a"))])
    app.add_middleware(SlowAPIASGIMiddleware, limiter=limiter)
    assert codes(make_client(app), "/a", 2) == [200, 429]


def test_the_endpoint_is_not_run_when_rejected(
    middleware: type, make_client: Any
) -> None:
    calls: list[int] = []

    async def view(request: Request) -> Response:
        calls.append(1)
        return PlainTextResponse("x")

    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    client = make_client(make_app("starlette", limiter, middleware, [("/x", view)]))
    assert codes(client, "/x", 3) == [200, 429, 429]
    assert calls == [1]


def test_routes_added_after_the_first_request(make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    app = make_app(
        "starlette", limiter, SlowAPIASGIMiddleware, [("/a", text_view("a"))]
    )
    client = make_client(app)
    assert codes(client, "/b", 1) == [404]
    app.add_route("/b", text_view("b"))
    assert codes(client, "/b", 2) == [200, 429]


def test_third_party_middleware_calling_check_request_limit(make_client: Any) -> None:
    # Code that drives the limiter by hand, as third-party middleware does.
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            limiter._check_request_limit(request, None, True)
        except RateLimitExceeded as exc:
            seen.append(exc)
            response = _rate_limit_exceeded_handler(request, exc)
        else:
            response = PlainTextResponse("ok")
        await response(scope, receive, send)

    client = make_client(app)
    assert codes(client, "/a", 2) == [200, 429]
    assert seen[0].detail == "1 per 1 minute"


# --------------------------------------------------------------------------
# route resolution: routers, mounts, same-named views


def test_fastapi_include_router(middleware: type, make_client: Any) -> None:
    # slowapi issue #281: routes of included routers went unlimited.
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    app: Any = make_app("fastapi", limiter, middleware, [])
    inner = APIRouter(prefix="/inner")
    outer = APIRouter(prefix="/outer")

    @inner.get("/deep")
    async def deep() -> dict[str, int]:
        return {"deep": 1}

    @outer.get("/shallow")
    async def shallow() -> dict[str, int]:
        return {"shallow": 1}

    @outer.get("/decorated")
    @limiter.limit("3/minute")
    async def decorated(request: Request) -> dict[str, int]:
        return {"decorated": 1}

    @outer.get("/free")
    @limiter.exempt
    async def free() -> dict[str, int]:
        return {"free": 1}

    outer.include_router(inner)
    app.include_router(outer, prefix="/v1")
    client = make_client(app)
    assert codes(client, "/v1/outer/shallow", 2) == [200, 429]
    assert codes(client, "/v1/outer/inner/deep", 2) == [200, 429]
    assert codes(client, "/v1/outer/decorated", 4) == [200, 200, 200, 429]
    assert codes(client, "/v1/outer/free", 3) == [200, 200, 200]


def test_routes_added_to_an_included_router_later(
    middleware: type, make_client: Any
) -> None:
    """FastAPI >= 0.137 serves routes added to a router after include_router
    (at any depth); the middleware's route caches must see them too."""
    import fastapi.routing

    if not hasattr(fastapi.routing, "iter_route_contexts"):
        pytest.skip("this FastAPI serves only the routes present at inclusion")
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    app: Any = make_app("fastapi", limiter, middleware, [])
    inner = APIRouter(prefix="/inner")
    outer = APIRouter(prefix="/outer")

    @outer.get("/a")
    async def a() -> dict[str, int]:
        return {"a": 1}

    outer.include_router(inner)
    app.include_router(outer)
    client = make_client(app)
    assert codes(client, "/outer/a", 2) == [200, 429]
    assert codes(client, "/outer/b", 1) == [404]  # cached as no endpoint
    assert codes(client, "/outer/inner/c", 1) == [404]

    @outer.get("/b")
    async def b() -> dict[str, int]:
        return {"b": 1}

    @inner.get("/c")
    async def c() -> dict[str, int]:
        return {"c": 1}

    assert codes(client, "/outer/b", 2) == [200, 429]
    assert codes(client, "/outer/inner/c", 2) == [200, 429]


def test_starlette_mounts(middleware: type, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    sub_limited = limiter.limit("2/minute")(text_view("sub"))
    sub_app = Starlette(
        routes=[Route("/page", sub_limited), Route("/plain", text_view("p"))]
    )
    fastapi_sub = FastAPI()

    @fastapi_sub.get("/f")
    async def f() -> dict[str, int]:
        return {"f": 1}

    app = Starlette(
        routes=[
            Mount("/router", routes=[Route("/r", text_view("r"))]),
            Mount("/sub", app=sub_app),
            Mount("/fast", app=fastapi_sub),
            Mount(
                "/nested",
                routes=[Mount("/deeper", routes=[Route("/n", text_view("n"))])],
            ),
        ]
    )
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    app.add_middleware(middleware)
    client = make_client(app)
    assert codes(client, "/router/r", 2) == [200, 429]
    assert codes(client, "/sub/plain", 2) == [200, 429]
    assert codes(client, "/sub/page", 3) == [200, 200, 429]
    assert codes(client, "/fast/f", 2) == [200, 429]
    assert codes(client, "/nested/deeper/n", 2) == [200, 429]


def test_mounted_app_without_routes_is_not_limited(
    tmp_path: Any, make_client: Any
) -> None:
    from starlette.staticfiles import StaticFiles

    (tmp_path / "a.txt").write_text("static")
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    app = Starlette(routes=[Mount("/static", app=StaticFiles(directory=tmp_path))])
    app.state.limiter = limiter
    app.add_middleware(SlowAPIASGIMiddleware)
    client = make_client(app)
    assert codes(client, "/static/a.txt", 3) == [200, 200, 200]


def test_same_named_views_keep_their_own_limits(
    middleware: type, make_client: Any
) -> None:
    # slowapi issues #75 / #191: two views named alike in one module shared
    # their registrations, so each request was counted against both limits.
    limiter = Limiter(key_func=get_remote_address)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    app.add_middleware(middleware)

    @app.get("/home")
    @limiter.limit("5/minute")
    async def homepage(request: Request) -> dict[str, str]:
        return {"page": "home"}

    @app.get("/mars")  # noqa: F811 - the point of the test
    @limiter.limit("5/minute")
    async def homepage(request: Request) -> dict[str, str]:  # type: ignore[no-redef]  # noqa: F811
        return {"page": "mars"}

    client = make_client(app)
    assert codes(client, "/home", 6) == [200] * 5 + [429]
    assert codes(client, "/mars", 6) == [200] * 5 + [429]


def test_same_named_views_in_different_modules(make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, key_style="endpoint")
    one, two = text_view("one"), text_view("two")
    one.__name__ = two.__name__ = "index"
    one.__module__, two.__module__ = "pkg.one", "pkg.two"
    one = limiter.limit("1/minute")(one)
    two = limiter.limit("2/minute")(two)
    client = make_client(
        make_app(
            "starlette", limiter, SlowAPIASGIMiddleware, [("/1", one), ("/2", two)]
        )
    )
    assert codes(client, "/1", 2) == [200, 429]
    assert codes(client, "/2", 3) == [200, 200, 429]


def test_limit_decorator_above_the_route_decorator(make_client: Any) -> None:
    # With a middleware, a limit placed above @app.get (which slowapi never
    # applied) is found through the registered function.
    limiter = Limiter(key_func=get_remote_address)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    app.add_middleware(SlowAPIASGIMiddleware)

    @limiter.limit("1/minute")
    @app.get("/upside")
    async def upside(request: Request) -> dict[str, int]:
        return {"ok": 1}

    client = make_client(app)
    assert codes(client, "/upside", 2) == [200, 429]


# --------------------------------------------------------------------------
# streaming, files: raw ASGI, to see every message


async def _drive(
    app: Any, path: str, extensions: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("1.2.3.4", 5),
        "server": ("test", 80),
        "extensions": extensions or {},
    }
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages


def _streaming_app(limiter_module: Any, middleware: type) -> Starlette:
    limiter = limiter_module.Limiter(
        key_func=lambda: "k", default_limits=["10/minute"], headers_enabled=True
    )

    async def chunks() -> Any:
        for i in range(3):
            yield f"chunk {i}\n".encode()

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), headers={"content-length": "24"})

    app = Starlette(routes=[Route("/stream", stream)])
    app.state.limiter = limiter
    app.add_middleware(middleware)
    return app


def test_streaming_response_is_intact(middleware: type) -> None:
    # slowapi issues #249 / #260: http.response.start was re-sent before
    # every body chunk.
    import rapidlimit

    messages = asyncio.run(_drive(_streaming_app(rapidlimit, middleware), "/stream"))
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "http.response.start"
    assert kinds.count("http.response.start") == 1
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"
    headers = dict(messages[0]["headers"])
    assert headers[b"x-ratelimit-remaining"] == b"9"
    assert headers[b"content-length"] == b"24"


def test_slowapi_breaks_streaming_responses() -> None:
    # Pins the slowapi bug the test above guards against.
    import slowapi
    import slowapi.middleware

    app = _streaming_app(slowapi, slowapi.middleware.SlowAPIASGIMiddleware)
    messages = asyncio.run(_drive(app, "/stream"))
    assert [m["type"] for m in messages].count("http.response.start") > 1


def test_file_response_with_pathsend(tmp_path: Any, middleware: type) -> None:
    path = tmp_path / "f.txt"
    path.write_text("file body")
    limiter = Limiter(
        key_func=lambda: "k", default_limits=["10/minute"], headers_enabled=True
    )

    async def download(request: Request) -> Response:
        return FileResponse(path)

    app = Starlette(routes=[Route("/f", download)])
    app.state.limiter = limiter
    app.add_middleware(middleware)
    messages = asyncio.run(_drive(app, "/f", {"http.response.pathsend": {}}))
    assert [m["type"] for m in messages] == [
        "http.response.start",
        "http.response.pathsend",
    ]
    assert messages[1]["path"] == os.fspath(path)
    assert dict(messages[0]["headers"])[b"x-ratelimit-limit"] == b"10"
    # And a normal file download, through a client.
    client = TestClient(app)
    assert client.get("/f").text == "file body"


def test_existing_retry_after_is_kept_later(make_client: Any) -> None:
    limiter = Limiter(
        key_func=get_remote_address, default_limits=["10/minute"], headers_enabled=True
    )

    async def busy(request: Request) -> Response:
        return PlainTextResponse(
            "busy", status_code=503, headers={"retry-after": "3600"}
        )

    client = make_client(
        make_app("starlette", limiter, SlowAPIASGIMiddleware, [("/b", busy)])
    )
    response = client.get("/b")
    assert response.status_code == 503
    assert response.headers.get_list("retry-after") == [
        str(int(response.headers["retry-after"]))
    ]
    assert int(response.headers["retry-after"]) >= 3599


# --------------------------------------------------------------------------
# websockets


def _ws_app(limiter: Limiter, middleware: type | None) -> Starlette:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    @limiter.limit("1/minute")
    async def limited(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("limited")
        await websocket.close()

    app = Starlette(
        routes=[WebSocketRoute("/ws", echo), WebSocketRoute("/limited", limited)]
    )
    app.state.limiter = limiter
    if middleware is not None:
        app.add_middleware(middleware)
    return app


def _connect(client: TestClient, path: str) -> str:
    with client.websocket_connect(path) as ws:
        return str(ws.receive_text())


def test_websocket_default_limits(middleware: type) -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    client = TestClient(_ws_app(limiter, middleware))
    assert _connect(client, "/ws") == "hello"
    with pytest.raises(WebSocketDenialResponse) as denied:
        _connect(client, "/ws")
    assert denied.value.status_code == 429
    assert denied.value.json() == {"error": "Rate limit exceeded: 1 per 1 minute"}


@pytest.mark.parametrize("middleware", [None, SlowAPIASGIMiddleware])
def test_websocket_decorator(middleware: type | None) -> None:
    limiter = Limiter(key_func=get_remote_address)
    client = TestClient(_ws_app(limiter, middleware))
    assert _connect(client, "/limited") == "limited"
    with pytest.raises(WebSocketDenialResponse):
        _connect(client, "/limited")


def test_websocket_close_without_denial_extension() -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["1/minute"])
    app = _ws_app(limiter, SlowAPIASGIMiddleware)

    async def connect() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        scope = {
            "type": "websocket",
            "path": "/ws",
            "root_path": "",
            "headers": [],
            "query_string": b"",
            "client": ("1.1.1.1", 1),
            "extensions": {},
        }
        queue = [{"type": "websocket.connect"}]

        async def receive() -> dict[str, Any]:
            return (
                queue.pop(0)
                if queue
                else {"type": "websocket.disconnect", "code": 1000}
            )

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    first = asyncio.run(connect())
    assert first[0]["type"] == "websocket.accept"
    second = asyncio.run(connect())
    assert second == [
        {
            "type": "websocket.close",
            "code": 1008,
            "reason": "Rate limit exceeded: 1 per 1 minute",
        }
    ]


def test_dropped_applications_are_released(middleware: type) -> None:
    """An application per test (or per reload): once dropped, nothing the
    middleware cached keeps its routes, its endpoints and their limiter (with
    a Redis storage, its connection and I/O thread) alive."""
    limiters: list[weakref.ref[Limiter]] = []

    async def go(app: Starlette) -> None:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver"
        ) as client:
            for path in ("/x", "/y"):
                assert (await client.get(path)).status_code == 200
            assert (await client.get("/missing")).status_code == 404

    for _ in range(5):
        limiter = Limiter(key_func=get_remote_address, default_limits=["9/minute"])
        limited = limiter.limit("5/minute")(text_view("y"))
        app = make_app(
            "starlette",
            limiter,
            middleware,
            [("/x", text_view("x")), ("/y", limited)],
        )
        asyncio.run(go(app))
        limiters.append(weakref.ref(limiter))
        del app, limiter, limited
    gc.collect()
    assert [ref() for ref in limiters] == [None] * 5


@pytest.mark.parametrize("swallow", [False, True])
def test_storage_error_in_the_middleware(
    middleware: type,
    swallow: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error of the decision itself (here the clock) in a middleware's
    usual check: with ``swallow_errors`` the request goes through without
    rate-limit headers, logged; without, the error propagates (a 500), as
    on the general path and in the decorator."""
    import time

    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["5/minute"],
        headers_enabled=True,
        swallow_errors=swallow,
    )
    app = make_app("fastapi", limiter, middleware, [("/a", text_view("a"))])
    real = time.time

    def broken() -> float:  # once: logging reads the clock too
        monkeypatch.setattr(time, "time", real)
        raise RuntimeError("clock")

    clock_broken = [False]

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        # Broken only while the app runs: httpx reads the clock too.
        if clock_broken[0]:
            monkeypatch.setattr(time, "time", broken)
        try:
            await app(scope, receive, send)
        finally:
            monkeypatch.setattr(time, "time", real)

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=outer, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = await c.get("/a")
            clock_broken[0] = True
            failed = await c.get("/a")
            clock_broken[0] = False
            return [first, failed, await c.get("/a")]

    first, failed, after = asyncio.run(main())
    assert rate_headers(first)["x-ratelimit-remaining"] == "4"
    if swallow:
        assert failed.status_code == 200
        assert "x-ratelimit-remaining" not in failed.headers
        assert "Swallowing error" in caplog.text
    else:
        assert failed.status_code == 500
    # Nothing was counted for the failed request.
    assert rate_headers(after)["x-ratelimit-remaining"] == "3"


# --------------------------------------------------------------------------
# served as the top application


@pytest.mark.parametrize("middleware", MIDDLEWARES, ids=["BaseMW", "ASGIMW"])
def test_served_by_uvicorn_as_the_top_application(middleware: type) -> None:
    """``uvicorn module:app`` with ``app = SlowAPIASGIMiddleware(inner)``:
    uvicorn guesses ASGI 3 from the middleware's ``__call__`` (which returns
    the application's awaitable rather than being a coroutine function)."""
    import socket
    import threading
    import time

    import uvicorn

    limiter = Limiter(
        key_func=get_remote_address, default_limits=["2/minute"], headers_enabled=True
    )
    inner = make_app("fastapi", limiter, middleware, [("/ok", text_view("ok"))])
    inner.user_middleware.clear()  # served through the instance below instead
    inner.middleware_stack = None
    app = middleware(inner, limiter=limiter)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    config.load()
    assert config.interface == "asgi3"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            first, second, third = (client.get("/ok") for _ in range(3))
    finally:
        server.should_exit = True
        thread.join(30)
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert first.text == "ok"
    assert rate_headers(first)["x-ratelimit-remaining"] == "1"
    assert rate_headers(second)["x-ratelimit-remaining"] == "0"
    assert "retry-after" in rate_headers(third)
    assert "2 per 1 minute" in third.text


# --------------------------------------------------------------------------
# the core's lookup of the usual request (mw_route)


def test_mw_route_decides_only_what_the_python_lookup_would() -> None:
    """mw_route takes a request only while the middleware's caches say
    what its Python lookup would find; anything changed sends the request
    back to the Python path with nothing written."""
    from fastapi.routing import APIRoute
    from starlette.datastructures import State

    from rapidlimit import _core

    limiter = Limiter(
        key_func=get_remote_address, default_limits=["2/minute"], headers_enabled=True
    )
    inner = make_app("fastapi", limiter, middleware=SlowAPIASGIMiddleware, routes=[])
    inner.user_middleware.clear()
    inner.add_api_route("/a", text_view("a"))
    mw = SlowAPIASGIMiddleware(inner)

    def scope(path: str = "/a", **changes: Any) -> dict[str, Any]:
        made = {
            "type": "http",
            "method": "GET",
            "path": path,
            "root_path": "",
            "client": ("10.1.1.1", 1),
            "headers": [],
            "query_string": b"",
        }
        made.update(changes)
        return made

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    def route(made: dict[str, Any]) -> Any:
        return _core.mw_route(made, receive, send, mw._fast_state)

    # The first request fills the caches (the Python path) and is counted.
    asyncio.run(mw(scope(client=("10.9.9.9", 1)), receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 200
    fast = mw._fast_state
    wrapped = _core.mw_route(scope(), receive, send, fast)
    assert type(wrapped) is _core.HeaderSend
    assert _core.mw_route(scope(), receive, send, fast) is not None  # the 2nd hit
    rejected = scope()
    assert _core.mw_route(rejected, receive, send, fast) is False
    assert rejected["state"]["view_rate_limit"] is not None

    untouched = [
        (scope(type="websocket"), fast),
        (scope(app=object()), fast),
        (scope("/unseen"), fast),
        (scope(method="POST"), fast),
        (scope(), fast[:-1]),
    ]
    for odd, routes in untouched:
        assert _core.mw_route(odd, receive, send, routes) is None
        assert "state" not in odd
    # A route added, the limiter replaced or removed, a new app.state.
    inner.router.routes.append(APIRoute("/b", text_view("b")))
    odd = scope()
    assert route(odd) is None and "state" not in odd
    inner.router.routes.pop()
    assert route(scope(client=("10.2.2.2", 1)))
    inner.state.limiter = Limiter(key_func=get_remote_address)
    odd = scope(client=("10.3.3.3", 1))
    assert route(odd) is None and "state" not in odd
    del inner.state.limiter
    odd = scope(client=("10.3.3.3", 1))
    assert route(odd) is None and "state" not in odd
    inner.state.limiter = limiter
    assert route(scope(client=("10.6.6.6", 1)))
    inner.state = State({"limiter": limiter})  # the old one keeps its limiter
    odd = scope(client=("10.3.3.3", 1))
    assert route(odd) is None and "state" not in odd
    # The Python path takes those, and mw_route again once it has seen them.
    asyncio.run(mw(scope(client=("10.4.4.4", 1)), receive, send))  # type: ignore[arg-type]
    assert route(scope(client=("10.5.5.5", 1)))
