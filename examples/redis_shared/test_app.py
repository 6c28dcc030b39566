"""Three instances of the app (two uvicorn, one Hypercorn on trio) and a
real redis-server, driven over HTTP by httpx: the limit holds across
instances, and a Redis outage is a 503 that ends when Redis is back."""

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


def server_command(server: list[str], port: int) -> list[str]:
    app = "examples.redis_shared.app:app"
    if server[0] == "hypercorn":
        bind = ["--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
        return [sys.executable, "-m", "hypercorn", app, *bind, *server[1:]]
    bind = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return [sys.executable, "-m", "uvicorn", app, *bind, *server]


def spawn_instance(
    name: str, redis_uri: str, server: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, REDIS_URL=redis_uri, INSTANCE=name)
    return spawn(server_command(server, port), env), f"http://127.0.0.1:{port}"


@pytest.fixture
def cluster() -> Iterator[tuple[RedisServer, list[str]]]:
    redis = RedisServer()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis.start()
        # a: plain uvicorn (asyncio, h11); b: uvicorn[standard]'s uvloop and
        # httptools, as `pip install "fastapi[standard]"` gives; c: Hypercorn
        # on trio, where no asyncio loop runs. All start at once; every one
        # started is stopped, whatever fails.
        servers = {
            "a": ["--loop", "asyncio", "--http", "h11"],
            "b": ["--loop", "uvloop", "--http", "httptools"],
            "c": ["hypercorn", "--worker-class", "trio"],
        }
        urls = []
        for name, server in servers.items():
            proc, url = spawn_instance(name, redis.uri, server)
            procs.append(proc)
            urls.append(url)
        for name, proc, url in zip(servers, procs, urls):
            wait_started(f"instance {name}", proc, f"{url}/docs")
        yield redis, urls
    finally:
        for proc in procs:
            stop(proc)
        redis.cleanup()


def test_instances_share_each_clients_limit(
    cluster: tuple[RedisServer, list[str]],
) -> None:
    _, urls = cluster
    key = {"X-API-Key": "team-1"}
    got = [httpx.get(f"{urls[i % 3]}/report", headers=key) for i in range(8)]
    assert [r.status_code for r in got] == [200] * 5 + [429] * 3
    assert {r.json()["instance"] for r in got[:5]} == {"a", "b", "c"}
    # One count across the instances: the headers go down 4, 3, 2, 1, 0.
    assert [r.headers["x-ratelimit-remaining"] for r in got[:5]] == list("43210")
    assert got[5].json() == {"error": "Rate limit exceeded: 5 per 1 minute"}
    assert 0 < int(got[5].headers["retry-after"]) <= 60
    # Another key has its own five.
    other = [
        httpx.get(f"{urls[i % 3]}/report", headers={"X-API-Key": "team-2"})
        for i in range(6)
    ]
    assert [r.status_code for r in other] == [200] * 5 + [429]


def test_redis_outage_is_a_503_until_redis_returns(
    cluster: tuple[RedisServer, list[str]],
) -> None:
    redis, urls = cluster
    key = {"X-API-Key": "team-3"}
    assert httpx.get(f"{urls[0]}/report", headers=key).status_code == 200
    redis.kill()
    for url in urls[1:]:
        down = httpx.get(f"{url}/report", headers=key, timeout=5.0)
        assert down.status_code == 503
        assert down.json() == {"error": "Rate limit storage unavailable"}
        assert int(down.headers["retry-after"]) >= 1
    redis.restart()
    # Both instances reconnect by themselves (a fresh key per round, so
    # that rounds where only one is back do not use up a limit).
    deadline = time.monotonic() + 15
    statuses: set[int] = set()
    round_no = 0
    while time.monotonic() < deadline:
        round_no += 1
        fresh = {"X-API-Key": f"team-3-{round_no}"}
        statuses = {httpx.get(f"{u}/report", headers=fresh).status_code for u in urls}
        if statuses == {200}:
            break
        assert statuses <= {200, 503}
        time.sleep(0.2)
    assert statuses == {200}
