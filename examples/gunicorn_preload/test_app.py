"""gunicorn with ``--preload`` and three uvicorn workers, forked after the
app (and its limiter's Redis connection) was made in the master, against a
real redis-server, driven over HTTP by httpx: one exact count across the
workers, a Redis connection per worker, and none left once gunicorn
stops."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from app_server import spawn, stop, wait_started  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402

WORKERS = 3


def app_connections(redis: RedisServer) -> int:
    """Clients of the server other than the one asking."""
    listing = redis.client().execute_command("CLIENT", "LIST")
    if isinstance(listing, bytes):
        listing = listing.decode()
    return sum(1 for line in listing.splitlines() if "cmd=client|list" not in line)


@pytest.fixture
def served() -> Iterator[tuple[RedisServer, str, subprocess.Popen[bytes]]]:
    redis = RedisServer()
    proc: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "--workers",
            str(WORKERS),
            "--worker-class",
            "uvicorn_worker.UvicornWorker",
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "examples.gunicorn_preload.app:app",
        ]
        proc = spawn(args, dict(os.environ, REDIS_URL=redis.uri))
        url = f"http://127.0.0.1:{port}"
        wait_started("gunicorn", proc, f"{url}/whoami")
        yield redis, url, proc
    finally:
        if proc is not None:
            stop(proc, 20.0)
        redis.cleanup()


def test_workers_forked_after_preload_share_one_exact_count(
    served: tuple[RedisServer, str, subprocess.Popen[bytes]],
) -> None:
    redis, url, proc = served
    # The workers take connections as they come: fresh ones reach several.
    workers: set[int] = set()
    deadline = time.monotonic() + 20
    while len(workers) < 2 and time.monotonic() < deadline:
        workers.add(httpx.get(f"{url}/whoami").json()["worker"])
    assert len(workers) >= 2, "gunicorn sent every connection to one worker"

    def work(_: int) -> httpx.Response:
        return httpx.get(f"{url}/work", timeout=10.0)

    with ThreadPoolExecutor(max_workers=15) as pool:
        responses = list(pool.map(work, range(30)))
    statuses = sorted(r.status_code for r in responses)
    # Exactly 10 admitted in all, whichever worker served them: no 503
    # (a connection shared with the master or another worker would mix up
    # replies), no count lost or made twice.
    assert statuses == [200] * 10 + [429] * 20
    remaining = sorted(
        int(r.headers["x-ratelimit-remaining"])
        for r in responses
        if r.status_code == 200
    )
    assert remaining == list(range(10))

    # The master's connection (made before the fork) and one per worker
    # that decided, at most one per process.
    deciders = {r.json()["worker"] for r in responses if r.status_code == 200}
    assert 1 + len(deciders) <= app_connections(redis) <= 1 + WORKERS

    proc.terminate()
    proc.wait(20)
    # Every copy of every socket is closed with its process.
    deadline = time.monotonic() + 5
    while app_connections(redis) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app_connections(redis) == 0
