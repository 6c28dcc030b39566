"""An API behind a reverse proxy (nginx, a load balancer...).

The peer address is the proxy's, so ``get_remote_address`` would put every
client in one bucket, and trusting ``X-Forwarded-For`` blindly lets clients
pick their bucket. ``trusted_proxy_key_func`` reads the forwarded address
only when the request comes from one of the listed proxies.
"""

from fastapi import FastAPI, Request

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.middleware import SlowAPIASGIMiddleware
from rapidlimit.util import trusted_proxy_key_func

TRUSTED_PROXIES = ["10.0.0.0/8", "127.0.0.1"]

client_address = trusted_proxy_key_func(TRUSTED_PROXIES)
limiter = Limiter(key_func=client_address, default_limits=["2/minute"])
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
app.add_middleware(SlowAPIASGIMiddleware)


@app.get("/whoami")
async def whoami(request: Request) -> dict[str, str]:
    return {"client": client_address(request)}
