"""The slowapi quickstart, with ``slowapi`` replaced by ``rapidlimit``.

``python3 examples/quickstart.py`` sends seven requests to ``/home``
in-process and prints what came back: five pass, then 429s with the
rate-limit headers. ``python3 examples/quickstart.py --serve`` runs it under
uvicorn instead, for ``curl -i localhost:8000/home``.
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


def demo() -> None:
    # httpx's ASGI transport: in process, like Starlette's TestClient, which
    # on Starlette 1.x warns that its httpx backend is deprecated.
    import asyncio

    import httpx

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver"
        ) as client:
            for attempt in range(1, 8):
                r = await client.get("/home")
                print(
                    f"request {attempt}: {r.status_code} {r.text!r:45}"
                    f" remaining={r.headers.get('X-RateLimit-Remaining')}"
                    f" retry-after={r.headers.get('Retry-After')}"
                )

    asyncio.run(run())


if __name__ == "__main__":
    import sys

    if "--serve" in sys.argv:
        import uvicorn

        # --port N for a port other than uvicorn's 8000 (the test uses one).
        port = (
            int(sys.argv[sys.argv.index("--port") + 1])
            if "--port" in sys.argv
            else 8000
        )
        uvicorn.run(app, port=port)
    else:
        demo()
