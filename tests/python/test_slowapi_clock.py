"""Rate-limit headers and Retry-After under a frozen, advanced clock."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

import pytest
from fastapi import FastAPI
from freezegun import freeze_time
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from conftest import FROZEN, FROZEN_EPOCH, AsyncClientAdapter, rate_headers
from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from rapidlimit.util import get_remote_address

T = FROZEN_EPOCH


def _app(limiter: Limiter, kind: str, middleware: Any) -> Starlette:
    if kind == "async":

        async def view(request: Request) -> Response:
            return PlainTextResponse("ok")

    else:

        def view(request: Request) -> Response:  # type: ignore[misc]
            return PlainTextResponse("ok")

    async def plain(request: Request) -> Response:
        return PlainTextResponse("plain")

    app = Starlette(
        routes=[Route("/x", limiter.limit("2/minute")(view)), Route("/p", plain)]
    )
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    if middleware is not None:
        app.add_middleware(middleware)
    return app


@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize("middleware", [None, SlowAPIMiddleware, SlowAPIASGIMiddleware])
def test_fixed_window_headers_follow_the_clock(kind: str, middleware: Any) -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    app = _app(limiter, kind, middleware)
    client = AsyncClientAdapter(app)
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        first: Any = client.get("/x")
        assert rate_headers(first) == {
            "x-ratelimit-limit": "2",
            "x-ratelimit-remaining": "1",
            "x-ratelimit-reset": str(T + 61),
            "retry-after": "61",
        }
        frozen.tick(20)
        second: Any = client.get("/x")
        assert rate_headers(second)["x-ratelimit-remaining"] == "0"
        assert rate_headers(second)["retry-after"] == "41"
        frozen.tick(10)
        third: Any = client.get("/x")
        assert third.status_code == 429
        assert rate_headers(third) == {
            "x-ratelimit-limit": "2",
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": str(T + 61),
            "retry-after": "31",
        }
        frozen.tick(30)  # t = 60: the window is over
        fourth: Any = client.get("/x")
        assert fourth.status_code == 200
        assert rate_headers(fourth)["x-ratelimit-reset"] == str(T + 60 + 61)
        assert rate_headers(fourth)["retry-after"] == "61"


@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize("middleware", [None, SlowAPIMiddleware, SlowAPIASGIMiddleware])
def test_retry_after_of_a_window_opened_by_the_request(
    kind: str, middleware: Any
) -> None:
    # slowapi reads the clock again after the hit: with a running clock a
    # minute's window opened by this very request shows 60 (the clock moved
    # on), with a frozen one 61 (1 + reset - now); rapidlimit follows both.
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    client = AsyncClientAdapter(_app(limiter, kind, middleware))
    assert rate_headers(client.get("/x"))["retry-after"] == "60"
    limiter.reset()
    with freeze_time(FROZEN, real_asyncio=True):
        assert rate_headers(client.get("/x"))["retry-after"] == "61"
        assert rate_headers(client.get("/x"))["retry-after"] == "61"


def test_http_date_retry_after() -> None:
    limiter = Limiter(
        key_func=get_remote_address, headers_enabled=True, retry_after="http-date"
    )
    client = AsyncClientAdapter(_app(limiter, "async", None))
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        assert (
            client.get("/x").headers["retry-after"] == "Fri, 01 Jan 2100 00:01:01 -0000"
        )  # type: ignore[attr-defined]
        frozen.tick(45)
        client.get("/x")
        rejected: Any = client.get("/x")
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == formatdate(T + 61)


@pytest.mark.parametrize(
    ("strategy", "reset_after_first", "retry_when_rejected"),
    [
        # Window starts at the first hit.
        ("fixed-window", 61, 51),
        # The oldest entry leaves the window 60 s after it was made.
        ("moving-window", 61, 51),
        # Token bucket: each request costs 30 s of the 2/minute bucket. The
        # reset is when it is full again; a refusal's Retry-After counts to
        # when it has room for the request (T + 30).
        ("token-bucket", 31, 21),
    ],
)
def test_strategies_under_a_frozen_clock(
    strategy: str, reset_after_first: int, retry_when_rejected: int
) -> None:
    limiter = Limiter(
        key_func=get_remote_address, headers_enabled=True, strategy=strategy
    )
    client = AsyncClientAdapter(_app(limiter, "async", None))
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        first: Any = client.get("/x")
        assert int(first.headers["x-ratelimit-reset"]) == T + reset_after_first
        client.get("/x")
        frozen.tick(10)
        rejected: Any = client.get("/x")
        assert rejected.status_code == 429
        assert rejected.headers["x-ratelimit-remaining"] == "0"
        assert int(rejected.headers["retry-after"]) == retry_when_rejected


@pytest.mark.parametrize("retry_after", [None, "http-date"])
@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize("middleware", [None, SlowAPIMiddleware, SlowAPIASGIMiddleware])
def test_token_bucket_retry_after_counts_to_room_for_the_request(
    kind: str, middleware: Any, retry_after: str | None
) -> None:
    # A client that obeys a token bucket's Retry-After gets through then,
    # not a period later when the bucket is full again (X-RateLimit-Reset).
    limiter = Limiter(
        key_func=get_remote_address,
        headers_enabled=True,
        strategy="token-bucket",
        retry_after=retry_after,
    )
    client = AsyncClientAdapter(_app(limiter, kind, middleware))

    def retry(seconds: int, date: float) -> str:  # as slowapi's formulas
        return formatdate(date) if retry_after else str(seconds)

    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        assert [client.get("/x").status_code for _ in range(2)] == [200, 200]
        frozen.tick(10)
        rejected: Any = client.get("/x")
        assert rejected.status_code == 429
        # Room for one more at T + 30 (two hits of 30 s each, a 60 s
        # bucket), full again at T + 60.
        assert rejected.headers["x-ratelimit-reset"] == str(T + 61)
        assert rejected.headers["retry-after"] == retry(21, T + 31)
        frozen.tick(19.5)
        again: Any = client.get("/x")
        assert again.status_code == 429
        assert again.headers["retry-after"] == retry(1, T + 31)
        frozen.tick(0.5)
        admitted: Any = client.get("/x")
        assert admitted.status_code == 200
        # An admitted request's Retry-After is slowapi's: to the reset.
        assert admitted.headers["retry-after"] == retry(61, T + 91)


def test_token_bucket_limit_string_sets_the_burst() -> None:
    # README: with token-bucket, "50/5 seconds" is a bucket of 50 that
    # refills one every 0.1 s: a burst of 50, then 10 per second.
    limiter = Limiter(key_func=get_remote_address, strategy="token-bucket")

    async def view(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/b", limiter.limit("50/5 seconds")(view))])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    client = AsyncClientAdapter(app)

    def allowed(n: int) -> int:
        return sum(client.get("/b").status_code == 200 for _ in range(n))  # type: ignore[attr-defined]

    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        assert allowed(60) == 50
        # Not 0.1: time.time() near 2100 has a resolution of about 0.5 us.
        frozen.tick(0.15)
        assert allowed(3) == 1
        frozen.tick(1.0)  # 11.5 tokens since the burst, one taken
        assert allowed(20) == 10
        frozen.tick(60)  # full again, never above 50
        assert allowed(60) == 50


def test_sliding_window_recovers_gradually() -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        headers_enabled=True,
        strategy="sliding-window-counter",
    )
    client = AsyncClientAdapter(_app(limiter, "async", None))
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        assert [client.get("/x").status_code for _ in range(3)] == [200, 200, 429]  # type: ignore[attr-defined]
        frozen.tick(60)  # the previous window still weighs 2 * 60/60
        assert client.get("/x").status_code == 429  # type: ignore[attr-defined]
        frozen.tick(30)  # now 2 * 30/60 = 1
        assert client.get("/x").status_code == 200  # type: ignore[attr-defined]
        assert client.get("/x").status_code == 429  # type: ignore[attr-defined]


def test_default_limit_headers_follow_the_clock() -> None:
    limiter = Limiter(
        key_func=get_remote_address, headers_enabled=True, default_limits=["1/second"]
    )
    client = AsyncClientAdapter(_app(limiter, "async", SlowAPIASGIMiddleware))
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        assert client.get("/p").headers["retry-after"] == "2"  # type: ignore[attr-defined]
        assert client.get("/p").status_code == 429  # type: ignore[attr-defined]
        frozen.tick(1)
        ok: Any = client.get("/p")
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-reset"] == str(T + 3)


def test_fastapi_response_headers_under_a_frozen_clock() -> None:
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.get("/f")
    @limiter.limit("5/hour")
    def f(request: Request, response: Response) -> dict[str, bool]:
        return {"ok": True}

    client = AsyncClientAdapter(app)
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        frozen.tick(0.75)
        response: Any = client.get("/f")
        assert response.headers["x-ratelimit-reset"] == str(T + 3601)
        assert response.headers["retry-after"] == "3601"  # int(3601.75 - 0.75)


def test_a_patched_time_function_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # hiro-style clocks patch time.time; the limiter reads it per request.
    now = {"t": 1_000_000.0}
    monkeypatch.setattr(time, "time", lambda: now["t"])
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    client = AsyncClientAdapter(_app(limiter, "async", None))
    assert client.get("/x").headers["x-ratelimit-reset"] == "1000061"  # type: ignore[attr-defined]
    client.get("/x")
    assert client.get("/x").status_code == 429  # type: ignore[attr-defined]
    now["t"] += 60
    assert client.get("/x").status_code == 200  # type: ignore[attr-defined]


def test_a_clock_patched_after_the_first_requests_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The decorator's wrapper must not keep the time.time it saw first.
    limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
    client = AsyncClientAdapter(_app(limiter, "async", None))
    client.get("/p")
    client.get("/x")  # builds the route's plan: later requests take the shortcut
    now = {"t": 1_000_000.0}
    monkeypatch.setattr(time, "time", lambda: now["t"])
    limiter.reset()
    assert client.get("/x").headers["x-ratelimit-reset"] == "1000061"  # type: ignore[attr-defined]
    client.get("/x")
    assert client.get("/x").status_code == 429  # type: ignore[attr-defined]
    now["t"] += 60
    assert client.get("/x").status_code == 200  # type: ignore[attr-defined]
