"""decide_many_async: awaited without blocking the event loop, pipelined,
exact under concurrency, answered in process for blocked keys."""

from __future__ import annotations

import asyncio
import gc
import os
import time
import weakref

import pytest

from conftest import Ticker
from rapidlimit import _core, parse
from rapidlimit.storage import RedisStorage
from rapidlimit.strategies import STRATEGIES
from redis_server import RedisServer

T0 = 1_700_000_000.5


@pytest.fixture(autouse=True)
def _uses_server(server: RedisServer) -> None:
    """Every test here needs the server (emptied by conftest)."""


async def test_async_matches_sync(server: RedisServer) -> None:
    store = RedisStorage(server.uri, blocked_cache=False)
    item = parse("3/minute")
    for name in sorted(STRATEGIES):
        limiter = STRATEGIES[name](store)
        got = [
            tuple((await store.decide_many_async(name, [(item, "a", 1)], now=T0))[0])
            for _ in range(4)
        ]
        assert [d[0] for d in got] == [True, True, True, False], name
        # The same limiter object may name the strategy.
        tested = await store.decide_many_async(limiter, [(item, "a", 1)], T0, True)
        assert tested[0].allowed is False
        assert tuple(limiter.decide_many([(item, "a", 1)], now=T0)[0]) == got[3]
    store.close()


async def test_64_concurrent_requests_exact_and_pipelined(server: RedisServer) -> None:
    store = RedisStorage(server.uri, timeout=2.0)
    item = parse("500/hour")
    other = parse("100000/hour")

    async def one(i: int) -> bool:
        decisions = await store.decide_many_async(
            "moving-window", [(other, "x", 1), (item, "x", 1)], now=T0 + i * 1e-6
        )
        return decisions[-1].allowed

    results: list[bool] = []
    for _ in range(20):  # 20 waves of 64 concurrent requests
        results += await asyncio.gather(*(one(len(results) + i) for i in range(64)))
    assert sum(results) == 500
    stats = store.stats()
    # One call per request: the wide limit is charged in Redis even when
    # the narrow one is known blocked (then only the wide one is sent).
    assert stats["calls"] == 64 * 20
    assert stats["cache_hits"] > 0
    assert stats["writes"] < stats["calls"]  # batched
    assert stats["scripts"] < stats["calls"]  # waiting requests share calls
    assert stats["inline_calls"] == 0  # the loop never blocks on a socket
    store.close()


async def test_batches_persist_across_waves_of_awaits(server: RedisServer) -> None:
    """64 tasks, each awaiting one decision after another: the replies read
    together resume their tasks in one loop turn and the tasks' next
    decisions leave together. Batches used to decay to about one decision
    per script (the first of a turn sent alone, its reply alone)."""
    store = RedisStorage(server.uri, timeout=2.0)
    item = parse("1000000/hour")

    async def task(i: int) -> None:
        for j in range(25):
            await store.decide_many_async(
                "fixed-window", [(item, f"t{i}", 1)], now=T0 + j * 1e-3
            )

    await asyncio.gather(*(task(i) for i in range(64)))
    stats = store.stats()
    assert stats["decisions"] == 64 * 25
    # 16 to 32 per script here; under 8 when a lone decision is started at
    # once, about 1.3 before replies read together woke the loop once.
    assert stats["decisions"] >= 10 * stats["scripts"], stats
    store.close()


async def test_loop_keeps_serving_while_redis_is_slow(server: RedisServer) -> None:
    store = RedisStorage(server.uri, timeout=0.2, on_error="fail-open")
    item = parse("10/second")
    assert (await store.decide_many_async("fixed-window", [(item, "a", 1)]))[0].allowed
    ticker = Ticker(0.005)
    with await asyncio.to_thread(server.hold) as held:
        start = time.monotonic()
        before = ticker.ticks
        decisions = await store.decide_many_async("fixed-window", [(item, "a", 1)])
        waited = time.monotonic() - start
        during = ticker.ticks - before
        assert held.held  # answered by the timeout, not by Redis
    assert decisions[0].allowed  # fail-open
    # The 0.2 s timeout; the I/O thread's idle wake-up, a second, would be
    # far above the bound, which leaves room for a busy CI machine.
    assert 0.15 < waited < 0.7
    assert during >= 10  # the loop ran other tasks meanwhile
    assert store.stats()["timeouts"] >= 1
    await ticker.stop()
    store.close()


async def test_fail_closed_raises_with_retry_after(server: RedisServer) -> None:
    store = RedisStorage(
        server.uri, timeout=0.1, on_error="fail-closed", fail_closed_retry_after=7
    )
    item = parse("10/second")
    with await asyncio.to_thread(server.hold):
        with pytest.raises(_core.RedisUnavailableError) as info:
            await store.decide_many_async("token-bucket", [(item, "a", 1)])
        assert info.value.retry_after == 7.0
        with pytest.raises(_core.RedisUnavailableError):
            store.decide_many("token-bucket", [(item, "a", 1)])
    store.close()


async def test_blocked_key_is_answered_without_redis(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    item = parse("1/minute")
    assert (await store.decide_many_async("fixed-window", [(item, "a", 1)], T0))[
        0
    ].allowed
    first = (await store.decide_many_async("fixed-window", [(item, "a", 1)], T0))[0]
    assert not first.allowed
    server.reset_stats()
    future = store.decide_many_async("fixed-window", [(item, "a", 1)], T0 + 1)
    assert future.done()  # decided before it is awaited
    later = (await future)[0]
    assert not later.allowed
    assert later.reset_time == first.reset_time
    assert later.retry_after == pytest.approx(first.retry_after - 1)
    assert "evalsha" not in server.command_calls()
    store.close()


async def test_cancelled_and_abandoned_futures(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    item = parse("100/second")
    futures = [
        store.decide_many_async("sliding-window-counter", [(item, "a", 1)])
        for _ in range(50)
    ]
    for f in futures[::2]:
        f.cancel()
    done = await asyncio.gather(*futures[1::2])
    assert all(d[0].allowed for d in done)
    # Later calls are unaffected.
    assert (await store.decide_many_async("fixed-window", [(item, "b", 1)]))[0].allowed
    store.close()


async def test_a_loop_stalled_before_its_flush_times_nothing_out(
    server: RedisServer,
) -> None:
    """The loop sends what it queued at the end of its iteration; an
    iteration held up past the timeout (a full garbage collection of a big
    heap, a handler computing on the loop) has kept Redis waiting for
    nothing: the timeout counts from the send."""
    store = RedisStorage(server.uri, timeout=0.2, on_error="fail-closed")
    item = parse("10/second")
    future = store.decide_many_async("fixed-window", [(item, "a", 1)])
    time.sleep(0.5)  # blocks the loop
    assert (await future)[0].allowed
    stats = store.stats()
    assert stats["timeouts"] == 0, stats
    assert stats["loop_writes"] >= 1, stats
    store.close()


async def test_a_loop_stalled_before_reading_its_replies_times_nothing_out(
    server: RedisServer,
) -> None:
    """Replies that came in time but wait unread behind a stalled loop are
    read, not timed out, by the I/O thread's periodic pass (at least one a
    second) that finds their deadline past."""
    store = RedisStorage(server.uri, timeout=0.3, on_error="fail-closed")
    item = parse("10/second")
    future = store.decide_many_async("fixed-window", [(item, "a", 1)])
    await asyncio.sleep(0)  # the loop's flush sends it
    assert store.stats()["loop_writes"] == 1
    time.sleep(1.3)  # blocks the loop past the deadline and a periodic pass
    assert (await future)[0].allowed
    stats = store.stats()
    assert stats["timeouts"] == 0, stats
    assert stats["disconnects"] == 0, stats
    store.close()


def test_needs_a_running_loop(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        store.decide_many_async("fixed-window", [(parse("1/second"), "a", 1)])
    store.close()


def test_many_loops_one_after_another(server: RedisServer) -> None:
    """Each asyncio.run gets its own loop (and completion channel)."""
    store = RedisStorage(server.uri)
    item = parse("1000/minute")

    async def go() -> bool:
        return (await store.decide_many_async("fixed-window", [(item, "a", 1)]))[
            0
        ].allowed

    assert all(asyncio.run(go()) for _ in range(30))
    store.close()


def test_loops_closed_with_decisions_in_flight_are_released(
    server: RedisServer,
) -> None:
    """A loop closed before its answers were read (pytest-asyncio's loop per
    test, asyncio.run cancelling a task that awaits Redis) leaves neither
    itself nor its completion eventfd behind."""
    store = RedisStorage(server.uri)
    item = parse("1000000/minute")

    async def go() -> bool:
        return (await store.decide_many_async("fixed-window", [(item, "a", 1)]))[
            0
        ].allowed

    async def abandon() -> None:
        for _ in range(3):
            store.decide_many_async("fixed-window", [(item, "a", 1)])

    assert asyncio.run(go())
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    for _ in range(40):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(abandon())
        loop.close()
        loops.append(weakref.ref(loop))
        del loop
    # The answers arrive after their loop is closed; they go once they are
    # in and a later loop asks.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert asyncio.run(go())  # the store keeps working on a new loop
        gc.collect()
        if all(ref() is None for ref in loops):
            break
        time.sleep(0.05)
    assert sum(ref() is not None for ref in loops) == 0
    assert len(os.listdir("/proc/self/fd")) <= fds + 1
    store.close()


def test_loops_closed_after_a_timeout_are_released(
    server: RedisServer,
) -> None:
    """A loop closed while its decisions are in flight (asyncio.run, a loop
    per test under pytest-asyncio, after a wait_for timeout) gets their
    answers after it closed; each answer holds its future and so the loop.
    Those loops, their eventfds and whatever their tasks held were kept for
    good; they go once a later loop asks for a decision."""
    store = RedisStorage(server.uri, timeout=2.0)
    item = parse("1000/minute")
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def leave_in_flight() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                store.decide_many_async("fixed-window", [(item, "a", 1)]), 0.01
            )
        names = _core.HeaderNames(b"a", b"b", b"c", b"d", _View)
        view = store.decide_view_async(
            "fixed-window", item, "a", "/v", 1, T0, names, None, ""
        )
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(view, 0.01)

    async def later() -> bool:
        return (await store.decide_many_async("fixed-window", [(item, "b", 1)]))[
            0
        ].allowed

    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with server.hold():
            asyncio.run(leave_in_flight())  # the answers come once it is closed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert asyncio.run(later())
        gc.collect()
        if all(ref() is None for ref in loops):
            break
        time.sleep(0.05)
    assert [ref() for ref in loops] == [None] * 3
    assert len(os.listdir("/proc/self/fd")) <= fds
    store.close()


class _View:
    __slots__ = ("_data",)


def test_loops_in_several_threads_at_once(server: RedisServer) -> None:
    """One storage, a loop on the main thread and one per worker thread (a
    sync endpoint's asyncio.run): each loop gets its own answers."""
    store = RedisStorage(server.uri, timeout=2.0)
    item = parse("1000/minute")

    async def burst(key: str) -> list[bool]:
        got = await asyncio.gather(
            *(
                store.decide_many_async("fixed-window", [(item, key, 1)])
                for _ in range(20)
            )
        )
        return [d[0].allowed for d in got]

    def in_thread(key: str) -> list[bool]:
        return asyncio.run(burst(key))

    async def main() -> list[list[bool]]:
        threads = [asyncio.to_thread(in_thread, f"t{i}") for i in range(4)]
        return await asyncio.gather(burst("main"), *threads)

    assert asyncio.run(main()) == [[True] * 20] * 5
    for key in ("main", "t0", "t1", "t2", "t3"):
        tested = store.decide_many("fixed-window", [(item, key, 1)], test=True)
        assert tested[0].remaining == 1000 - 20
    store.close()
