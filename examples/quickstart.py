"""The slowapi quickstart, with ``slowapi`` replaced by ``rapidlimit``.

Run it with ``uvicorn quickstart:app`` from this directory, then call
``curl -i localhost:8000/home`` six times in a minute.
"""

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


# The route decorator goes above the limit decorator.
@app.get("/home")
@limiter.limit("5/minute")
async def homepage(request: Request) -> PlainTextResponse:
    return PlainTextResponse("test")


@app.get("/mars")
@limiter.limit("5/minute")
async def mars(request: Request) -> dict[str, str]:
    return {"key": "value"}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app)
