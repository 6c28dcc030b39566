"""The Python API of the core: ``rapidlimit._core`` as typed in ``_core.pyi``
and the ``limits``-shaped wrappers in ``rapidlimit.strategies``.

Time is passed explicitly (``now=``) everywhere except where the system
clock itself is under test.
"""

from __future__ import annotations

import re
import threading
import time

import limits
import pytest

import rapidlimit
from rapidlimit import _core
from rapidlimit.storage import MemoryStorage
from rapidlimit.strategies import (
    STRATEGIES,
    Decision,
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
    TokenBucketRateLimiter,
    WindowStats,
)

T0 = 1_700_000_000.0  # a multiple of 10 s and of 1/64 s
ALL = [
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
    TokenBucketRateLimiter,
]


@pytest.fixture(params=ALL, ids=lambda cls: cls.STRATEGY)
def limiter(request: pytest.FixtureRequest) -> RateLimiter:
    return request.param(MemoryStorage())


# ------------------------------------------------------ hit / test / decide


def test_hit_test_and_decide(limiter: RateLimiter) -> None:
    item = rapidlimit.parse("3/minute")
    assert limiter.test(item, "a", now=T0)
    d = limiter.decide(item, "a", now=T0)
    assert isinstance(d, Decision)
    assert (d.allowed, d.limit, d.remaining, d.retry_after) == (True, 3, 2, 0.0)
    assert limiter.hit(item, "a", now=T0)
    assert limiter.hit(item, "a", now=T0)
    assert not limiter.test(item, "a", now=T0)
    assert not limiter.hit(item, "a", now=T0)
    d = limiter.decide(item, "a", now=T0 + 1)
    assert not d.allowed
    assert d.remaining == 0
    assert 0 < d.retry_after <= 60
    assert d.reset_time > T0
    # Other identities are independent.
    assert limiter.hit(item, "b", now=T0)


def test_test_consumes_nothing(limiter: RateLimiter) -> None:
    item = rapidlimit.parse("2 per 10 seconds")
    for _ in range(10):
        assert limiter.test(item, "k", now=T0)
        assert limiter.test(item, "k", cost=2, now=T0)
    assert limiter.get_window_stats(item, "k", now=T0).remaining == 2
    assert limiter.hit(item, "k", cost=2, now=T0)
    assert not limiter.test(item, "k", now=T0)


def test_decision_is_a_struct_sequence() -> None:
    limiter = FixedWindowRateLimiter(MemoryStorage())
    d = limiter.decide(rapidlimit.parse("2/second"), "q", now=100.0)
    assert d == (True, 2, 1, 101.0, 0.0)
    assert tuple(d) == (d.allowed, d.limit, d.remaining, d.reset_time, d.retry_after)
    assert type(d) is _core.Decision is rapidlimit.Decision
    assert "allowed=True" in repr(d)
    assert isinstance(d.reset_time, float)
    assert isinstance(d.retry_after, float)


@pytest.mark.parametrize("amount", [1, 256, 257, 1000, 1023, 1024, 1025, 10**9])
def test_decision_values_around_the_core_caches(amount: int) -> None:
    """Small ints and 0.0 come from caches in the core: plain values."""
    limiter = FixedWindowRateLimiter(MemoryStorage())
    d = limiter.decide(rapidlimit.parse(f"{amount}/minute"), "q", now=T0)
    assert tuple(d) == (True, amount, amount - 1, T0 + 60, 0.0)
    assert [type(v) for v in d] == [bool, int, int, float, float]
    item = rapidlimit.parse(f"{amount}/minute")
    rejected = limiter.decide(item, "q", cost=amount, now=T0 + 1)
    assert tuple(rejected) == (False, amount, 0, T0 + 60, 59.0)


def test_retry_after_is_sub_second() -> None:
    limiter = TokenBucketRateLimiter(MemoryStorage())
    item = rapidlimit.parse("10/second")
    for _ in range(10):
        assert limiter.hit(item, "k", now=T0)
    d = limiter.decide(item, "k", now=T0 + 1 / 32)  # exact in binary
    assert not d.allowed
    assert d.retry_after == 0.06875
    assert d.reset_time == pytest.approx(T0 + 1.0, abs=1e-6)


def test_cost(limiter: RateLimiter) -> None:
    item = rapidlimit.parse("5/minute")
    assert limiter.hit(item, "k", cost=3, now=T0)
    assert limiter.test(item, "k", cost=2, now=T0)
    assert not limiter.test(item, "k", cost=3, now=T0)
    assert limiter.decide(item, "k", cost=2, now=T0).remaining == 0
    assert limiter.hit(item, "k", cost=0, now=T0)  # free
    assert not limiter.hit(item, "k", cost=1, now=T0)
    # More than the whole limit never fits.
    assert not limiter.hit(item, "other", cost=6, now=T0)
    assert limiter.hit(item, "zero", cost=True, now=T0)  # bool is an int


@pytest.mark.parametrize("bad", [-1, 10**15 + 1, 2**70])
def test_cost_out_of_range_is_a_value_error(limiter: RateLimiter, bad: int) -> None:
    item = rapidlimit.parse("5/minute")
    with pytest.raises((ValueError, OverflowError), match="cost|int"):
        limiter.hit(item, "k", cost=bad, now=T0)
    with pytest.raises((ValueError, OverflowError)):
        limiter.decide_many([(item, "k", bad)], now=T0)


@pytest.mark.parametrize("bad", ["1", None, [1]])
def test_cost_must_be_an_integer(limiter: RateLimiter, bad: object) -> None:
    item = rapidlimit.parse("5/minute")
    for method in (limiter.hit, limiter.test, limiter.decide):
        with pytest.raises(TypeError):
            method(item, "k", cost=bad, now=T0)
    assert limiter.get_window_stats(item, "k", now=T0).remaining == 5


def test_a_whole_float_cost_is_its_integer(limiter: RateLimiter) -> None:
    # A cost worked out by division (n / 2.0) counts as the whole number it is.
    item = rapidlimit.parse("5/minute")
    assert limiter.hit(item, "k", cost=2.0, now=T0)
    assert limiter.decide(item, "k", cost=3.0, now=T0).remaining == 0
    assert not limiter.hit(item, "k", cost=1.0, now=T0)
    assert limiter.decide_many([(item, "other", 4.0)], now=T0)[0].remaining == 1


@pytest.mark.parametrize("bad", [1.5, 0.1, -1.0, float("nan"), float("inf"), 1e16])
def test_a_fractional_or_out_of_range_float_cost_is_a_value_error(
    limiter: RateLimiter, bad: float
) -> None:
    item = rapidlimit.parse("5/minute")
    for method in (limiter.hit, limiter.test, limiter.decide):
        with pytest.raises(ValueError, match="whole number"):
            method(item, "k", cost=bad, now=T0)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        limiter.decide_many([(item, "k", bad)], now=T0)
    assert limiter.get_window_stats(item, "k", now=T0).remaining == 5


def test_now_argument() -> None:
    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = rapidlimit.parse("1/second")
    assert limiter.hit(item, "k", now=100)  # ints are accepted
    assert not limiter.hit(item, "k", now=100.999)
    assert limiter.hit(item, "k", now=101.0)
    assert limiter.hit(item, "k", now=None) is True  # the system clock
    with pytest.raises(TypeError):
        limiter.hit(item, "k", now="soon")
    for bad in (float("nan"), float("inf"), 1e12):
        with pytest.raises(ValueError, match="now must be finite"):
            limiter.hit(item, "k", now=bad)
    with pytest.raises(TypeError, match="unexpected keyword argument 'when'"):
        limiter.hit(item, "k", when=1.0)


def test_system_clock_is_time_time() -> None:
    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = rapidlimit.parse("1/hour")
    before = time.time()
    d = limiter.decide(item, "k")
    after = time.time()
    assert before + 3600 - 0.01 <= d.reset_time <= after + 3600 + 0.01
    reset, remaining = limiter.get_window_stats(item, "k")
    assert remaining == 0
    assert reset == d.reset_time


def test_argument_errors_are_clear() -> None:
    limiter = FixedWindowRateLimiter(MemoryStorage())
    with pytest.raises(TypeError, match="missing required argument 'item'"):
        limiter.hit()
    with pytest.raises(TypeError, match="expected RateLimitItem, got str"):
        limiter.hit("1/second", "k")
    with pytest.raises(TypeError, match="RateLimitItem"):
        limiter.hit(limits.parse("1/second"), "k")
    with pytest.raises(ValueError, match="unknown strategy 'leaky-bucket'"):
        RateLimiter(MemoryStorage(), "leaky-bucket")
    with pytest.raises(TypeError, match="storage must be a rapidlimit storage"):
        RateLimiter(object(), "fixed-window")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got MemoryStorage"):
        FixedWindowRateLimiter(limits.storage.MemoryStorage())  # type: ignore[arg-type]


# ----------------------------------------------------------- identifiers


def test_identifiers_of_any_type_build_limits_keys() -> None:
    ours = rapidlimit.parse("2/minute")
    theirs = limits.parse("2/minute")
    for ids in [
        (),
        ("a",),
        ("a", "b"),
        (b"bytes",),
        (7,),
        (1, 2.5, None, b"x", "y"),
        ("a/b", ""),
        ("ünïcødé", "日本"),
        tuple(str(i) for i in range(9)),
    ]:
        assert ours.key_for(*ids) == theirs.key_for(*ids), ids


def test_identifiers_of_equal_text_share_state() -> None:
    limiter = MovingWindowRateLimiter(MemoryStorage())
    item = rapidlimit.parse("2/minute")
    assert limiter.hit(item, 5, now=T0)
    assert limiter.hit(item, b"5", now=T0)
    assert not limiter.hit(item, "5", now=T0)
    assert limiter.hit(item, "x", 1, now=T0)
    assert limiter.get_window_stats(item, "x", "1", now=T0).remaining == 1
    assert limiter.get_window_stats(item, "x/1", now=T0).remaining == 1


def test_invalid_utf8_bytes_identifier_raises() -> None:
    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = rapidlimit.parse("2/minute")
    with pytest.raises(UnicodeDecodeError):
        limiter.hit(item, b"\xff", now=T0)
    with pytest.raises(UnicodeDecodeError):
        item.key_for(b"\xff")


# ------------------------------------------------------- window stats/clear


def test_window_stats_is_a_named_tuple(limiter: RateLimiter) -> None:
    item = rapidlimit.parse("4 per 10 seconds")
    stats = limiter.get_window_stats(item, "k", now=T0)
    assert isinstance(stats, WindowStats)
    assert stats.remaining == 4
    assert stats._fields == ("reset_time", "remaining")
    limiter.hit(item, "k", cost=3, now=T0 + 1)
    stats = limiter.get_window_stats(item, "k", now=T0 + 2)
    assert stats.remaining == 1
    assert stats.reset_time > T0 + 2
    reset_time, remaining = stats
    assert (reset_time, remaining) == (stats.reset_time, stats.remaining)


def test_window_stats_per_strategy() -> None:
    item = rapidlimit.parse("4 per 10 seconds")
    expected = {
        # The counter expires 10 s after the first hit.
        "fixed-window": (T0 + 11, 1),
        # The oldest entry leaves 10 s after it was made.
        "moving-window": (T0 + 11, 1),
        # Epoch-aligned 10 s windows: this one ends at T0 + 10.
        "sliding-window-counter": (T0 + 10, 1),
        # 3 tokens of 2.5 s each, taken at T0 + 1: full at T0 + 8.5.
        "token-bucket": (T0 + 8.5, 1),
    }
    for name, cls in STRATEGIES.items():
        limiter = cls(MemoryStorage())
        assert limiter.hit(item, "k", cost=3, now=T0 + 1)
        assert limiter.get_window_stats(item, "k", now=T0 + 2) == expected[name], name


def test_clear(limiter: RateLimiter) -> None:
    item = rapidlimit.parse("1/hour")
    other = rapidlimit.parse("1/minute")
    assert limiter.hit(item, "k", now=T0)
    assert limiter.hit(other, "k", now=T0)
    assert not limiter.hit(item, "k", now=T0)
    assert limiter.clear(item, "k") is None
    assert limiter.hit(item, "k", now=T0)
    assert not limiter.hit(other, "k", now=T0)  # another limit, not cleared
    limiter.clear(item, "never-seen")


def test_storage_reset_and_len() -> None:
    storage = MemoryStorage()
    limiters = [cls(storage) for cls in ALL]
    item = rapidlimit.parse("1/hour")
    for limiter in limiters:
        for key in ("a", "b", "c"):
            assert limiter.hit(item, key, now=T0)
    assert len(storage) == 12
    assert storage.reset() == 12
    assert len(storage) == 0
    # True when empty, as limits' storages are: `storage or MemoryStorage()`
    # keeps it.
    assert storage and bool(MemoryStorage())
    for limiter in limiters:
        assert limiter.hit(item, "a", now=T0)
    assert storage.check() is True


def test_limiters_on_one_storage_keep_separate_state() -> None:
    storage = MemoryStorage()
    fixed = FixedWindowRateLimiter(storage)
    moving = MovingWindowRateLimiter(storage)
    item = rapidlimit.parse("1/hour")
    assert fixed.hit(item, "k", now=T0)
    assert moving.hit(item, "k", now=T0)
    assert fixed.storage is storage
    assert moving.strategy == "moving-window"


# ------------------------------------------------------------- decide_many


def test_decide_many_stops_at_the_first_rejection(limiter: RateLimiter) -> None:
    big = rapidlimit.parse("10/minute")
    one = rapidlimit.parse("1/minute")
    assert limiter.hit(one, "b", now=T0)
    requests = [(big, "a", 1), (one, "b", 1), (big, "c", 1)]
    out = limiter.decide_many(requests, now=T0 + 1)
    assert [d.allowed for d in out] == [True, False]
    assert out[0].remaining == 9
    assert out[-1].retry_after > 0
    # "a" was charged, "c" was not.
    assert limiter.get_window_stats(big, "a", now=T0 + 1).remaining == 9
    assert limiter.get_window_stats(big, "c", now=T0 + 1).remaining == 10
    # All admitted: one decision each.
    out = limiter.decide_many([(big, "a", 2), (big, "c", 3)], now=T0 + 1)
    assert [(d.allowed, d.remaining) for d in out] == [(True, 7), (True, 7)]
    assert limiter.decide_many([], now=T0) == []


def test_decide_many_test_mode_evaluates_all(limiter: RateLimiter) -> None:
    big = rapidlimit.parse("10/minute")
    one = rapidlimit.parse("1/minute")
    assert limiter.hit(one, "b", now=T0)
    requests = [(big, "a", 1), (one, "b", 1), (big, "c", 11), (big, "d", 4)]
    out = limiter.decide_many(requests, now=T0 + 1, test=True)
    assert [d.allowed for d in out] == [True, False, False, True]
    assert [d.limit for d in out] == [10, 1, 10, 10]
    # Positional arguments work too, and nothing was charged.
    assert len(limiter.decide_many(requests, T0 + 1, True)) == 4
    assert limiter.get_window_stats(big, "a", now=T0 + 1).remaining == 10
    assert limiter.get_window_stats(big, "d", now=T0 + 1).remaining == 10


def test_decide_many_matches_sequential_decides() -> None:
    item = rapidlimit.parse("3/minute")
    batch = SlidingWindowCounterRateLimiter(MemoryStorage())
    single = SlidingWindowCounterRateLimiter(MemoryStorage())
    requests = [(item, "k", 1), (item, "k", 1), (item, "j", 2), (item, "k", 1)]
    got = batch.decide_many(requests, now=T0)
    want = [single.decide(i, k, cost=c, now=T0) for i, k, c in requests]
    assert got == want


def test_decide_many_argument_errors() -> None:
    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = rapidlimit.parse("3/minute")
    with pytest.raises(TypeError, match=r"tuple \(item, identity, cost\)"):
        limiter.decide_many([(item, "k")])
    with pytest.raises(TypeError, match=r"tuple \(item, identity, cost\)"):
        limiter.decide_many([[item, "k", 1]])
    with pytest.raises(TypeError, match="sequence"):
        limiter.decide_many(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected RateLimitItem"):
        limiter.decide_many([("3/minute", "k", 1)])
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        limiter.decide_many([], bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        limiter.decide_many()  # type: ignore[call-arg]
    # A failed batch charges nothing, even the valid requests before the
    # bad one.
    with pytest.raises(ValueError):
        limiter.decide_many([(item, "k", 1), (item, "k", -1)], now=T0)
    assert limiter.get_window_stats(item, "k", now=T0).remaining == 3


# ------------------------------------------------------- RateLimitItem API


def test_rate_limit_item_mirrors_limits() -> None:
    ours = rapidlimit.parse("5 per 2 minutes")
    theirs = limits.parse("5 per 2 minutes")
    assert (ours.amount, ours.multiples, ours.granularity, ours.namespace) == (
        theirs.amount,
        theirs.multiples,
        theirs.GRANULARITY.name,
        theirs.namespace,
    )
    assert ours.get_expiry() == theirs.get_expiry() == 120
    assert str(ours) == str(theirs) == "5 per 2 minute"
    assert ours.key_for("x") == theirs.key_for("x")
    item = _core.RateLimitItem(5, 2, "NS", granularity="minute")
    assert item.key_for("a") == "NS/a/5/2/minute"
    assert _core.RateLimitItem(5, None).multiples == 1
    assert _core.RateLimitItem(5, 0).multiples == 1
    assert _core.granularity_seconds("day") == 86400


def test_rate_limit_item_equality_and_hash() -> None:
    a = rapidlimit.parse("2/second")
    b = _core.RateLimitItem(2, 1, granularity="second")
    assert a == b
    assert hash(a) == hash(b)
    assert a != rapidlimit.parse("3/second")
    assert a != rapidlimit.parse("2/minute")
    # As in limits, the namespace is not part of equality.
    assert a == _core.RateLimitItem(2, 1, "OTHER")
    assert limits.parse("2/second") == limits.RateLimitItemPerSecond(2, 1, "OTHER")
    assert hash(a) == hash(_core.RateLimitItem(2, 1, "OTHER"))
    assert a != "2/second"
    assert a != limits.parse("2/second")
    assert a.with_burst(5) != a
    assert a.with_burst(5).with_burst(0) == a
    assert len({a, b, rapidlimit.parse("2 per 1 second")}) == 1
    assert rapidlimit.parse("1/second") < rapidlimit.parse("1/minute")


def test_rate_limit_item_validation() -> None:
    with pytest.raises(ValueError, match="no granularity matched for fortnight"):
        _core.RateLimitItem(5, granularity="fortnight")
    with pytest.raises(ValueError, match="amount out of range"):
        _core.RateLimitItem(-1)
    with pytest.raises(ValueError, match="burst out of range"):
        _core.RateLimitItem(5, burst=-1)
    with pytest.raises(ValueError, match="burst out of range"):
        rapidlimit.parse("1/second").with_burst(-2)
    with pytest.raises(ValueError, match="multiples out of range"):
        _core.RateLimitItem(1, 10**9, granularity="year")
    item = _core.RateLimitItem(3, 1, burst=7)
    assert item.burst == 7
    assert rapidlimit.parse("3/second").burst == 0


def test_parse_errors_use_limits_wording() -> None:
    with pytest.raises(ValueError, match="couldn't parse rate limit string 'nonsense'"):
        rapidlimit.parse("nonsense")
    with pytest.raises(ValueError, match="couldn't parse rate limit string '5'"):
        rapidlimit.parse(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rapidlimit.parse_many("1/second;;")


def test_parse_cache_returns_fresh_lists() -> None:
    first = rapidlimit.parse_many("1/second;2/minute")
    second = rapidlimit.parse_many("1/second;2/minute")
    assert first == second
    assert first is not second
    first.append(rapidlimit.parse("9/day"))
    first.clear()
    assert rapidlimit.parse_many("1/second;2/minute") == second
    assert len(second) == 2
    # Items are immutable values; sharing them is fine.
    assert rapidlimit.parse("1/second") is rapidlimit.parse("1/second")
    assert rapidlimit.parse("1/second") == _core.parse("1/second")


def test_token_bucket_burst_from_python() -> None:
    limiter = TokenBucketRateLimiter(MemoryStorage())
    item = rapidlimit.parse("2/second").with_burst(5)
    assert [limiter.hit(item, "k", now=T0) for _ in range(6)] == [True] * 5 + [False]
    d = limiter.decide(item, "k", now=T0)
    assert d.limit == 2
    assert d.retry_after == pytest.approx(0.5)
    assert limiter.get_window_stats(item, "k", now=T0 + 1) == (T0 + 2.5, 2)


# ----------------------------------------------------------- MemoryStorage


def test_memory_storage_options() -> None:
    storage = MemoryStorage(max_keys=10, shards=4)
    assert storage.max_keys == 10
    assert MemoryStorage().max_keys == 1_000_000
    assert isinstance(storage.memory_bytes(), int)
    assert isinstance(storage, _core.Storage)
    for kwargs in ({"max_keys": 0}, {"max_keys": -5}):
        with pytest.raises(ValueError, match="max_keys must be > 0"):
            MemoryStorage(**kwargs)
    for shards in (0, -1, 65537):
        with pytest.raises(ValueError, match="shards must be between 1 and 65536"):
            MemoryStorage(shards=shards)
    with pytest.raises(TypeError):
        MemoryStorage(max_keys="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _core.Storage()


def test_memory_storage_cap_holds_through_the_api() -> None:
    storage = MemoryStorage(max_keys=100, shards=64)
    limiter = FixedWindowRateLimiter(storage)
    item = rapidlimit.parse("1/day")
    for i in range(5000):
        assert limiter.hit(item, f"user{i}", now=T0 + i * 0.001)
        assert len(storage) <= 100
    # Recently used keys survive; the newest one is certainly there.
    assert not limiter.hit(item, "user4999", now=T0 + 5)


# -------------------------------------------------------------- subclasses


def test_subclassing_works() -> None:
    class Audited(FixedWindowRateLimiter):
        def __init__(self, storage: MemoryStorage) -> None:
            super().__init__(storage)
            self.calls = 0

        def checked_hit(self, item: _core.RateLimitItem, key: str) -> bool:
            self.calls += 1
            return self.hit(item, key, now=T0)

    limiter = Audited(MemoryStorage())
    item = rapidlimit.parse("1/minute")
    assert limiter.checked_hit(item, "k")
    assert not limiter.checked_hit(item, "k")
    assert limiter.calls == 2
    assert isinstance(limiter, RateLimiter)
    assert limiter.strategy == "fixed-window"

    class Direct(RateLimiter):
        pass

    direct = Direct(MemoryStorage(), "token-bucket")
    assert direct.hit(item, "k", now=T0)
    assert not direct.hit(item, "k", now=T0)


def test_subclass_that_skips_init_fails_clearly() -> None:
    class Broken(RateLimiter):
        def __init__(self) -> None:
            pass

    with pytest.raises(TypeError, match="__init__"):
        Broken()


def test_strategies_registry() -> None:
    assert set(STRATEGIES) == {
        "fixed-window",
        "moving-window",
        "sliding-window-counter",
        "token-bucket",
    }
    for name, cls in STRATEGIES.items():
        assert cls(MemoryStorage()).strategy == name == cls.STRATEGY
    # Every strategy limits has, rapidlimit has under the same name, but
    # limits 4's fixed-window-elastic-expiry (deprecated in 4.1, gone in 5).
    theirs = set(limits.strategies.STRATEGIES) - {"fixed-window-elastic-expiry"}
    assert theirs <= set(STRATEGIES)


# ----------------------------------------------------------------- threads


def test_exact_admission_from_python_threads(limiter: RateLimiter) -> None:
    item = rapidlimit.parse("500/minute")
    admitted = []
    lock = threading.Lock()

    def worker() -> None:
        mine = sum(limiter.hit(item, "hot", now=T0) for _ in range(200))
        with lock:
            admitted.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 500
