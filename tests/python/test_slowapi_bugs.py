"""Each slowapi bug listed in the spec, pinned as fixed.

Where it helps, the same scenario is also run with slowapi itself to show
that the test really exercises the bug.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import warnings
from typing import Any

import pytest
import slowapi
import slowapi.errors
import slowapi.middleware
import slowapi.util
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import rapidlimit
from conftest import AsyncClientAdapter
from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from rapidlimit.util import ForwardedAddress, get_remote_address, trusted_proxy_key_func

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def codes(client: Any, path: str, n: int, **kwargs: Any) -> list[int]:
    return [client.get(path, **kwargs).status_code for _ in range(n)]


# --------------------------------------------------------------------------
# #281: routes of included routers were not limited (FastAPI >= 0.137)


def _router_app(lib: Any, limiter_cls: Any, middleware: Any) -> FastAPI:
    app = FastAPI()
    app.state.limiter = limiter_cls(
        key_func=lambda: "test", default_limits=["1 per minute"]
    )
    router = APIRouter()

    @router.get("/key")
    async def capture_key(request: Request) -> dict[str, str]:
        return {"key": "value"}

    app.include_router(router)
    app.add_middleware(middleware)
    return app


def test_281_included_router_is_limited() -> None:
    import fastapi.routing

    theirs = AsyncClientAdapter(
        _router_app(slowapi, slowapi.Limiter, slowapi.middleware.SlowAPIMiddleware)
    )
    if hasattr(fastapi.routing, "iter_route_contexts"):  # FastAPI >= 0.137
        assert codes(theirs, "/key", 3) == [200, 200, 200]  # slowapi fails open
    else:  # the bug is not there yet (Python 3.9 gets FastAPI 0.128)
        assert codes(theirs, "/key", 2) == [200, 429]
    for middleware in (SlowAPIMiddleware, SlowAPIASGIMiddleware):
        ours = AsyncClientAdapter(_router_app(rapidlimit, Limiter, middleware))
        assert codes(ours, "/key", 2) == [200, 429]


# --------------------------------------------------------------------------
# #75 / #191 / #173: same-named views shared their limits


def _same_name_app(limiter: Any, exc: Any, handler: Any) -> FastAPI:
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(exc, handler)

    @app.get("/home")
    @limiter.limit("5/minute")
    async def homepage(request: Request) -> Response:
        return PlainTextResponse("test")

    @app.get("/mars")
    @limiter.limit("5/minute")
    async def homepage(request: Request, response: Response) -> dict[str, str]:  # type: ignore[no-redef]  # noqa: F811
        return {"key": "value"}

    return app


def test_75_same_named_views_count_once() -> None:
    theirs = AsyncClientAdapter(
        _same_name_app(
            slowapi.Limiter(key_func=slowapi.util.get_remote_address),
            slowapi.errors.RateLimitExceeded,
            slowapi._rate_limit_exceeded_handler,
        )
    )
    assert codes(theirs, "/home", 4) == [200, 200, 429, 429]  # counted twice
    ours = AsyncClientAdapter(
        _same_name_app(
            Limiter(key_func=get_remote_address),
            RateLimitExceeded,
            _rate_limit_exceeded_handler,
        )
    )
    assert codes(ours, "/home", 6) == [200] * 5 + [429]
    assert codes(ours, "/mars", 6) == [200] * 5 + [429]


# --------------------------------------------------------------------------
# #163: a callable shared_limit scope raised NameError


def test_163_callable_shared_scope() -> None:
    def build(limiter: Any, exc: Any, handler: Any) -> Starlette:
        shared = limiter.shared_limit("2/minute", scope=lambda endpoint: "pair")

        @shared
        async def a(request: Request) -> Response:
            return PlainTextResponse("a")

        @shared
        async def b(request: Request) -> Response:
            return PlainTextResponse("b")

        app = Starlette(routes=[Route("/a", a), Route("/b", b)])
        app.state.limiter = limiter
        app.add_exception_handler(exc, handler)
        return app

    theirs = AsyncClientAdapter(
        build(
            slowapi.Limiter(key_func=slowapi.util.get_remote_address),
            slowapi.errors.RateLimitExceeded,
            slowapi._rate_limit_exceeded_handler,
        )
    )
    with pytest.raises(NameError):
        theirs.get("/a")
    ours = AsyncClientAdapter(
        build(
            Limiter(key_func=get_remote_address),
            RateLimitExceeded,
            _rate_limit_exceeded_handler,
        )
    )
    assert codes(ours, "/a", 1) + codes(ours, "/b", 2) == [200, 200, 429]


# --------------------------------------------------------------------------
# #239 / #253: errors ending in the 429 handler, AttributeError 500s


class _Broken:
    def decide_many(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("down")

    hit = decide = decide_headers = decide_view = get_window_stats = decide_many


def _error_app(
    limiter: Any, middleware: Any, exc: Any, handler: Any, decorated: bool
) -> Starlette:
    async def view(request: Request) -> Response:
        return PlainTextResponse("ok")

    if decorated:
        view = limiter.limit("5/minute")(view)
    app = Starlette(routes=[Route("/x", view)])
    app.state.limiter = limiter
    app.add_exception_handler(exc, handler)
    if middleware is not None:
        app.add_middleware(middleware)
    return app


def test_239_storage_error_in_middleware_never_reaches_the_429_handler() -> None:
    theirs_limiter = slowapi.Limiter(
        key_func=slowapi.util.get_remote_address,
        default_limits=["5/minute"],
        headers_enabled=True,
    )
    theirs_limiter._limiter = _Broken()
    theirs = TestClient(
        _error_app(
            theirs_limiter,
            slowapi.middleware.SlowAPIMiddleware,
            slowapi.errors.RateLimitExceeded,
            slowapi._rate_limit_exceeded_handler,
            decorated=False,
        ),
        raise_server_exceptions=True,
    )
    with pytest.raises(AttributeError):  # the handler crashed on the error
        theirs.get("/x")

    called: list[Any] = []

    def handler(request: Request, exc: Any) -> Response:
        called.append(exc)
        return _rate_limit_exceeded_handler(request, exc)

    for middleware in (SlowAPIMiddleware, SlowAPIASGIMiddleware):
        ours_limiter = Limiter(
            key_func=get_remote_address,
            default_limits=["5/minute"],
            headers_enabled=True,
        )
        ours_limiter._limiter = _Broken()  # type: ignore[assignment]
        app = _error_app(
            ours_limiter, middleware, RateLimitExceeded, handler, decorated=False
        )
        with pytest.raises(ConnectionError):  # the original error, untouched
            TestClient(app).get("/x")
        assert (
            TestClient(app, raise_server_exceptions=False).get("/x").status_code == 500
        )
        ours_limiter._swallow_errors = True
        assert codes(TestClient(app), "/x", 2) == [200, 200]
    assert called == []


@pytest.mark.parametrize("setting", ["swallow_errors", "auto_check"])
def test_253_no_attribute_error_without_a_check(setting: str) -> None:
    def limiter_for(cls: Any, key_func: Any) -> Any:
        if setting == "swallow_errors":
            limiter = cls(key_func=key_func, swallow_errors=True, headers_enabled=True)
            limiter._limiter = _Broken()
        else:
            limiter = cls(key_func=key_func, auto_check=False, headers_enabled=True)
        return limiter

    theirs = TestClient(
        _error_app(
            limiter_for(slowapi.Limiter, slowapi.util.get_remote_address),
            None,
            slowapi.errors.RateLimitExceeded,
            slowapi._rate_limit_exceeded_handler,
            decorated=True,
        )
    )
    with pytest.raises(AttributeError):
        theirs.get("/x")
    ours = TestClient(
        _error_app(
            limiter_for(Limiter, get_remote_address),
            None,
            RateLimitExceeded,
            _rate_limit_exceeded_handler,
            decorated=True,
        )
    )
    assert codes(ours, "/x", 3) == [200, 200, 200]


@pytest.mark.parametrize("swallow", [True, False])
def test_swallow_errors_covers_a_dynamic_limits_key_function(swallow: bool) -> None:
    # slowapi reads a dynamic limit that takes the key before its check's
    # try block, catching only ValueError: a key function raising there
    # was a 500 even with swallow_errors=True (found by seeds 20000 to
    # 25000 of test_app_differential's random_options).
    def key(request: Request) -> str:
        if "x-boom" in request.headers:
            raise KeyError("boom")
        return "k"

    def build(cls: Any, exc: Any, handler: Any) -> Starlette:
        limiter = cls(key_func=key, swallow_errors=swallow, headers_enabled=True)

        async def view(request: Request) -> Response:
            return PlainTextResponse("ok")

        limited = limiter.limit(lambda key: "2/minute")(view)
        app = Starlette(routes=[Route("/x", limited)])
        app.state.limiter = limiter
        app.add_exception_handler(exc, handler)
        return app

    theirs = TestClient(
        build(
            slowapi.Limiter,
            slowapi.errors.RateLimitExceeded,
            slowapi._rate_limit_exceeded_handler,
        ),
        raise_server_exceptions=False,
    )
    assert codes(theirs, "/x", 1, headers={"x-boom": "1"}) == [500]
    ours = TestClient(
        build(Limiter, RateLimitExceeded, _rate_limit_exceeded_handler),
        raise_server_exceptions=False,
    )
    boom = ours.get("/x", headers={"x-boom": "1"})
    if swallow:  # through, without headers
        assert boom.status_code == 200
        assert "x-ratelimit-limit" not in boom.headers
    else:  # the key function's error, as slowapi
        assert boom.status_code == 500
    assert codes(ours, "/x", 3) == [200, 200, 429]  # uncounted either way


# --------------------------------------------------------------------------
# default_limits as a string; shared mutable defaults


def test_default_limits_string_is_not_split_into_characters() -> None:
    def build(limiter: Any, middleware: Any) -> Starlette:
        async def view(request: Request) -> Response:
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/x", view)])
        app.state.limiter = limiter
        app.add_middleware(middleware)
        return app

    theirs_limiter = slowapi.Limiter(
        key_func=slowapi.util.get_remote_address,
        default_limits="2/minute",  # type: ignore[arg-type]
    )
    with pytest.raises((ValueError, AttributeError)):  # parsed char by char
        TestClient(build(theirs_limiter, slowapi.middleware.SlowAPIMiddleware)).get(
            "/x"
        )
    ours = TestClient(
        build(
            Limiter(key_func=get_remote_address, default_limits="2/minute"),
            SlowAPIMiddleware,
        )
    )
    assert codes(ours, "/x", 3) == [200, 200, 429]


def test_limiters_do_not_share_storage_options() -> None:
    first = slowapi.Limiter(key_func=slowapi.util.get_remote_address)
    second = slowapi.Limiter(key_func=slowapi.util.get_remote_address)
    assert first._storage_options is second._storage_options  # slowapi's bug
    ours_first = Limiter(key_func=get_remote_address)
    ours_second = Limiter(key_func=get_remote_address)
    assert ours_first._storage_options is not ours_second._storage_options


# --------------------------------------------------------------------------
# dynamic routes and the middleware; duplicated headers


def test_dynamic_route_does_not_also_get_the_defaults() -> None:
    def build(limiter: Any, middleware: Any, exc: Any, handler: Any) -> Starlette:
        @limiter.limit(lambda: "5/minute")
        async def view(request: Request) -> Response:
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/x", view)])
        app.state.limiter = limiter
        app.add_exception_handler(exc, handler)
        app.add_middleware(middleware)
        return app

    theirs = TestClient(
        build(
            slowapi.Limiter(
                key_func=slowapi.util.get_remote_address,
                default_limits=["1/minute"],
                headers_enabled=True,
            ),
            slowapi.middleware.SlowAPIMiddleware,
            slowapi.errors.RateLimitExceeded,
            slowapi._rate_limit_exceeded_handler,
        )
    )
    first = theirs.get("/x")
    assert len(first.headers.get_list("x-ratelimit-limit")) == 2  # duplicated
    assert theirs.get("/x").status_code == 429  # the default applied
    for middleware in (SlowAPIMiddleware, SlowAPIASGIMiddleware):
        ours = TestClient(
            build(
                Limiter(
                    key_func=get_remote_address,
                    default_limits=["1/minute"],
                    headers_enabled=True,
                ),
                middleware,
                RateLimitExceeded,
                _rate_limit_exceeded_handler,
            )
        )
        responses = [ours.get("/x") for _ in range(6)]
        assert [r.status_code for r in responses] == [200] * 5 + [429]
        assert responses[0].headers.get_list("x-ratelimit-limit") == ["5"]


# --------------------------------------------------------------------------
# X-Forwarded-For and trusted proxies


def _scope_request(peer: str, headers: dict[str, str]) -> Request:
    return Request(
        {
            "type": "http",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": (peer, 1),
        }
    )


def test_trusted_proxy_key_func() -> None:
    key = trusted_proxy_key_func(["10.0.0.0/8", "::1"])
    # A client talking directly cannot choose its bucket with a header.
    assert (
        key(_scope_request("203.0.113.9", {"X-Forwarded-For": "1.1.1.1"}))
        == "203.0.113.9"
    )
    # Behind a trusted proxy, the last untrusted hop is the client.
    assert (
        key(_scope_request("10.0.0.2", {"X-Forwarded-For": "1.1.1.1, 203.0.113.9"}))
        == "203.0.113.9"
    )
    assert (
        key(_scope_request("10.0.0.2", {"X-Forwarded-For": "203.0.113.9, 10.0.0.7"}))
        == "203.0.113.9"
    )
    assert (
        key(_scope_request("::1", {"X-Forwarded-For": "2001:db8::1"})) == "2001:db8::1"
    )
    # Every hop trusted: the leftmost one.
    assert (
        key(_scope_request("10.0.0.2", {"X-Forwarded-For": "10.0.0.3"})) == "10.0.0.3"
    )
    # No header: the peer.
    assert key(_scope_request("10.0.0.2", {})) == "10.0.0.2"
    # RFC 7239 Forwarded.
    forwarded = 'for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711"'
    assert (
        key(_scope_request("10.0.0.2", {"Forwarded": forwarded})) == "2001:db8:cafe::17"
    )
    assert (
        key(_scope_request("10.0.0.2", {"Forwarded": "for=192.0.2.60:8080"}))
        == "192.0.2.60"
    )


def test_forwarded_address_defaults_to_no_trusted_proxy() -> None:
    key = ForwardedAddress()
    assert (
        key(_scope_request("127.0.0.1", {"X-Forwarded-For": "1.1.1.1"})) == "127.0.0.1"
    )
    with pytest.raises(ValueError):
        ForwardedAddress(["10.0.0.0/8"], headers=["X-Real-IP"])
    with pytest.raises(ValueError):
        ForwardedAddress(["not an address"])


def test_trusted_proxy_key_func_in_an_app() -> None:
    limiter = Limiter(key_func=trusted_proxy_key_func(["127.0.0.0/8"]))

    @limiter.limit("1/minute")
    async def view(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", view)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    client = AsyncClientAdapter(app)  # peer 127.0.0.1, a trusted proxy
    assert codes(client, "/x", 2, headers={"X-Forwarded-For": "5.5.5.5"}) == [200, 429]
    assert codes(client, "/x", 1, headers={"X-Forwarded-For": "6.6.6.6"}) == [200]


# --------------------------------------------------------------------------
# the request path does no parsing, no introspection, one core call


class _CountingLimiter:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.other = 0

    def decide_many(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner.decide_many(*args, **kwargs)

    def decide(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner.decide(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        self.other += 1
        return getattr(self.inner, name)


@pytest.mark.parametrize("middleware", [None, SlowAPIMiddleware, SlowAPIASGIMiddleware])
def test_one_core_call_per_request_and_none_in_the_handler(
    middleware: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        headers_enabled=True,
        default_limits=["100/hour"],
        application_limits=["1000/day"],
    )
    counting = _CountingLimiter(limiter._limiter)
    limiter._limiter = counting  # type: ignore[assignment]

    @limiter.limit("2/minute;50/hour", override_defaults=False)
    async def view(request: Request) -> Response:
        return PlainTextResponse("ok")

    @limiter.limit(lambda: "3/minute")
    async def dynamic(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", view), Route("/d", dynamic)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    if middleware is not None:
        app.add_middleware(middleware)
    client = AsyncClientAdapter(app)
    client.get("/x")  # warm up (plans are built on first use)
    client.get("/d")
    counting.calls = 0

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("called on the request path")

    monkeypatch.setattr(inspect, "signature", boom)
    monkeypatch.setattr(rapidlimit._core, "parse_many", boom)
    monkeypatch.setattr(rapidlimit._core, "parse", boom)
    caplog.set_level(logging.DEBUG - 1, logger="nothing")
    responses = [client.get("/x") for _ in range(3)] + [
        client.get("/d") for _ in range(3)
    ]
    assert [r.status_code for r in responses] == [200, 429, 429, 200, 200, 429]
    assert counting.calls == 6  # one per request, none for headers or the 429
    assert counting.other == 0
    assert all(r.headers["x-ratelimit-limit"] for r in responses)
    # A rejection logs nothing at WARNING (slowapi logged every one).
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_rejections_are_not_logged_with_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rapidlimit")
    limiter = Limiter(key_func=get_remote_address)

    @limiter.limit("1/minute")
    async def view(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", view)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    client = AsyncClientAdapter(app)
    assert codes(client, "/x", 3) == [200, 429, 429]
    records = [r for r in caplog.records if r.name == "rapidlimit"]
    assert len(records) == 2
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in records)


def test_sync_view_rejection_skips_the_thread_pool() -> None:
    import threading

    limiter = Limiter(key_func=get_remote_address)
    threads: list[str] = []

    @limiter.limit("1/minute")
    def view(request: Request) -> Response:
        threads.append(threading.current_thread().name)
        return PlainTextResponse("ok")

    assert inspect.iscoroutinefunction(view)
    app = Starlette(routes=[Route("/x", view)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    client = AsyncClientAdapter(app)
    assert codes(client, "/x", 3) == [200, 429, 429]
    assert len(threads) == 1
    assert threads[0] != threading.main_thread().name  # the view ran in the pool


def test_endpoint_called_directly_still_works() -> None:
    limiter = Limiter(key_func=get_remote_address)

    @limiter.limit("1/minute")
    async def view(request: Request) -> str:
        return "direct"

    request = Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [],
            "client": ("1.1.1.1", 1),
        }
    )
    assert asyncio.run(view(request)) == "direct"
