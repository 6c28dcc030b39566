"""A plain Starlette application (no FastAPI): sync and async views, a
shared limit over a group of routes, and a custom 429 page.

Run: ``uvicorn examples.starlette_app.app:app``.
"""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from rapidlimit import Limiter
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, headers_enabled=True)

# Both report routes draw from one budget of 3 per minute per client.
reports = limiter.shared_limit("3/minute", scope="reports")


@limiter.limit("2/second")
async def index(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


@reports
def daily(request: Request) -> Response:  # sync views work too
    return JSONResponse({"report": "daily"})


@reports
async def weekly(request: Request) -> Response:
    return JSONResponse({"report": "weekly"})


async def too_many(request: Request, exc: RateLimitExceeded) -> Response:
    response = HTMLResponse(f"<h1>Slow down</h1><p>{exc.detail}</p>", status_code=429)
    # Keep the X-RateLimit-* and Retry-After headers on the custom page.
    return request.app.state.limiter._inject_headers(
        response, request.state.view_rate_limit
    )


app = Starlette(
    routes=[
        Route("/", index),
        Route("/reports/daily", daily),
        Route("/reports/weekly", weekly),
    ],
    exception_handlers={RateLimitExceeded: too_many},
)
app.state.limiter = limiter
