"""The example under uvicorn against a real redis-server, driven over HTTP
by httpx: each API key gets its 3 searches a minute, then 429 with the
wait; a Redis outage is a 503 that ends when Redis is back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from app_server import spawn, stop, wait_started  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402


@pytest.fixture
def served() -> Iterator[tuple[RedisServer, str]]:
    redis = RedisServer()
    proc: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        port = free_port()
        args = [sys.executable, "-m", "uvicorn", "examples.limits_aio.app:app"]
        args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        proc = spawn(args, dict(os.environ, REDIS_URL=redis.uri))
        url = f"http://127.0.0.1:{port}"
        wait_started("limits_aio example", proc, f"{url}/docs")
        yield redis, url
    finally:
        if proc is not None:
            stop(proc)
        redis.cleanup()


def test_each_key_gets_its_searches_then_429(served: tuple[RedisServer, str]) -> None:
    redis, url = served
    key = {"X-API-Key": "k1"}
    got = [httpx.get(f"{url}/search?q=x", headers=key) for _ in range(4)]
    assert [r.status_code for r in got] == [200, 200, 200, 429]
    assert got[0].json() == {"q": "x"}
    detail = got[3].json()["detail"]
    assert detail.startswith("Rate limit exceeded: 3 per 1 minute; try again in")
    assert 1 <= int(got[3].headers["retry-after"]) <= 60
    other = [httpx.get(f"{url}/search", headers={"X-API-Key": "k2"}) for _ in range(4)]
    assert [r.status_code for r in other] == [200, 200, 200, 429]
    # The counts live in Redis, in rapidlimit's keys (one per API key).
    keys = redis.client().keys("*")
    assert len(keys) == 2 and all(k.startswith("rapidlimit:") for k in keys), keys


def test_redis_outage_is_a_503_until_redis_returns(
    served: tuple[RedisServer, str],
) -> None:
    redis, url = served
    assert httpx.get(f"{url}/search", headers={"X-API-Key": "k3"}).status_code == 200
    redis.kill()
    down = httpx.get(f"{url}/search", headers={"X-API-Key": "k3"}, timeout=5.0)
    assert down.status_code == 503
    assert down.json() == {"detail": "Rate limit storage unavailable"}
    assert down.headers["retry-after"] == "1"
    redis.restart()
    deadline = time.monotonic() + 15
    status = 0
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/search", headers={"X-API-Key": "k4"}).status_code
        if status == 200:
            break
        assert status == 503
        time.sleep(0.2)
    assert status == 200
