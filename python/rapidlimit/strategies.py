"""Rate limiting strategies with the interface of ``limits.strategies``.

Each class binds one algorithm of the native core to a storage.
``hit``/``test``/``get_window_stats``/``clear`` behave as in ``limits``;
``decide`` and ``decide_many`` return full decisions (remaining, reset time
and retry-after) in the same call.
"""

from __future__ import annotations

from typing import NamedTuple

from rapidlimit._core import Decision, RateLimiter, RateLimitItem, Storage

__all__ = [
    "STRATEGIES",
    "Decision",
    "FixedWindowRateLimiter",
    "MovingWindowRateLimiter",
    "RateLimiter",
    "SlidingWindowCounterRateLimiter",
    "TokenBucketRateLimiter",
    "WindowStats",
]


class WindowStats(NamedTuple):
    """Same shape as ``limits.WindowStats``."""

    reset_time: float
    remaining: int


class _Strategy(RateLimiter):
    STRATEGY = ""

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage, self.STRATEGY)

    def get_window_stats(
        self, item: RateLimitItem, *identifiers: object, now: float | None = None
    ) -> WindowStats:
        reset_time, remaining = super().get_window_stats(item, *identifiers, now=now)
        return WindowStats(reset_time, remaining)


class FixedWindowRateLimiter(_Strategy):
    STRATEGY = "fixed-window"


class MovingWindowRateLimiter(_Strategy):
    STRATEGY = "moving-window"


class SlidingWindowCounterRateLimiter(_Strategy):
    STRATEGY = "sliding-window-counter"


class TokenBucketRateLimiter(_Strategy):
    """GCRA: ``amount`` per period with bursts up to ``item.burst``."""

    STRATEGY = "token-bucket"


STRATEGIES: dict[str, type[_Strategy]] = {
    cls.STRATEGY: cls
    for cls in (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
        TokenBucketRateLimiter,
    )
}
