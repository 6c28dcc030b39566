"""Limits as FastAPI dependencies: endpoints need no ``request`` parameter.

``limiter.depends(...)`` works on a route, on a whole router, per API key,
or per user after an authentication dependency. The middleware applies the
default limit to every route before the app runs (as slowapi's); a
``depends()`` limit is checked when FastAPI runs it, in FastAPI's order. Run:
``uvicorn examples.fastapi_dependency.app:app``.
"""

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware
from rapidlimit.util import get_remote_address

limiter = Limiter(
    key_func=get_remote_address, default_limits=["1000/day"], headers_enabled=True
)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
app.add_middleware(SlowAPIASGIMiddleware)

TOKENS = {"token-alice": "alice", "token-bob": "bob"}


def authenticate(request: Request) -> None:
    user = TOKENS.get(request.headers.get("authorization", ""))
    if user is None:
        raise HTTPException(status_code=401, detail="unknown token")
    request.state.user = user


def current_user(request: Request) -> str:
    return str(request.state.user)


# Declared after authenticate: FastAPI runs them in this order, so the
# limit is per user and refused tokens use up none of it (they count
# towards the default, per address, checked before the app).
@app.get(
    "/me",
    dependencies=[
        Depends(authenticate),
        Depends(limiter.depends("2/minute", key_func=current_user)),
    ],
)
async def me(request: Request) -> dict[str, str]:
    return {"user": request.state.user}


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
