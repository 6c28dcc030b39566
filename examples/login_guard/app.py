"""A login endpoint guarded against password guessing.

Two limits, checked as FastAPI dependencies so that the second can key on
the username in the request's JSON body:

- per account: 3 attempts a minute and 10 an hour, whatever address they
  come from, so an attacker rotating addresses still meets them; the two
  windows make the cooldown grow with persistence (a minute after the
  third attempt, up to an hour after the tenth);
- per address: 20 attempts an hour over all accounts, so one client
  trying many accounts meets its own limit.

Usernames are compared case-insensitively, so ``Bob`` and ``bob`` share a
budget. Run: ``uvicorn examples.login_guard.app:app``.
"""

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from rapidlimit import Limiter, _rate_limit_exceeded_handler
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.util import get_remote_address

PASSWORDS = {"alice": "correct horse"}  # stands in for a user database

limiter = Limiter(key_func=get_remote_address, headers_enabled=True)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


class Credentials(BaseModel):
    username: str
    password: str


def credentials(body: Credentials, request: Request) -> Credentials:
    # FastAPI has parsed the body: the account's key function reads this.
    request.state.account = body.username.strip().lower()
    return body


def account(request: Request) -> str:
    return "account:" + request.state.account


@app.post("/login", dependencies=[Depends(limiter.depends("20/hour"))])
async def login(
    body: Annotated[Credentials, Depends(credentials)],
    # After `body`: FastAPI solves the parameters' dependencies in order.
    _: Annotated[None, Depends(limiter.depends("3/minute;10/hour", key_func=account))],
) -> dict[str, str]:
    if PASSWORDS.get(body.username.strip().lower()) != body.password:
        raise HTTPException(status_code=401, detail="bad credentials")
    return {"token": "t0k3n"}
