"""RedisWaiter, what RedisStorage.decide_view_async returns: awaited like an
asyncio.Future (the event loop's reader wakes the awaiting task itself),
usable by asyncio's helpers, cancellable, and finishing the decorator's
check in the awaiting task."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from rapidlimit import Limiter, _core, _rate_limit_exceeded_handler, parse
from rapidlimit._core import HeaderNames, RedisWaiter
from rapidlimit.errors import RateLimitExceeded
from rapidlimit.storage import RedisStorage
from rapidlimit.strategies import STRATEGIES
from rapidlimit.util import get_remote_address
from redis_server import RedisServer

pytestmark = pytest.mark.skipif(
    not _core.redis_available(), reason="built without hiredis"
)

T0 = 1_700_000_000.0


class _View:
    __slots__ = ("_data",)


NAMES = HeaderNames(
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
    b"retry-after",
    _View,
)


def _ask(store: RedisStorage, key: str = "k", now: float = T0) -> RedisWaiter[Any]:
    item = parse("3/minute")
    return store.decide_view_async(
        "fixed-window", item, key, "/s", 1, now, NAMES, None, ""
    )


def test_awaited_like_a_future(server: RedisServer) -> None:
    store = RedisStorage(server.uri)

    async def run() -> None:
        waiter = _ask(store)
        assert asyncio.isfuture(waiter)
        assert waiter.get_loop() is asyncio.get_running_loop()
        assert not waiter.done()
        with pytest.raises(asyncio.InvalidStateError):
            waiter.result()
        view = await waiter
        assert type(view) is _View
        assert view._data[4][:3] == (True, 3, 2)
        assert waiter.done() and not waiter.cancelled()
        assert waiter.result() is view
        assert waiter.exception() is None
        assert await waiter is view  # awaiting again gives the same
        # asyncio's helpers take it as a future.
        views = await asyncio.gather(_ask(store, "g1"), _ask(store, "g2"))
        assert [v._data[2] for v in views] == ["g1", "g2"]
        view = await asyncio.wait_for(_ask(store, "w"), timeout=5)
        assert view._data[2] == "w"
        done, _ = await asyncio.wait([_ask(store, "x")])
        assert done.pop().result()._data[2] == "x"
        assert (await asyncio.shield(_ask(store, "s")))._data[2] == "s"

    asyncio.run(run())
    store.close()


def test_task_context_and_callbacks(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="-")

    async def one(name: str) -> str:
        var.set(name)
        await _ask(store, name)
        assert var.get() == name  # resumed in its own context...
        var.set(name + "!")
        await asyncio.sleep(0)
        return var.get()  # ...not in a copy of it

    async def run() -> None:
        names = [f"t{i}" for i in range(20)]
        got = await asyncio.gather(*(one(n) for n in names))
        assert got == [n + "!" for n in names]
        seen: list[Any] = []
        ctx = contextvars.copy_context()
        ctx.run(var.set, "from-callback")
        waiter = _ask(store, "cb")
        waiter.add_done_callback(lambda w: seen.append(var.get()), context=ctx)
        waiter.add_done_callback(seen.append)
        removed = waiter.add_done_callback(print)
        assert removed is None
        assert waiter.remove_done_callback(print) == 1
        await waiter
        await asyncio.sleep(0)
        assert seen == ["from-callback", waiter]
        # Added once done: called soon, as asyncio's futures do.
        waiter.add_done_callback(seen.append)
        assert len(seen) == 2
        await asyncio.sleep(0)
        assert seen[-1] is waiter

    asyncio.run(run())
    store.close()


def test_callback_error_goes_to_the_loop_handler(server: RedisServer) -> None:
    store = RedisStorage(server.uri)
    errors: list[dict[str, Any]] = []

    def boom(_: Any) -> None:
        raise ValueError("boom")

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: errors.append(context)
        )
        waiter = _ask(store, "e")
        waiter.add_done_callback(boom)
        assert (await waiter)._data[2] == "e"  # the awaiting task is unharmed

    asyncio.run(run())
    assert len(errors) == 1
    assert isinstance(errors[0]["exception"], ValueError)
    store.close()


def test_cancellation(server: RedisServer) -> None:
    store = RedisStorage(server.uri)

    async def run() -> None:
        waiter = _ask(store, "c")
        assert waiter.cancel("why")
        assert not waiter.cancel()
        assert waiter.cancelled() and waiter.done()
        with pytest.raises(asyncio.CancelledError, match="why"):
            waiter.result()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # The answer still arrives and is dropped; the next call is fine.
        assert (await _ask(store, "c"))._data[4][0]

        # A task cancelled while it awaits a waiter.
        started = asyncio.Event()

        async def waits() -> Any:
            w = _ask(store, "t")
            started.set()
            return await w

        task = asyncio.create_task(waits())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        # Timeouts cancel it too.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_ask(store, "to"), timeout=0)
        # Many at once, half cancelled.
        waiters = [_ask(store, f"m{i % 3}") for i in range(40)]
        for w in waiters[::2]:
            w.cancel()
        views = await asyncio.gather(*waiters[1::2])
        assert all(type(v) is _View for v in views)

    asyncio.run(run())
    store.close()


def test_fail_closed_raises_through_the_waiter() -> None:
    store = RedisStorage(
        "redis://127.0.0.1:1/0",
        on_error="fail-closed",
        timeout=0.1,
        connect_timeout=0.1,
    )

    async def run() -> None:
        waiter = _ask(store)
        with pytest.raises(_core.RedisUnavailableError):
            await waiter
        assert isinstance(waiter.exception(), _core.RedisUnavailableError)

    asyncio.run(run())
    store.close()


class _Finisher:
    """Stands in for the Limiter: records _finish_endpoint's calls."""

    def __init__(self, answer: Any = "finished") -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer

    def _finish_endpoint(self, view: Any, exc: Any, conn: Any, plan: Any) -> Any:
        self.calls.append((view, exc, conn, plan))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _check(store: RedisStorage, state: dict[Any, Any], finisher: _Finisher) -> Any:
    item = parse("1/minute")
    lim = STRATEGIES["fixed-window"](store)
    return store.decide_view_async(
        lim, item, "peer", "/f", 1, T0, NAMES, None, "",
        state, "view", finisher, "conn", "plan",
    )  # fmt: skip


def test_finishing_the_decorator_check(server: RedisServer) -> None:
    store = RedisStorage(server.uri, blocked_cache=False)

    async def run() -> None:
        finisher = _Finisher()
        state: dict[Any, Any] = {}
        view = await _check(store, state, finisher)
        assert type(view) is _View and state["view"] is view
        assert finisher.calls == []  # allowed: nothing more to do
        state2: dict[Any, Any] = {}
        assert await _check(store, state2, finisher) == "finished"
        ((rejected, exc, conn, plan),) = finisher.calls
        assert state2["view"] is rejected and not rejected._data[4][0]
        assert (exc, conn, plan) == (None, "conn", "plan")
        # What _finish_endpoint raises is what the await raises.
        raising = _Finisher(LookupError("429"))
        with pytest.raises(LookupError, match="429"):
            await _check(store, {}, raising)

    asyncio.run(run())
    store.close()


def test_finishing_a_storage_error() -> None:
    store = RedisStorage(
        "redis://127.0.0.1:1/0", on_error="fail-closed", timeout=0.1,
        connect_timeout=0.1,
    )  # fmt: skip

    async def run() -> None:
        finisher = _Finisher("503")
        state: dict[Any, Any] = {}
        assert await _check(store, state, finisher) == "503"
        ((view, exc, _, _),) = finisher.calls
        assert view is None and isinstance(exc, _core.RedisUnavailableError)
        assert "view" not in state

    asyncio.run(run())
    store.close()


def test_decorator_on_redis_logs_rejections_in_the_task(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A rejection is finished (logged, answered 429) in the request's own
    task, with its context."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("rid", default="-")
    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # Not the Redis engine's own records ("rapidlimit.redis", sent
            # from whichever task drains its queue of log lines).
            if record.name == limiter.logger.name:
                seen.append(var.get())

    limiter = Limiter(key_func=get_remote_address, storage_uri=server.uri)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.middleware("http")
    async def tag(request: Request, call_next: Any) -> Any:
        var.set(request.headers.get("x-rid", "-"))
        return await call_next(request)

    @app.get("/w")
    @limiter.limit("2/minute")
    async def w(request: Request) -> dict[str, bool]:
        return {"ok": True}

    handler = Capture()
    limiter.logger.addHandler(handler)
    limiter.logger.setLevel(logging.DEBUG)
    try:
        with TestClient(app) as client:
            codes = [
                client.get("/w", headers={"x-rid": f"r{i}"}).status_code
                for i in range(4)
            ]
    finally:
        limiter.logger.removeHandler(handler)
        limiter.logger.setLevel(logging.NOTSET)
    assert codes == [200, 200, 429, 429]
    assert seen[-2:] == ["r2", "r3"]


@pytest.mark.skipif(
    not hasattr(asyncio, "eager_task_factory"),
    reason="asyncio.eager_task_factory is new in Python 3.12",
)
def test_eager_task_factory(server: RedisServer) -> None:
    """Under asyncio's eager task factory a task runs up to its first await
    inside create_task: a decision asked there is still awaited and woken
    right, exactly as many requests are admitted as the limit allows, and
    a task cancelled before it ever yields gets CancelledError."""
    import httpx

    store = RedisStorage(server.uri)
    limiter = Limiter(key_func=get_remote_address, storage_uri=server.uri)
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)

    @app.get("/e")
    @limiter.limit("10/minute")
    async def e(request: Request) -> dict[str, bool]:
        return {"ok": True}

    async def allowed(key: str) -> bool:
        return bool((await _ask(store, key))._data[4][0])

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        tasks = [asyncio.create_task(allowed(f"e{i % 4}")) for i in range(24)]
        assert (await asyncio.gather(*tasks)).count(True) == 4 * 3  # 3/minute
        task = asyncio.create_task(allowed("c"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(allowed("c"), timeout=5)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            codes = await asyncio.gather(*(c.get("/e") for _ in range(25)))
        assert sorted(r.status_code for r in codes) == [200] * 10 + [429] * 15

    asyncio.run(run())
    store.close()
    limiter.close()
