"""An API written against ``limits.aio`` directly (no slowapi), counting in
rapidlimit's C++ store on Redis.

A FastAPI dependency hits a moving window per API key. The only line that
names rapidlimit is the storage URI: ``async+rapidlimit+redis://`` instead
of limits' own ``async+redis://`` (and the import that registers it). The
hits are awaited on the event loop without a thread, and those that
requests make together share one Redis script call. When Redis cannot
answer, the storage's default policy (fail-closed) raises a
``ConnectionError``, answered here with 503 and ``Retry-After``.

Run::

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.limits_aio.app:app
"""

import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

import rapidlimit.contrib.limits  # noqa: F401  (registers the rapidlimit+ schemes)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
storage = storage_from_string(f"async+rapidlimit+{REDIS_URL}", timeout=0.5)
limiter = MovingWindowRateLimiter(storage)
SEARCH = parse("3/minute")


async def rate_limited(request: Request) -> None:
    key = request.headers.get("x-api-key", "anonymous")
    try:
        if await limiter.hit(SEARCH, "search", key):
            return
        stats = await limiter.get_window_stats(SEARCH, "search", key)
    except ConnectionError:
        raise HTTPException(
            503, "Rate limit storage unavailable", headers={"Retry-After": "1"}
        ) from None
    wait = max(1, math.ceil(stats.reset_time - time.time()))
    raise HTTPException(
        429,
        f"Rate limit exceeded: {SEARCH}; try again in {wait} s",
        headers={"Retry-After": str(wait)},
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    storage.close()


app = FastAPI(lifespan=lifespan)


@app.get("/search", dependencies=[Depends(rate_limited)])
async def search(q: str = "") -> dict[str, str]:
    return {"q": q}
