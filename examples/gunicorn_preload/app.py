"""An API served by gunicorn with ``--preload`` and uvicorn workers, its
limits in Redis.

``--preload`` imports the app once in gunicorn's master, which then forks
the workers: the limiter, and its Redis connection and I/O thread, are made
before the fork. Each worker opens a connection of its own on its first
request (a connection shared by processes would mix up their replies), and
closes its copy of the master's socket at the fork, so Redis sees the
master's connection close when the master closes it. The limit is one
count across the workers: 10 requests per minute per client, whichever
worker serves them.

Run::

    REDIS_URL=redis://127.0.0.1:6379/0 gunicorn --preload -w 4 \\
        -k uvicorn_worker.UvicornWorker examples.gunicorn_preload.app:app
"""

import os

from fastapi import FastAPI, Request

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address

limiter = Limiter(
    key_func=get_remote_address,
    storage_uri=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    storage_options={"timeout": 0.5, "connect_timeout": 0.5},
    headers_enabled=True,
)

app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/work")
@limiter.limit("10/minute")
async def work(request: Request) -> dict[str, int]:
    return {"worker": os.getpid()}


@app.get("/whoami")
@limiter.exempt
async def whoami(request: Request) -> dict[str, int]:
    return {"worker": os.getpid()}
