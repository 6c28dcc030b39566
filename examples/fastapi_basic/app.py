"""A FastAPI service with per-route limits, defaults for every other route,
an application-wide cap, and an exempt health check.

``SlowAPIASGIMiddleware`` applies the default and application limits (it
also finds routes inside ``include_router``); the decorators add per-route
limits. Run: ``uvicorn examples.fastapi_basic.app:app``.
"""

from fastapi import APIRouter, FastAPI, Request, Response

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware
from rapidlimit.util import get_remote_address

limiter = Limiter(
    key_func=get_remote_address,
    default_limits=["60/minute"],
    application_limits=["20000/hour"],
    headers_enabled=True,
)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
app.add_middleware(SlowAPIASGIMiddleware)

items = APIRouter(prefix="/items")


@items.get("")
async def list_items() -> list[str]:
    # No decorator: the default limit (60/minute) applies.
    return ["apple", "pear"]


@items.post("")
@limiter.limit("5/minute;50/day")
async def create_item(request: Request, response: Response) -> dict[str, str]:
    # Writes are expensive: a tighter limit replaces the default.
    return {"created": "ok"}


@items.get("/search")
@limiter.limit("10/minute", cost=lambda request: 1 + len(request.query_params))
async def search(request: Request, q: str = "") -> dict[str, str]:
    # Each query parameter makes a search cost one more hit.
    return {"q": q}


@app.get("/health")
@limiter.exempt
async def health() -> dict[str, str]:
    return {"status": "ok"}


app.include_router(items)
