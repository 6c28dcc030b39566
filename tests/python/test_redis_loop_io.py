"""An event loop drives an idle Redis connection itself: it sends its batch
and reads the replies from its own selector, without waking the store's I/O
thread (RedisStore::LoopFlush / LoopRead / LoopWatch). These tests hold it
to what the I/O thread guarantees: the timeout, reconnects, sharing the
connection with blocking callers and other loops, NOSCRIPT, and no file
descriptor outliving its use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import pytest

from rapidlimit import _core, parse
from rapidlimit.storage import RedisStorage
from redis_server import RedisServer

FAST = {"timeout": 0.2, "connect_timeout": 0.5, "reconnect_min": 0.01}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("pool_size", [1, 3])
async def test_an_idle_connection_is_driven_by_the_loop(
    server: RedisServer, pool_size: int
) -> None:
    # In a pool, the loop drives the first connection.
    store = RedisStorage(server.uri, pool_size=pool_size)
    item = parse("5/minute")
    got = [
        (await store.decide_many_async("fixed-window", [(item, "a", 1)]))[0].allowed
        for _ in range(7)
    ]
    assert got == [True] * 5 + [False] * 2
    stats = store.stats()
    # Six went out one at a time from the loop (the sixth's refusal taught
    # the blocked-key cache, which answered the seventh).
    assert stats["loop_writes"] == 6
    assert stats["writes"] == 6
    assert stats["cache_hits"] == 1
    assert stats["inline_calls"] == 0
    store.close()


async def test_loop_driven_request_meets_the_timeout(server: RedisServer) -> None:
    store = RedisStorage(server.uri, timeout=0.2, on_error="fail-closed")
    item = parse("10/second")
    assert (await store.decide_many_async("fixed-window", [(item, "a", 1)]))[0].allowed
    sent = store.stats()["loop_writes"]
    with await asyncio.to_thread(server.hold) as held:
        start = time.monotonic()
        with pytest.raises(_core.RedisUnavailableError):
            await store.decide_many_async("fixed-window", [(item, "b", 1)])
        waited = time.monotonic() - start
        assert held.held  # answered at the timeout, not by Redis
    # The request went out from the loop (its I/O thread slept through it)
    # and the loop's own deadline check failed it.
    assert store.stats()["loop_writes"] == sent + 1
    # The 0.2 s timeout; the I/O thread's idle wake-up, a second, would be
    # far above the bound, which leaves room for a busy CI machine.
    assert 0.15 < waited < 0.7
    assert store.stats()["timeouts"] >= 1
    # The connection was replaced; the loop watches the new one.
    deadline = time.monotonic() + 5
    while not store.connected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert (await store.decide_many_async("fixed-window", [(item, "c", 1)]))[0].allowed
    assert store.stats()["loop_writes"] == sent + 2
    store.close()


async def _echo_round_trips(n: int) -> None:
    """Opens n connections to a local asyncio server, one after another:
    each takes the lowest free descriptor number and registers it with the
    loop's selector, which fails if the loop still lists a number the
    store closed under it."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(10))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.read(10) == b"ping"
            writer.close()
            await writer.wait_closed()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_reconnects_leave_no_stale_descriptor(own_server: RedisServer) -> None:
    store = RedisStorage(own_server.uri, on_error="fail-open", **FAST)
    item = parse("1000/minute")
    for round_ in range(3):
        for i in range(5):
            key = f"k{round_}-{i}"
            assert (await store.decide_many_async("fixed-window", [(item, key, 1)]))[
                0
            ].allowed
        sent = store.stats()["loop_writes"]
        own_server.kill()
        # Answered by the policy while Redis is gone; new sockets meanwhile
        # take the numbers the store's old connection freed.
        await store.decide_many_async("fixed-window", [(item, "gone", 1)])
        await _echo_round_trips(20)
        own_server.restart()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(_core.RedisUnavailableError):
                await store.decide_many_async("fixed-window", [(item, "probe", 1)])
            if store.connected and store.stats()["loop_writes"] > sent:
                break
            await asyncio.sleep(0.02)
        await _echo_round_trips(20)
        decisions = await store.decide_many_async(
            "fixed-window", [(item, f"after-{round_}", 1)]
        )
        assert decisions[0].allowed
        assert decisions[0].remaining == 999  # counted in the new Redis
        assert store.stats()["loop_writes"] > sent
    store.close()


def test_loops_leave_no_descriptor_behind(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    item = parse("1000000/minute")

    async def some() -> None:
        for i in range(5):
            await store.decide_many_async("fixed-window", [(item, f"k{i}", 1)])

    asyncio.run(some())  # the first loop's eventfd and watch, then steady
    before = open_fds()
    for _ in range(20):
        asyncio.run(some())
    assert open_fds() <= before + 1
    assert store.stats()["loop_writes"] >= 20 * 5
    store.close()


@pytest.mark.parametrize("pool_size", [1, 3])
async def test_blocking_callers_and_the_loop_share_the_connection(
    server: RedisServer, pool_size: int
) -> None:
    """A thread deciding inline (it writes and reads the socket itself when
    the connection is idle) and the loop's tasks, on one key: exact. In a
    pool, the thread's calls go round the connections, the loop's first."""
    store = RedisStorage(
        server.uri, blocked_cache=False, timeout=2.0, pool_size=pool_size
    )
    item = parse("300/hour")
    allowed_sync = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal allowed_sync
        while not stop.is_set():
            if store.decide_many("fixed-window", [(item, "shared", 1)])[0].allowed:
                allowed_sync += 1

    thread = threading.Thread(target=hammer)
    thread.start()
    try:

        async def one() -> bool:
            got = await store.decide_many_async("fixed-window", [(item, "shared", 1)])
            return got[0].allowed

        def both_ways() -> bool:
            stats = store.stats()
            return stats["loop_writes"] > 0 and stats["inline_calls"] > 0

        allowed_async = 0
        rounds = 0
        # Which of the two writes first is the scheduler's choice: on a
        # loaded machine one may take more rounds to meet an idle connection.
        while rounds < 40 or (not both_ways() and rounds < 5000):
            allowed_async += sum(await asyncio.gather(*(one() for _ in range(8))))
            await asyncio.sleep(0)
            rounds += 1
    finally:
        stop.set()
        thread.join()
    assert allowed_sync + allowed_async == 300
    stats = store.stats()
    assert stats["loop_writes"] > 0 and stats["inline_calls"] > 0
    assert stats["mismatches"] == 0
    store.close()


@pytest.mark.parametrize("pool_size", [1, 3])
def test_two_loops_in_two_threads_share_the_connection(
    server: RedisServer, pool_size: int
) -> None:
    store = RedisStorage(
        server.uri, blocked_cache=False, timeout=2.0, pool_size=pool_size
    )
    item = parse("500/hour")
    allowed = [0, 0]

    def run(slot: int) -> None:
        async def main() -> None:
            for _ in range(50):
                got = await asyncio.gather(
                    *(
                        store.decide_many_async("fixed-window", [(item, "k", 1)])
                        for _ in range(8)
                    )
                )
                allowed[slot] += sum(d[0].allowed for d in got)

        asyncio.run(main())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 500
    store.close()


async def test_the_loop_drives_several_stores(server: RedisServer) -> None:
    """Five stores (five prefixes) awaited together from one loop: each of
    the first four sends its batches from the loop, none from an I/O
    thread, and each store's replies come back to it. The fifth, over the
    stores one loop drives, is served by its I/O thread."""
    item = parse("10/minute")
    stores = [RedisStorage(server.uri, key_prefix=f"s{i}:") for i in range(5)]
    for _ in range(3):
        got = await asyncio.gather(
            *(s.decide_many_async("fixed-window", [(item, "a", 1)]) for s in stores)
        )
        assert all(d[0].allowed for d in got)
    stats = [s.stats() for s in stores]
    assert [st["loop_writes"] for st in stats[:4]] == [3] * 4
    assert [st["writes"] for st in stats[:4]] == [3] * 4
    assert stats[4]["loop_writes"] == 0 and stats[4]["writes"] == 3
    # Every store counted its own key: three hits each.
    for cost, allowed in ((7, True), (8, False)):
        for s in stores:
            got = s.decide_many("fixed-window", [(item, "a", cost)], test=True)
            assert got[0].allowed is allowed
    for s in stores:
        s.close()


async def test_a_dropped_store_makes_room_for_another(server: RedisServer) -> None:
    """A store the app no longer holds leaves its place among the stores
    the loop drives to the next one (and is closed with its last
    reference)."""
    item = parse("10/minute")
    held = [RedisStorage(server.uri, key_prefix=f"h{i}:") for i in range(3)]
    dropped = RedisStorage(server.uri, key_prefix="d:")
    for store in [*held, dropped]:
        got = await store.decide_many_async("fixed-window", [(item, "a", 1)])
        assert got[0].allowed
    assert [s.stats()["loop_writes"] for s in [*held, dropped]] == [1] * 4
    del store, dropped
    late = RedisStorage(server.uri, key_prefix="late:")
    assert (await late.decide_many_async("fixed-window", [(item, "a", 1)]))[0].allowed
    assert late.stats()["loop_writes"] == 1
    for s in [*held, late]:
        s.close()


async def test_a_closed_store_leaves_the_loop_to_the_next(server: RedisServer) -> None:
    """A store made to replace a closed one (a limiter rebuilt on the same
    loop) is driven by the loop, not left to its I/O thread."""
    item = parse("10/minute")
    first = RedisStorage(server.uri)
    assert (await first.decide_many_async("fixed-window", [(item, "a", 1)]))[0].allowed
    assert first.stats()["loop_writes"] == 1
    first.close()
    # The loop sees the closed connection's end at its next turn.
    await asyncio.sleep(0.05)
    second = RedisStorage(server.uri)
    for key in ("a", "b", "c"):
        got = await second.decide_many_async("fixed-window", [(item, key, 1)])
        assert got[0].allowed
    assert second.stats()["loop_writes"] == 3
    second.close()


async def test_noscript_from_the_loop(server: RedisServer) -> None:
    store = RedisStorage(server.uri, blocked_cache=False)
    item = parse("3/minute")
    assert (await store.decide_many_async("token-bucket", [(item, "a", 1)]))[0].allowed
    server.client().script_flush()
    reloads = store.stats()["script_reloads"]
    got = [
        (await store.decide_many_async("token-bucket", [(item, "a", 1)]))[0].allowed
        for _ in range(3)
    ]
    assert got == [True, True, False]
    stats = store.stats()
    assert stats["script_reloads"] == reloads + 1
    assert stats["loop_writes"] >= 4
    store.close()


async def test_closing_the_store_ends_the_connection_the_loop_watched(
    own_server: RedisServer,
) -> None:
    server = own_server  # no other test's connections in its count
    client = server.client()
    baseline = int(client.info("clients")["connected_clients"])
    start = open_fds()
    # A long timeout: the loop's deadline check, which would also notice,
    # comes too late to be what ends the connection here.
    store = RedisStorage(server.uri, timeout=5.0)
    item = parse("10/minute")
    assert (await store.decide_many_async("fixed-window", [(item, "a", 1)]))[0].allowed
    assert store.stats()["loop_writes"] == 1
    assert int(client.info("clients")["connected_clients"]) == baseline + 1
    # The loop holds a duplicate of the socket; closing the store must end
    # the connection anyway, and the loop then lets its duplicate go.
    store.close()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        if int(client.info("clients")["connected_clients"]) == baseline:
            break
    assert int(client.info("clients")["connected_clients"]) == baseline
    await asyncio.sleep(0.05)
    # Only this loop's wake-up eventfd stays (with the loop).
    assert open_fds() == start + 1
