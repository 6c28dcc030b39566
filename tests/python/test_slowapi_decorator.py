"""@limiter.limit / shared_limit / exempt on FastAPI and Starlette endpoints.

Most tests run for FastAPI and plain Starlette, sync and async endpoints, no
middleware or either middleware, through TestClient and httpx's ASGI
transport.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from conftest import rate_headers
from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import ConfigurationError, RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from rapidlimit.util import get_remote_address

FRAMEWORKS = ["fastapi", "starlette"]
KINDS = ["async", "sync"]
MIDDLEWARES = [None, SlowAPIMiddleware, SlowAPIASGIMiddleware]


def endpoint(kind: str, body: str = "ok") -> Callable[..., Any]:
    if kind == "async":

        async def view(request: Request) -> Response:
            return PlainTextResponse(body)

    else:

        def view(request: Request) -> Response:  # type: ignore[misc]
            return PlainTextResponse(body)

    view.__name__ = f"view_{body}"
    return view


def build(
    framework: str,
    limiter: Limiter,
    routes: list[tuple[str, Callable[..., Any]]]
    | list[tuple[str, Callable[..., Any], list[str]]],
    middleware: type | None = None,
    handler: Any = _rate_limit_exceeded_handler,
) -> Starlette:
    app: Starlette = FastAPI() if framework == "fastapi" else Starlette()
    for route in routes:
        path, view = route[0], route[1]
        methods = list(route[2]) if len(route) > 2 else ["GET"]  # type: ignore[misc]
        if framework == "fastapi":
            app.add_api_route(path, view, methods=methods)  # type: ignore[attr-defined]
        else:
            app.add_route(path, view, methods=methods)
    app.state.limiter = limiter
    if handler is not None:
        app.add_exception_handler(RateLimitExceeded, handler)
    if middleware is not None:
        app.add_middleware(middleware)
    return app


def statuses(client: Any, path: str, n: int, method: str = "GET") -> list[int]:
    return [client.request(method, path).status_code for _ in range(n)]


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=MIDDLEWARES, ids=["decorator", "BaseMW", "ASGIMW"])
def middleware(request: pytest.FixtureRequest) -> type | None:
    return request.param  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# the basics, across every setup


def test_limit_then_429(
    framework: str, kind: str, middleware: type | None, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    view = limiter.limit("2/minute")(endpoint(kind))
    client = make_client(build(framework, limiter, [("/x", view)], middleware))
    first, second, third = (client.get("/x") for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert first.text == "ok"
    assert third.json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    assert third.headers["content-type"] == "application/json"
    assert rate_headers(first)["x-ratelimit-limit"] == "2"
    assert rate_headers(first)["x-ratelimit-remaining"] == "1"
    assert rate_headers(second)["x-ratelimit-remaining"] == "0"
    assert rate_headers(third)["x-ratelimit-remaining"] == "0"
    assert 58 <= int(third.headers["retry-after"]) <= 61
    for response in (first, second, third):
        # Headers are sent once, never duplicated.
        raw = [k for k, _ in response.headers.multi_items()]
        assert raw.count("x-ratelimit-limit") == 1
        assert raw.count("retry-after") == 1


def test_headers_off_by_default(
    framework: str, kind: str, middleware: type | None, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit("1/minute")(endpoint(kind))
    client = make_client(build(framework, limiter, [("/x", view)], middleware))
    ok, rejected = client.get("/x"), client.get("/x")
    assert (ok.status_code, rejected.status_code) == (200, 429)
    assert rate_headers(ok) == {}
    assert rate_headers(rejected) == {}


def test_routes_count_apart(framework: str, kind: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    a = limiter.limit("1/minute")(endpoint(kind, "a"))
    b = limiter.limit("1/minute")(endpoint(kind, "b"))
    client = make_client(build(framework, limiter, [("/a", a), ("/b", b)]))
    assert statuses(client, "/a", 2) == [200, 429]
    assert statuses(client, "/b", 2) == [200, 429]


def test_clients_count_apart(framework: str) -> None:
    from conftest import AsyncClientAdapter

    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit("1/minute")(endpoint("async"))
    app = build(framework, limiter, [("/x", view)])
    one = AsyncClientAdapter(app, client=("10.0.0.1", 1))
    two = AsyncClientAdapter(app, client=("10.0.0.2", 1))
    assert statuses(one, "/x", 2) == [200, 429]
    assert statuses(two, "/x", 2) == [200, 429]


def test_url_style_counts_each_path_apart(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)

    @limiter.limit("1/minute")
    async def item(request: Request) -> Response:
        return PlainTextResponse("item")

    client = make_client(build(framework, limiter, [("/items/{n}", item)]))
    assert statuses(client, "/items/1", 2) == [200, 429]
    assert statuses(client, "/items/2", 2) == [200, 429]


def test_endpoint_style_counts_the_view(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, key_style="endpoint")

    @limiter.limit("1/minute")
    async def item(request: Request) -> Response:
        return PlainTextResponse("item")

    client = make_client(build(framework, limiter, [("/items/{n}", item)]))
    assert statuses(client, "/items/1", 2) == [200, 429]
    assert statuses(client, "/items/2", 1) == [429]
    from conftest import AsyncClientAdapter

    host = "127.0.0.1" if isinstance(client, AsyncClientAdapter) else "testclient"
    key = f"LIMITER/{host}/{__name__}.item/1/1/minute"
    assert limiter._storage.get(key) == 3


def test_several_limits_in_one_string(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)

    @limiter.limit("3/minute;1/second")
    async def view(request: Request) -> Response:
        return PlainTextResponse("x")

    client = make_client(build(framework, limiter, [("/x", view)]))
    ok = client.get("/x")
    # The header describes the limit with the smallest period.
    assert rate_headers(ok)["x-ratelimit-limit"] == "1"
    rejected = client.get("/x")
    assert rejected.status_code == 429
    assert rejected.json()["error"] == "Rate limit exceeded: 1 per 1 second"


def test_stacked_decorators_count_once(
    framework: str, kind: str, middleware: type | None, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    view = limiter.limit("10/minute")(limiter.limit("3/hour")(endpoint(kind)))
    client = make_client(build(framework, limiter, [("/x", view)], middleware))
    responses = [client.get("/x") for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [rate_headers(r)["x-ratelimit-remaining"] for r in responses[:3]] == [
        "9",
        "8",
        "7",
    ]
    assert responses[3].json()["error"] == "Rate limit exceeded: 3 per 1 hour"


def test_two_limiters_on_one_view_both_apply(framework: str, make_client: Any) -> None:
    by_client = Limiter(key_func=get_remote_address)
    for_everyone = Limiter(key_func=lambda: "everyone")

    @by_client.limit("5/minute")
    @for_everyone.limit("2/minute")
    async def view(request: Request) -> Response:
        return PlainTextResponse("x")

    client = make_client(build(framework, by_client, [("/x", view)]))
    assert statuses(client, "/x", 3) == [200, 200, 429]


# --------------------------------------------------------------------------
# 429 handlers


def test_without_a_handler_the_http_exception_handler_answers(
    framework: str, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit("1/minute")(endpoint("async"))
    client = make_client(build(framework, limiter, [("/x", view)], handler=None))
    client.get("/x")
    rejected = client.get("/x")
    assert rejected.status_code == 429
    if framework == "fastapi":
        assert rejected.json() == {"detail": "1 per 1 minute"}
    else:
        assert rejected.text == "1 per 1 minute"


@pytest.mark.parametrize("handler_kind", ["sync", "async"])
def test_custom_handler(
    framework: str, middleware: type | None, handler_kind: str, make_client: Any
) -> None:
    seen: list[RateLimitExceeded] = []

    def sync_handler(request: Request, exc: RateLimitExceeded) -> Response:
        seen.append(exc)
        return JSONResponse({"custom": exc.detail}, status_code=429)

    async def async_handler(request: Request, exc: RateLimitExceeded) -> Response:
        return sync_handler(request, exc)

    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit("1/minute", error_message="too many")(endpoint("async"))
    handler = sync_handler if handler_kind == "sync" else async_handler
    client = make_client(build(framework, limiter, [("/x", view)], middleware, handler))
    client.get("/x")
    rejected = client.get("/x")
    assert rejected.status_code == 429
    assert rejected.json() == {"custom": "too many"}
    assert isinstance(seen[0], RateLimitExceeded)
    assert seen[0].limit is not None and seen[0].limit.limit.amount == 1


def test_handler_for_status_429_is_used(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit("1/minute")(endpoint("async"))
    app = build(framework, limiter, [("/x", view)], handler=None)

    async def on_429(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("by status", status_code=429)

    app.add_exception_handler(429, on_429)
    client = make_client(app)
    client.get("/x")
    assert client.get("/x").text == "by status"


def test_handler_called_directly_with_headers(framework: str, make_client: Any) -> None:
    # Code that wraps the default handler in its own keeps working.
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)

    def wrapping(request: Request, exc: RateLimitExceeded) -> Response:
        response = _rate_limit_exceeded_handler(request, exc)
        response.headers["x-wrapped"] = "1"
        return response

    view = limiter.limit("1/minute")(endpoint("async"))
    client = make_client(build(framework, limiter, [("/x", view)], handler=wrapping))
    client.get("/x")
    rejected = client.get("/x")
    assert rejected.status_code == 429
    assert rejected.headers["x-wrapped"] == "1"
    assert rejected.json() == {"error": "Rate limit exceeded: 1 per 1 minute"}
    assert rate_headers(rejected)["x-ratelimit-remaining"] == "0"


# --------------------------------------------------------------------------
# decorator options


def test_shared_limit(framework: str, kind: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    shared = limiter.shared_limit("3/minute", scope="group")
    a = shared(endpoint(kind, "a"))
    b = shared(endpoint(kind, "b"))
    client = make_client(build(framework, limiter, [("/a", a), ("/b", b)]))
    assert statuses(client, "/a", 2) == [200, 200]
    assert statuses(client, "/b", 2) == [200, 429]


def test_shared_limit_with_callable_scope(framework: str, make_client: Any) -> None:
    # slowapi issue #163: a callable scope raised NameError.
    limiter = Limiter(key_func=get_remote_address)
    scopes: list[str] = []

    def scope_of(endpoint_key: str) -> str:
        scopes.append(endpoint_key)
        return "team"

    shared = limiter.shared_limit("2/minute", scope=scope_of)
    a = shared(endpoint("async", "a"))
    b = shared(endpoint("async", "b"))
    by_request = limiter.shared_limit(
        "1/minute", scope=lambda request: request.headers.get("x-team", "none")
    )(endpoint("async", "c"))
    client = make_client(
        build(framework, limiter, [("/a", a), ("/b", b), ("/c", by_request)])
    )
    assert statuses(client, "/a", 1) + statuses(client, "/b", 2) == [200, 200, 429]
    assert scopes[:2] == ["/a", "/b"]
    assert client.get("/c", headers={"x-team": "red"}).status_code == 200
    assert client.get("/c", headers={"x-team": "red"}).status_code == 429
    assert client.get("/c", headers={"x-team": "blue"}).status_code == 200


def test_callable_limit_values(framework: str, kind: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    current = {"value": "2/minute"}
    plain = limiter.limit(lambda: current["value"])(endpoint(kind, "a"))
    keyed = limiter.limit(lambda key: "1/minute" if key else "9/minute")(
        endpoint(kind, "b")
    )
    client = make_client(build(framework, limiter, [("/a", plain), ("/b", keyed)]))
    assert statuses(client, "/a", 3) == [200, 200, 429]
    current["value"] = "5/minute"  # a new limit, new counters
    assert statuses(client, "/a", 1) == [200]
    assert statuses(client, "/b", 2) == [200, 429]


def test_dynamic_limit_returning_garbage_is_skipped(
    framework: str, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit(lambda: "lots per fortnight")(endpoint("async"))
    client = make_client(build(framework, limiter, [("/x", view)]))
    assert statuses(client, "/x", 3) == [200, 200, 200]
    assert "failed to load ratelimit" in caplog.text


@pytest.mark.parametrize("cost", [2, 2.0, "callable", "callable float"])
def test_cost(framework: str, kind: str, cost: Any, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    if cost == "callable":
        charge: Any = lambda request: int(request.query_params.get("n", 2))  # noqa: E731
    elif cost == "callable float":  # as slowapi's own tests write costs
        charge = lambda request: int(request.query_params.get("n", 4)) * 0.5  # noqa: E731
    else:
        charge = cost
    view = limiter.limit("5/minute", cost=charge)(endpoint(kind))
    client = make_client(build(framework, limiter, [("/x", view)]))
    assert statuses(client, "/x", 3) == [200, 200, 429]


@pytest.mark.parametrize("bad", [1.5, -1, "2"])
def test_a_bad_static_cost_fails_at_decoration(bad: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    with pytest.raises(ConfigurationError, match=f"invalid cost {bad!r}"):
        limiter.limit("5/minute", cost=bad)
    with pytest.raises(ConfigurationError, match=f"invalid cost {bad!r}"):
        limiter.shared_limit("5/minute", scope="s", cost=bad)
    with pytest.raises(ConfigurationError, match=f"invalid cost {bad!r}"):
        limiter.depends("5/minute", cost=bad)


def test_a_fractional_cost_from_a_callable_names_itself(
    framework: str, kind: str, make_client: Any
) -> None:
    # slowapi passed 7.5 on to limits (counted in memory, refused by its
    # Redis storage); here counts are whole hits everywhere, and the error
    # says why, a 500 like any error of the app's own callables ...
    charge = lambda request: 7.5  # noqa: E731
    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit("50/minute", cost=charge)(endpoint(kind))
    client = make_client(build(framework, limiter, [("/x", view)]))
    with pytest.raises(ValueError, match="cost must be a whole number.*7.5"):
        client.get("/x")
    # ... unless errors are swallowed: then the request goes through.
    limiter = Limiter(key_func=get_remote_address, swallow_errors=True)
    view = limiter.limit("1/minute", cost=charge)(endpoint(kind))
    client = make_client(build(framework, limiter, [("/x", view)]))
    assert statuses(client, "/x", 2) == [200, 200]


def test_per_method_and_methods(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    per_method = limiter.limit("1/minute", per_method=True)(endpoint("async", "a"))
    only_post = limiter.limit("1/minute", methods=["post"])(endpoint("async", "b"))
    client = make_client(
        build(
            framework,
            limiter,
            [("/a", per_method, ["GET", "POST"]), ("/b", only_post, ["GET", "POST"])],
        )
    )
    assert statuses(client, "/a", 2, "GET") == [200, 429]
    assert statuses(client, "/a", 2, "POST") == [200, 429]
    assert statuses(client, "/b", 3, "GET") == [200, 200, 200]
    assert statuses(client, "/b", 2, "POST") == [200, 429]


def test_exempt_when(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    flag = {"exempt": True}
    no_args = limiter.limit("1/minute", exempt_when=lambda: flag["exempt"])(
        endpoint("async", "a")
    )
    with_request = limiter.limit(
        "1/minute", exempt_when=lambda request: "vip" in request.headers
    )(endpoint("async", "b"))
    client = make_client(
        build(framework, limiter, [("/a", no_args), ("/b", with_request)])
    )
    assert statuses(client, "/a", 3) == [200, 200, 200]
    flag["exempt"] = False
    assert statuses(client, "/a", 2) == [200, 429]
    assert [client.get("/b", headers={"vip": "1"}).status_code for _ in range(3)] == [
        200,
        200,
        200,
    ]
    assert statuses(client, "/b", 2) == [200, 429]


def test_error_message(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    fixed = limiter.limit("1/minute", error_message="slow down")(endpoint("async", "a"))
    computed = limiter.limit("1/minute", error_message=lambda: "later")(
        endpoint("async", "b")
    )
    client = make_client(build(framework, limiter, [("/a", fixed), ("/b", computed)]))
    assert statuses(client, "/a", 1) == [200]
    assert client.get("/a").json() == {"error": "Rate limit exceeded: slow down"}
    assert statuses(client, "/b", 1) == [200]
    assert client.get("/b").json() == {"error": "Rate limit exceeded: later"}


def test_key_func_override_and_without_request(
    framework: str, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address)
    by_header = limiter.limit(
        "1/minute", key_func=lambda request: request.headers.get("x-user", "anon")
    )(endpoint("async", "a"))
    constant = limiter.limit("2/minute", key_func=lambda: "all")(endpoint("async", "b"))
    client = make_client(
        build(framework, limiter, [("/a", by_header), ("/b", constant)])
    )
    assert client.get("/a", headers={"x-user": "u1"}).status_code == 200
    assert client.get("/a", headers={"x-user": "u1"}).status_code == 429
    assert client.get("/a", headers={"x-user": "u2"}).status_code == 200
    assert statuses(client, "/b", 3) == [200, 200, 429]


def test_empty_key_skips_the_limit(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=lambda: "")
    view = limiter.limit("1/minute")(endpoint("async"))
    client = make_client(build(framework, limiter, [("/x", view)]))
    assert statuses(client, "/x", 3) == [200, 200, 200]


def test_override_defaults(
    framework: str, middleware: type | None, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits=["2/minute"])
    overriding = limiter.limit("5/minute")(endpoint("async", "a"))
    adding = limiter.limit("5/minute", override_defaults=False)(endpoint("async", "b"))
    client = make_client(
        build(framework, limiter, [("/a", overriding), ("/b", adding)], middleware)
    )
    assert statuses(client, "/a", 4) == [200] * 4
    assert statuses(client, "/b", 3) == [200, 200, 429]


def test_exempt(framework: str, middleware: type | None, make_client: Any) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["1/minute"],
        application_limits=["1/minute"],
    )
    free = limiter.exempt(endpoint("async", "free"))
    limited = limiter.exempt(limiter.limit("1/minute")(endpoint("async", "ex")))
    client = make_client(
        build(framework, limiter, [("/free", free), ("/ex", limited)], middleware)
    )
    assert statuses(client, "/free", 3) == [200, 200, 200]
    assert statuses(client, "/ex", 3) == [200, 200, 200]
    assert f"{free.__module__}.{free.__name__}" in limiter._exempt_routes


def test_key_prefix_in_storage_keys(framework: str) -> None:
    from conftest import AsyncClientAdapter

    limiter = Limiter(key_func=get_remote_address, key_prefix="app1")

    @limiter.limit("5/minute", per_method=True)
    async def view(request: Request) -> Response:
        return PlainTextResponse("x")

    client = AsyncClientAdapter(build(framework, limiter, [("/x", view)]))
    client.get("/x")
    client.get("/x")
    assert limiter._storage.get("LIMITER/app1/127.0.0.1//x:GET/5/1/minute") == 2


def test_registered_limits_are_visible(framework: str) -> None:
    limiter = Limiter(key_func=get_remote_address)
    view = limiter.limit("5/minute")(endpoint("async"))
    name = f"{view.__module__}.{view.__name__}"
    assert [lim.limit.amount for lim in limiter._route_limits[name]] == [5]


# --------------------------------------------------------------------------
# switches


def test_enabled_can_be_toggled(
    framework: str, middleware: type | None, make_client: Any
) -> None:
    limiter = Limiter(key_func=get_remote_address, enabled=False, headers_enabled=True)
    view = limiter.limit("1/minute")(endpoint("async"))
    client = make_client(build(framework, limiter, [("/x", view)], middleware))
    responses = [client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert rate_headers(responses[0]) == {}
    limiter.enabled = True
    assert statuses(client, "/x", 2) == [200, 429]


def test_settings_changed_between_requests_apply(
    framework: str, kind: str, make_client: Any
) -> None:
    # The wrappers keep the limiter's settings with the route (the spec of
    # Limiter._fast_spec) once the first request made it: a later change
    # must still apply.
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    view = limiter.limit("3/minute")(endpoint(kind))
    client = make_client(build(framework, limiter, [("/x", view)]))
    assert rate_headers(client.get("/x"))["x-ratelimit-remaining"] == "2"
    limiter._headers_enabled = False
    response = client.get("/x")
    assert response.status_code == 200
    assert rate_headers(response) == {}
    limiter._headers_enabled = True
    limiter.enabled = False
    assert statuses(client, "/x", 3) == [200, 200, 200]  # not counted
    limiter.enabled = True
    assert rate_headers(client.get("/x"))["x-ratelimit-remaining"] == "0"
    assert statuses(client, "/x", 1) == [429]
    limiter._key_prefix = "other"  # other counters
    assert rate_headers(client.get("/x"))["x-ratelimit-remaining"] == "2"
    # A filter added in place (no attribute set): requests go unlimited.
    limiter._request_filters.append(lambda: True)
    responses = [client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert rate_headers(responses[0]) == {}
    limiter._request_filters.clear()
    assert statuses(client, "/x", 3) == [200, 200, 429]


def test_auto_check_off_never_fails(
    framework: str, kind: str, middleware: type | None, make_client: Any
) -> None:
    # slowapi issue #253: auto_check=False (or swallowed errors) left no
    # view_rate_limit and the decorator crashed with AttributeError.
    limiter = Limiter(
        key_func=get_remote_address, auto_check=False, headers_enabled=True
    )
    view = limiter.limit("1/minute")(endpoint(kind))
    client = make_client(build(framework, limiter, [("/x", view)], middleware))
    responses = [client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert rate_headers(responses[0]) == {}


def test_view_rate_limit_and_manual_check(framework: str, make_client: Any) -> None:
    # The private API that slowapi users call by hand.
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    seen: list[Any] = []

    async def manual(request: Request) -> Response:
        limiter._check_request_limit(request, manual, in_middleware=False)
        seen.append(request.state.view_rate_limit)
        response = PlainTextResponse("m")
        return limiter._inject_headers(response, request.state.view_rate_limit)

    limiter.limit("1/minute")(manual)  # registers limits for `manual` only
    client = make_client(build(framework, limiter, [("/m", manual)]))
    ok = client.get("/m")
    assert ok.status_code == 200
    assert rate_headers(ok)["x-ratelimit-remaining"] == "0"
    item, args = seen[0]
    assert str(item) == "1 per 1 minute"
    assert args[1] == "/m"
    assert seen[0] == (item, args)
    rejected = client.get("/m")
    assert rejected.status_code == 429
    assert rate_headers(rejected)["x-ratelimit-limit"] == "1"


def test_inject_headers_with_a_plain_tuple() -> None:
    # A hand-made (limit, args) pair: the storage is asked.
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    import rapidlimit

    item = rapidlimit.parse("3/minute")
    limiter.limiter.hit(item, "k", "/p")
    response = limiter._inject_headers(PlainTextResponse("x"), (item, ["k", "/p"]))
    assert response.headers["x-ratelimit-limit"] == "3"
    assert response.headers["x-ratelimit-remaining"] == "2"


# --------------------------------------------------------------------------
# FastAPI specifics


def test_fastapi_response_parameter_gets_headers(kind: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    if kind == "async":

        @app.get("/with")
        @limiter.limit("2/minute")
        async def with_response(request: Request, response: Response) -> dict[str, int]:
            response.headers["x-own"] = "1"
            return {"a": 1}

        @app.get("/without")
        @limiter.limit("2/minute")
        async def without_response(request: Request) -> dict[str, int]:
            return {"b": 2}

        @app.get("/norequest")
        @limiter.limit("2/minute")
        async def no_request(q: int = 0) -> dict[str, int]:
            return {"q": q}

    else:

        @app.get("/with")
        @limiter.limit("2/minute")
        def with_response(request: Request, response: Response) -> dict[str, int]:
            response.headers["x-own"] = "1"
            return {"a": 1}

        @app.get("/without")
        @limiter.limit("2/minute")
        def without_response(request: Request) -> dict[str, int]:
            return {"b": 2}

        @app.get("/norequest")
        @limiter.limit("2/minute")
        def no_request(q: int = 0) -> dict[str, int]:
            return {"q": q}

    client = make_client(app)
    response = client.get("/with")
    assert response.json() == {"a": 1}
    assert response.headers["x-own"] == "1"
    assert rate_headers(response)["x-ratelimit-remaining"] == "1"
    response = client.get("/without")
    assert response.json() == {"b": 2}
    assert rate_headers(response)["x-ratelimit-remaining"] == "1"
    assert client.get("/norequest?q=3").json() == {"q": 3}
    assert client.get("/norequest").status_code == 200
    assert client.get("/norequest").status_code == 429
    # The hidden parameters stay out of the OpenAPI schema.
    schema = client.get("/openapi.json").json()
    params = schema["paths"]["/norequest"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["q"]


@pytest.mark.parametrize("retry_after", [None, "http-date"])
def test_fastapi_endpoint_headers_of_its_own(
    retry_after: str | None, make_client: Any
) -> None:
    # Rate-limit headers the endpoint set itself (on its `response` parameter
    # or the Response it returns) are replaced, not repeated; an HTTP-date
    # Retry-After is formatted in Python.
    limiter = Limiter(
        key_func=get_remote_address, headers_enabled=True, retry_after=retry_after
    )
    app = FastAPI()
    app.state.limiter = limiter

    @app.get("/param")
    @limiter.limit("5/minute")
    async def param(request: Request, response: Response) -> dict[str, int]:
        response.headers["X-RateLimit-Limit"] = "999"
        return {"a": 1}

    @app.get("/returned")
    @limiter.limit("5/minute")
    async def returned(request: Request) -> Response:
        return PlainTextResponse("r", headers={"Retry-After": "3600"})

    @app.get("/plain")
    @limiter.limit("5/minute")
    async def plain(request: Request, response: Response) -> dict[str, int]:
        return {"p": 1}

    client = make_client(app)
    for path in ("/param", "/returned", "/plain"):
        response = client.get(path)
        assert response.status_code == 200
        limits = [v for k, v in response.headers.items() if k == "x-ratelimit-limit"]
        assert limits == ["5"], path
        assert len(response.headers.get_list("retry-after")) == 1, path
        retry = response.headers["retry-after"]
        if retry_after == "http-date":
            assert retry.endswith("GMT") or retry.endswith("-0000"), path
        elif path == "/returned":
            assert int(retry) >= 3599  # the later of the two, as slowapi
        else:
            assert 0 <= int(retry) <= 61


def test_fastapi_depends(make_client: Any) -> None:
    from fastapi import Depends

    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.get("/dep", dependencies=[Depends(limiter.depends("2/minute"))])
    async def dep() -> dict[str, bool]:
        return {"ok": True}

    shared = limiter.depends("3/minute", scope="pair")

    @app.get("/p1", dependencies=[Depends(shared)])
    def p1() -> dict[str, int]:
        return {"p": 1}

    @app.get("/p2")
    def p2(_: None = Depends(shared)) -> dict[str, int]:
        return {"p": 2}

    client = make_client(app)
    first = client.get("/dep")
    assert first.json() == {"ok": True}
    assert rate_headers(first)["x-ratelimit-remaining"] == "1"
    assert client.get("/dep").status_code == 200
    rejected = client.get("/dep")
    assert rejected.status_code == 429
    assert rejected.json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    assert statuses(client, "/p1", 2) + statuses(client, "/p2", 2) == [
        200,
        200,
        200,
        429,
    ]


class Item(BaseModel):
    name: str


def test_fastapi_path_parameters_and_body(make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.post("/items/{item_id}")
    @limiter.limit("1/minute")
    async def create(request: Request, item_id: int, item: Item) -> dict[str, Any]:
        return {"id": item_id, "name": item.name}

    client = make_client(app)
    response = client.post("/items/3", json={"name": "x"})
    assert response.json() == {"id": 3, "name": "x"}
    assert client.post("/items/3", json={"name": "x"}).status_code == 429
    assert client.post("/items/3", json={"bad": 1}).status_code in (422, 429)


# --------------------------------------------------------------------------
# errors from the storage


class FailingLimiter:
    """Stands in for the core strategy and fails every call."""

    def __init__(self) -> None:
        self.calls = 0

    def decide_many(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise ConnectionError("storage is down")

    decide = decide_headers = decide_view = decide_many


def test_storage_error_swallowed_lets_requests_through(
    framework: str,
    middleware: type | None,
    make_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        swallow_errors=True,
        headers_enabled=True,
        default_limits=["1/minute"],
    )
    limiter._limiter = FailingLimiter()  # type: ignore[assignment]
    view = limiter.limit("1/minute")(endpoint("async"))
    plain = endpoint("async", "plain")
    client = make_client(
        build(framework, limiter, [("/x", view), ("/y", plain)], middleware)
    )
    responses = [client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert rate_headers(responses[0]) == {}
    assert "Swallowing error" in caplog.text
    if middleware is not None:
        assert statuses(client, "/y", 3) == [200, 200, 200]


def test_storage_error_not_swallowed_is_a_plain_500(
    framework: str, middleware: type | None, make_client: Any
) -> None:
    # slowapi issues #239/#253: the error went through the 429 handler, which
    # failed again. Here it propagates as itself; no 429 handler involved.
    handled: list[Exception] = []

    def handler(request: Request, exc: RateLimitExceeded) -> Response:
        handled.append(exc)
        return _rate_limit_exceeded_handler(request, exc)

    limiter = Limiter(key_func=get_remote_address)
    limiter._limiter = FailingLimiter()  # type: ignore[assignment]
    view = limiter.limit("1/minute")(endpoint("async"))
    app = build(framework, limiter, [("/x", view)], middleware, handler=handler)
    client = make_client(app, raise_server_exceptions=False)
    assert client.get("/x").status_code == 500
    assert handled == []
    with pytest.raises(ConnectionError):
        make_client(app).get("/x")


def test_in_memory_fallback(
    framework: str, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        in_memory_fallback_enabled=True,
    )
    real = limiter._limiter
    failing = FailingLimiter()
    limiter._limiter = failing  # type: ignore[assignment]
    view = limiter.limit("2/minute")(endpoint("async"))
    client = make_client(build(framework, limiter, [("/x", view)]))
    assert statuses(client, "/x", 3) == [200, 200, 429]  # counted in memory
    assert limiter._storage_dead is True
    assert failing.calls == 1
    # The main storage comes back: after the back-off it is used again.
    limiter._limiter = real
    monkeypatch.setattr(limiter, "_last_check_backend", 0.0)
    assert statuses(client, "/x", 1) == [200]
    assert limiter._storage_dead is False


def test_in_memory_fallback_limits(framework: str, make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, in_memory_fallback=["1/minute"])
    limiter._limiter = FailingLimiter()  # type: ignore[assignment]
    view = limiter.limit("5/minute")(endpoint("async"))
    client = make_client(build(framework, limiter, [("/x", view)]))
    assert statuses(client, "/x", 2) == [200, 429]


# --------------------------------------------------------------------------
# misc


def test_endpoint_without_request_on_starlette(make_client: Any) -> None:
    limiter = Limiter(key_func=get_remote_address)

    @limiter.limit("1/minute")
    async def view(req: Request) -> Response:  # not named "request"
        return PlainTextResponse("x")

    client = make_client(build("starlette", limiter, [("/x", view)]))
    assert statuses(client, "/x", 2) == [200, 429]


def test_error_body_bytes_match_jsonresponse() -> None:
    limiter = Limiter(key_func=get_remote_address)
    limiter.limit("5/minute", error_message='é "quoted"')(endpoint("async"))
    [limit] = next(iter(limiter._route_limits.values()))
    expected = JSONResponse({"error": 'Rate limit exceeded: é "quoted"'}).body
    assert limit.error_body() == expected
    assert json.loads(limit.error_body()) == {
        "error": 'Rate limit exceeded: é "quoted"'
    }


def test_http_endpoint_methods(make_client: Any) -> None:
    from starlette.endpoints import HTTPEndpoint
    from starlette.routing import Route

    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)

    class Items(HTTPEndpoint):
        @limiter.limit("1/minute")
        async def get(self, request: Request) -> Response:
            return PlainTextResponse("get")

        @limiter.limit("2/minute")
        def post(self, request: Request) -> Response:
            return PlainTextResponse("post")

    app = Starlette(routes=[Route("/items", Items)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    client = make_client(app)
    assert statuses(client, "/items", 2) == [200, 429]
    assert statuses(client, "/items", 3, "POST") == [200, 200, 429]
    assert client.post("/items").headers["x-ratelimit-limit"] == "2"


def test_fastapi_websocket_decorator() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient, WebSocketDenialResponse

    limiter = Limiter(key_func=get_remote_address)
    app = FastAPI()
    app.state.limiter = limiter

    @app.websocket("/ws")
    @limiter.limit("1/minute")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    client = TestClient(app)
    with client.websocket_connect("/ws") as connection:
        assert connection.receive_text() == "hi"
    with pytest.raises(WebSocketDenialResponse), client.websocket_connect("/ws"):
        pass


def test_a_moving_window_limit_too_large_fails_at_decoration() -> None:
    """The moving window logs every hit: past 2**20 per window every request
    failed (a 500) instead of the decoration."""
    limiter = Limiter(key_func=get_remote_address, strategy="moving-window")
    message = "invalid rate limit '2000000/day'.*moving-window.*too large"
    with pytest.raises(ConfigurationError, match=message):

        @limiter.limit("2000000/day")
        async def view(request: Request) -> None:
            return None

    with pytest.raises(ConfigurationError, match="too large"):
        limiter.shared_limit("5/second;2000000/day", scope="s")
    with pytest.raises(ConfigurationError, match="too large"):
        limiter.depends("2000000/day")
    with pytest.raises(ConfigurationError, match="too large"):
        Limiter(
            key_func=get_remote_address,
            strategy="moving-window",
            default_limits=["2000000/day"],
        )
    # The bound is the moving window's: other strategies take it.
    Limiter(key_func=get_remote_address).limit("2000000/day")
    limiter.limit("1048576/day")


def test_a_dynamic_moving_window_limit_too_large_is_skipped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = Limiter(key_func=get_remote_address, strategy="moving-window")
    app = Starlette()
    app.state.limiter = limiter

    @limiter.limit(lambda: "2000000/day")
    async def view(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app.add_route("/v", view)
    with caplog.at_level("ERROR", logger=limiter.logger.name):
        assert TestClient(app).get("/v").status_code == 200
    assert "too large" in caplog.text
