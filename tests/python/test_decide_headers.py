"""RateLimiter.decide_headers: the decision of decide() plus the four
rate-limit headers, formatted by the core exactly as the slowapi layer's
Python formulas would format them, on memory and Redis storages."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rapidlimit import _core, parse
from rapidlimit._core import HeaderNames, RateLimiter
from rapidlimit.storage import MemoryStorage, RedisStorage
from rapidlimit.strategies import STRATEGIES
from redis_server import RedisServer

NAMES = HeaderNames(
    b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset", b"retry-after"
)
T0 = 1_700_000_000.0
STRATEGY_NAMES = sorted(STRATEGIES)


def expected_headers(
    names: HeaderNames, decision: tuple[Any, ...], now: float, strategy: str = ""
) -> tuple[tuple[bytes, bytes], ...]:
    """What the Python layer computed before the core did it: slowapi's
    formulas, but a token bucket's refusal counts to when it has room for
    the cost, not to its reset (when it is full again)."""
    allowed, limit, remaining, reset_time, retry_after = decision
    assert isinstance(reset_time, float)
    retry = 1 + reset_time - now
    if strategy == "token-bucket" and not allowed:
        retry = 1 + retry_after
    return (
        (names.limit, b"%d" % limit),
        (names.remaining, b"%d" % remaining),
        (names.reset, b"%d" % int(1 + reset_time)),
        (names.retry_after, b"%d" % int(retry)),
    )


def check(
    result: tuple[Any, ...], decision: Any, now: float, strategy: str = ""
) -> None:
    assert type(result) is tuple and len(result) == 6
    assert result[:5] == tuple(decision)
    assert [type(v) for v in result[:5]] == [bool, int, int, float, float]
    assert type(result[5]) is tuple
    assert result[5] == expected_headers(NAMES, tuple(decision), now, strategy)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize(
    "limit", ["5/7 seconds", "300/minute", "2/day", "1500/3 seconds", "3/second"]
)
def test_same_as_decide_and_python_formulas(strategy: str, limit: str) -> None:
    """Two limiters fed the same requests: decide() + the formulas on one,
    decide_headers() on the other, allowed and rejected, with fractional
    clocks and values on both sides of the cached tables (1024)."""
    plain = STRATEGIES[strategy](MemoryStorage())
    fused = STRATEGIES[strategy](MemoryStorage())
    item = parse(limit)
    rnd = random.Random(f"{strategy}{limit}")
    now = T0 + 0.123456
    seen = set()
    for _ in range(2000):
        now += rnd.choice([0.0, 1e-6, 1e-9, 0.37, 0.5, 0.999999, 1.0, 2.5, 7.0])
        key = f"k{rnd.randrange(3)}"
        cost = rnd.choice([0, 1, 1, 1, 2])
        decision = plain.decide(item, key, cost=cost, now=now)
        check(
            fused.decide_headers(item, key, cost, now, NAMES), decision, now, strategy
        )
        seen.add(decision.allowed)
    if not limit.startswith(("300", "1500")):
        assert seen == {True, False}


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_random_clocks_near_whole_seconds(strategy: str) -> None:
    """int() truncates toward zero: reset times and clocks just below, on
    and just above whole seconds, and clocks that run backwards (a large
    Retry-After beyond the cached pairs)."""
    plain = STRATEGIES[strategy](MemoryStorage())
    fused = STRATEGIES[strategy](MemoryStorage())
    rnd = random.Random(strategy)
    items = [parse(t) for t in ("1/second", "2/3 seconds", "4/minute", "3/hour")]
    for i in range(3000):
        base = T0 + rnd.randrange(-5000, 5000)
        now = base + rnd.choice(
            [0.0, 1e-9, 2e-9, -1e-9, 0.5, 0.999999999, 1 - 1e-7, rnd.random()]
        )
        item = rnd.choice(items)
        key = f"c{i % 7}"
        cost = rnd.choice([0, 1, 1, 2])
        decision = plain.decide(item, key, cost=cost, now=now)
        check(
            fused.decide_headers(item, key, cost, now, NAMES), decision, now, strategy
        )


def test_truncation_boundaries() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    ref = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("1/second")
    for offset in (0.0, 1e-9, 0.5, 0.999999999, -1e-9):
        now = T0 + offset
        key = f"b{offset}"
        check(
            lim.decide_headers(item, key, 1, now, NAMES),
            ref.decide(item, key, now=now),
            now,
        )
        # The same window formatted for other clock readings.
        for later in (now + 1e-9, now + 0.5, now + 0.999999999):
            d = ref.decide(item, key, cost=0, now=later)
            check(lim.decide_headers(item, key, 0, later, NAMES), d, later)


def test_integer_now_is_accepted() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    ref = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("5/minute")
    now = 1_700_000_123
    check(
        lim.decide_headers(item, "a", 1, now, NAMES),
        ref.decide(item, "a", now=now),
        now,
    )


def test_identity_is_built_like_decide_many() -> None:
    """One identifier, keyed exactly like decide_many's identity (and like
    decide's single identifier): both limiters share the same counter."""
    storage = MemoryStorage()
    lim = STRATEGIES["fixed-window"](storage)
    item = parse("3/minute")
    identities: list[Any] = ["1.2.3.4", 42, b"bytes-id", "ünï"]
    for identity in identities:
        lim.decide_headers(item, identity, 1, T0, NAMES)
        (d,) = lim.decide_many([(item, identity, 1)], now=T0)
        assert d.remaining == 1
        assert lim.decide(item, identity, cost=0, now=T0).remaining == 1


def test_charges_like_decide() -> None:
    lim = STRATEGIES["moving-window"](MemoryStorage())
    item = parse("3/minute")
    assert lim.decide_headers(item, "a", 2, T0, NAMES)[:3] == (True, 3, 1)
    assert lim.decide_headers(item, "a", 2, T0, NAMES)[:3] == (False, 3, 1)
    assert lim.decide_headers(item, "a", 1, T0, NAMES)[:3] == (True, 3, 0)
    assert not lim.test(item, "a", now=T0)


def test_custom_names_cached_pairs_and_fresh_lists() -> None:
    names = HeaderNames(b"l", b"r", b"s", b"ra")
    assert (names.limit, names.remaining, names.reset, names.retry_after) == (
        b"l",
        b"r",
        b"s",
        b"ra",
    )
    assert repr(names) == "HeaderNames(b'l', b'r', b's', b'ra')"

    class Name(bytes):
        pass

    plain = HeaderNames(Name(b"l"), b"r", b"s", b"ra")
    assert type(plain.limit) is bytes and plain.limit == b"l"
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("1000/hour")
    first = lim.decide_headers(item, "a", 1, T0, names)
    second = lim.decide_headers(item, "a", 0, T0, names)
    assert [n for n, _ in first[5]] == [b"l", b"r", b"s", b"ra"]
    assert first[5][:2] == ((b"l", b"1000"), (b"r", b"999"))
    # Values below 1024 come from the names' tables: the same pairs, and
    # the name objects are the ones given.
    assert first[5][0] is second[5][0]
    assert first[5][1] is second[5][1]
    assert first[5][3] is second[5][3]
    assert first[5][0][0] is names.limit
    # ... in a tuple of their own per call (read, copied or appended to a
    # response's headers: never changed).
    assert first[5] is not second[5]
    assert type(first[5]) is tuple and len(first[5]) == 4
    # Beyond the tables the values are formatted on the spot.
    big = parse("100000/hour")
    got = lim.decide_headers(big, "a", 1, T0, names)
    assert got[5][:2] == ((b"l", b"100000"), (b"r", b"99999"))
    assert lim.decide_headers(parse("1024/hour"), "a", 1, T0, names)[5][:2] == (
        (b"l", b"1024"),
        (b"r", b"1023"),
    )


def test_names_of_other_headernames_are_never_mixed() -> None:
    """Values beyond the tables are cached by the core too, per name."""
    a = HeaderNames(b"a-l", b"a-r", b"a-s", b"a-ra")
    b = HeaderNames(b"b-l", b"b-r", b"b-s", b"b-ra")
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("5000/hour")
    for names in (a, b, a, b):
        got = lim.decide_headers(item, "k", 0, T0, names)
        assert [n for n, _ in got[5]] == [
            names.limit,
            names.remaining,
            names.reset,
            names.retry_after,
        ]


def test_no_reference_leaks() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    small = parse("10/second")
    big = parse("1000000/second")
    pair = lim.decide_headers(small, "a", 0, T0, NAMES)[5][0]
    watched = (pair, small, big, lim, NAMES, NAMES.limit, NAMES.remaining, NAMES.reset)

    def run() -> list[int]:
        for i in range(1000):
            lim.decide_headers(small, "a", 1, T0 + i * 0.25, NAMES)
            lim.decide_headers(small, "a", 1, T0 + i * 0.25, NAMES)  # rejected
            lim.decide_headers(big, "a", 1, T0 + i * 0.25, NAMES)
        return [sys.getrefcount(o) for o in watched]

    first = run()  # leaves the core's caches in the state the second leaves
    assert run() == first


class _View:
    __slots__ = ("_data",)


VIEW_NAMES = HeaderNames(
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
    b"retry-after",
    _View,
)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("prefix", ["", "svc"])
def test_decide_view_is_decide_headers_in_a_view(strategy: str, prefix: str) -> None:
    ours = STRATEGIES[strategy](MemoryStorage())
    reference = STRATEGIES[strategy](MemoryStorage())
    item = parse("3/10 seconds")
    marker = object()
    for i in range(12):
        now = T0 + i * 0.75
        for key, scope in (("1.2.3.4", "/a"), ("1.2.3.4", "/b"), ("5.6.7.8", "/a")):
            view = ours.decide_view(
                item, key, scope, 1, now, VIEW_NAMES, marker, prefix
            )
            assert type(view) is _View
            identity = f"{prefix}/{key}/{scope}" if prefix else f"{key}/{scope}"
            expected = reference.decide_headers(item, identity, 1, now, NAMES)
            lim, got_prefix, got_key, got_scope, result = view._data
            assert (lim, got_prefix, got_key, got_scope) == (marker, prefix, key, scope)
            assert result == expected
    # The same storage key as decide_headers with the joined identity.
    later = T0 + 100
    view = ours.decide_view(item, "k", "s", 2, later, VIEW_NAMES, None, prefix)
    identity = f"{prefix}/k/s" if prefix else "k/s"
    assert ours.decide_headers(item, identity, 0, later, NAMES)[2] == 1


def test_decide_view_needs_a_view_class() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("3/second")
    assert NAMES.view_type is None and VIEW_NAMES.view_type is _View
    with pytest.raises(TypeError, match="view class"):
        lim.decide_view(item, "k", "s", 1, T0, NAMES, None, "")
    with pytest.raises(TypeError, match="8 positional"):
        lim.decide_view(item, "k", "s", 1, T0, VIEW_NAMES, None)

    class NoSlots:
        pass

    class ReadOnly:
        _data = property(lambda self: None)

    for bad in (NoSlots, ReadOnly, 5):
        with pytest.raises(TypeError, match="view_type"):
            HeaderNames(b"a", b"b", b"c", b"d", bad)  # type: ignore[arg-type]
    # Errors of the decision itself come out before any view is made.
    with pytest.raises(ValueError, match="cost"):
        lim.decide_view(item, "k", "s", -1, T0, VIEW_NAMES, None, "")
    with pytest.raises(TypeError):
        lim.decide_view(None, "k", "s", 1, T0, VIEW_NAMES, None, "")  # type: ignore[arg-type]


def test_decide_view_keeps_no_extra_references() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("10/second")
    marker, key, scope, prefix = object(), "client", "/route", "p"
    watched = (marker, key, scope, prefix, item, _View, VIEW_NAMES)

    def run() -> list[int]:
        for i in range(500):
            view = lim.decide_view(
                item, key, scope, 1, T0 + i * 0.25, VIEW_NAMES, marker, prefix
            )
            del view
        return [sys.getrefcount(o) for o in watched]

    first = run()
    assert run() == first


def test_threads_agree_with_the_formulas() -> None:
    """Several threads on values beyond the tables: whatever the core
    caches between calls, every result matches its own decision."""
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("1000000/hour")
    errors: list[str] = []

    def work(tid: int) -> None:
        rnd = random.Random(tid)
        for _ in range(3000):
            now = T0 + rnd.random() * 5
            got = lim.decide_headers(item, f"t{tid % 2}", 1, now, NAMES)
            if got[5] != expected_headers(NAMES, got[:5], now):
                errors.append(repr(got))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_arguments() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("5/minute")
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, T0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, T0, NAMES, None)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, T0, names=NAMES)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lim.decide_headers("5/minute", "a", 1, T0, NAMES)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, T0, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", "1", T0, NAMES)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, None, NAMES)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, "now", NAMES)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lim.decide_headers(item, "a", -1, T0, NAMES)
    for bad_now in (float("nan"), float("inf"), 1e12):
        with pytest.raises(ValueError):
            lim.decide_headers(item, "a", 1, bad_now, NAMES)
    with pytest.raises(UnicodeDecodeError):
        lim.decide_headers(item, b"\xff", 1, T0, NAMES)
    moving = STRATEGIES["moving-window"](MemoryStorage())
    with pytest.raises(ValueError):
        moving.decide_headers(parse("100000000/day"), "a", 1, T0, NAMES)
    # Nothing was charged by the failed calls.
    assert lim.decide(item, "a", cost=0, now=T0).remaining == 5
    with pytest.raises(TypeError):
        HeaderNames("limit", b"r", b"s", b"ra")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        HeaderNames(b"l", b"r", b"s")  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        NAMES.limit = b"x"  # type: ignore[misc]


def test_subclass_that_skips_init_fails_clearly() -> None:
    class Names(HeaderNames):
        def __init__(self) -> None:  # skips HeaderNames.__init__
            pass

    with pytest.raises(TypeError, match="__init__"):
        Names()


# ------------------------------------------------------------------ Redis


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.cleanup()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unreachable(on_error: str) -> RedisStorage:
    return RedisStorage(
        f"redis://127.0.0.1:{closed_port()}/0",
        on_error=on_error,
        timeout=0.1,
        connect_timeout=0.1,
        fail_closed_retry_after=3,
    )


needs_redis = pytest.mark.skipif(
    not _core.redis_available(), reason="built without hiredis"
)


@needs_redis
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_redis_same_as_memory(server: RedisServer, strategy: str) -> None:
    server.client().flushall()
    memory = STRATEGIES[strategy](MemoryStorage())
    store = RedisStorage(server.uri)
    redis = STRATEGIES[strategy](store)
    item = parse("3/5 seconds")
    now = T0 + 0.25
    for i in range(40):
        now += [0.0, 0.4, 1.0, 1.7][i % 4]
        key = f"k{i % 2}"
        expected = memory.decide_headers(item, key, 1, now, NAMES)
        got = redis.decide_headers(item, key, 1, now, NAMES)
        assert got == expected
        check(got, got[:5], now, strategy)
    store.close()


@needs_redis
def test_redis_fail_closed_raises(server: RedisServer) -> None:
    lim = STRATEGIES["fixed-window"](unreachable("fail-closed"))
    item = parse("5/minute")
    calls: dict[str, Callable[[], object]] = {
        "decide_headers": lambda: lim.decide_headers(item, "a", 1, time.time(), NAMES),
        "decide": lambda: lim.decide(item, "a"),
        "decide_many": lambda: lim.decide_many([(item, "a", 1)]),
    }
    for name, call in calls.items():
        with pytest.raises(_core.RedisUnavailableError) as info:
            call()
        assert info.value.retry_after == 3.0, name
        assert isinstance(info.value, ConnectionError)
    # hit/test answer by the policy instead.
    assert lim.hit(item, "a") is False
    assert lim.test(item, "a") is False
    assert RedisStorage.last_status() == "fail-closed"


@needs_redis
def test_redis_fail_closed_after_the_server_dies(server: RedisServer) -> None:
    srv = RedisServer()
    srv.start()
    try:
        store = RedisStorage(srv.uri, on_error="fail-closed", timeout=0.15)
        lim = STRATEGIES["fixed-window"](store)
        item = parse("5/minute")
        assert lim.decide_headers(item, "a", 1, T0, NAMES)[:3] == (True, 5, 4)
        srv.kill()
        with pytest.raises(_core.RedisUnavailableError):
            lim.decide_headers(item, "a", 1, T0, NAMES)
    finally:
        srv.cleanup()


@needs_redis
@pytest.mark.parametrize("policy", ["fail-open", "fallback"])
def test_redis_other_policies_answer(server: RedisServer, policy: str) -> None:
    lim: RateLimiter = STRATEGIES["fixed-window"](unreachable(policy))
    item = parse("5/minute")
    got = lim.decide_headers(item, "a", 1, T0, NAMES)
    assert got[0] is True
    check(got, got[:5], T0)
    assert lim.decide(item, "b", now=T0).allowed
    assert lim.decide_many([(item, "c", 1)], now=T0)[0].allowed
    assert RedisStorage.last_status() == policy


# ------------------------------------------------- RedisStorage.decide_view_async


@needs_redis
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("prefix", ["", "svc"])
def test_redis_decide_view_async_same_as_memory_decide_view(
    server: RedisServer, strategy: str, prefix: str
) -> None:
    server.client().flushall()
    memory = STRATEGIES[strategy](MemoryStorage())
    store = RedisStorage(server.uri)
    lim = STRATEGIES[strategy](store)
    item = parse("3/5 seconds")
    marker = object()

    async def run() -> None:
        now = T0 + 0.25
        for i in range(30):
            now += [0.0, 0.4, 1.0, 1.7][i % 4]
            key, scope = f"10.0.0.{i % 2}", "/r"
            expected = memory.decide_view(
                item, key, scope, 1, now, VIEW_NAMES, marker, prefix
            )
            got = await store.decide_view_async(
                lim, item, key, scope, 1, now, VIEW_NAMES, marker, prefix
            )
            assert type(got) is _View
            assert got._data[:4] == (marker, prefix, key, scope)
            assert got._data[4] == expected._data[4], i
        # Several awaited together share one script call, each its own view.
        views = await asyncio.gather(
            *(
                store.decide_view_async(
                    lim, item, f"c{j}", "/g", 1, now, VIEW_NAMES, j, prefix
                )
                for j in range(8)
            )
        )
        assert [v._data[0] for v in views] == list(range(8))
        assert all(v._data[4][:3] == (True, 3, 2) for v in views)

    asyncio.run(run())
    store.close()


@needs_redis
def test_redis_decide_view_async_arguments_and_fail_closed(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    lim = STRATEGIES["fixed-window"](store)
    item = parse("5/minute")

    async def run() -> None:
        with pytest.raises(TypeError, match="view class"):
            await store.decide_view_async(lim, item, "k", "s", 1, T0, NAMES, None, "")
        with pytest.raises(TypeError, match="9 or 14 positional"):
            await store.decide_view_async(lim, item, "k", "s", 1, T0, VIEW_NAMES, None)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="cost"):
            await store.decide_view_async(
                lim, item, "k", "s", -1, T0, VIEW_NAMES, None, ""
            )
        with pytest.raises(TypeError):
            await store.decide_view_async(
                lim,
                item,
                "k",
                "s",
                1,
                None,
                VIEW_NAMES,
                None,
                "",  # type: ignore[arg-type]
            )
        dead = unreachable("fail-closed")
        with pytest.raises(_core.RedisUnavailableError) as info:
            await dead.decide_view_async(
                "fixed-window", item, "k", "s", 1, T0, VIEW_NAMES, None, ""
            )
        assert info.value.retry_after == 3.0
        dead.close()
        open_ = unreachable("fail-open")
        view = await open_.decide_view_async(
            "fixed-window", item, "k", "s", 1, T0, VIEW_NAMES, None, ""
        )
        assert view._data[4][0] is True
        open_.close()

    asyncio.run(run())
    store.close()


@needs_redis
def test_redis_decide_view_async_keeps_no_extra_references(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    lim = STRATEGIES["fixed-window"](store)
    item = parse("1000000/minute")
    marker, key, scope, prefix = object(), "client-ref", "/route", "p"
    watched = (marker, key, scope, prefix, item, _View, VIEW_NAMES)

    async def run() -> list[int]:
        for _ in range(300):
            view = await store.decide_view_async(
                lim, item, key, scope, 1, T0, VIEW_NAMES, marker, prefix
            )
            del view
        return [sys.getrefcount(o) for o in watched]

    asyncio.run(run())  # warm-up: caches filled
    before = asyncio.run(run())
    after = asyncio.run(run())
    assert after == before
    store.close()


# --------------------------------------------------------------------------
# decide_scope and merge_headers: the decorator's usual request


def _scope_spec(
    lim: RateLimiter, item: Any, **changes: Any
) -> tuple[tuple[Any, ...], list[Any]]:
    """A spec as Limiter._fast_spec lays it out, and the fallback's calls."""
    from starlette.responses import Response

    calls: list[Any] = []
    fields: dict[str, Any] = {
        "plan": None,
        "limit": "limit-marker",
        "item": item,
        "cost": 1,
        "names": VIEW_NAMES,
        "scope_name": None,
        "endpoint_name": None,
        "done_key": "done",
        "by_key": "by",
        "view_key": "view",
        "core": lim,
        "prefix": "",
        "by": "by-marker",
        "filters": [],
        "response_type": Response,
        "merge_names": frozenset((b"x-ratelimit-limit", b"retry-after")),
        "headers": True,
        "fused": True,
        "merge_fallback": lambda carrier, view: calls.append((carrier, view)),
        "send_spec": None,
    }
    fields.update(changes)
    if fields["send_spec"] is None:
        fields["send_spec"], _ = _send_spec(fused=fields["fused"])
    return tuple(fields.values()), calls


def _send_spec(**changes: Any) -> tuple[tuple[Any, ...], list[Any]]:
    """A HeaderSend spec as Limiter._send_spec lays it out, and the
    fallback's calls."""
    calls: list[Any] = []
    fields: dict[str, Any] = {
        "names": VIEW_NAMES,
        "view_key": "view",
        "merge_names": frozenset((b"x-ratelimit-limit", b"retry-after")),
        "fused": True,
        "fallback": lambda message, view: calls.append((message, view)),
        "mark_key": "mark",
        "mark_value": "mw",
    }
    fields.update(changes)
    return tuple(fields.values()), calls


def _http_scope(client: Any = ("10.0.0.1", 5000)) -> dict[str, Any]:
    return {"type": "http", "path": "/p", "client": client}


def test_decide_scope_reads_time_time_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    reference = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("2/minute")
    spec, _ = _scope_spec(lim, item)
    for now in (T0, T0 + 0.5, T0 + 61.25):
        # A replaced time.time is looked up on every call and used.
        monkeypatch.setattr(time, "time", lambda now=now: now)
        scope = _http_scope()
        view = _core.decide_scope(scope, spec)
        assert type(view) is _View
        assert scope["state"] == {"done": True, "by": "by-marker", "view": view}
        expected = reference.decide_headers(item, "10.0.0.1//p", 1, now, NAMES)
        assert view._data == ("limit-marker", "", "10.0.0.1", "/p", expected)
    monkeypatch.undo()
    # The builtin clock: the same float time.time() gives.
    before = time.time()
    view = _core.decide_scope(_http_scope(("10.0.0.2", 1)), spec)
    after = time.time()
    retry = int(view._data[4][5][3][1])
    reset = view._data[4][3]
    assert int(1 + reset - after) <= retry <= int(1 + reset - before)


def test_decide_scope_rejection_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("1/minute")
    spec, _ = _scope_spec(lim, item)
    assert type(_core.decide_scope(_http_scope(), spec)) is _View
    scope = _http_scope()
    # Rejected: False, the view in the state.
    assert _core.decide_scope(scope, spec) is False
    assert scope["state"]["view"]._data[4][0] is False
    # Checked already, a filter, or a client that is not a str: the general
    # path's, nothing written.
    assert _core.decide_scope(scope, spec) is None
    filtered, _ = _scope_spec(lim, item, filters=[lambda: True])
    for odd_scope, odd_spec in (
        (_http_scope(), filtered),
        (_http_scope((7, 1)), spec),
    ):
        assert _core.decide_scope(odd_scope, odd_spec) is None
        assert odd_scope.get("state", {}) == {}

    # A failing time.time is raised once the request is marked checked, as
    # the general path has it.
    def broken() -> float:
        raise RuntimeError("clock")

    monkeypatch.setattr(time, "time", broken)
    scope = _http_scope(("10.9.9.9", 1))
    with pytest.raises(RuntimeError, match="clock"):
        _core.decide_scope(scope, spec)
    assert scope["state"] == {"done": True, "by": "by-marker"}
    with pytest.raises(TypeError, match="2 or 3 positional"):
        _core.decide_scope(scope)  # type: ignore[call-arg]
    # Not a spec (another layout): the general path's.
    assert _core.decide_scope(_http_scope(), spec[:-1]) is None


def test_merge_headers_appends_or_falls_back() -> None:
    from starlette.responses import PlainTextResponse, Response

    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("5/minute")
    spec, calls = _scope_spec(lim, item)
    view = _core.decide_scope(_http_scope(), spec)
    pairs = view._data[4][5]
    # The returned Response gets them; else the `response` parameter.
    returned = PlainTextResponse("x")
    parameter = Response()
    _core.merge_headers(returned, parameter, view, spec)
    assert tuple(returned.raw_headers[-4:]) == pairs
    assert not any(p in parameter.raw_headers for p in pairs)
    plain = Response()
    _core.merge_headers({"a": 1}, plain, view, spec)
    assert tuple(plain.raw_headers[-4:]) == pairs
    _core.merge_headers({"a": 1}, None, view, spec)  # nothing to carry them
    assert calls == []
    # A header of those names there already, an odd pair, an HTTP-date
    # Retry-After: the fallback's.
    own = PlainTextResponse("x", headers={"Retry-After": "5"})
    _core.merge_headers(own, None, view, spec)
    odd = Response()
    odd.raw_headers.append([b"x-other", b"1"])  # type: ignore[arg-type]
    _core.merge_headers(odd, None, view, spec)
    dated, dated_calls = _scope_spec(lim, item, fused=False)
    other = Response()
    _core.merge_headers(other, None, view, dated)
    assert calls == [(own, view), (odd, view)]
    assert dated_calls == [(other, view)]
    assert b"retry-after" not in dict(other.raw_headers)

    # isinstance, not the type: an object claiming the Response class (a
    # proxy) carries them; a list returned does not.
    class Proxy:
        def __init__(self) -> None:
            self.raw_headers: list[tuple[bytes, bytes]] = []

        @property  # type: ignore[misc]
        def __class__(self) -> type:
            return Response

    proxy = Proxy()
    _core.merge_headers(proxy, None, view, spec)
    assert tuple(proxy.raw_headers) == pairs
    listed = Response()
    _core.merge_headers([1], listed, view, spec)
    assert tuple(listed.raw_headers[-4:]) == pairs
    with pytest.raises(TypeError, match="spec"):
        _core.merge_headers(returned, None, view, spec[:-1])
    # Headers off: untouched.
    off, off_calls = _scope_spec(lim, item, headers=False)
    untouched = PlainTextResponse("x")
    before = list(untouched.raw_headers)
    _core.merge_headers(untouched, None, view, off)
    assert untouched.raw_headers == before and off_calls == []


class _Sink:
    """An ASGI send recording its messages; returns a marker per call."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def __call__(self, message: Any) -> str:
        self.messages.append(message)
        return f"sent {len(self.messages)}"


def test_mw_decide_wraps_send_for_the_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("1/minute")
    spec, _ = _scope_spec(lim, item)
    sink = _Sink()
    scope = _http_scope()
    wrapped = _core.mw_decide(scope, spec, sink)
    assert type(wrapped) is _core.HeaderSend
    view = scope["state"]["view"]
    assert type(view) is _View
    marked = {"done": True, "by": "by-marker", "view": view, "mark": "mw"}
    assert scope["state"] == marked
    start = {"type": "http.response.start", "status": 200, "headers": [(b"a", b"1")]}
    body = {"type": "http.response.body", "body": b"x"}
    assert wrapped(start) == "sent 1"
    assert wrapped(body) == "sent 2"
    assert sink.messages == [start, body]
    assert start["headers"] == [(b"a", b"1"), *view._data[4][5]]
    assert body == {"type": "http.response.body", "body": b"x"}
    # Rejected: False, the view in the state, nothing wrapped.
    scope = _http_scope()
    assert _core.mw_decide(scope, spec, sink) is False
    assert "mark" not in scope["state"]
    # Checked already: the general path's.
    assert _core.mw_decide(scope, spec, sink) is None
    # Headers off: send itself, unmarked.
    off, _ = _scope_spec(lim, parse("5/minute"), headers=False)
    scope = _http_scope(("10.0.0.2", 1))
    assert _core.mw_decide(scope, off, sink) is sink
    assert "mark" not in scope["state"]

    def broken() -> float:
        raise RuntimeError("clock")

    monkeypatch.setattr(time, "time", broken)
    scope = _http_scope(("10.9.9.9", 1))
    with pytest.raises(RuntimeError, match="clock"):
        _core.mw_decide(scope, spec, sink)
    assert scope["state"] == {"done": True, "by": "by-marker"}
    monkeypatch.undo()
    with pytest.raises(TypeError, match="3 positional"):
        _core.mw_decide(scope, spec)  # type: ignore[call-arg]
    bad = spec[:-1] + (("not", "a", "send", "spec"),)
    with pytest.raises(TypeError, match="send spec"):
        _core.mw_decide(_http_scope(("10.0.0.3", 1)), bad, sink)


def _start(headers: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "http.response.start", "status": 200}
    if headers is not None:
        message["headers"] = headers
    return message


def test_header_send_appends_or_falls_back() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    spec, _ = _scope_spec(lim, parse("5/minute"))
    scope = _http_scope()
    view = _core.decide_scope(scope, spec)
    pairs = view._data[4][5]
    send_spec, calls = _send_spec()
    state: dict[str, Any] = {}
    sink = _Sink()
    sender = _core.HeaderSend(sink, state, send_spec)
    # No view, or None: untouched.
    for value in (None, "absent"):
        if value is None:
            state["view"] = None
        message = _start([])
        sender(message)
        assert message["headers"] == [] and calls == []
        state.pop("view", None)
    # The view read when the response starts (a decorator may replace it).
    state["view"] = view
    message = _start([(b"content-type", b"text/plain")])
    sender(message)
    assert message["headers"] == [(b"content-type", b"text/plain"), *pairs]
    # Names already there, a tuple of headers, no headers, an odd pair, a
    # view of another class: the fallback's.
    odd_messages = [
        _start([(b"retry-after", b"5")]),
        _start(((b"a", b"1"),)),
        _start(),
        _start([[b"a", b"1"]]),
    ]
    for message in odd_messages:
        sender(message)
    state["view"] = ("other", "view")
    other = _start([])
    sender(other)
    assert calls == [(m, view) for m in odd_messages] + [(other, ("other", "view"))]
    assert odd_messages[0]["headers"] == [(b"retry-after", b"5")]
    # An HTTP-date Retry-After (fused False): the fallback's.
    dated_spec, dated_calls = _send_spec(fused=False)
    state["view"] = view
    dated = _start([])
    _core.HeaderSend(sink, state, dated_spec)(dated)
    assert dated_calls == [(dated, view)] and dated["headers"] == []
    # Other messages, and messages that are not dicts, pass untouched.
    body = {"type": "http.response.body", "body": b""}
    sender(body)
    assert body == {"type": "http.response.body", "body": b""}
    from collections import UserDict

    mapping = UserDict(_start([]))
    sender(mapping)
    assert mapping["headers"] == []
    assert sink.messages[-2:] == [body, mapping]

    # A fallback that raises: raised, nothing sent.
    def fail(message: Any, view: Any) -> None:
        raise ValueError("fallback")

    failing_spec, _ = _send_spec(fallback=fail)
    sent = len(sink.messages)
    with pytest.raises(ValueError, match="fallback"):
        _core.HeaderSend(sink, state, failing_spec)(_start(()))
    assert len(sink.messages) == sent


def test_header_send_bad_arguments() -> None:
    send_spec, _ = _send_spec()
    sink = _Sink()
    with pytest.raises(TypeError, match="dict"):
        _core.HeaderSend(sink, [], send_spec)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="send spec"):
        _core.HeaderSend(sink, {}, send_spec[:-1])
    with pytest.raises(TypeError):
        _core.HeaderSend(sink, {})  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="keywords"):
        _core.HeaderSend(sink, {}, send_spec, extra=1)  # type: ignore[call-arg]
    sender = _core.HeaderSend(sink, {}, send_spec)
    with pytest.raises(TypeError, match="1 argument"):
        sender(_start(), _start())  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="1 argument"):
        sender(message=_start())  # type: ignore[call-arg]


def test_header_send_keeps_no_extra_references_and_is_collected() -> None:
    import gc
    import weakref

    lim = STRATEGIES["fixed-window"](MemoryStorage())
    spec, _ = _scope_spec(lim, parse("1000/minute"))
    send_spec, _ = _send_spec()
    sink = _Sink()

    def run() -> list[int]:
        for _ in range(200):
            scope = _http_scope()
            sender = _core.mw_decide(scope, spec, sink)
            sender(_start([]))
            sender({"type": "http.response.body"})
            del scope["state"]["done"]
        sink.messages.clear()
        return [sys.getrefcount(o) for o in (sink, send_spec, spec, VIEW_NAMES)]

    first = run()
    assert run() == first

    # A cycle through a HeaderSend (its state holds it) is collected.
    class Marker:
        pass

    marker = Marker()
    ref = weakref.ref(marker)
    state: dict[str, Any] = {"marker": marker}
    state["sender"] = _core.HeaderSend(sink, state, send_spec)
    del state, marker
    gc.collect()
    assert ref() is None
