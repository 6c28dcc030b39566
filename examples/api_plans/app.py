"""An API sold in plans: each API key gets its plan's limits, with bursts.

Clients send their key in ``X-API-Key``. The key function counts a known key
as itself and anything else (no key, an unknown one) by the caller's
address. The limit is a callable that receives that key and returns its
plan's limit string, so a client moved to another plan gets the new limits
on its next request (``KEYS`` and ``PLANS`` stand in for a database or a
cache). Each plan has two windows, a per-minute one and a daily quota, and
a key has one budget for the whole API (``shared_limit``), which each route
draws from at its own cost: an export costs five requests. Keys of the
``internal`` plan are exempt.

The ``token-bucket`` strategy lets clients burst: ``"30/minute"`` is a
bucket of 30 requests that refills one every 2 seconds, so an idle client
may send 30 at once but no more than 30 per minute on average.

Run: ``uvicorn examples.api_plans.app:app``.
"""

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address

F = TypeVar("F", bound=Callable[..., Any])

PLANS = {
    "anonymous": "5/minute;100/day",
    "free": "30/minute;1000/day",
    "pro": "600/minute;100000/day",
}
KEYS = {"key-alice": "free", "key-bob": "pro", "key-ops": "internal"}


def api_key(request: Request) -> str:
    key = request.headers.get("x-api-key", "")
    return key if key in KEYS else "addr:" + get_remote_address(request)


def plan_limits(key: str) -> str:
    # Also asked for exempt keys (before exempt_when, as slowapi does): the
    # internal plan reads the pro limits, which its exemption then skips.
    return PLANS.get(KEYS.get(key, "anonymous"), PLANS["pro"])


def is_internal(request: Request) -> bool:
    return KEYS.get(request.headers.get("x-api-key", "")) == "internal"


limiter = Limiter(key_func=api_key, strategy="token-bucket", headers_enabled=True)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


def plan_budget(cost: int = 1) -> Callable[[F], F]:
    """One budget per key over every route of the API (``shared_limit``),
    which each route draws from at its own cost."""
    return limiter.shared_limit(
        plan_limits, scope="api", exempt_when=is_internal, cost=cost
    )


@app.get("/v1/quotes")
@plan_budget()
async def quotes(request: Request, response: Response) -> dict[str, float]:
    return {"EURUSD": 1.0842}


@app.get("/v1/export")
@plan_budget(cost=5)
async def export(request: Request, response: Response) -> dict[str, str]:
    return {"url": "/downloads/quotes.csv"}
