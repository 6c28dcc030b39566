"""The moving-window log holds one entry per admitted hit: limits too large
for it are refused with a clear error instead of exhausting memory."""

from __future__ import annotations

import pytest

from rapidlimit import RateLimitItem, parse
from rapidlimit.storage import MemoryStorage
from rapidlimit.strategies import (
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

HUGE = RateLimitItem(10**15, 1, granularity="hour")


def test_huge_moving_window_limit_is_a_clear_error() -> None:
    limiter = MovingWindowRateLimiter(MemoryStorage())
    with pytest.raises(ValueError, match="moving-window limit .* too large"):
        limiter.hit(HUGE, "k", cost=10**15)
    with pytest.raises(ValueError, match="sliding-window-counter"):
        limiter.decide_many([(HUGE, "k", 1)])
    with pytest.raises(ValueError, match="too large"):
        MemoryStorage().acquire_entry("k", 10**12, 60, amount=10**12)


def test_largest_moving_window_limit_still_works() -> None:
    limiter = MovingWindowRateLimiter(MemoryStorage())
    item = RateLimitItem(1 << 20, 1, granularity="hour")
    assert limiter.hit(item, "k", cost=1 << 20, now=100.0)
    assert not limiter.hit(item, "k", now=100.5)


def test_sliding_window_takes_large_quotas() -> None:
    limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
    assert limiter.hit(HUGE, "k", cost=10**15, now=100.0)
    assert not limiter.hit(parse("1/hour"), "k2", cost=2, now=100.0)
