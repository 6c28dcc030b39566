"""The decorator's wrapper keeps every endpoint signature working.

The wrapper is generated per endpoint with the endpoint's own parameters
(or ``*args, **kwargs`` for signatures it cannot copy); these tests pin that
arguments, defaults, keyword-only and positional-only parameters, parameter
names that the wrapper's body also uses, and stacked decorators reach the
endpoint unchanged, and that the limit and its headers still apply.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import rate_headers
from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address

KINDS = ["async", "sync"]


def fastapi_app(limiter: Limiter) -> FastAPI:
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def starlette_app(limiter: Limiter, routes: list[Route]) -> Starlette:
    app = Starlette(routes=routes)
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def limiter(**kwargs: Any) -> Limiter:
    return Limiter(key_func=get_remote_address, headers_enabled=True, **kwargs)


def make(kind: str, source: str) -> Any:
    """An endpoint from source text: the same body as a sync or async def."""
    namespace: dict[str, Any] = {"Request": Request, "Response": Response}
    prefix = "async def" if kind == "async" else "def"
    exec(source.replace("DEF", prefix), namespace)
    return namespace["view"]


def exhaust(client: Any, url: str, allowed: int) -> None:
    for remaining in range(allowed - 1, -1, -1):
        r = client.get(url)
        assert r.status_code == 200, r.text
        assert rate_headers(r)["x-ratelimit-remaining"] == str(remaining)
    r = client.get(url)
    assert r.status_code == 429
    assert r.json() == {"error": f"Rate limit exceeded: {allowed} per 1 minute"}


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_and_keyword_only_parameters(kind: str, make_client: Any) -> None:
    lim = limiter()
    app = fastapi_app(lim)
    view = make(
        kind,
        "DEF view(request: Request, a: int, b: str = 'bee', *, c: int = 7,"
        " d: float = 0.5):\n"
        "    return {'a': a, 'b': b, 'c': c, 'd': d}\n",
    )
    app.get("/v")(lim.limit("3/minute")(view))
    client = make_client(app)
    r = client.get("/v?a=1")
    assert r.json() == {"a": 1, "b": "bee", "c": 7, "d": 0.5}
    assert rate_headers(r)["x-ratelimit-limit"] == "3"
    r = client.get("/v?a=2&b=x&c=3&d=1.5")
    assert r.json() == {"a": 2, "b": "x", "c": 3, "d": 1.5}
    assert client.get("/v?a=3").status_code == 200
    assert client.get("/v?a=4").status_code == 429


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_named_like_the_wrappers_locals(kind: str, make_client: Any) -> None:
    # Names the wrapper's body uses for its own values must not leak into
    # or out of the endpoint's parameters; a keyword-only ``func`` must not
    # collide with run_in_threadpool's own parameter (sync views).
    lim = limiter()
    app = fastapi_app(lim)
    view = make(
        kind,
        "DEF view(request: Request, response: Response, limiter: str = 'L',"
        " conn: str = 'C', outcome: str = 'O', *, func: str = 'F',"
        " wrapper: str = 'W', args: str = 'A', kwargs: str = 'K'):\n"
        "    response.headers['x-seen'] = 'yes'\n"
        "    return [limiter, func, conn, outcome, wrapper, args, kwargs]\n",
    )
    app.get("/v")(lim.limit("2/minute")(view))
    client = make_client(app)
    r = client.get("/v?limiter=1&conn=2&kwargs=3&func=4")
    assert r.json() == ["1", "4", "2", "O", "W", "A", "3"]
    assert r.headers["x-seen"] == "yes"
    assert rate_headers(r)["x-ratelimit-remaining"] == "1"
    assert client.get("/v").status_code == 200
    assert client.get("/v").status_code == 429


@pytest.mark.parametrize("kind", KINDS)
def test_endpoint_without_request_or_response(kind: str, make_client: Any) -> None:
    lim = limiter()
    app = fastapi_app(lim)
    view = make(kind, "DEF view(item_id: int, q: str = ''):\n    return [item_id, q]\n")
    wrapped = lim.limit("2/minute")(view)
    # The hidden parameters are keyword-only and stay out of the schema.
    hidden = [p for p in inspect.signature(wrapped).parameters if p.startswith("_")]
    assert all(
        inspect.signature(wrapped).parameters[p].kind == inspect.Parameter.KEYWORD_ONLY
        for p in hidden
    )
    app.get("/items/{item_id}")(wrapped)
    client = make_client(app)
    r = client.get("/items/5?q=z")
    assert r.json() == [5, "z"]
    assert rate_headers(r)["x-ratelimit-limit"] == "2"
    schema = client.get("/openapi.json").json()
    params = schema["paths"]["/items/{item_id}"]["get"]["parameters"]
    assert sorted(p["name"] for p in params) == ["item_id", "q"]
    # slowapi's default key_style "url": each path has its own count.
    assert rate_headers(client.get("/items/5"))["x-ratelimit-remaining"] == "0"
    assert client.get("/items/5").status_code == 429
    exhaust(client, "/items/6", 2)


@pytest.mark.parametrize("kind", KINDS)
def test_var_keyword_and_positional_only_endpoints(kind: str) -> None:
    # Signatures the wrapper cannot copy keep working through *args/**kwargs.
    from starlette.testclient import TestClient

    lim = limiter()
    varkw = make(
        kind,
        "DEF view(request, **extra):\n"
        "    return __import__('starlette.responses').responses.JSONResponse("
        "sorted(extra))\n",
    )
    posonly = make(
        kind,
        "DEF view(request, /):\n"
        "    return __import__('starlette.responses').responses.JSONResponse("
        "request.url.path)\n",
    )
    app = starlette_app(
        lim,
        [
            Route("/kw", lim.limit("2/minute")(varkw)),
            Route("/pos", lim.limit("2/minute")(posonly)),
        ],
    )
    client = TestClient(app)
    assert client.get("/kw").json() == []
    assert client.get("/pos").json() == "/pos"
    assert client.get("/pos").status_code == 200
    assert client.get("/pos").status_code == 429
    assert client.get("/kw").status_code == 200
    assert client.get("/kw").status_code == 429


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("future", [False, True])
def test_request_and_response_parameters_of_other_types(
    kind: str, future: bool, make_client: Any
) -> None:
    # Named request and response but annotated otherwise (here query
    # parameters), they are the endpoint's own: FastAPI injects neither, so
    # the wrapper takes hidden ones and the limit and headers still apply
    # (slowapi raised on every request). String annotations are resolved.
    lim = limiter()
    app = fastapi_app(lim)
    view = make(
        kind,
        ("from __future__ import annotations\n" if future else "")
        + "DEF view(request: str, response: str = 'none'):\n"
        "    return [request, response]\n",
    )
    app.get("/v")(lim.limit("2/minute")(view))
    client = make_client(app)
    r = client.get("/v?request=a&response=b")
    assert r.json() == ["a", "b"]
    assert rate_headers(r)["x-ratelimit-remaining"] == "1"
    r = client.get("/v?request=c")
    assert r.json() == ["c", "none"]
    assert rate_headers(r)["x-ratelimit-remaining"] == "0"
    assert client.get("/v?request=d").status_code == 429
    schema = client.get("/openapi.json").json()
    params = schema["paths"]["/v"]["get"]["parameters"]
    assert sorted(p["name"] for p in params) == ["request", "response"]


def test_an_app_decorator_below_gets_its_arguments_as_they_came(
    make_client: Any,
) -> None:
    # A functools.wraps decorator of the app's, under @limit: FastAPI calls
    # by keyword and the decorator reads kwargs; Starlette passes the
    # request by position and the decorator reads args[0]. The limit's
    # wrapper forwards them unchanged, as slowapi does.
    import functools

    seen: list[tuple[int, list[str]]] = []

    def needs_token(func: Any) -> Any:
        @functools.wraps(func)
        async def inner(*args: Any, **kwargs: Any) -> Any:
            seen.append((len(args), sorted(kwargs)))
            request = kwargs["request"] if kwargs else args[0]
            if request.headers.get("x-token") != "ok":
                return JSONResponse({"detail": "no"}, status_code=401)
            return await func(*args, **kwargs)

        return inner

    lim = limiter()
    app = fastapi_app(lim)

    @app.get("/f")
    @lim.limit("2/minute")
    @needs_token
    async def f(request: Request, q: int = 1) -> dict[str, int]:
        return {"q": q}

    async def s(request: Any) -> Any:
        return JSONResponse({"ok": True})

    star = starlette_app(lim, [Route("/s", lim.limit("2/minute")(needs_token(s)))])
    for client, path, by_keyword in (
        (make_client(app), "/f?q=3", True),
        (make_client(star), "/s", False),
    ):
        seen.clear()
        assert client.get(path).status_code == 401
        ok = {"x-token": "ok"}
        statuses = [client.get(path, headers=ok).status_code for _ in range(2)]
        assert statuses == [200, 429]  # the 401 counted too, as in slowapi
        if by_keyword:
            assert seen[0] == (0, ["q", "request"])
        else:
            assert seen[0] == (1, [])


@pytest.mark.parametrize("kind", KINDS)
def test_called_directly_with_positional_and_keyword_arguments(kind: str) -> None:
    # Outside a request (no connection among the arguments) the wrapper
    # just calls the view, with the arguments as given.
    import asyncio

    lim = limiter()
    view = make(kind, "DEF view(a, b=2, *, c=3):\n    return (a, b, c)\n")
    wrapped = lim.limit("1/minute")(view)
    assert asyncio.run(wrapped(1)) == (1, 2, 3)
    assert asyncio.run(wrapped(1, 5, c=6)) == (1, 5, 6)
    assert asyncio.run(wrapped(a=9, c=0)) == (9, 2, 0)
    with pytest.raises(TypeError):
        asyncio.run(wrapped())


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_limits_on_a_starlette_view(kind: str) -> None:
    from starlette.testclient import TestClient

    lim = limiter()
    view = make(
        kind,
        "DEF view(request):\n"
        "    from starlette.responses import PlainTextResponse\n"
        "    return PlainTextResponse('ok')\n",
    )
    wrapped = lim.limit("3/minute")(lim.limit("2/minute")(view))
    client = TestClient(starlette_app(lim, [Route("/s", wrapped)]))
    assert client.get("/s").status_code == 200
    assert client.get("/s").status_code == 200
    r = client.get("/s")
    assert r.status_code == 429
    assert r.json() == {"error": "Rate limit exceeded: 2 per 1 minute"}


def test_returned_response_keeps_its_own_headers(make_client: Any) -> None:
    lim = limiter()
    app = fastapi_app(lim)

    @app.get("/r")
    @lim.limit("5/minute")
    async def view(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True}, headers={"x-app": "1"})

    r = make_client(app).get("/r")
    assert r.headers["x-app"] == "1"
    assert rate_headers(r)["x-ratelimit-remaining"] == "4"


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="inspect.markcoroutinefunction is 3.12+"
)
def test_a_function_marked_as_a_coroutine_function_is_awaited() -> None:
    # From 3.12 the decorator asks inspect, not asyncio (deprecated in 3.14),
    # whether an endpoint is async: a marked plain function must count.
    lim = limiter()

    async def body(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    def view(request: Request) -> Any:
        return body(request)

    from starlette.testclient import TestClient

    inspect.markcoroutinefunction(view)  # type: ignore[attr-defined,unused-ignore]
    wrapped = lim.limit("1/minute")(view)
    assert inspect.iscoroutinefunction(wrapped)
    client = TestClient(starlette_app(lim, [Route("/m", wrapped)]))
    assert client.get("/m").json() == {"ok": True}
    assert client.get("/m").status_code == 429
