from __future__ import annotations

import asyncio
from typing import Any

import httpx

from .app import app, limiter


def get(peer: str, forwarded_for: str | None = None) -> Any:
    async def go() -> Any:
        transport = httpx.ASGITransport(app=app, client=(peer, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
            return await c.get("/whoami", headers=headers)

    return asyncio.run(go())


def setup_function() -> None:
    limiter.reset()


def test_clients_behind_the_proxy_get_their_own_bucket() -> None:
    assert get("10.0.0.5", "198.51.100.7").json() == {"client": "198.51.100.7"}
    assert get("10.0.0.5", "198.51.100.7").status_code == 200
    assert get("10.0.0.5", "198.51.100.7").status_code == 429
    assert get("10.0.0.5", "198.51.100.8").status_code == 200


def test_direct_clients_cannot_choose_their_bucket() -> None:
    assert get("203.0.113.9", "1.1.1.1").json() == {"client": "203.0.113.9"}
    assert get("203.0.113.9", "2.2.2.2").status_code == 200
    assert get("203.0.113.9", "3.3.3.3").status_code == 429
