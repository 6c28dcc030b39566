import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from freezegun import freeze_time

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from .app import KEYS, app, limiter

ALICE = {"x-api-key": "key-alice"}  # free: 30/minute;1000/day


@pytest.fixture
def clock() -> Iterator[Any]:
    limiter.reset()
    with freeze_time("2026-12-06 12:00:00", real_asyncio=True) as frozen:
        yield frozen


def codes(client: TestClient, n: int, path: str = "/v1/quotes", **kw: Any) -> list[int]:
    return [client.get(path, **kw).status_code for _ in range(n)]


def test_a_key_bursts_then_waits_for_room(clock: Any) -> None:
    client = TestClient(app)
    assert codes(client, 31, headers=ALICE) == [200] * 30 + [429]
    refused = client.get("/v1/quotes", headers=ALICE)
    assert refused.json() == {"error": "Rate limit exceeded: 30 per 1 minute"}
    # One request's room comes back every 2 s (Retry-After counts to it, as
    # slowapi rounds: 1 + 2 s); the bucket is full again in a minute.
    assert refused.headers["retry-after"] == "3"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    clock.tick(2)
    assert codes(client, 2, headers=ALICE) == [200, 429]


def test_the_export_draws_five_from_the_same_budget(clock: Any) -> None:
    client = TestClient(app)
    assert codes(client, 7, "/v1/export", headers=ALICE) == [200] * 6 + [429]
    refused = client.get("/v1/export", headers=ALICE)
    assert refused.headers["retry-after"] == "11"  # room for 5: 10 s
    assert client.get("/v1/quotes", headers=ALICE).status_code == 429
    clock.tick(2)
    assert client.get("/v1/quotes", headers=ALICE).status_code == 200


def test_callers_without_a_known_key_count_by_address(clock: Any) -> None:
    client = TestClient(app)
    assert codes(client, 6) == [200] * 5 + [429]
    unknown = client.get("/v1/quotes", headers={"x-api-key": "key-guessed"})
    assert unknown.status_code == 429
    assert unknown.headers["x-ratelimit-limit"] == "5"
    assert client.get("/v1/quotes", headers=ALICE).status_code == 200


def test_a_new_plan_applies_on_the_next_request(
    clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = TestClient(app)
    assert codes(client, 31, headers=ALICE)[-1] == 429
    monkeypatch.setitem(KEYS, "key-alice", "pro")
    upgraded = client.get("/v1/quotes", headers=ALICE)
    assert upgraded.status_code == 200
    assert upgraded.headers["x-ratelimit-limit"] == "600"


def test_internal_keys_are_exempt(clock: Any) -> None:
    client = TestClient(app)
    ops = {"x-api-key": "key-ops"}
    assert set(codes(client, 200, headers=ops)) == {200}
    assert "x-ratelimit-limit" not in client.get("/v1/quotes", headers=ops).headers


def test_the_daily_quota_stops_a_steady_client(clock: Any) -> None:
    # An anonymous caller (5/minute;100/day) sending one request every
    # 12 s never meets the per-minute limit, only the daily one, which
    # refills one request every 864 s.
    client = TestClient(app)
    admitted = 0
    while (response := client.get("/v1/quotes")).status_code == 200:
        admitted += 1
        clock.tick(12)
    assert response.json() == {"error": "Rate limit exceeded: 100 per 1 day"}
    assert 100 <= admitted <= 100 + admitted * 12 // 864
    assert 1 <= int(response.headers["retry-after"]) <= 865
