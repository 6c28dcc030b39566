"""Code written against ``_core.pyi`` as users write it: mypy --strict
checks this file in CI (pyproject's ``[tool.mypy] files``) and
test_typed_usage.py runs it, so the stubs and the runtime must agree."""

from __future__ import annotations

import rapidlimit
from rapidlimit import Decision, RateLimitItem
from rapidlimit.strategies import FixedWindowRateLimiter, TokenBucketRateLimiter

T0 = 1_700_000_000.0


def exercise() -> list[object]:
    storage = rapidlimit.MemoryStorage()
    fixed = FixedWindowRateLimiter(storage)
    item = rapidlimit.parse("5/minute")
    out: list[object] = [fixed.hit(item, "a", cost=2, now=T0)]
    # A Decision is a 5-tuple: unpacked, indexed, converted.
    allowed, limit, remaining, reset_time, retry_after = fixed.decide(item, "a", now=T0)
    decision: Decision = fixed.decide(item, "a", now=T0)
    out += [allowed, limit, remaining, reset_time - T0, retry_after]
    out += [tuple(decision)[2], decision.remaining, decision[0]]
    # Items order by period, as limits' do.
    items: list[RateLimitItem] = sorted(rapidlimit.parse_many("1/hour;1/second"))
    out.append([str(i) for i in items])
    bucket = TokenBucketRateLimiter(storage)
    burst = rapidlimit.parse("10/second").with_burst(20)
    out.append(bucket.hit(burst, "b", now=T0))
    many = fixed.decide_many([(item, "c", 1), (item, "d", 9)], now=T0, test=True)
    out.append([d.allowed for d in many])
    stats = fixed.get_window_stats(item, "a", now=T0)
    out.append(stats[1])
    fixed.clear(item, "a")
    return out
