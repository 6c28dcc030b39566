"""An unchanged slowapi application counting in rapidlimit's C++ store.

Keep slowapi, add one import and one URI: ``limits`` then talks to the
native store through ``rapidlimit.contrib.limits``.
"""

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

import rapidlimit.contrib.limits  # noqa: F401  (registers rapidlimit+memory://)

limiter = Limiter(
    key_func=get_remote_address,
    storage_uri="rapidlimit+memory://",
    strategy="moving-window",
)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/home")
@limiter.limit("3/minute")
async def home(request: Request) -> dict[str, str]:
    return {"hello": "world"}
