"""RedisStorage against a real redis-server: the same semantics as the memory
store for every strategy, URIs and options, one command per request, script
reload after SCRIPT FLUSH, and a GIL-free wait."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from rapidlimit import Limiter, _core, _rate_limit_exceeded_handler, parse
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.storage import MemoryStorage, RedisStorage, storage_from_string
from rapidlimit.strategies import STRATEGIES
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

T0 = 1_700_000_000.25
# What the store may send (EVALSHA; GET/SET/SETRANGE run inside the
# script) plus what the test's own redis-py probe sends.
ALLOWED_COMMANDS = {
    "evalsha",
    "get",
    "set",
    "setrange",
    "config|resetstat",
    "hello",
    "info",
    "client|setinfo",
}
STRATEGY_NAMES = sorted(STRATEGIES)


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each semantics test runs once per store."""
    if request.param == "memory":
        yield MemoryStorage()
        return
    srv = request.getfixturevalue("server")
    store = storage_from_string(srv.uri, blocked_cache=False)
    yield store
    store.close()


def decide(limiter: Any, item: Any, key: str, now: float, cost: int = 1) -> tuple:
    return tuple(limiter.decide_many([(item, key, cost)], now=now)[0])


# ------------------------------------------------------------- semantics


def test_fixed_window(storage: Any) -> None:
    lim = STRATEGIES["fixed-window"](storage)
    item = parse("2/minute")
    assert decide(lim, item, "a", T0) == (True, 2, 1, T0 + 60, 0.0)
    assert decide(lim, item, "a", T0 + 1) == (True, 2, 0, T0 + 60, 0.0)
    assert decide(lim, item, "a", T0 + 2) == (False, 2, 0, T0 + 60, 58.0)
    assert lim.get_window_stats(item, "a", now=T0 + 3) == (T0 + 60, 0)
    assert storage.get(item.key_for("a"), now=T0 + 3) == 3  # rejected hits count
    assert decide(lim, item, "a", T0 + 60) == (True, 2, 1, T0 + 120, 0.0)
    assert lim.test(item, "b", now=T0)
    assert lim.hit(item, "b", cost=2, now=T0)
    assert not lim.test(item, "b", now=T0)


def test_moving_window(storage: Any) -> None:
    lim = STRATEGIES["moving-window"](storage)
    item = parse("2 per 10 seconds")
    assert decide(lim, item, "a", T0)[:3] == (True, 2, 1)
    assert decide(lim, item, "a", T0 + 4)[:3] == (True, 2, 0)
    d = decide(lim, item, "a", T0 + 5)
    assert d[:3] == (False, 2, 0)
    assert d[4] == pytest.approx(5.0, abs=1e-6)
    assert decide(lim, item, "a", T0 + 10.5)[:3] == (True, 2, 0)
    assert lim.get_window_stats(item, "a", now=T0 + 11) == pytest.approx((T0 + 14, 0))
    assert not lim.hit(item, "a", cost=3, now=T0 + 100)  # more than the limit


def test_sliding_window_counter(storage: Any) -> None:
    lim = STRATEGIES["sliding-window-counter"](storage)
    item = parse("10 per 10 seconds")
    base = 1_700_000_000.0  # epoch-aligned windows
    for i in range(10):
        assert decide(lim, item, "a", base + i * 0.1)[0]
    assert not decide(lim, item, "a", base + 1)[0]
    # Half-way into the next window the previous one weighs half.
    d = decide(lim, item, "a", base + 15)
    assert d[:3] == (True, 10, 4)
    assert storage.get_sliding_window(item.key_for("a"), 10, now=base + 15) == (
        10,
        pytest.approx(5.0),
        1,
        pytest.approx(15.0),
    )


def test_token_bucket(storage: Any) -> None:
    lim = STRATEGIES["token-bucket"](storage)
    item = _core.RateLimitItem(10, 1, granularity="second", burst=3)
    assert [decide(lim, item, "a", T0)[0] for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    d = decide(lim, item, "a", T0)
    assert d[4] == pytest.approx(0.1)
    assert decide(lim, item, "a", T0 + 0.11)[:3] == (True, 10, 0)


def test_limits_storage_interface(storage: Any) -> None:
    assert storage.incr("k", 10, 2, now=T0) == 2
    assert storage.incr("k", 10, 1, now=T0 + 1) == 3
    assert storage.get("k", now=T0 + 1) == 3
    assert storage.get_expiry("k", now=T0 + 1) == pytest.approx(T0 + 10)
    assert storage.get("k", now=T0 + 10) == 0
    assert storage.acquire_entry("m", 2, 5, now=T0)
    assert storage.acquire_entry("m", 2, 5, now=T0 + 1)
    assert not storage.acquire_entry("m", 2, 5, now=T0 + 2)
    assert storage.get_moving_window("m", 2, 5, now=T0 + 2) == (
        pytest.approx(T0),
        2,
    )
    assert storage.acquire_sliding_window_entry("s", 3, 10, now=T0)
    prev, prev_ttl, cur, cur_ttl = storage.get_sliding_window("s", 10, now=T0)
    assert (prev, cur) == (0, 1)
    storage.clear("k")
    storage.clear("m")
    storage.clear_sliding_window("s", 10)
    assert storage.get("k", now=T0) == 0
    assert storage.get_moving_window("m", 2, 5, now=T0 + 2)[1] == 0
    assert storage.get_sliding_window("s", 10, now=T0)[2] == 0


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_random_calls_match_memory(server: RedisServer, strategy: str) -> None:
    """Random batches, costs and clock steps: both stores answer alike."""
    memory = STRATEGIES[strategy](MemoryStorage())
    store = RedisStorage(server.uri, blocked_cache=False)
    redis = STRATEGIES[strategy](store)
    items = [
        parse("3/second"),
        parse("5 per 2 seconds"),
        _core.RateLimitItem(7, 3, granularity="second", burst=2),
        parse("1000 per hour"),
    ]
    rng = random.Random(strategy)
    now = T0
    for step in range(600):
        now += rng.choice([0.0, 1e-6, 0.05, 0.3, 1.0, 2.5])
        reqs = [
            (items[i], f"id{rng.randrange(3)}", rng.choice([0, 1, 1, 1, 2, 600]))
            for i in rng.sample(range(len(items)), rng.randrange(1, 4))
        ]
        test = rng.random() < 0.15
        a = [tuple(d) for d in memory.decide_many(reqs, now=now, test=test)]
        b = [tuple(d) for d in redis.decide_many(reqs, now=now, test=test)]
        assert a == b, (step, reqs)
        item, ident, _ = reqs[0]
        assert memory.get_window_stats(item, ident, now=now) == redis.get_window_stats(
            item, ident, now=now
        ), step
    assert store.stats()["mismatches"] == 0
    store.close()


# ------------------------------------------------------------------ URIs


def test_uri_forms(server: RedisServer) -> None:
    for uri in (
        server.uri,
        f"rapidlimit+redis://127.0.0.1:{server.port}",
        f"valkey://127.0.0.1:{server.port}/1",
        f"redis+unix://{server.unix_path}?db=2",
        f"unix://{server.unix_path}",
    ):
        store = storage_from_string(uri)
        assert isinstance(store, RedisStorage)
        assert store.check(), uri
        assert store.connected
        store.close()


def test_options_from_query_and_keywords(server: RedisServer) -> None:
    store = storage_from_string(
        server.uri + "?on_error=fallback&socket_timeout=0.5",
        on_error="fail-open",
        socket_connect_timeout=1,
        retry_on_timeout=True,  # redis-py option: accepted, no meaning here
        key_prefix="myapp:",
    )
    assert store.on_error == "fail-open"  # keywords win over the query
    lim = STRATEGIES["fixed-window"](store)
    assert lim.hit(parse("1/second"), "x")
    assert server.client().keys("myapp:*")
    store.close()


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("rediss://h:6380", ["rediss://h:6380", "TLS"]),
        ("redis+cluster://h:7000", ["redis+cluster://h:7000", "Cluster"]),
        ("redis+sentinel://h/x", ["Sentinel"]),
        ("redis://h:port", ["port"]),
        ("redis://:hunter2@h/x", ["***", "database"]),
    ],
)
def test_bad_uris_fail_at_start_naming_the_uri(uri: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        storage_from_string(uri)
    for word in words:
        assert word in str(info.value)
    assert "hunter2" not in str(info.value)


def test_bad_options_name_the_uri(server: RedisServer) -> None:
    with pytest.raises(ValueError, match="bogus.*redis://127.0.0.1"):
        storage_from_string(server.uri, bogus=1)
    with pytest.raises(ValueError, match="on_error"):
        RedisStorage(server.uri, on_error="maybe")
    with pytest.raises(ValueError, match="TLS"):
        RedisStorage(server.uri, ssl=True)


def test_memory_uris_unchanged() -> None:
    assert isinstance(storage_from_string("memory://"), MemoryStorage)
    with pytest.raises(ValueError, match="expected memory://"):
        storage_from_string("mongodb://x")


# ------------------------------------------------------- one round trip


def test_one_command_per_request_with_several_limits(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    lim = STRATEGIES["sliding-window-counter"](store)
    items = [parse("10/second"), parse("100/minute"), parse("1000/hour")]
    server.reset_stats()
    for i in range(20):
        decisions = lim.decide_many([(it, f"c{i % 2}", 1) for it in items], now=T0)
        assert len(decisions) == 3
        assert store.last_status() == "redis"
    calls = server.command_calls()
    assert calls["evalsha"] == 20
    assert calls["get"] == 60  # run by the script: 3 limits per call
    assert set(calls) <= ALLOWED_COMMANDS
    store.close()


def test_limiter_sends_one_command_per_request(server: RedisServer) -> None:
    """Through the slowapi-compatible Limiter, headers on, three limits."""
    limiter = Limiter(
        key_func=get_remote_address,
        headers_enabled=True,
        storage_uri=server.uri,
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.get("/r")
    @limiter.limit("5/second;50/minute;500/hour")
    async def route(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    client = TestClient(app)
    client.get("/r")  # warm-up (connection, script cache)
    server.reset_stats()
    codes = [client.get("/r").status_code for _ in range(8)]
    assert codes == [200] * 4 + [429] * 4
    calls = server.command_calls()
    # 4 admitted + 1 rejected go to Redis; later rejections hit the cache.
    assert calls["evalsha"] == 5
    assert set(calls) <= ALLOWED_COMMANDS
    assert "x-ratelimit-remaining" in client.get("/r").headers


def test_script_reload_after_script_flush(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    lim = STRATEGIES["token-bucket"](store)
    item = parse("5/minute")
    assert lim.hit(item, "a", now=T0)
    server.client().script_flush()
    assert lim.hit(item, "a", now=T0)
    assert store.last_status() == "redis"
    assert store.stats()["script_reloads"] == 1
    server.reset_stats()
    assert lim.hit(item, "a", now=T0)
    assert "eval" not in server.command_calls()  # back to EVALSHA
    store.close()


def test_keys_an_acl_refuses_do_not_give_up_evalsha(own_server: RedisServer) -> None:
    """A NOPERM for the call's keys (the storage's prefix outside the ACL
    user's key pattern) is no refusal of EVALSHA: once the ACL lets the keys
    in, calls go by EVALSHA again, not with the whole script each time. A
    user refused EVALSHA itself still gets decisions, through EVAL."""
    admin = own_server.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~other:*", "+@all")
    store = RedisStorage(
        own_server.uri,
        username="app",
        password="pw",
        key_prefix="app:",
        blocked_cache=False,
    )
    lim = STRATEGIES["fixed-window"](store)
    item = parse("100/minute")
    with pytest.raises(_core.RedisUnavailableError):
        lim.decide_many([(item, "a", 1)], now=T0)
    assert store.last_status() == "fail-closed"
    assert "NOPERM" in store.last_error()

    admin.execute_command("ACL", "SETUSER", "app", "~app:*")
    own_server.reset_stats()
    for i in range(5):
        assert lim.decide_many([(item, "a", 1)], now=T0)[0].remaining == 99 - i
        assert store.last_status() == "redis"
    calls = own_server.command_calls()
    assert calls.get("evalsha") == 5
    assert "eval" not in calls
    store.close()

    admin.execute_command(
        "ACL", "SETUSER", "noevalsha", "on", ">pw", "~*", "+@all", "-evalsha"
    )
    store = RedisStorage(own_server.uri, username="noevalsha", password="pw")
    lim = STRATEGIES["fixed-window"](store)
    own_server.reset_stats()
    assert lim.decide_many([(item, "b", 1)], now=T0)[0].remaining == 99
    assert store.last_status() == "redis"
    assert own_server.command_calls().get("eval", 0) >= 1
    store.close()


# ------------------------------------------------------------- the GIL


def test_sync_wait_releases_the_gil(server: RedisServer) -> None:
    store = RedisStorage(server.uri, timeout=2.0)
    lim = STRATEGIES["fixed-window"](store)
    item = parse("100/second")
    assert lim.hit(item, "a")
    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    # A daemon, stopped whatever happens: left spinning, it would eat a CPU
    # for the rest of the session and hold the interpreter's exit forever.
    spinner = threading.Thread(target=spin, daemon=True)
    with server.hold() as held:
        spinner.start()
        try:
            start = time.monotonic()
            before = ticks
            # Redis resumes 0.3 s from now, from another thread.
            threading.Timer(0.3, held.release).start()
            assert lim.hit(item, "a")  # waits for Redis to wake up
            waited = time.monotonic() - start
            during = ticks - before
        finally:
            stop.set()
            spinner.join()
    assert waited > 0.15
    assert store.last_status() == "redis"
    # Another Python thread ran freely while this one waited.
    assert during > 10_000
    store.close()


def test_ping_stats_and_close(server: RedisServer) -> None:
    store = RedisStorage(server.uri, on_error="fail-open")
    assert 0 < store.ping() < 0.1
    assert store.check()
    stats = store.stats()
    assert stats["reconnects"] == 1
    assert stats["mismatches"] == 0
    assert "redis://127.0.0.1" in store.uri
    store.close()
    store.close()
    assert not store.check()
    lim = STRATEGIES["fixed-window"](store)
    assert lim.hit(parse("1/second"), "x")
    assert store.last_status() == "fail-open"
    with pytest.raises(_core.RedisUnavailableError):
        len(store)  # a closed store cannot count Redis's keys


def test_reset_and_len(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    item = parse("5/minute")
    for name in STRATEGY_NAMES:
        STRATEGIES[name](store).hit(item, "a")
    assert len(store) == 4
    server.client().set("other", "1")
    assert store.reset() == 4
    assert len(store) == 0
    assert store  # true when empty, as limits' storages are
    assert server.client().get("other") == "1"
    store.close()


def test_decide_many_arguments(server: RedisServer) -> None:
    """``now`` and ``test`` by position or by keyword, for the limiter and
    for the storage's own call (and its awaitable); an unknown keyword is a
    TypeError naming it."""
    storage = RedisStorage(server.uri)
    item = parse("2/minute")
    limiter = STRATEGIES["fixed-window"](storage)
    reqs = [(item, "args", 1)]
    assert limiter.decide_many(reqs, T0, True)[0].remaining == 2  # test: no hit
    assert limiter.decide_many(reqs, T0, test=True)[0].remaining == 2
    assert limiter.decide_many(reqs, now=T0)[0].remaining == 1  # a hit
    assert storage.decide_many("fixed-window", reqs, T0, True)[0][2] == 1
    assert storage.decide_many("fixed-window", reqs, now=T0, test=False)[0][2] == 0
    with pytest.raises(TypeError, match="'tset'"):
        limiter.decide_many(reqs, now=T0, tset=True)
    with pytest.raises(TypeError, match="'tset'"):
        storage.decide_many("fixed-window", reqs, now=T0, tset=True)
    with pytest.raises(TypeError, match="'tset'"):
        storage.decide_many_async("fixed-window", reqs, now=T0, tset=True)
    storage.close()


def test_a_moving_window_limit_too_large_is_refused_before_redis(
    server: RedisServer,
) -> None:
    """The storage's own calls refuse a moving-window limit its log cannot
    hold, as the limiters do, with nothing sent: written, such a log made
    every later hit of the key a refusal of Redis (fail-closed: a 503)."""
    storage = RedisStorage(server.uri)
    big = parse("2000000/day")
    reqs = [(parse("5/minute"), "ok", 1), (big, "big", 1)]
    client = server.client()
    client.config_resetstat()
    for call in (storage.decide_many, storage.decide_many_async):
        with pytest.raises(ValueError, match="'2000000 per 1 day' is too large"):
            call("moving-window", reqs, now=T0)
    assert "cmdstat_evalsha" not in client.info("commandstats")
    assert storage.decide_many("sliding-window-counter", reqs, now=T0)[1][0]
    largest = parse(f"{_core.MAX_MOVING_WINDOW_AMOUNT}/day")
    for _ in range(2):  # the log written is read back
        assert storage.decide_many("moving-window", [(largest, "k", 1)], now=T0)[0][0]
    storage.close()
