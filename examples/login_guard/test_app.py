import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from freezegun import freeze_time

from .app import app, limiter


@pytest.fixture
def clock() -> Iterator[Any]:
    limiter.reset()
    with freeze_time("2026-12-06 12:00:00", real_asyncio=True) as frozen:
        yield frozen


def attempt(address: str, username: str, password: str) -> httpx.Response:
    """One login attempt from ``address``."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(address, 4000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test"
        ) as client:
            return await client.post(
                "/login", json={"username": username, "password": password}
            )

    return asyncio.run(go())


def attempts(tries: list[tuple[str, str, str]]) -> list[int]:
    """(address, username, password) per attempt, in order: the statuses."""
    return [attempt(*one).status_code for one in tries]


def test_an_account_is_guarded_whatever_the_address(clock: Any) -> None:
    # Each guess from another address, the name in another case.
    guesses = [
        (f"10.0.0.{i}", "Alice" if i % 2 else "alice", "guess") for i in range(5)
    ]
    assert attempts(guesses) == [401, 401, 401, 429, 429]
    # Even the right password waits out the cooldown...
    assert attempts([("10.0.1.1", "alice", "correct horse")]) == [429]
    # ...which is a minute after the third attempt.
    clock.tick(60)
    assert attempts([("10.0.1.1", "alice", "correct horse")]) == [200]


def test_the_cooldown_grows_with_persistence(clock: Any) -> None:
    statuses = []
    for _ in range(5):  # three tries a minute, for five minutes
        statuses += attempts([("10.0.0.9", "alice", "guess")] * 3)
        clock.tick(60)
    # The hourly window stops the eleventh attempt: no more tries until
    # the hour that began with the first one is over.
    assert statuses == [401] * 10 + [429] * 5
    clock.tick(60 * 55 - 1)
    assert attempts([("10.0.0.9", "alice", "correct horse")]) == [429]
    clock.tick(1)
    assert attempts([("10.0.0.9", "alice", "correct horse")]) == [200]


def test_one_address_trying_many_accounts_meets_its_own_limit(clock: Any) -> None:
    tries = [("10.0.0.7", f"user{i}", "guess") for i in range(21)]
    assert attempts(tries) == [401] * 20 + [429]
    # Another address is not held back by it.
    assert attempts([("10.0.0.8", "alice", "correct horse")]) == [200]


def test_a_refusal_says_how_long_to_wait(clock: Any) -> None:
    attempts([("10.0.0.1", "bob", "guess")] * 3)
    response = attempt("10.0.0.1", "bob", "x")
    assert response.status_code == 429
    assert response.json() == {"error": "Rate limit exceeded: 3 per 1 minute"}
    assert response.headers["retry-after"] == "61"  # 60 s, as slowapi rounds
