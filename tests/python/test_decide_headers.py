"""RateLimiter.decide_headers: the decision of decide() plus the four
rate-limit headers, formatted by the core exactly as the slowapi layer's
Python formulas would format them."""

from __future__ import annotations

import random

import pytest

from rapidlimit import parse
from rapidlimit._core import HeaderNames
from rapidlimit.storage import MemoryStorage
from rapidlimit.strategies import STRATEGIES

NAMES = HeaderNames(
    b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset", b"retry-after"
)
T0 = 1_700_000_000.0


def expected_headers(
    names: HeaderNames, decision: tuple[object, ...], now: float
) -> list[tuple[bytes, bytes]]:
    _, limit, remaining, reset_time, _ = decision
    assert isinstance(reset_time, float)
    return [
        (names.limit, b"%d" % limit),  # type: ignore[str-bytes-safe]
        (names.remaining, b"%d" % remaining),  # type: ignore[str-bytes-safe]
        (names.reset, b"%d" % int(1 + reset_time)),
        (names.retry_after, b"%d" % int(1 + reset_time - now)),
    ]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("limit", ["5/7 seconds", "300/minute", "2/day"])
def test_same_as_decide_and_python_formulas(strategy: str, limit: str) -> None:
    plain = STRATEGIES[strategy](MemoryStorage())
    fused = STRATEGIES[strategy](MemoryStorage())
    item = parse(limit)
    rnd = random.Random(f"{strategy}{limit}")
    now = T0 + 0.123456
    seen = set()
    for _ in range(2000):
        now += rnd.choice([0.0, 1e-6, 0.37, 0.999999, 1.0, 2.5, 7.0])
        key = f"k{rnd.randrange(3)}"
        cost = rnd.choice([1, 1, 1, 2])
        decision = plain.decide(item, key, cost=cost, now=now)
        result = fused.decide_headers(item, key, cost, now, NAMES)
        assert result[:5] == tuple(decision)
        assert result[5] == expected_headers(NAMES, tuple(decision), now)
        seen.add(decision.allowed)
    if not limit.startswith("300"):
        assert seen == {True, False}


def test_boundaries_of_the_truncation() -> None:
    """int() truncates toward zero: reset times just below and above whole
    seconds, and a `now` after the reset (negative Retry-After)."""
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("1/second")
    for offset in (0.0, 1e-9, 0.5, 0.999999999):
        now = T0 + offset
        result = lim.decide_headers(item, f"b{offset}", 1, now, NAMES)
        assert result[5] == expected_headers(NAMES, result[:5], now)
        # The same decision formatted for a later clock reading.
        later = now + 3.0
        again = lim.decide_headers(item, f"b{offset}", 0, later, NAMES)
        assert again[5] == expected_headers(NAMES, again[:5], later)


def test_custom_names_and_fresh_lists() -> None:
    names = HeaderNames(b"l", b"r", b"s", b"ra")
    assert (names.limit, names.remaining, names.reset, names.retry_after) == (
        b"l",
        b"r",
        b"s",
        b"ra",
    )
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("100/hour")
    first = lim.decide_headers(item, "a", 1, T0, names)
    second = lim.decide_headers(item, "a", 1, T0, names)
    assert [n for n, _ in first[5]] == [b"l", b"r", b"s", b"ra"]
    assert first[5] is not second[5]
    first[5].append((b"x", b"y"))  # the caller owns the list
    assert len(lim.decide_headers(item, "a", 1, T0, names)[5]) == 4
    # Small values come from the name's table: the same pair object.
    assert first[5][0] is second[5][0]
    big = parse("100000/hour")
    assert lim.decide_headers(big, "a", 1, T0, names)[5][0] == (b"l", b"100000")


def test_bad_arguments() -> None:
    lim = STRATEGIES["fixed-window"](MemoryStorage())
    item = parse("5/minute")
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, T0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lim.decide_headers("5/minute", "a", 1, T0, NAMES)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lim.decide_headers(item, "a", 1, T0, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lim.decide_headers(item, "a", -1, T0, NAMES)
    with pytest.raises(ValueError):
        lim.decide_headers(item, "a", 1, float("nan"), NAMES)
    with pytest.raises(TypeError):
        HeaderNames("limit", b"r", b"s", b"ra")  # type: ignore[arg-type]
