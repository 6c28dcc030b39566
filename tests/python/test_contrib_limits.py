"""rapidlimit.contrib.limits: the native store as a ``limits`` storage, used
by an unchanged slowapi application."""

from __future__ import annotations

import asyncio
from typing import Any

import limits
import limits.aio.strategies
import limits.strategies
import pytest
import slowapi
import slowapi.errors
import slowapi.middleware
import slowapi.util
from freezegun import freeze_time
from limits.storage import storage_from_string
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import rapidlimit.contrib.limits
from conftest import FROZEN, AsyncClientAdapter
from rapidlimit.contrib.limits import AsyncRapidlimitStorage, RapidlimitStorage

STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter"]


def test_sliding_windows_are_timestamped_like_limits_memory_storage() -> None:
    # limits (and its tests) tell clock-aligned sliding windows apart by
    # this class; ours are, so a burst that straddles an aligned boundary
    # is judged as limits' memory storage judges it.
    from limits.storage.base import TimestampedSlidingWindow

    item = limits.parse("4 per 2 seconds")
    results = {}
    for uri in ("memory://", "rapidlimit+memory://", "async+rapidlimit+memory://"):
        storage = storage_from_string(uri)
        assert isinstance(storage, TimestampedSlidingWindow) or uri == "memory://"
        with freeze_time("2026-01-01 00:00:01.5") as clock:
            if uri.startswith("async"):
                aio = limits.aio.strategies.SlidingWindowCounterRateLimiter(storage)

                async def burst(aio: Any = aio) -> list[bool]:
                    out = [await aio.hit(item, "k") for _ in range(4)]
                    clock.tick(0.61)
                    return [*out, await aio.hit(item, "k")]

                results[uri] = asyncio.run(burst())
            else:
                sync = limits.strategies.SlidingWindowCounterRateLimiter(storage)
                out = [sync.hit(item, "k") for _ in range(4)]
                clock.tick(0.61)
                results[uri] = [*out, sync.hit(item, "k")]
    assert results["memory://"] == [True, True, True, True, True]
    assert len(set(map(tuple, results.values()))) == 1, results


def test_scheme_is_registered() -> None:
    storage = storage_from_string("rapidlimit+memory://")
    assert isinstance(storage, RapidlimitStorage)
    assert isinstance(storage, limits.storage.Storage)
    assert isinstance(storage, limits.storage.MovingWindowSupport)
    assert isinstance(storage, limits.storage.SlidingWindowCounterSupport)
    assert storage.check() is True


def test_an_empty_storage_is_true_as_limits_storages_are() -> None:
    # Code written for limits tests a storage for truth (``storage or
    # MemoryStorage()``, ``if not self._storage``); limits' storages have no
    # __len__ and are always true, ours counts its keys with __len__.
    theirs = storage_from_string("memory://")
    ours = storage_from_string("rapidlimit+memory://")
    assert len(ours) == 0
    assert bool(theirs) is True
    assert bool(ours) is True
    kept = ours or storage_from_string("memory://")
    assert kept is ours
    ours.incr("k", 10)
    assert len(ours) == 1
    assert bool(ours) is True


def test_options_from_uri_and_keywords() -> None:
    assert (
        storage_from_string("rapidlimit+memory://?max_keys=123").native.max_keys == 123
    )  # type: ignore[attr-defined]
    assert (
        storage_from_string("rapidlimit+memory://", max_keys=45).native.max_keys == 45
    )  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        storage_from_string("rapidlimit+memory://", colour="blue")


def test_fixed_window_storage_interface() -> None:
    storage = RapidlimitStorage()
    with freeze_time(FROZEN) as frozen:
        assert storage.get("k") == 0
        assert storage.incr("k", 10) == 1
        assert storage.incr("k", 10, amount=3) == 4
        assert storage.get("k") == 4
        expiry = storage.get_expiry("k")
        assert expiry == pytest.approx(frozen().timestamp() + 10)
        frozen.tick(11)
        assert storage.get("k") == 0
        storage.incr("k", 10)
        storage.clear("k")
        assert storage.get("k") == 0
        storage.incr("a", 10)
        storage.incr("b", 10)
        assert storage.reset() is not None
        assert storage.get("a") == 0


def test_limits_4_elastic_expiry_argument() -> None:
    """limits < 5 (the newest on Python 3.9) passes elastic_expiry to every
    incr: False is a plain fixed window, True (its removed
    fixed-window-elastic-expiry strategy) is refused."""
    storage = RapidlimitStorage()
    aio = AsyncRapidlimitStorage()
    assert storage.incr("k", 10, elastic_expiry=False, amount=2) == 2
    assert asyncio.run(aio.incr("k", 10, elastic_expiry=False, amount=2)) == 2
    with pytest.raises(NotImplementedError, match="elastic"):
        storage.incr("k", 10, elastic_expiry=True)
    with pytest.raises(NotImplementedError, match="elastic"):
        asyncio.run(aio.incr("k", 10, elastic_expiry=True))
    assert storage.get("k") == 2


def test_moving_window_storage_interface() -> None:
    storage = RapidlimitStorage()
    with freeze_time(FROZEN) as frozen:
        assert storage.acquire_entry("m", 2, 10)
        frozen.tick(1)
        assert storage.acquire_entry("m", 2, 10)
        assert not storage.acquire_entry("m", 2, 10)
        start, count = storage.get_moving_window("m", 2, 10)
        assert count == 2
        assert start == pytest.approx(frozen().timestamp() - 1)
        frozen.tick(9.5)  # the first entry has left the window
        assert storage.acquire_entry("m", 2, 10)
        assert not storage.acquire_entry("m", 5, 10, amount=6)


def test_sliding_window_storage_interface() -> None:
    storage = RapidlimitStorage()
    with freeze_time(FROZEN) as frozen:
        assert storage.acquire_sliding_window_entry("s", 2, 60)
        assert storage.acquire_sliding_window_entry("s", 2, 60)
        assert not storage.acquire_sliding_window_entry("s", 2, 60)
        previous, previous_ttl, current, current_ttl = storage.get_sliding_window(
            "s", 60
        )
        assert (previous, current) == (0, 2)
        frozen.tick(60)
        previous, previous_ttl, current, _ = storage.get_sliding_window("s", 60)
        assert (previous, current) == (2, 0)
        assert previous_ttl == pytest.approx(60)
        storage.clear_sliding_window("s", 60)
        assert storage.get_sliding_window("s", 60)[0::2] == (0, 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_limits_strategies_match_memory_storage(strategy: str) -> None:
    item = limits.parse("3 per 10 seconds")
    results: dict[str, list[Any]] = {}
    for uri in ("memory://", "rapidlimit+memory://"):
        with freeze_time(FROZEN) as frozen:
            limiter = limits.strategies.STRATEGIES[strategy](storage_from_string(uri))
            seen = []
            for step in [0, 0, 0, 0, 2.5, 0, 4.25, 0, 0, 6.5, 0, 0, 0, 11.5, 0]:
                frozen.tick(step)
                hit = limiter.hit(item, "user", "scope")
                stats = limiter.get_window_stats(item, "user", "scope")
                test = limiter.test(item, "user", "scope")
                seen.append((hit, test, stats.remaining, round(stats.reset_time, 3)))
            limiter.clear(item, "user", "scope")
            assert limiter.test(item, "user", "scope")
            results[uri] = seen
    assert results["rapidlimit+memory://"] == results["memory://"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_async_storage_with_limits_aio(strategy: str) -> None:
    item = limits.parse("2/minute")

    async def run() -> list[bool]:
        storage = storage_from_string("async+rapidlimit+memory://")
        assert isinstance(storage, AsyncRapidlimitStorage)
        limiter = limits.aio.strategies.STRATEGIES[strategy](storage)
        hits = [await limiter.hit(item, "k") for _ in range(3)]
        stats = await limiter.get_window_stats(item, "k")
        assert stats.remaining == 0
        assert await storage.check()
        await storage.reset()
        return hits

    assert asyncio.run(run()) == [True, True, False]


def _slowapi_app(storage_uri: str, strategy: str) -> tuple[Starlette, Any]:
    # An ordinary slowapi application; only storage_uri differs.
    limiter = slowapi.Limiter(
        key_func=slowapi.util.get_remote_address,
        default_limits=["3/minute"],
        headers_enabled=True,
        storage_uri=storage_uri,
        strategy=strategy,
    )

    @limiter.limit("2/minute")
    async def limited(request: Request) -> Response:
        return PlainTextResponse("limited")

    async def plain(request: Request) -> Response:
        return PlainTextResponse("plain")

    async def handler(request: Request, exc: Exception) -> Response:
        return slowapi._rate_limit_exceeded_handler(request, exc)  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/limited", limited), Route("/plain", plain)])
    app.state.limiter = limiter
    app.add_exception_handler(slowapi.errors.RateLimitExceeded, handler)
    app.add_middleware(slowapi.middleware.SlowAPIMiddleware)
    return app, limiter


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unchanged_slowapi_app_on_the_native_store(strategy: str) -> None:
    assert rapidlimit.contrib.limits  # imported: the scheme is registered
    outcomes = {}
    for uri in ("memory://", "rapidlimit+memory://"):
        app, limiter = _slowapi_app(uri, strategy)
        client = AsyncClientAdapter(app)
        seen = []
        with freeze_time(FROZEN, real_asyncio=True) as frozen:
            for step in (
                ["/limited"] * 3 + ["/plain"] * 4 + [61.5, "/limited", "/plain"]
            ):
                if isinstance(step, float):
                    frozen.tick(step)
                    continue
                response: Any = client.get(step)
                headers = {
                    k: str(int(float(v))) if k == "x-ratelimit-reset" else v
                    for k, v in response.headers.items()
                    if k.startswith("x-ratelimit") or k == "retry-after"
                }
                seen.append((step, response.status_code, response.text, headers))
        outcomes[uri] = seen
        if uri.startswith("rapidlimit"):
            assert isinstance(limiter._storage, RapidlimitStorage)
            assert len(limiter._storage) > 0
    assert [s[1] for s in outcomes["rapidlimit+memory://"]] == [
        200, 200, 429, 200, 200, 200, 429, 200, 200,
    ]  # fmt: skip
    if strategy == "sliding-window-counter":
        # limits computes the sliding reset with float error (see
        # test_slowapi_compat); compare everything else.
        for ours, theirs in zip(
            outcomes["rapidlimit+memory://"], outcomes["memory://"]
        ):
            assert ours[:3] == theirs[:3]
            assert (
                ours[3]["x-ratelimit-remaining"] == theirs[3]["x-ratelimit-remaining"]
            )
    else:
        assert outcomes["rapidlimit+memory://"] == outcomes["memory://"]
