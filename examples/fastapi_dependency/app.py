"""Limits as FastAPI dependencies: endpoints need no ``request`` parameter.

``limiter.depends(...)`` works on a route, on a whole router, or per user
with a key function reading an API key. Run:
``uvicorn examples.fastapi_dependency.app:app``.
"""

from fastapi import APIRouter, Depends, FastAPI, Request

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


def api_key(request: Request) -> str:
    return request.headers.get("x-api-key", "anonymous")


@app.get("/public", dependencies=[Depends(limiter.depends("3/minute"))])
async def public() -> dict[str, str]:
    return {"data": "public"}


# Every route of this router shares a per-API-key budget.
partner = APIRouter(
    prefix="/partner",
    dependencies=[
        Depends(limiter.depends("100/hour", key_func=api_key, scope="partner"))
    ],
)


@partner.get("/orders")
async def orders() -> list[int]:
    return [1, 2, 3]


@partner.get("/invoices")
async def invoices() -> list[int]:
    return [7]


app.include_router(partner)
