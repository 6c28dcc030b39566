"""Redis killed mid-run and restarted, for each failure policy: no exception
but the documented one, no wait beyond the timeout, and recovery. Also
through the slowapi-compatible Limiter: never a 500. A key Redis refuses
(a value of another type under its name) affects its own request alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from typing import Any

import httpx
import pytest
import redis as redis_py
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from rapidlimit import Limiter, _core, _rate_limit_exceeded_handler, parse
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.storage import RedisStorage
from rapidlimit.strategies import STRATEGIES
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

POLICIES = ["fail-open", "fail-closed", "fallback"]
NAMES = _core.HeaderNames(b"x-limit", b"x-remaining", b"x-reset", b"retry-after")
FAST = {
    "timeout": 0.15,
    "connect_timeout": 0.3,
    "reconnect_min": 0.01,
    "reconnect_max": 0.1,
}


@pytest.fixture
def server(own_server: RedisServer) -> RedisServer:
    """Tests here kill and restart Redis: a server of their own."""
    return own_server


def wait_recovered(store: RedisStorage, limit: float = 5.0) -> bool:
    probe = STRATEGIES["fixed-window"](store)
    item = parse("1000000/second")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        probe.hit(item, "probe")
        if store.last_status() == "redis":
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("policy", POLICIES)
def test_killed_and_restarted(
    server: RedisServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rapidlimit.redis")
    store = RedisStorage(server.uri, on_error=policy, **FAST)
    lim = STRATEGIES["fixed-window"](store)
    item = parse("2/minute")
    assert lim.hit(item, "a")
    server.kill()
    outcomes: list[Any] = []
    for _ in range(4):
        start = time.monotonic()
        # hit() answers by the policy (False when fail-closed); calls that
        # return decisions raise RedisUnavailableError when fail-closed.
        try:
            decision = lim.decide_many([(item, "a", 1)])[0]
            outcomes.append((decision.allowed, store.last_status()))
        except _core.RedisUnavailableError as exc:
            assert exc.retry_after == 1.0
            outcomes.append((lim.hit(item, "a"), store.last_status()))
        assert time.monotonic() - start < 0.8
        for call in (
            lambda: store.decide_many(lim, [(item, "b", 1)]),
            lambda: lim.decide(item, "b"),
            lambda: lim.decide_headers(item, "b", 1, time.time(), NAMES),
        ):
            try:
                call()
                raised = False
            except _core.RedisUnavailableError as exc:
                raised = True
                assert exc.retry_after == 1.0
            assert raised == (policy == "fail-closed")
    if policy == "fail-open":
        assert outcomes == [(True, "fail-open")] * 4
    elif policy == "fail-closed":
        assert outcomes == [(False, "fail-closed")] * 4
    else:  # the same limits in process memory
        assert outcomes == [(True, "fallback")] * 2 + [(False, "fallback")] * 2
    server.restart()
    assert wait_recovered(store)
    assert lim.hit(item, "fresh")
    assert store.last_status() == "redis"
    stats = store.stats()  # also forwards the I/O thread's log records
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{policy} policy" in m for m in messages), messages
    assert any("is back" in m for m in messages), messages
    assert stats["disconnects"] >= 1
    assert stats["reconnects"] >= 2
    store.close()


@pytest.mark.parametrize("policy", POLICIES)
async def test_killed_and_restarted_async(server: RedisServer, policy: str) -> None:
    store = RedisStorage(server.uri, on_error=policy, **FAST)
    item = parse("5/minute")
    assert (await store.decide_many_async("token-bucket", [(item, "a", 1)]))[0].allowed
    server.kill()
    start = time.monotonic()
    if policy == "fail-closed":
        with pytest.raises(_core.RedisUnavailableError):
            await store.decide_many_async("token-bucket", [(item, "a", 1)])
    else:
        decisions = await store.decide_many_async("token-bucket", [(item, "a", 1)])
        assert decisions[0].allowed
    assert time.monotonic() - start < 0.4
    server.restart()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(_core.RedisUnavailableError):
            await store.decide_many_async("token-bucket", [(item, "z", 1)])
        if store.connected:
            break
        await asyncio.sleep(0.02)
    decisions = await store.decide_many_async("token-bucket", [(item, "new", 1)])
    assert decisions[0].allowed
    store.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_slow_redis_times_out(server: RedisServer, policy: str) -> None:
    store = RedisStorage(server.uri, on_error=policy, **FAST)
    lim = STRATEGIES["moving-window"](store)
    item = parse("10/second")
    assert lim.hit(item, "a")
    with server.hold() as held:
        start = time.monotonic()
        lim.hit(item, "a")  # never raises: answered by the policy
        took = time.monotonic() - start
        assert held.held  # by the timeout, not by Redis
    assert 0.1 < took < 0.35
    assert store.last_status() == policy
    assert wait_recovered(store)
    store.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_limiter_never_answers_500(server: RedisServer, policy: str) -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        headers_enabled=True,
        storage_uri=server.uri,
        storage_options={"on_error": policy, **FAST},
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.get("/r")
    @limiter.limit("3/minute")
    async def route(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/r").status_code == 200
    server.kill()
    codes = [client.get("/r").status_code for _ in range(5)]
    assert 500 not in codes
    expected = {"fail-open": {200}, "fail-closed": {503}, "fallback": {200, 429}}
    assert set(codes) <= expected[policy]
    server.restart()
    assert wait_recovered(limiter._storage)  # type: ignore[arg-type]
    assert client.get("/r").status_code in (200, 429)


# How the Limiter meets a storage failure: the storage's 503, the storage's
# own count in memory (in_memory_fallback_enabled), or the Limiter's
# in_memory_fallback limits.
FOREIGN_MODES = {
    "fail-closed": {"storage_options": {"on_error": "fail-closed"}},
    "fallback-policy": {"in_memory_fallback_enabled": True},
    "in-memory-fallback-limits": {"in_memory_fallback": ["1/minute"]},
}


@pytest.mark.parametrize("mode", sorted(FOREIGN_MODES))
async def test_foreign_typed_key_affects_only_its_own_request(
    server: RedisServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    # One client's key holds a list (an application's LPUSH under the same
    # name); its request shares a script call with innocent ones. Only it
    # may get the failure policy: the others are decided by Redis and
    # counted once (a Lua error answered every request of the call with
    # the policy and kept the counts of those before the bad one, so they
    # were counted, then refused or counted again in memory).
    caplog.set_level(logging.ERROR, logger="rapidlimit.redis")
    caplog.set_level(logging.INFO, logger="rapidlimit")
    limiter = Limiter(
        key_func=lambda request: request.headers["x-client"],
        headers_enabled=True,
        storage_uri=server.uri,
        **FOREIGN_MODES[mode],
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.get("/r")
    @limiter.limit("5/minute")
    async def route(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    redis = server.client()
    raw = redis_py.Redis(host="127.0.0.1", port=server.port)  # bytes values
    store: RedisStorage = limiter._storage  # type: ignore[assignment]
    clients = [f"c{i}" for i in range(4)] + ["bad"] + [f"c{i}" for i in range(4, 8)]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver"
    ) as http:

        async def wave() -> dict[str, httpx.Response]:
            responses = await asyncio.gather(
                *(http.get("/r", headers={"x-client": c}) for c in clients)
            )
            return dict(zip(clients, responses))

        assert (await http.get("/r", headers={"x-client": "bad"})).status_code == 200
        (bad_key,) = redis.keys("*{bad}*")
        redis.delete(bad_key)
        redis.lpush(bad_key, "app data")
        for round_ in (1, 2):
            before = store.stats()
            answers = await wave()
            after = store.stats()
            # The requests shared script calls (one, unless the machine is
            # slow): the bad one had company.
            assert after["scripts"] - before["scripts"] < len(clients) / 2
            for client in clients[:4] + clients[5:]:
                response = answers[client]
                assert response.status_code == 200, (client, response.text)
                assert response.headers["x-ratelimit-remaining"] == str(5 - round_)
                (key,) = redis.keys(f"*{{{client}}}*")
                count = struct.unpack("<d", raw.get(key)[:8])[0]
                assert count == round_, client  # counted once per request
            bad = answers["bad"]
            if mode == "fail-closed":
                assert bad.status_code == 503
            elif mode == "fallback-policy":
                assert bad.status_code == 200  # counted once, in memory
                assert bad.headers["x-ratelimit-remaining"] == str(5 - round_)
            else:
                assert bad.status_code == (200 if round_ == 1 else 429)
            assert after["errors"] - before["errors"] == 1
            assert after["mismatches"] == 0
    # The application's value is as it left it.
    assert redis.lrange(bad_key, 0, -1) == ["app data"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("WRONGTYPE" in m and bad_key in m for m in messages), messages
    # Redis was up all along: no outage is reported, nor its end.
    assert not any("unreachable" in m or "recovered" in m for m in messages)
    limiter.close()
    raw.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_reset_clear_and_len_raise_while_redis_is_down(
    server: RedisServer, policy: str
) -> None:
    """An administrator's reset must not pass for done when Redis did not
    answer (slowapi's raises redis-py's error there): whatever the policy
    of decisions, reset(), clear() and len() raise RedisUnavailableError,
    after clearing what the storage keeps in process; once Redis is back
    they work again."""
    store = RedisStorage(server.uri, on_error=policy, **FAST)
    lim = STRATEGIES["fixed-window"](store)
    item = parse("2/minute")
    assert lim.hit(item, "a") and lim.hit(item, "a")
    assert not lim.hit(item, "a")  # now in the blocked-key cache too
    assert len(store) == 1
    server.kill()
    calls = {
        "reset": store.reset,
        "len": lambda: len(store),
        "clear": lambda: store.clear("LIMITER/a/2/1/minute"),
        "clear_sliding_window": lambda: store.clear_sliding_window("k", 60),
        "strategy clear": lambda: lim.clear(item, "a"),
    }
    for name, call in calls.items():
        start = time.monotonic()
        with pytest.raises(_core.RedisUnavailableError) as info:
            call()
        assert time.monotonic() - start < 2.0, name
        assert info.value.retry_after == 0.0, name
        assert "partly done" in str(info.value), name
    limiter = Limiter(key_func=get_remote_address, storage_uri=server.uri)
    limiter._storage.close()
    limiter._storage = store
    with pytest.raises(ConnectionError):
        limiter.reset()
    # The blocked-key cache was cleared with the rest of what is in
    # process: the next decision asks Redis (here: meets the policy).
    lim.hit(item, "a")
    assert store.last_status() != "cache"
    server.restart()
    assert wait_recovered(store)
    assert lim.hit(item, "a") and lim.hit(item, "a")
    assert not lim.hit(item, "a")
    assert len(store) == 2  # "a" and wait_recovered's probe
    lim.clear(item, "a")
    assert lim.hit(item, "a")
    assert store.reset() == 2
    assert len(store) == 0
    limiter.reset()
    store.close()
