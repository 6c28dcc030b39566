"""Several instances of one API sharing their limits through Redis.

Every instance (uvicorn workers, containers, hosts) names the same Redis, so
a client's 5 requests per minute are 5 in all, whichever instance serves
them. Clients are told apart by their API key (``X-API-Key``), anonymous
ones by address. The endpoint is async: its decision is awaited, and the
event loop serves other requests while Redis answers. When Redis cannot
answer, requests get 503 with ``Retry-After`` (with ``swallow_errors=True``
they would go through instead); the limiter reconnects by itself.

Run two instances against one Redis::

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.redis_shared.app:app --port 8001
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.redis_shared.app:app --port 8002
"""

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address


def api_key(request: Request) -> str:
    return request.headers.get("x-api-key") or get_remote_address(request)


limiter = Limiter(
    key_func=api_key,
    storage_uri=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    storage_options={"timeout": 0.5, "connect_timeout": 0.5},
    headers_enabled=True,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Requests suspended on Redis together make CPython's collector promote
    # their objects and then sweep the whole heap every few seconds: frozen,
    # the start-up objects stay out of those sweeps (the README's latency
    # tail on Redis).
    gc.collect()
    gc.freeze()
    yield
    limiter.close()


app = FastAPI(lifespan=lifespan)
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/report")
@limiter.limit("5/minute")
async def report(request: Request, response: Response) -> dict[str, str]:
    return {"instance": os.environ.get("INSTANCE", "")}
