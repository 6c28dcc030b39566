"""The same applications run with real slowapi and with rapidlimit, under a
frozen clock that the test advances: statuses, bodies, rate-limit headers and
storage keys must match.

Normalised: ``X-RateLimit-Reset`` is compared as an integer (slowapi prints
the float); ``Retry-After`` of sync views is not compared (slowapi computes it
in a worker thread, where freezegun gives the real time). slowapi's default
429 handler is wrapped in an async handler so
that it runs on the event loop: as a sync handler Starlette runs it in a
worker thread, where freezegun hands out the real time.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import slowapi
import slowapi.errors
import slowapi.middleware
import slowapi.util
from fastapi import FastAPI
from freezegun import freeze_time
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

import rapidlimit
import rapidlimit.errors
import rapidlimit.middleware
import rapidlimit.util
from conftest import FROZEN, AsyncClientAdapter, rate_headers


def _lib(name: str) -> types.SimpleNamespace:
    if name == "slowapi":

        async def handler(request: Request, exc: Exception) -> Response:
            return slowapi._rate_limit_exceeded_handler(request, exc)  # type: ignore[arg-type]

        return types.SimpleNamespace(
            name=name,
            Limiter=slowapi.Limiter,
            handler=handler,
            RateLimitExceeded=slowapi.errors.RateLimitExceeded,
            get_remote_address=slowapi.util.get_remote_address,
            SlowAPIMiddleware=slowapi.middleware.SlowAPIMiddleware,
            SlowAPIASGIMiddleware=slowapi.middleware.SlowAPIASGIMiddleware,
        )
    return types.SimpleNamespace(
        name=name,
        Limiter=rapidlimit.Limiter,
        handler=rapidlimit._rate_limit_exceeded_handler,
        RateLimitExceeded=rapidlimit.errors.RateLimitExceeded,
        get_remote_address=rapidlimit.util.get_remote_address,
        SlowAPIMiddleware=rapidlimit.middleware.SlowAPIMiddleware,
        SlowAPIASGIMiddleware=rapidlimit.middleware.SlowAPIASGIMiddleware,
    )


Step = Any  # ("GET", "/path", {headers}) or a number of seconds to advance
Builder = Callable[[types.SimpleNamespace], tuple[Starlette, Any]]


def _run(
    lib_name: str,
    build: Builder,
    steps: list[Step],
    ignore: tuple[str, ...] = (),
    raise_server_exceptions: bool = True,
) -> tuple[list[Any], Any]:
    lib = _lib(lib_name)
    # Built before freezing: FastAPI imports pydantic lazily, and pydantic's
    # date types cannot be defined while freezegun replaces datetime.date.
    app, limiter = build(lib)
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        client = AsyncClientAdapter(
            app, raise_server_exceptions=raise_server_exceptions
        )
        seen = []
        for step in steps:
            if isinstance(step, (int, float)):
                frozen.tick(step)
                continue
            method, path, *rest = step
            headers = rest[0] if rest else {}
            response: Any = client.request(method, path, headers=headers)
            headers = rate_headers(response)
            for name in ignore:
                headers.pop(name, None)
            seen.append((method, path, response.status_code, response.text, headers))
    return seen, limiter


def _compare(
    build: Builder,
    steps: list[Step],
    ignore: tuple[str, ...] = (),
    within_a_second: tuple[str, ...] = (),
    raise_server_exceptions: bool = True,
) -> tuple[Any, Any]:
    theirs, their_limiter = _run(
        "slowapi", build, steps, ignore, raise_server_exceptions
    )
    ours, our_limiter = _run(
        "rapidlimit", build, steps, ignore, raise_server_exceptions
    )
    if within_a_second:
        for our_step, their_step in zip(ours, theirs):
            for name in within_a_second:
                if name in our_step[4] and name in their_step[4]:
                    assert abs(int(our_step[4][name]) - int(their_step[4][name])) <= 1
                    our_step[4][name] = their_step[4][name]
    assert ours == theirs
    return their_limiter, our_limiter


def _assert_same_keys(their_limiter: Any, our_limiter: Any) -> None:
    counters = their_limiter._storage.storage  # limits' MemoryStorage Counter
    assert counters, "slowapi stored nothing"
    with freeze_time(FROZEN):
        for key, value in counters.items():
            assert our_limiter._storage.get(key) == value, key


def _app(
    framework: str,
    lib: types.SimpleNamespace,
    limiter: Any,
    middleware: str | None = None,
) -> Starlette:
    app: Starlette = FastAPI() if framework == "fastapi" else Starlette()
    app.state.limiter = limiter
    app.add_exception_handler(lib.RateLimitExceeded, lib.handler)
    if middleware:
        app.add_middleware(getattr(lib, middleware))
    return app


def _route(
    app: Starlette,
    framework: str,
    path: str,
    view: Any,
    methods: list[str] | None = None,
) -> None:
    if framework == "fastapi":
        app.add_api_route(path, view, methods=methods or ["GET"])  # type: ignore[attr-defined]
    else:
        app.add_route(path, view, methods=methods or ["GET"])


def _view(kind: str, name: str) -> Any:
    if kind == "async":

        async def view(request: Request) -> Response:
            return PlainTextResponse(name)

    else:

        def view(request: Request) -> Response:  # type: ignore[misc]
            return PlainTextResponse(name)

    view.__name__ = name
    return view


GET = ("GET", "/x")


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize(
    "strategy", ["fixed-window", "moving-window", "sliding-window-counter"]
)
@pytest.mark.parametrize("limit", ["3/minute", "2/minute;1/second", "2 per 10 seconds"])
def test_decorator_matches_slowapi(
    framework: str, kind: str, strategy: str, limit: str
) -> None:
    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=lib.get_remote_address, headers_enabled=True, strategy=strategy
        )
        app = _app(framework, lib, limiter)
        _route(app, framework, "/x", limiter.limit(limit)(_view(kind, "x")))
        return app, limiter

    # Ticks avoid landing exactly on window edges, where limits' moving
    # window disagrees with itself (an entry is inside the window for
    # acquire_entry and outside for get_moving_window).
    steps = [GET, GET, GET, GET, 1.5, GET, GET, 8.25, GET, 20, GET, GET, 31.5]
    steps += [GET, GET, GET, GET]
    # slowapi computes Retry-After of a sync view in the worker thread, where
    # freezegun gives the real clock: not comparable there.
    ignore: tuple[str, ...] = ()
    if kind == "sync":
        ignore = ("retry-after",)
        if strategy == "sliding-window-counter":  # its reset is read there too
            ignore += ("x-ratelimit-reset",)
    # limits' sliding window computes the reset time with float arithmetic on
    # the epoch ((now / expiry) % 1) that lands a hair before whole seconds;
    # the core computes it exactly, so the integer header can differ by one.
    close = ("x-ratelimit-reset",) if strategy == "sliding-window-counter" else ()
    their_limiter, our_limiter = _compare(build, steps, ignore, close)
    if strategy == "fixed-window":
        _assert_same_keys(their_limiter, our_limiter)


@pytest.mark.parametrize("retry_after", [None, "http-date"])
@pytest.mark.parametrize("key_prefix", ["", "tenant"])
def test_headers_and_keys_match_slowapi(
    retry_after: str | None, key_prefix: str
) -> None:
    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=lib.get_remote_address,
            headers_enabled=True,
            retry_after=retry_after,
            key_prefix=key_prefix,
        )
        app = _app("fastapi", lib, limiter)

        @app.get("/x")
        @limiter.limit("2/minute", per_method=True)
        async def x(request: Request, response: Response) -> dict[str, int]:
            return {"x": 1}

        @app.post("/x")
        @limiter.limit("2/minute", per_method=True)
        async def x_post(request: Request, response: Response) -> dict[str, int]:
            return {"x": 2}

        return app, limiter

    steps = [
        GET,
        GET,
        GET,
        ("POST", "/x"),
        30,
        GET,
        ("POST", "/x"),
        ("POST", "/x"),
        31,
        GET,
    ]
    their_limiter, our_limiter = _compare(build, steps)
    _assert_same_keys(their_limiter, our_limiter)


def test_decorator_options_match_slowapi() -> None:
    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(key_func=lib.get_remote_address, headers_enabled=True)
        app = _app("starlette", lib, limiter)
        shared = limiter.shared_limit("3/minute", scope="shared")
        _route(app, "starlette", "/s1", shared(_view("async", "s1")))
        _route(app, "starlette", "/s2", shared(_view("async", "s2")))
        _route(
            app,
            "starlette",
            "/cost",
            limiter.limit("5/minute", cost=lambda request: 2)(_view("async", "cost")),
        )
        _route(
            app,
            "starlette",
            "/methods",
            limiter.limit("1/minute", methods=["POST"])(_view("async", "methods")),
            ["GET", "POST"],
        )
        _route(
            app,
            "starlette",
            "/msg",
            limiter.limit("1/minute", error_message="nope")(_view("async", "msg")),
        )
        _route(
            app,
            "starlette",
            "/vip",
            limiter.limit(
                "1/minute", exempt_when=lambda request: "vip" in request.headers
            )(_view("async", "vip")),
        )
        _route(
            app,
            "starlette",
            "/dyn",
            limiter.limit(lambda key: "2/minute" if key else "1/minute")(
                _view("async", "dyn")
            ),
        )
        _route(
            app,
            "starlette",
            "/other-key",
            limiter.limit("1/minute", key_func=lambda: "everyone")(
                _view("async", "other")
            ),
        )
        return app, limiter

    steps = [
        ("GET", "/s1"), ("GET", "/s2"), ("GET", "/s1"), ("GET", "/s2"),
        ("GET", "/cost"), ("GET", "/cost"), ("GET", "/cost"),
        ("GET", "/methods"), ("GET", "/methods"),
        ("POST", "/methods"), ("POST", "/methods"),
        ("GET", "/msg"), ("GET", "/msg"),
        ("GET", "/vip", {"vip": "1"}), ("GET", "/vip", {"vip": "1"}),
        ("GET", "/vip"), ("GET", "/vip"),
        ("GET", "/dyn"), ("GET", "/dyn"), ("GET", "/dyn"),
        ("GET", "/other-key"), ("GET", "/other-key"),
        61,
        ("GET", "/s1"), ("GET", "/cost"), ("GET", "/msg"),
    ]  # fmt: skip
    their_limiter, our_limiter = _compare(build, steps)
    _assert_same_keys(their_limiter, our_limiter)


@pytest.mark.parametrize(
    "strategy", ["fixed-window", "moving-window", "sliding-window-counter"]
)
def test_headers_of_a_counter_charged_twice_match_slowapi(strategy: str) -> None:
    """A route limit that is also a default limit (override_defaults=False)
    charges one counter twice per request; slowapi's headers read it after
    both hits. Found by test_app_differential.py (seed 145): rapidlimit
    reported the counter as the route limit's hit left it, one too high."""

    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=lib.get_remote_address,
            headers_enabled=True,
            strategy=strategy,
            default_limits=["5/hour"],
        )
        app = _app("starlette", lib, limiter)
        _route(
            app,
            "starlette",
            "/x",
            limiter.limit("5/hour", override_defaults=False)(_view("async", "x")),
        )
        return app, limiter

    steps = [GET, GET, 10, GET, GET]
    # The sliding window's float reset (and the Retry-After slowapi derives
    # from it): see test_decorator_matches_slowapi.
    close: tuple[str, ...] = ()
    if strategy == "sliding-window-counter":
        close = ("x-ratelimit-reset", "retry-after")
    _compare(build, steps, within_a_second=close)
    ours, _ = _run("rapidlimit", build, steps)
    assert [headers["x-ratelimit-remaining"] for *_, headers in ours] == [
        "3",
        "1",
        "0",
        "0",
    ]


@pytest.mark.parametrize("middleware", ["SlowAPIMiddleware", "SlowAPIASGIMiddleware"])
@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
def test_middleware_defaults_match_slowapi(middleware: str, framework: str) -> None:
    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=lib.get_remote_address,
            headers_enabled=True,
            # One string: slowapi puts a list of defaults in a set, whose
            # order (and so which counters a rejected request charges)
            # depends on the hash seed.
            default_limits=["2/minute;5/hour"],
        )
        app = _app(framework, lib, limiter, middleware)
        _route(app, framework, "/plain", _view("async", "plain"))
        _route(app, framework, "/sync", _view("sync", "sync"))
        _route(app, framework, "/own", limiter.limit("3/minute")(_view("async", "own")))
        _route(
            app,
            framework,
            "/both",
            limiter.limit("3/minute", override_defaults=False)(_view("async", "both")),
        )
        _route(app, framework, "/free", limiter.exempt(_view("async", "free")))
        return app, limiter

    steps = [
        ("GET", "/plain"), ("GET", "/plain"), ("GET", "/plain"),
        ("GET", "/sync"), ("GET", "/sync"), ("GET", "/sync"),
        ("GET", "/own"), ("GET", "/own"), ("GET", "/own"), ("GET", "/own"),
        ("GET", "/both"), ("GET", "/both"), ("GET", "/both"),
        ("GET", "/free"), ("GET", "/free"), ("GET", "/free"),
        ("GET", "/missing"),
        61,
        ("GET", "/plain"), ("GET", "/own"), ("GET", "/both"),
    ]  # fmt: skip
    their_limiter, our_limiter = _compare(build, steps)
    _assert_same_keys(their_limiter, our_limiter)


@pytest.mark.parametrize("middleware", ["SlowAPIMiddleware", "SlowAPIASGIMiddleware"])
def test_application_limits_on_plain_routes_match_slowapi(middleware: str) -> None:
    # slowapi applies application limits to routes without a decorator only.
    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=lib.get_remote_address,
            headers_enabled=True,
            application_limits=["3/minute"],
        )
        app = _app("starlette", lib, limiter, middleware)
        _route(app, "starlette", "/a", _view("async", "a"))
        _route(app, "starlette", "/b", _view("async", "b"))
        return app, limiter

    steps = [
        ("GET", "/a"),
        ("GET", "/b"),
        ("GET", "/a"),
        ("GET", "/b"),
        60,
        ("GET", "/b"),
    ]
    their_limiter, our_limiter = _compare(build, steps)
    _assert_same_keys(their_limiter, our_limiter)


def test_key_style_endpoint_matches_slowapi() -> None:
    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=lib.get_remote_address, headers_enabled=True, key_style="endpoint"
        )
        app = _app("starlette", lib, limiter)
        _route(
            app,
            "starlette",
            "/items/{n}",
            limiter.limit("2/minute")(_view("async", "items")),
        )
        return app, limiter

    steps = [("GET", "/items/1"), ("GET", "/items/2"), ("GET", "/items/3")]
    their_limiter, our_limiter = _compare(build, steps)
    _assert_same_keys(their_limiter, our_limiter)


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
@pytest.mark.parametrize("kind", ["async", "sync"])
def test_auto_check_off_with_a_check_in_the_view_matches_slowapi(
    framework: str, kind: str
) -> None:
    """auto_check=False, and the view checks itself with
    ``_check_request_limit``: slowapi's decorator adds the headers of the
    view that check left. Found by test_app_differential.py (seed 202):
    rapidlimit's decorator added none once auto_check was off."""

    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=lib.get_remote_address, headers_enabled=True, auto_check=False
        )
        app = _app(framework, lib, limiter)
        views: list[Any] = []

        if kind == "async":

            async def x(request: Request) -> Response:
                limiter._check_request_limit(request, views[0], False)
                return PlainTextResponse("x")

        else:

            def x(request: Request) -> Response:  # type: ignore[misc]
                limiter._check_request_limit(request, views[0], False)
                return PlainTextResponse("x")

        views.append(limiter.limit("2/minute")(x))
        _route(app, framework, "/x", views[0])
        return app, limiter

    # slowapi computes Retry-After of a sync view in the worker thread, where
    # freezegun gives the real clock (see test_decorator_matches_slowapi).
    ignore = ("retry-after",) if kind == "sync" else ()
    _compare(build, [GET, GET, GET, 61, GET], ignore)
    ours, _ = _run("rapidlimit", build, [GET, GET, GET])
    assert [headers.get("x-ratelimit-remaining") for *_, headers in ours] == [
        "1",
        "0",
        "0",
    ]


@pytest.mark.parametrize("sync", [False, True])
def test_a_limit_refused_before_a_failing_key_function_matches_slowapi(
    sync: bool,
) -> None:
    """slowapi calls each limit's key function just before charging it: a
    request refused by an earlier limit gets its 429 although a later
    limit's key function would raise, and one that an earlier limit lets
    through is charged there before the error (a 500). Found by
    test_app_differential.py (seed 218): rapidlimit called every key
    function first, so the error came before any limit was charged."""

    def boom_key(request: Request) -> str:
        if "x-boom" in request.headers:
            raise KeyError("no key for this request")
        return "client"

    def build(lib: types.SimpleNamespace) -> tuple[Starlette, Any]:
        limiter = lib.Limiter(
            key_func=boom_key, headers_enabled=True, default_limits=["5/minute"]
        )
        app = _app("starlette", lib, limiter)
        limit = limiter.limit(
            "2/minute", key_func=lambda: "all", override_defaults=False
        )
        _route(app, "starlette", "/x", limit(_view("sync" if sync else "async", "x")))
        return app, limiter

    boom = ("GET", "/x", {"x-boom": "1"})
    steps = [GET, boom, GET, boom, 61, boom, GET]
    ignore = ("retry-after",) if sync else ()
    _compare(build, steps, ignore, raise_server_exceptions=False)
    ours, _ = _run("rapidlimit", build, steps, ignore, raise_server_exceptions=False)
    assert [status for _, _, status, *_ in ours] == [200, 500, 429, 429, 500, 200]
