"""rapidlimit+redis:// as a ``limits`` storage, against a real redis-server:
the three ``limits`` strategies answer as ``limits``' own redis:// storage
(sync and ``limits.aio``), the async class keeps the event loop free, an
unchanged slowapi app enforces and shares its limits through Redis, and an
outage follows the storage's policy and slowapi's settings."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import limits
import limits.aio.storage
import limits.aio.strategies
import limits.errors
import limits.storage
import limits.strategies
import pytest
import slowapi
import slowapi.errors
import slowapi.middleware
import slowapi.util
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import rapidlimit.contrib.limits  # noqa: F401  (registers the schemes)
from conftest import FROZEN_EPOCH, Ticker, needs_limits_5
from rapidlimit import _core
from rapidlimit.contrib.limits import AsyncRapidlimitStorage, RapidlimitStorage
from redis_server import RedisServer

SYNC = {
    "fixed-window": limits.strategies.FixedWindowRateLimiter,
    "moving-window": limits.strategies.MovingWindowRateLimiter,
    "sliding-window-counter": limits.strategies.SlidingWindowCounterRateLimiter,
}
ASYNC = {
    "fixed-window": limits.aio.strategies.FixedWindowRateLimiter,
    "moving-window": limits.aio.strategies.MovingWindowRateLimiter,
    "sliding-window-counter": limits.aio.strategies.SlidingWindowCounterRateLimiter,
}
NAMES = sorted(SYNC)
# The sequences end with the strategy's clear(), which in limits 4 clears
# the plain key only and leaves a sliding window in place (with limits' own
# storages too; clear_sliding_window is new in limits 5).
CLEARED_NAMES = [
    pytest.param(name, marks=needs_limits_5("clear() leaves the sliding window"))
    if name == "sliding-window-counter"
    else name
    for name in NAMES
]
# 1 ms past a minute boundary: limits' redis:// starts its windows at the
# first hit, limits' memory:// (and rapidlimit) at epoch multiples of the
# window; from here both agree on the sliding window's reset too.
T0 = FROZEN_EPOCH + 0.001
# (clock step, cost) for "4/minute". limits' redis:// keeps fixed and
# sliding windows with Redis TTLs on the real clock, so those two are
# compared without clock steps; the moving window reads time.time() in both.
STEPS = [(0, 1)] * 3 + [(0, 2), (0, 1), (0, 1)]
MOVING_STEPS = [(0, 1), (5, 1), (5, 2), (5, 1), (40, 1), (6, 1), (10, 3), (30, 1)]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of the test's own, which it may kill."""
    srv = RedisServer()
    srv.start()
    yield srv
    srv.cleanup()


class Clock:
    """time.time() for the adapter, limits and slowapi alike."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    frozen = Clock(T0)
    monkeypatch.setattr(time, "time", frozen)
    return frozen


def ours(srv: RedisServer, scheme: str = "rapidlimit+redis", **options: Any) -> Any:
    # Unless the test is about timeouts, not the 0.2 s default: a loaded CI
    # machine once stalled a test's event loop past it (a fail-closed
    # TimeoutError in the middle of its hits); a reply that never comes
    # still fails the test.
    if "timeout" not in options and "socket_timeout" not in options:
        options["timeout"] = 5.0
    return limits.storage.storage_from_string(
        f"{scheme}://127.0.0.1:{srv.port}/0", **options
    )


def theirs(srv: RedisServer, scheme: str = "redis", **options: Any) -> Any:
    """limits' own storage on another database of the same server."""
    return limits.storage.storage_from_string(
        f"{scheme}://127.0.0.1:{srv.port}/1", **options
    )


Answer = tuple[Any, ...]


class ModuloWindow:
    """Equal to a reset time up to whole windows, 0.1 s either way."""

    def __init__(self, value: float, window: float) -> None:
        self.value = value
        self.window = window

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (int, float)):
            return NotImplemented
        d = (other - self.value) % self.window
        return min(d, self.window - d) < 0.1

    def __repr__(self) -> str:
        return f"{self.value} (mod {self.window})"


def approx_answers(answers: list[Answer], strategy: str = "") -> list[Any]:
    """Reset times (the last field) may differ by the milliseconds Redis
    TTLs lose on the real clock while the test runs. limits' redis://
    sliding window computes its reset as (2 * window - elapsed) % window,
    which right after the first hit is ~0 or ~window depending on whether a
    millisecond has passed: those are compared up to whole windows."""

    def reset(value: float) -> Any:
        if strategy == "sliding-window-counter":
            return ModuloWindow(value, 60)
        return pytest.approx(value, abs=0.1)

    return [(*a[:-1], reset(a[-1])) for a in answers]


# ----------------------------------------------------- limits strategies


def sync_sequence(
    limiter: Any, clock: Clock, item: Any, steps: list[tuple[int, int]]
) -> list[Answer]:
    seen: list[Answer] = []
    for step, cost in steps:
        clock.tick(step)
        hit = limiter.hit(item, "user", "scope", cost=cost)
        test = limiter.test(item, "user", "scope")
        stats = limiter.get_window_stats(item, "user", "scope")
        seen.append((hit, test, stats.remaining, stats.reset_time))
    limiter.clear(item, "user", "scope")
    stats = limiter.get_window_stats(item, "user", "scope")
    seen.append(("cleared", limiter.test(item, "user", "scope"), stats.remaining, 0))
    assert limiter.hit(item, "user", "scope")
    return seen


@pytest.mark.parametrize("strategy", CLEARED_NAMES)
def test_same_answers_as_limits_redis(
    server: RedisServer, clock: Clock, strategy: str
) -> None:
    item = limits.parse("4/minute")
    steps = MOVING_STEPS if strategy == "moving-window" else STEPS
    mine = SYNC[strategy](ours(server))
    reference = SYNC[strategy](theirs(server))
    got = sync_sequence(mine, clock, item, steps)
    clock.now = T0
    expected = sync_sequence(reference, clock, item, steps)
    assert got == approx_answers(expected, strategy)
    admitted = [a[0] for a in got[:-1]]
    remaining = [a[2] for a in got[:-1]]
    if strategy == "fixed-window":  # rejected hits count too, as in limits
        assert admitted == [True, True, True, False, False, False]
        assert remaining == [3, 2, 1, 0, 0, 0]
        assert got[0][3] == pytest.approx(T0 + 60, abs=0.01)
    elif strategy == "sliding-window-counter":  # the last unit still fits
        assert admitted == [True, True, True, False, True, False]
        assert remaining == [3, 2, 1, 1, 0, 0]
    else:
        assert admitted == [True, True, True, False, False, True, True, False]
    assert got[-1] == ("cleared", True, 4, 0)


@pytest.mark.parametrize("strategy", CLEARED_NAMES)
def test_window_rollover_as_limits_memory(
    server: RedisServer, clock: Clock, strategy: str
) -> None:
    """Across window ends (which limits' redis:// only sees on the real
    clock) the Redis store answers as limits' memory:// on a moved clock."""
    item = limits.parse("3 per 10 seconds")
    steps = [(0, 1)] * 4 + [(2.5, 1), (0, 1), (4.25, 1), (0, 1), (0, 1)]
    steps += [(6.5, 1), (0, 1), (0, 1), (0, 1), (11.5, 1), (0, 2), (0, 1)]
    results = []
    for storage in (ours(server), limits.storage.storage_from_string("memory://")):
        clock.now = float(FROZEN_EPOCH)
        results.append(sync_sequence(SYNC[strategy](storage), clock, item, steps))
    assert results[0] == results[1]


def test_other_schemes_reach_the_same_counters(server: RedisServer) -> None:
    item = limits.parse("5/minute")
    path = server.unix_path
    stores = [
        ours(server),
        ours(server, "rapidlimit+valkey"),
        limits.storage.storage_from_string(f"rapidlimit+redis+unix://{path}"),
        limits.storage.storage_from_string(f"rapidlimit+unix://{path}"),
        limits.storage.storage_from_string(f"rapidlimit+valkey+unix://{path}"),
    ]
    answers = [
        limits.strategies.FixedWindowRateLimiter(s).hit(item, "k") for s in stores
    ]
    assert answers == [True] * 5
    assert not limits.strategies.FixedWindowRateLimiter(stores[3]).hit(item, "k")
    for store in stores:
        assert isinstance(store, RapidlimitStorage)
        assert isinstance(store.native, _core.RedisStorage)
        assert store.check()


def test_scheme_errors_name_the_uri() -> None:
    for scheme in ("rapidlimit+rediss", "rapidlimit+valkeys"):
        uri = f"{scheme}://user:secret@127.0.0.1:6380/0"
        with pytest.raises(ValueError, match="TLS") as info:
            limits.storage.storage_from_string(uri)
        assert "127.0.0.1:6380" in str(info.value)
        assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="rapidlimit\\+redis\\+sentinel"):
        RapidlimitStorage("rapidlimit+redis+sentinel://127.0.0.1:26379")
    with pytest.raises(ValueError, match="rapidlimit\\+nowhere"):  # not memory
        RapidlimitStorage("rapidlimit+nowhere://127.0.0.1")
    with pytest.raises(limits.errors.ConfigurationError):  # not registered
        limits.storage.storage_from_string("rapidlimit+nowhere://127.0.0.1")
    with pytest.raises(ValueError, match="colour"):
        limits.storage.storage_from_string(
            "rapidlimit+redis://127.0.0.1:1", colour="blue"
        )


def test_redis_py_style_options(server: RedisServer) -> None:
    """What limits users pass in storage_options works: redis-py's timeouts
    are RedisStorage's, key_prefix too; options without a meaning for this
    client and limits' own flags are accepted."""
    storage = ours(
        server,
        socket_timeout=0.1,
        socket_connect_timeout=1,
        retry_on_timeout=True,
        health_check_interval=30,
        max_connections=20,
        decode_responses=True,
        key_prefix="myapp:",
        wrap_exceptions=True,
        implementation="redispy",
    )
    assert storage.wrap_exceptions
    lim = limits.strategies.FixedWindowRateLimiter(storage)
    assert lim.hit(limits.parse("1/minute"), "k")
    assert all(k.startswith("myapp:") for k in server.client().keys("*"))
    assert server.client().keys("*")

    # socket_timeout=0.1 bounds the wait: a slow Redis is an outage.
    with server.hold():
        started = time.monotonic()
        with pytest.raises(limits.errors.StorageError) as info:
            lim.hit(limits.parse("1/minute"), "other")
        assert time.monotonic() - started < 0.35
    assert isinstance(info.value.storage_error, _core.RedisUnavailableError)

    slow = ours(server, socket_timeout=2)  # and from the URI's query string
    fast = limits.storage.storage_from_string(
        f"rapidlimit+redis://127.0.0.1:{server.port}/0?timeout=2&key_prefix=q:"
    )
    for store in (slow, fast):
        assert limits.strategies.MovingWindowRateLimiter(store).hit(
            limits.parse("1/minute"), "k"
        )
    assert server.client().keys("q:*")


def test_prefix_without_colon_is_written_as_limits_writes_it(
    own_server: RedisServer,
) -> None:
    """limits writes key_prefix="myapp" as myapp:<key>, and Redis ACL key
    patterns are written for that (~myapp:*): the same prefix must not put
    rapidlimit's keys outside the user's pattern (every call refused,
    NOPERM)."""
    admin = own_server.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~myapp:*", "+@all")
    for prefix in ("myapp", "myapp:"):
        storage = limits.storage.storage_from_string(
            f"rapidlimit+redis://app:pw@127.0.0.1:{own_server.port}/0",
            key_prefix=prefix,
        )
        lim = limits.strategies.FixedWindowRateLimiter(storage)
        assert lim.hit(limits.parse("2/minute"), prefix)
        assert lim.get_window_stats(limits.parse("2/minute"), prefix).remaining == 1
        storage.close()
    keys = own_server.client().keys("*")
    assert len(keys) == 2 and all(k.startswith("myapp:") for k in keys), keys


# ------------------------------------------------------------ limits.aio


async def async_sequence(
    limiter: Any, clock: Clock, item: Any, steps: list[tuple[int, int]]
) -> list[Answer]:
    seen: list[Answer] = []
    for step, cost in steps:
        clock.tick(step)
        hit = await limiter.hit(item, "user", "scope", cost=cost)
        test = await limiter.test(item, "user", "scope")
        stats = await limiter.get_window_stats(item, "user", "scope")
        seen.append((hit, test, stats.remaining, stats.reset_time))
    await limiter.clear(item, "user", "scope")
    stats = await limiter.get_window_stats(item, "user", "scope")
    test = await limiter.test(item, "user", "scope")
    seen.append(("cleared", test, stats.remaining, 0))
    return seen


@pytest.mark.parametrize("strategy", CLEARED_NAMES)
def test_async_same_answers_as_limits_async_redis(
    server: RedisServer, clock: Clock, strategy: str
) -> None:
    item = limits.parse("4/minute")
    steps = MOVING_STEPS if strategy == "moving-window" else STEPS
    mine = ours(server, "async+rapidlimit+redis")
    assert isinstance(mine, AsyncRapidlimitStorage)
    assert isinstance(mine, limits.aio.storage.Storage)

    async def main() -> tuple[list[Answer], list[Answer]]:
        # Made on the loop: redis-py's pool creates an asyncio.Lock, which
        # Python 3.9 binds to the current event loop when it is created.
        reference = theirs(server, "async+redis", implementation="redispy")
        got = await async_sequence(ASYNC[strategy](mine), clock, item, steps)
        clock.now = T0
        expected = await async_sequence(ASYNC[strategy](reference), clock, item, steps)
        assert await mine.check()
        assert await mine.reset() is not None
        return got, expected

    got, expected = asyncio.run(main())
    assert got == approx_answers(expected, strategy)


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


class RefusingExecutor(concurrent.futures.ThreadPoolExecutor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the call must run on the event loop, not a thread")


@pytest.mark.parametrize("strategy", NAMES)
def test_async_redis_calls_run_on_the_loop_and_share_script_calls(
    server: RedisServer, strategy: str
) -> None:
    """The counting calls are awaited on the loop: no executor, no thread.
    Those a loop's tasks make together share script calls, and concurrent
    hits are counted exactly. clear and check (plain Redis commands) are
    awaited on the loop too: clear is one DEL, whatever the strategy."""
    item = limits.parse("20/minute")
    storage = ours(server, "async+rapidlimit+redis")
    executor = CountingExecutor(max_workers=2)

    async def main() -> tuple[list[bool], list[Any], list[bool]]:
        asyncio.get_running_loop().set_default_executor(executor)
        lim = ASYNC[strategy](storage)
        threads_before = threading.active_count()
        before = storage.native.stats()
        answers = await asyncio.gather(*(lim.hit(item, "k") for _ in range(50)))
        stats = await asyncio.gather(
            *(lim.get_window_stats(item, "k") for _ in range(10))
        )
        tests = await asyncio.gather(*(lim.test(item, "k") for _ in range(10)))
        after = storage.native.stats()
        assert executor.submitted == 0
        assert threading.active_count() == threads_before
        calls = after["calls"] - before["calls"]
        # Hits sent once the first answers came (a refusal) meet the
        # blocked-key cache instead of Redis.
        # The first stats after the hits take the last hit's answer: the
        # fixed window's get + get_expiry, the sliding window's one read (a
        # refused moving window's stats are read from the blocked-key
        # cache, counted in cache_hits).
        stats_calls = {"fixed-window": 2 * 10 - 2, "sliding-window-counter": 9}
        stats_calls = stats_calls.get(strategy, 10)
        expected = 50 + stats_calls + 10
        assert calls + after["cache_hits"] - before["cache_hits"] == expected
        assert (after["scripts"] - before["scripts"]) * 4 < calls
        server.reset_stats()
        await lim.clear(item, "k")
        assert server.command_calls().get("del") == 1
        assert await storage.check()
        assert executor.submitted == 0
        assert threading.active_count() == threads_before
        assert await lim.hit(item, "k")
        return list(answers), list(stats), list(tests)

    answers, stats, tests = asyncio.run(main())
    assert answers.count(True) == 20
    assert [s.remaining for s in stats] == [0] * 10
    assert not any(tests)
    storage.close()


def test_async_reset_is_awaited_on_the_loop(server: RedisServer) -> None:
    """limits.aio's reset on Redis: one SCAN of the keyspace for every
    strategy's keys, each page's keys removed by one UNLINK, all awaited on
    the loop (no executor, no thread). Another prefix's keys stay, and keys
    under the prefix that are no strategy's; what the process kept of the
    keys (the blocked-key cache) is forgotten."""
    import rapidlimit

    redis = server.client()
    redis.flushall()
    item = limits.parse("1/minute")
    storage = ours(server, "async+rapidlimit+redis")
    other = ours(server, "async+rapidlimit+redis", key_prefix="other")
    fixed = ASYNC["fixed-window"](storage)
    # More keys than one SCAN page (COUNT 1000) of the fixed window's.
    many = 1500

    async def main() -> tuple[int, dict[str, int], list[bool]]:
        asyncio.get_running_loop().set_default_executor(RefusingExecutor())
        await asyncio.gather(*(fixed.hit(item, f"k{i}") for i in range(many)))
        for name in NAMES:
            assert await ASYNC[name](storage).hit(item, "x")
        await storage.native.decide_many_async(
            "token-bucket", [(rapidlimit.parse("1/minute"), "x", 1)]
        )
        moving = ASYNC["moving-window"](storage)
        hits = storage.native.stats()["cache_hits"]
        assert [await moving.hit(item, "x") for _ in range(2)] == [False] * 2
        assert storage.native.stats()["cache_hits"] == hits + 1  # blocked
        assert await ASYNC["fixed-window"](other).hit(item, "k0")
        # "tw:" matches the scan's pattern but is no strategy's code.
        ours = next(k for k in redis.scan_iter(count=1000) if "fw:{k1}" in k)
        alien = ours.replace("fw:{k1}", "tw:{k1}")
        redis.set(alien, "x")
        assert redis.dbsize() == many + len(NAMES) + 1 + 1 + 1
        threads = threading.active_count()
        server.reset_stats()
        dropped = await storage.reset()
        calls = server.command_calls()
        assert threading.active_count() == threads
        assert redis.dbsize() == 2  # the other prefix's key and the alien
        assert redis.get(alien) == "x"
        again = [
            await moving.hit(item, "x"),
            await ASYNC["fixed-window"](other).hit(item, "k0"),
        ]
        return dropped, calls, again

    dropped, calls, again = asyncio.run(main())
    assert dropped == many + len(NAMES) + 1
    # The keyspace once for every strategy: 1,508 keys in two pages of
    # COUNT 1000, three should Redis be rehashing (a scan per strategy
    # takes at least five); one UNLINK per page that had keys.
    assert 2 <= calls["scan"] <= 3
    assert 2 <= calls["unlink"] <= calls["scan"]
    assert again == [True, False]
    storage.close()
    other.close()


@pytest.mark.parametrize("scheme", ["rapidlimit+redis", "async+rapidlimit+redis"])
def test_clear_is_one_command_for_every_strategy(
    server: RedisServer, scheme: str
) -> None:
    """limits' clear forgets a key's counter and moving window alike: one
    DEL, blocking or awaited (the states share a hash tag)."""
    item = limits.parse("1/minute")
    storage = ours(server, scheme)
    strategies = limits.aio.strategies if "async" in scheme else limits.strategies

    async def awaited(result: Any) -> Any:
        return await result if asyncio.iscoroutine(result) else result

    async def main() -> list[Any]:
        fixed = strategies.FixedWindowRateLimiter(storage)
        moving = strategies.MovingWindowRateLimiter(storage)
        seen = [await awaited(lim.hit(item, "k")) for lim in (fixed, moving) * 2]
        server.reset_stats()
        await awaited(storage.clear(item.key_for("k")))
        seen.append(server.command_calls().get("del"))
        seen.append(server.client().dbsize())
        seen += [await awaited(lim.hit(item, "k")) for lim in (fixed, moving)]
        return seen

    assert asyncio.run(main()) == [True, True, False, False, 1, 0, True, True]
    storage.close()


@pytest.mark.parametrize("policy", ["fail-open", "fallback"])
@pytest.mark.parametrize("strategy", NAMES)
def test_async_calls_get_the_policy_while_redis_is_down(
    own_server: RedisServer, strategy: str, policy: str
) -> None:
    # As the blocking calls: fail-open admits and reads nothing, fallback
    # counts in process; neither raises, and both recover with Redis.
    item = limits.parse("2/minute")
    storage = ours(own_server, "async+rapidlimit+redis", timeout=0.2, on_error=policy)
    lim = ASYNC[strategy](storage)

    async def main() -> tuple[list[bool], list[int]]:
        hits = [await lim.hit(item, "k") for _ in range(3)]
        remaining = [(await lim.get_window_stats(item, "k")).remaining]
        return hits, remaining

    async def recovered() -> bool:
        for _ in range(100):
            if await storage.check():
                return bool(await lim.hit(item, "k"))
            await asyncio.sleep(0.05)
        return False

    own_server.kill()
    hits, remaining = asyncio.run(main())
    if policy == "fallback":
        assert hits == [True, True, False]
        assert remaining == [0]
    else:
        assert hits == [True, True, True]
        assert remaining == [2]
    stats = storage.native.stats()
    # (The fixed window's stats read the last hit's answer.)
    assert stats[policy.replace("-", "_")] >= 3
    own_server.restart()
    assert asyncio.run(recovered())
    storage.close()


def test_async_memory_calls_stay_on_the_loop() -> None:
    item = limits.parse("2/minute")

    async def main() -> list[bool]:
        asyncio.get_running_loop().set_default_executor(RefusingExecutor())
        storage = limits.storage.storage_from_string("async+rapidlimit+memory://")
        answers = []
        for strategy in NAMES:
            lim = ASYNC[strategy](storage)
            answers += [await lim.hit(item, strategy) for _ in range(3)]
            await lim.get_window_stats(item, strategy)
            await lim.clear(item, strategy)
        assert await storage.check()
        return answers

    assert asyncio.run(main()) == [True, True, False] * 3


@pytest.mark.parametrize("strategy", NAMES)
def test_async_class_keeps_the_loop_free(server: RedisServer, strategy: str) -> None:
    """While Redis is held (0.3 s) an awaited hit waits for it, and the
    loop keeps running other tasks."""
    item = limits.parse("10/minute")
    storage = ours(server, "async+rapidlimit+redis", timeout=3.0)
    lim = ASYNC[strategy](storage)

    async def main() -> tuple[bool, float, int]:
        assert await lim.hit(item, "a")  # connected and warm
        with await asyncio.to_thread(server.hold) as held:
            ticker = Ticker()
            started = time.monotonic()
            asyncio.get_running_loop().call_later(0.3, held.release)
            allowed = await lim.hit(item, "a")
            waited = time.monotonic() - started
            await ticker.stop()
        return allowed, waited, ticker.ticks

    allowed, waited, ticks = asyncio.run(main())
    assert allowed
    assert waited >= 0.15  # the hit really waited for Redis
    assert ticks >= 8  # ... and the loop kept ticking meanwhile


# --------------------------------------------------------- unchanged slowapi


def slowapi_app(
    uri: str, strategy: str = "fixed-window", **kwargs: Any
) -> tuple[FastAPI, Any]:
    """An ordinary slowapi application; only storage_uri names our scheme.
    /r has a decorator limit, /d the default limit through the middleware."""
    limiter = slowapi.Limiter(
        key_func=slowapi.util.get_remote_address,
        default_limits=["2/minute"],
        storage_uri=uri,
        strategy=strategy,
        **{"headers_enabled": True, **kwargs},
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(
        slowapi.errors.RateLimitExceeded,
        slowapi._rate_limit_exceeded_handler,  # type: ignore[arg-type]
    )
    app.add_middleware(slowapi.middleware.SlowAPIMiddleware)

    @app.get("/r")
    @limiter.limit("3/minute")
    async def limited(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/d")
    async def default(request: Request) -> PlainTextResponse:
        return PlainTextResponse("default")

    return app, limiter


HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def run_requests(client: TestClient) -> list[Answer]:
    """On a frozen clock: limits' redis:// fixed window reads the key's TTL
    on the real clock and adds time.time()."""
    seen: list[Answer] = []
    for path in ["/r"] * 4 + ["/d"] * 3:
        response = client.get(path)
        headers = response.headers
        seen.append(
            (
                path,
                response.status_code,
                headers["x-ratelimit-limit"],
                headers["x-ratelimit-remaining"],
                int(headers["retry-after"]),
                float(headers["x-ratelimit-reset"]),
            )
        )
    return seen


@pytest.mark.parametrize("strategy", NAMES)
def test_unchanged_slowapi_app_as_with_limits_redis(
    server: RedisServer, clock: Clock, strategy: str
) -> None:
    app, limiter = slowapi_app(
        f"rapidlimit+redis://127.0.0.1:{server.port}/0", strategy
    )
    assert isinstance(limiter._storage, RapidlimitStorage)
    got = run_requests(TestClient(app))
    reference, _ = slowapi_app(f"redis://127.0.0.1:{server.port}/1", strategy)
    expected = run_requests(TestClient(reference))
    assert [a[:4] for a in got] == [a[:4] for a in expected]
    assert [a[1] for a in got] == [200, 200, 200, 429, 200, 200, 429]
    assert [a[3] for a in got] == ["2", "1", "0", "0", "1", "0", "0"]
    if strategy == "sliding-window-counter":
        # Retry-After is whole seconds of that reset: up to whole windows.
        for mine, ref in zip(got, expected):
            assert mine[5] == ModuloWindow(ref[5], 60)
            assert mine[4] % 60 in (ref[4] % 60, (ref[4] + 1) % 60, (ref[4] - 1) % 60)
    else:
        assert [a[:4] for a in got] == [a[:4] for a in expected]
        assert [a[5] for a in got] == [pytest.approx(a[5], abs=0.1) for a in expected]
        assert [a[4] for a in got] == [pytest.approx(a[4], abs=1) for a in expected]
        # One minute from the first hit, on X-RateLimit-Reset's "1 +".
        assert [a[5] for a in got] == [pytest.approx(T0 + 61, abs=0.01)] * 7
        assert all(a[4] in (60, 61) for a in got)


@pytest.mark.parametrize(
    ("strategy", "scripts"),
    [
        ("fixed-window", [1] * 7),
        # A refused moving window's stats are read from the blocked-key
        # cache.
        ("moving-window", [1] * 7),
        ("sliding-window-counter", [1] * 7),
    ],
)
def test_slowapi_with_headers_reads_the_hits_answer(
    server: RedisServer, clock: Clock, strategy: str, scripts: list[int]
) -> None:
    # slowapi reads the window's stats right after the hit for its headers,
    # allowed or refused: the hit's own answer gives them, so a fixed-window
    # request costs one script call, as the native Limiter's; a sliding
    # or moving window too.
    app, _ = slowapi_app(f"rapidlimit+redis://127.0.0.1:{server.port}/0", strategy)
    client = TestClient(app)
    client.get("/r")  # connected, script loaded
    server.client().flushall()
    server.reset_stats()
    got = run_requests(client)
    assert [a[1] for a in got] == [200, 200, 200, 429, 200, 200, 429]
    assert [a[3] for a in got] == ["2", "1", "0", "0", "1", "0", "0"]
    calls = server.command_calls()
    assert calls.get("evalsha", 0) + calls.get("eval", 0) == sum(scripts), calls


def test_stats_after_an_incr_come_from_it_once(
    own_server: RedisServer, clock: Clock
) -> None:
    server = own_server
    mine = ours(server)
    other = ours(server)  # another process counting on the same key
    server.reset_stats()
    assert mine.incr("k", 60) == 1
    assert other.incr("k", 60) == 2
    # The reads right after an incr give that incr's answer, without Redis,
    # once each (the first from another thread: slowapi reads a 429's
    # headers in the thread pool); then Redis again.
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(mine.get("k")))
    reader.start()
    reader.join()
    assert (seen, mine.get_expiry("k")) == ([1], T0 + 60)
    assert server.command_calls()["evalsha"] == 2
    assert (mine.get("k"), mine.get_expiry("k")) == (2, T0 + 60)
    assert server.command_calls()["evalsha"] == 4
    # Not another key's, nor after a clear or past the window's end.
    mine.incr("k", 60)
    assert mine.get("j") == 0
    mine.clear("k")
    assert mine.get("k") == 0
    mine.incr("k", 60)
    clock.tick(61)
    assert (mine.get("k"), mine.get_expiry("k")) == (0, T0 + 61)
    # Nor when the incr failed: the reads meet the policy too.
    mine.incr("k", 60)
    server.kill()
    with pytest.raises(_core.RedisUnavailableError):
        mine.incr("k", 60)
    with pytest.raises(_core.RedisUnavailableError):
        mine.get("k")
    mine.close()
    other.close()


def test_moving_window_after_an_acquire_comes_from_it_once(
    server: RedisServer, clock: Clock
) -> None:
    mine = ours(server, key_prefix="mw-once")
    other = ours(server, key_prefix="mw-once")
    assert mine.acquire_entry("m", 3, 60)
    clock.tick(1)
    assert other.acquire_entry("m", 3, 60)
    # The acquire's answer once (Redis holds two entries by then), then Redis.
    assert mine.get_moving_window("m", 3, 60) == (T0, 1)
    assert mine.get_moving_window("m", 3, 60) == (T0, 2)
    # Only for the same limit and window; also from the acquire that
    # filled the window (which leaves `limit` entries: no more are kept).
    assert mine.acquire_entry("m", 3, 60)
    server.reset_stats()
    assert mine.get_moving_window("m", 3, 60) == (T0, 3)
    assert "evalsha" not in server.command_calls()
    assert mine.get_moving_window("m", 4, 60) == (T0, 3)
    # A full window's decision does not say how many it holds; a later read
    # does not get an earlier acquire's answer either.
    assert not mine.acquire_entry("m", 3, 60)
    assert mine.get_moving_window("m", 3, 60) == (T0, 3)
    # Nor once its oldest entry has left the window.
    mine.clear("m")
    assert mine.acquire_entry("m", 3, 60)
    clock.tick(60)
    assert mine.get_moving_window("m", 3, 60) == (T0 + 61, 0)
    mine.close()
    other.close()


def test_sliding_window_after_an_acquire_comes_from_it_once(
    server: RedisServer, clock: Clock
) -> None:
    mine = ours(server, key_prefix="sw-once")
    other = ours(server, key_prefix="sw-once")
    uncached = ours(server, key_prefix="sw-once", blocked_cache=False)
    # T0 lies 0.001 s into a 10 s window.
    assert mine.acquire_sliding_window_entry("s", 3, 10)
    clock.tick(2.5)
    assert other.acquire_sliding_window_entry("s", 3, 10)
    server.reset_stats()
    # The acquire's answer once, its ttls shortened by the time since
    # (Redis holds two hits by then), then Redis.
    assert mine.get_sliding_window("s", 10) == (0, 0.0, 1, pytest.approx(17.499))
    assert "evalsha" not in server.command_calls()
    assert mine.get_sliding_window("s", 10) == uncached.get_sliding_window("s", 10)
    assert mine.get_sliding_window("s", 10)[2] == 2
    # Into the next window, the previous window's hits weigh by the time
    # left: what Redis reads, a second later too.
    clock.tick(10)
    assert mine.acquire_sliding_window_entry("s", 3, 10)
    clock.tick(1)
    expected = uncached.get_sliding_window("s", 10)
    assert expected[:3] == (2, pytest.approx(6.499), 1)
    assert mine.get_sliding_window("s", 10) == pytest.approx(expected)
    # Not past the window's end, nor for another window's length.
    assert mine.acquire_sliding_window_entry("s", 3, 10)
    assert mine.get_sliding_window("s", 60) == uncached.get_sliding_window("s", 60)
    clock.tick(7)
    assert mine.get_sliding_window("s", 10) == uncached.get_sliding_window("s", 10)
    assert mine.get_sliding_window("s", 10)[:3] == (2, pytest.approx(9.499), 0)
    for storage in (mine, other, uncached):
        storage.close()


def test_two_slowapi_apps_share_limits_through_redis(server: RedisServer) -> None:
    uri = f"rapidlimit+redis://127.0.0.1:{server.port}/0"
    one = TestClient(slowapi_app(uri)[0])
    two = TestClient(slowapi_app(uri)[0])  # another instance, same Redis
    codes = [c.get("/r").status_code for c in (one, two, one, two, one)]
    assert codes == [200, 200, 200, 429, 429]
    assert [c.get("/d").status_code for c in (two, one, two)] == [200, 200, 429]
    response = one.get("/d")
    assert response.status_code == 429
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert int(response.headers["retry-after"]) > 0


def test_close_releases_the_connections(server: RedisServer) -> None:
    """A slowapi app done before the process (an app per test, kept by
    FastAPI's caches) releases the native store's connections and I/O
    threads through ``limiter._storage.close()``; the storage then answers
    as during an outage."""
    uri = f"rapidlimit+redis://127.0.0.1:{server.port}/0"
    app, limiter = slowapi_app(uri, storage_options={"pool_size": 2})
    sync = RapidlimitStorage(uri)
    asynchronous = AsyncRapidlimitStorage(f"async+{uri}")
    with TestClient(app) as client:
        assert client.get("/r").status_code == 200
    assert sync.incr("k", 60) == 1
    assert asyncio.run(asynchronous.incr("k", 60)) == 2
    threads = len(os.listdir("/proc/self/task"))
    clients = len(server.client().client_list())
    assert clients >= 4 + 1
    storage = limiter._storage
    assert isinstance(storage, RapidlimitStorage)
    for store in (storage, sync, asynchronous):
        store.close()
        store.close()
    assert len(server.client().client_list()) <= clients - 4
    assert len(os.listdir("/proc/self/task")) <= threads - 4  # one per connection
    assert not storage.check()
    with pytest.raises(_core.RedisUnavailableError):
        sync.incr("k", 60)


# ------------------------------------------------------------------ outage


def outage_app(srv: RedisServer, **kwargs: Any) -> TestClient:
    app, _ = slowapi_app(
        f"rapidlimit+redis://127.0.0.1:{srv.port}/0",
        storage_options={"timeout": 0.1, **kwargs.pop("storage_options", {})},
        **kwargs,
    )
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def quiet_slowapi() -> Iterator[None]:
    """slowapi logs the swallowed tracebacks."""
    logger = logging.getLogger("slowapi")
    was = logger.disabled
    logger.disabled = True
    yield
    logger.disabled = was


def test_outage_raises_for_limits_and_check_is_false(
    own_server: RedisServer,
) -> None:
    plain = ours(own_server, timeout=0.1)
    wrapped = ours(own_server, timeout=0.1, wrap_exceptions=True)
    assert [plain.incr("k", 60), wrapped.incr("k", 60)] == [1, 2]
    own_server.kill()
    with pytest.raises(_core.RedisUnavailableError):
        plain.incr("k", 60)
    assert _core.RedisUnavailableError in plain.base_exceptions
    for call in (
        lambda s: s.incr("k", 60),
        lambda s: s.get("k"),
        lambda s: s.get_expiry("k"),
        lambda s: s.acquire_entry("m", 5, 60),
        lambda s: s.get_moving_window("m", 5, 60),
        lambda s: s.acquire_sliding_window_entry("s", 5, 60),
        lambda s: s.get_sliding_window("s", 60),
    ):
        with pytest.raises(limits.errors.StorageError):
            call(wrapped)
        # check() answers False, even right after a failed call
        assert plain.check() is False
        assert wrapped.check() is False
    # As limits' own RedisStorage (redis-py's error): a clear or reset
    # Redis did not confirm must not pass for done.
    for admin in (lambda s: s.clear("k"), lambda s: s.reset()):
        with pytest.raises(_core.RedisUnavailableError):
            admin(plain)
        with pytest.raises(limits.errors.StorageError):
            admin(wrapped)

    async def check_async() -> bool:
        store = ours(own_server, "async+rapidlimit+redis", timeout=0.1)
        with pytest.raises(_core.RedisUnavailableError):
            await store.incr("k", 60)
        result: bool = await store.check()
        return result

    assert asyncio.run(check_async()) is False

    own_server.restart()
    deadline = time.monotonic() + 5
    while not plain.check() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert plain.check()
    assert plain.incr("k", 60) == 1  # the restarted server is empty


# (our scheme, limits' own scheme for the same server, options): limits'
# own storage raises its client library's errors, redis-py's, valkey-py's
# or, for limits.aio, coredis' unless `implementation` names another.
VALKEY = needs_limits_5("no valkey:// in every limits 4")
CLIENT_LIBRARIES = [
    ("rapidlimit+redis", "redis", {}),
    pytest.param("rapidlimit+valkey", "valkey", {}, marks=VALKEY),
    ("async+rapidlimit+redis", "async+redis", {}),
    ("async+rapidlimit+redis", "async+redis", {"implementation": "redispy"}),
    pytest.param("async+rapidlimit+valkey", "async+valkey", {}, marks=VALKEY),
]


# A call of each kind the store answers (incr, a moving window's entry, a
# sliding window's read), sync or limits.aio.
COUNTING_CALLS: tuple[Callable[[Any], Any], ...] = (
    lambda s: s.incr("k", 60),
    lambda s: s.acquire_entry("m", 5, 60),
    lambda s: s.get_sliding_window("s", 60),
)


def _raised(
    loop: asyncio.AbstractEventLoop, storage: Any, call: Callable[[Any], Any]
) -> BaseException:
    """What ``call(storage)`` raises, awaited on ``loop`` for a limits.aio
    storage (one loop for all: coredis keeps its connections to one)."""
    try:
        result = call(storage)
        if asyncio.iscoroutine(result):
            loop.run_until_complete(result)
    except Exception as e:
        return e
    raise AssertionError(f"{storage!r}: no exception")


@pytest.mark.parametrize(("scheme", "their_scheme", "options"), CLIENT_LIBRARIES)
def test_errors_are_also_the_client_librarys_as_limits_raises_them(
    own_server: RedisServer, scheme: str, their_scheme: str, options: dict[str, Any]
) -> None:
    # Code written for limits' own storage catches its client library's
    # classes: a key Redis refuses raises its ResponseError, an outage its
    # ConnectionError. Ours are instances of the same classes (the library
    # is loaded: limits' storage imported it), and RedisUnavailableErrors.
    redis = own_server.client()
    loop = asyncio.new_event_loop()
    # The current loop: on Python 3.9 redis-py's asyncio pool makes an
    # asyncio.Lock when limits' storage is made, which looks it up.
    asyncio.set_event_loop(loop)
    mine = ours(own_server, scheme, timeout=0.2, **options)
    # On database 0, as ours.
    their = limits.storage.storage_from_string(
        f"{their_scheme}://127.0.0.1:{own_server.port}/0", **options
    )
    refused: list[BaseException] = []
    for storage in (their, mine):
        redis.flushall()
        first = storage.incr("k", 60)
        if asyncio.iscoroutine(first):
            loop.run_until_complete(first)
        (key,) = redis.keys("*")
        redis.delete(key)
        redis.rpush(key, "app data")
        refused.append(_raised(loop, storage, lambda s: s.incr("k", 60)))
    their_refusal, my_refusal = refused
    library = sys.modules[type(their_refusal).__module__]  # its exceptions
    assert isinstance(their_refusal, library.ResponseError)
    assert isinstance(my_refusal, library.ResponseError)
    assert isinstance(my_refusal, _core.RedisUnavailableError)
    assert "WRONGTYPE" in str(my_refusal) and "WRONGTYPE" in repr(my_refusal)
    # The attributes the library's __init__ sets (redis-py's status_code...)
    assert set(vars(their_refusal)) <= set(dir(my_refusal))
    own_server.kill()
    their_outage = _raised(loop, their, lambda s: s.incr("k", 60))
    assert isinstance(their_outage, library.ConnectionError)
    assert not isinstance(their_outage, _core.RedisUnavailableError)
    for call in (*COUNTING_CALLS, lambda s: s.clear("k"), lambda s: s.reset()):
        outage = _raised(loop, mine, call)
        assert isinstance(outage, library.ConnectionError), type(outage).__mro__
        assert isinstance(outage, _core.RedisUnavailableError)
        assert not isinstance(outage, library.ResponseError)
        assert "redis" in repr(outage)
        assert set(vars(their_outage)) <= set(dir(outage))
        copy = pickle.loads(pickle.dumps(outage))
        assert isinstance(copy, _core.RedisUnavailableError)
        assert str(copy) == str(outage)
    mine.close()
    asyncio.set_event_loop(None)
    loop.close()


# The exceptions module of the library limits' own storage uses, by the
# scheme and options of CLIENT_LIBRARIES.
def _library_of(their_scheme: str, options: dict[str, Any]) -> Any:
    name = their_scheme.removeprefix("async+")
    if their_scheme.startswith("async+") and name == "redis":
        name = "redis" if options.get("implementation") == "redispy" else "coredis"
    return importlib.import_module(f"{name}.exceptions")


@pytest.mark.parametrize(("scheme", "their_scheme", "options"), CLIENT_LIBRARIES)
def test_a_reply_missing_its_timeout_raises_the_librarys_timeout_error(
    own_server: RedisServer, scheme: str, their_scheme: str, options: dict[str, Any]
) -> None:
    # A Redis that accepts and never answers (held: stopped) makes limits'
    # own storage raise its client's TimeoutError at the socket timeout, not
    # its ConnectionError; ours raise the same class at the command timeout.
    library = _library_of(their_scheme, options)
    loop = asyncio.new_event_loop()
    if not their_scheme.startswith("async+"):
        their = theirs(own_server, their_scheme, socket_timeout=0.2)
        their.incr("k", 60)
        with own_server.hold():
            their_timeout = _raised(loop, their, lambda s: s.incr("k", 60))
        if sys.version_info >= (3, 10):
            # (On 3.9 socket.timeout is no builtin TimeoutError, and
            # redis-py 7 raises its ConnectionError for it there.)
            assert isinstance(their_timeout, library.TimeoutError)
            assert not isinstance(their_timeout, library.ConnectionError)
    for call in COUNTING_CALLS:
        # A connection up and idle, which the next call finds hung.
        mine = ours(own_server, scheme, timeout=0.2, **options)
        warm = mine.get("k")
        if asyncio.iscoroutine(warm):
            loop.run_until_complete(warm)
        with own_server.hold():
            timeout = _raised(loop, mine, call)
        assert isinstance(timeout, library.TimeoutError), type(timeout).__mro__
        assert isinstance(timeout, _core.RedisUnavailableError)
        assert not isinstance(timeout, library.ConnectionError)
        assert "within the command timeout" in str(timeout)
        assert "within the command timeout" in repr(timeout)
        mine.close()
    loop.close()


def test_an_error_never_imports_a_client_library(own_server: RedisServer) -> None:
    # Only code that has loaded a client library can catch its classes: the
    # adapter does not import one to raise its errors (a plain
    # RedisUnavailableError then).
    own_server.kill()
    code = f"""
import sys, limits.storage, rapidlimit.contrib.limits
from rapidlimit import _core
storage = limits.storage.storage_from_string(
    "rapidlimit+redis://127.0.0.1:{own_server.port}", timeout=0.1)
try:
    storage.incr("k", 60)
except _core.RedisUnavailableError as e:
    assert type(e) is _core.RedisUnavailableError, type(e).__mro__
loaded = [m for m in ("redis", "valkey", "coredis") if m in sys.modules]
assert not loaded, loaded
print("plain")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "plain", done.stderr


@pytest.mark.parametrize("strategy", NAMES)
def test_a_key_of_another_type_raises_for_that_call_alone(
    server: RedisServer, strategy: str
) -> None:
    # limits' own RedisStorage raises Redis's WRONGTYPE error for a key an
    # application filled with another type of value. Here the call raises
    # a RedisUnavailableError (the fail-closed policy, limits'
    # StorageError when wrapped) naming Redis's error and the key, leaves
    # the value alone, and other keys count as before.
    redis = server.client()
    for wrapped in (False, True):
        redis.flushall()
        storage = ours(server, wrap_exceptions=wrapped)
        limiter = SYNC[strategy](storage)
        item = limits.parse("2/minute")
        assert limiter.hit(item, "bad")
        (key,) = redis.keys("*")
        redis.delete(key)
        redis.rpush(key, "app data")
        expected: type[Exception] = (
            limits.errors.StorageError if wrapped else _core.RedisUnavailableError
        )
        for call in (limiter.hit, limiter.test, limiter.get_window_stats):
            with pytest.raises(expected) as raised:
                call(item, "bad")
            error = str(getattr(raised.value, "storage_error", raised.value))
            assert "WRONGTYPE" in error and key in error, error
        assert redis.lrange(key, 0, -1) == ["app data"]
        assert [limiter.hit(item, "good") for _ in range(3)] == [True, True, False]
        storage.close()


def test_slowapi_swallow_errors_with_fail_open(
    own_server: RedisServer, quiet_slowapi: None
) -> None:
    """swallow_errors=True: with the storage's fail-open policy every request
    passes during the outage, with headers and without a 500."""
    client = outage_app(
        own_server, swallow_errors=True, storage_options={"on_error": "fail-open"}
    )
    assert client.get("/r").status_code == 200
    own_server.kill()
    responses = [client.get(path) for path in ["/r", "/d"] * 4]
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.headers["x-ratelimit-limit"] in ("2", "3") for r in responses)
    assert not ours(own_server, timeout=0.1).check()


def test_slowapi_swallow_errors_with_fallback_policy(
    own_server: RedisServer, quiet_slowapi: None
) -> None:
    """on_error="fallback": the storage counts in process meanwhile."""
    client = outage_app(
        own_server, swallow_errors=True, storage_options={"on_error": "fallback"}
    )
    own_server.kill()
    codes = [client.get("/r").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]


def test_slowapi_swallow_errors_fail_closed_as_with_limits_redis(
    own_server: RedisServer, quiet_slowapi: None
) -> None:
    """With the default fail-closed policy the outage reaches slowapi as an
    exception, exactly as limits' own redis:// does: the same status codes
    (slowapi 0.1.10 answers 500 there itself: after swallowing the error it
    reads request.state.view_rate_limit, which was never set)."""
    mine = outage_app(own_server, swallow_errors=True)
    app, _ = slowapi_app(
        f"redis://127.0.0.1:{own_server.port}/1",
        swallow_errors=True,
        storage_options={"socket_timeout": 0.1},
    )
    reference = TestClient(app, raise_server_exceptions=False)
    assert mine.get("/r").status_code == reference.get("/r").status_code == 200
    own_server.kill()
    paths = ["/r", "/d", "/r"]
    assert [mine.get(p).status_code for p in paths] == [
        reference.get(p).status_code for p in paths
    ]


def test_slowapi_in_memory_fallback_when_redis_is_down(
    own_server: RedisServer, quiet_slowapi: None
) -> None:
    """The fail-closed outage reaches slowapi as an exception, so its
    in_memory_fallback counts afresh in process (3/minute on /r)."""
    client = outage_app(own_server, in_memory_fallback_enabled=True)
    assert client.get("/r").status_code == 200
    own_server.kill()
    codes = [client.get("/r").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert not ours(own_server, timeout=0.1).check()


@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter"])
def test_slowapi_refusal_from_the_cache_keeps_its_headers_when_redis_is_down(
    own_server: RedisServer, quiet_slowapi: None, strategy: str, clock: Clock
) -> None:
    """A client the blocked-key cache holds as over its limit is refused
    without Redis while it is down; slowapi then reads that refusal's
    headers with a second call, which must answer from the same cached
    state, not raise the fail-closed error (a 500: slowapi re-raises it
    after its in-memory fallback filled the headers)."""
    client = outage_app(own_server, strategy=strategy, in_memory_fallback_enabled=True)
    first = [client.get("/r") for _ in range(4)]
    assert [r.status_code for r in first] == [200, 200, 200, 429]
    own_server.kill()
    for _ in range(3):
        response = client.get("/r")
        assert response.status_code == 429
        for name in HEADERS:
            assert response.headers[name] == first[-1].headers[name], name
        assert int(response.headers["retry-after"]) > 0


def test_starlette_app_without_middleware(server: RedisServer) -> None:
    """The plainest slowapi setup: Starlette, a decorator, no middleware."""
    limiter = slowapi.Limiter(
        key_func=slowapi.util.get_remote_address,
        storage_uri=f"rapidlimit+redis://127.0.0.1:{server.port}/0",
        strategy="moving-window",
    )

    @limiter.limit("2/minute")
    async def view(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", view)])
    app.state.limiter = limiter
    app.add_exception_handler(
        slowapi.errors.RateLimitExceeded,
        slowapi._rate_limit_exceeded_handler,  # type: ignore[arg-type]
    )
    client = TestClient(app)
    assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]


def test_a_connection_pool_is_refused_not_ignored(server: RedisServer) -> None:
    """limits counts where the pool points (server and db); ignored, the
    counts would land where the URI points instead."""
    import redis

    pool = redis.ConnectionPool(port=server.port, db=3)
    with pytest.raises(ValueError, match="connection_pool.*storage URI"):
        ours(server, connection_pool=pool)
    pool.disconnect()


@pytest.mark.parametrize("scheme", ["rapidlimit+memory", "rapidlimit+redis"])
def test_a_fixed_window_longer_than_100_years_is_refused(
    server: RedisServer, scheme: str
) -> None:
    """As the other windows are (it overflowed: every hit admitted on memory,
    an error per hit on Redis)."""
    uri = "rapidlimit+memory://" if scheme == "rapidlimit+memory" else None
    storage = limits.storage.storage_from_string(uri) if uri else ours(server)
    limiter = limits.strategies.FixedWindowRateLimiter(storage)
    with pytest.raises(ValueError, match="expiry must be"):
        limiter.hit(limits.parse("2/297 years"), "k")
    assert limiter.hit(limits.parse("2/99 years"), "k")
