"""ASGI middlewares (``slowapi.middleware``).

Both classes are the same pure ASGI middleware: ``SlowAPIMiddleware`` is no
longer a ``BaseHTTPMiddleware``. For each HTTP or websocket request the
middleware finds the endpoint the way the router will (FastAPI included
routers, mounted routers and sub-applications, first full match wins),
checks the application, route and default limits of the ``Limiter`` in
``app.state.limiter`` (or the one passed as ``limiter=``) in one call into
the core, and then either answers 429 or runs the application, adding the
rate-limit headers to ``http.response.start`` as it goes by. Every other
message (body chunks of streaming responses, ``pathsend``, websocket
messages) passes untouched.

Served around the application rather than added to it (``app =
SlowAPIASGIMiddleware(fastapi_app)``, no ``app`` in the scope yet), it finds
the routes and ``state.limiter`` on the application it wraps; its 429 is
then the default one (the application's exception handlers run inside it).

The endpoint found for a (type, method, root_path, path) is cached; the
cache is dropped when the number of top-level routes changes. Routes added
later inside an already included router are not seen until then.
"""

from __future__ import annotations

import asyncio.coroutines as _asyncio_coroutines
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from rapidlimit._core import HeaderSend as _HeaderSend
from rapidlimit._core import mw_decide as _mw_decide
from rapidlimit._core import mw_route as _mw_route
from rapidlimit.extension import (
    _BY,
    _DEPENDS_ATTR,
    _UNSET,
    _VIEW,
    Limiter,
    ViewRateLimit,
    _make_request,
    _owe_application_limits,
)

__all__ = ["SlowAPIASGIMiddleware", "SlowAPIMiddleware", "find_endpoint"]

_iter_route_contexts: Callable[..., Iterable[Any]] | None
try:  # FastAPI >= 0.137 keeps included routers as a single route
    from fastapi.routing import iter_route_contexts as _iter_route_contexts
except ImportError:  # pragma: no cover - depends on the FastAPI version
    _iter_route_contexts = None

_CACHE_SIZE = 4096

_asyncio_coroutine_mark = getattr(_asyncio_coroutines, "_is_coroutine", None)
_mark_coroutine: Callable[[Any], Any] | None = getattr(
    inspect, "markcoroutinefunction", None
)


# (router, its _routes_version): FastAPI >= 0.137 serves the routes added
# to a router after include_router, and bumps the version when it does.
_Watch = tuple[tuple[Any, int], ...]

# id(routes) -> (routes, its length, the included routers' versions, the
# flattened routes). One per middleware: a cache shared by the module kept
# the routes of the last 256 applications alive, and through their
# endpoints the limiters with their Redis connections and threads (an
# application per test).
_FlatCache = dict[int, tuple[Sequence[BaseRoute], int, _Watch, Sequence[Any]]]


def _included_routers(routes: Sequence[Any]) -> _Watch:
    """The routers included in ``routes`` at any depth, with their versions."""
    found: dict[int, tuple[Any, int]] = {}
    pending = [routes]
    while pending:
        for route in pending.pop():
            if type(route).__name__ != "_IncludedRouter":
                continue
            router = getattr(route, "original_router", None)
            if router is None or id(router) in found:
                continue
            found[id(router)] = (router, getattr(router, "_routes_version", 0))
            pending.append(router.routes)
    return tuple(found.values())


def _changed(watch: _Watch) -> bool:
    for router, version in watch:  # per request: no generator
        if getattr(router, "_routes_version", 0) != version:
            return True
    return False


def _flatten(routes: Sequence[BaseRoute], cache: _FlatCache | None) -> Sequence[Any]:
    """``routes`` with FastAPI's included routers expanded into their routes
    (kept in ``cache`` while the list keeps its length and no included
    router gets new routes)."""
    if _iter_route_contexts is None:
        return routes
    cached = cache.get(id(routes)) if cache is not None else None
    if (
        cached is not None
        and cached[0] is routes
        and cached[1] == len(routes)
        and not _changed(cached[2])
    ):
        return cached[3]
    flat: Sequence[Any] = routes
    watch = _included_routers(routes)
    if watch:
        flat = list(_iter_route_contexts(routes))
    if cache is not None:
        if len(cache) > 256:
            cache.clear()
        cache[id(routes)] = (routes, len(routes), watch, flat)
    return flat


def find_endpoint(
    routes: Sequence[BaseRoute], scope: Scope, _depth: int = 0
) -> tuple[Any, bool]:
    """The endpoint the router will call for ``scope``, or None.

    Returns ``(endpoint, cacheable)``; ``cacheable`` is False when a host
    route took part (the result then depends on more than method and path).
    Only full matches count, as in Starlette: a 404 or 405 has no endpoint.
    """
    _, endpoint, cacheable = _find_route(routes, scope, _depth)
    return endpoint, cacheable


def _find_route(
    routes: Sequence[BaseRoute],
    scope: Scope,
    _depth: int = 0,
    cache: _FlatCache | None = None,
) -> tuple[Any, Any, bool]:
    """:func:`find_endpoint`, also returning the matched route."""
    cacheable = True
    for route in _flatten(routes, cache):
        if getattr(route, "host", None) is not None:
            cacheable = False
        try:
            match, child = route.matches(scope)
        except Exception:  # a route that cannot match this kind of scope
            continue
        if match != Match.FULL:
            continue
        sub_routes = getattr(route, "routes", None)
        if sub_routes is not None:  # Mount or Host
            if not sub_routes or _depth > 16:
                return None, None, cacheable
            found, endpoint, sub_cacheable = _find_route(
                sub_routes, {**scope, **child}, _depth + 1, cache
            )
            return found, endpoint, cacheable and sub_cacheable
        endpoint = child.get("endpoint") or getattr(route, "endpoint", None)
        return route, endpoint, cacheable
    return None, None, cacheable


def _has_depends(route: Any) -> bool:
    """Whether a FastAPI route has a ``Limiter.depends()`` dependency, at
    any depth (route, router, nested): its limit may record what the
    headers describe after the middleware's check."""
    seen: set[int] = set()
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is None or id(dependant) in seen:
            continue
        seen.add(id(dependant))
        if hasattr(getattr(dependant, "call", None), _DEPENDS_ATTR):
            return True
        pending.extend(getattr(dependant, "dependencies", None) or ())
    return False


_MISSING = object()


def _app_limiter(app: Any) -> Any:
    state = getattr(app, "state", None)
    values = getattr(state, "_state", None)  # starlette.datastructures.State
    if isinstance(values, dict):
        return values.get("limiter")
    return getattr(state, "limiter", None)


class _RouteFinish:
    """mw_route's end of a Redis check the storage's waiter did not allow
    (a rejection, or an error of the storage), as _ScopeFinish ends
    Limiter._scope_check_async's: the limit that failed, _Unavailable, or
    None when the limiter's error policy lets the request through. The
    waiter calls it with ``conn`` = (scope, receive, send)."""

    __slots__ = ()

    @staticmethod
    def _finish_endpoint(
        view: ViewRateLimit | None,
        exc: Exception | None,
        conn: tuple[Scope, Receive, Send],
        plan: Any,
    ) -> Any:
        scope, receive, send = conn
        limiter: Limiter = scope["state"][_BY]
        return limiter._single_failure(view, exc, scope, plan, None, (receive, send))


_ROUTE_FINISH = _RouteFinish()

# SlowAPIASGIMiddleware's attributes that mw_route reads, in _fast_state.
_ROUTE_FIELDS = frozenset(
    (
        "app",
        "_routes_app",
        "_limiter",
        "_state_values",
        "_state_object",
        "_routes",
        "_routes_len",
        "_routers",
        "_endpoints",
    )
)


class SlowAPIASGIMiddleware:
    """Checks limits before the app runs and adds the rate-limit headers.

    ``app.add_middleware(SlowAPIASGIMiddleware)`` uses ``app.state.limiter``;
    pass ``limiter=`` to use another one.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter | None = None,
        dispatch: Callable[..., Any] | None = None,
    ) -> None:
        self.app = app
        self._limiter = limiter
        # The endpoint found per (type, method, root_path, path), for the
        # application seen last (a middleware serves one application).
        self._routes_app: Any = _MISSING
        self._routes: Sequence[BaseRoute] | None = None
        self._routes_len = -1
        self._routers: _Watch = ()  # included routers, checked per request
        self._endpoints: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._flat: _FlatCache = {}
        # app.state and its dict (starlette's State keeps values in _state).
        self._state_object: Any = _MISSING
        self._state_values: dict[str, Any] | None = None
        self._fast_state: tuple[Any, ...] = ()
        self._sync_fast()

    def __setattr__(self, name: str, value: Any) -> None:
        # mw_route reads a copy of these (_fast_state): setting one remakes
        # it, as Limiter.__setattr__ empties its route specs. (Set on the
        # first request of a route table and when it changes, not per
        # request.)
        object.__setattr__(self, name, value)
        if name in _ROUTE_FIELDS and "_fast_state" in self.__dict__:
            self._sync_fast()

    def _sync_fast(self) -> None:
        """mw_route's copy of what the route lookup reads (its RouteField
        order)."""
        self._fast_state = (
            self.app,
            self._routes_app,
            self._limiter,
            self._state_values,
            self._state_object,
            self._routes,
            self._routes_len,
            self._routers,
            self._endpoints,
            _ROUTE_FINISH,
        )

    def _endpoint(self, app: Any, scope: Scope) -> tuple[Any, Any]:
        """(endpoint or None, whether its route has depends() limits)."""
        if app is not self._routes_app:
            self._routes_app = app
            self._routes = getattr(app, "routes", None)
            self._routes_len = -1
        routes = self._routes
        if routes is None:
            return None, ()
        endpoints = self._endpoints
        if len(routes) != self._routes_len or (
            self._routers and _changed(self._routers)
        ):
            endpoints.clear()
            self._routes_len = len(routes)
            self._routers = (
                _included_routers(routes) if _iter_route_contexts is not None else ()
            )
        key = (
            scope["type"],
            scope.get("method"),
            scope.get("root_path", ""),
            scope["path"],
        )
        found = endpoints.get(key)
        if found is None:
            route, endpoint, cacheable = _find_route(routes, scope, cache=self._flat)
            found = (endpoint, _has_depends(route) if route else False)
            if cacheable:
                if len(endpoints) >= _CACHE_SIZE:
                    endpoints.clear()
                endpoints[key] = found
        return found

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function that returns the application's own awaitable on
        # the usual path: an ASGI caller only awaits what it gets, and a
        # coroutine of ours around the app cost every request as much as a
        # pass-through middleware. (Marked below as a coroutine function
        # for servers that look, such as uvicorn's ASGI 2/3 guess.)
        #
        # The usual request (an HTTP route seen before whose plan is one
        # limit keyed by the peer's address) is one core call that finds
        # the route's plan as _lookup does, decides, and wraps send for the
        # headers; on Redis it submits the decision, whose waiter
        # _awaited awaits. None: it found no plan it can decide, and
        # changed nothing.
        try:
            wrapped = _mw_route(scope, receive, send, self._fast_state)
        except Exception as exc:  # the decision's: the state is marked
            return self._decision_failed(scope, receive, send, exc)
        if wrapped is None:
            return self._looked_up(scope, receive, send)
        if wrapped is False:  # rejected by the limiter the state names
            state = scope["state"]
            return self._not_allowed(scope, receive, send, state[_BY], None, False)
        if type(wrapped) is tuple:  # (waiter, send): on Redis
            return self._awaited(scope, receive, send, *wrapped)
        return self.app(scope, receive, wrapped)

    async def _awaited(
        self, scope: Scope, receive: Receive, send: Send, waiter: Any, sent: Send
    ) -> None:
        """mw_route's request on Redis once its decision is in: ``sent``
        (``send``, or the one adding the headers when they are on) goes to
        the application when the request is allowed or the storage's error
        lets it through."""
        outcome = await waiter
        if outcome.__class__ is not ViewRateLimit and outcome is not None:
            state = scope["state"]
            await state[_BY]._send_rejection(scope, receive, send, outcome, state)
            return
        await self.app(scope, receive, sent)

    def _lookup(self, scope: Scope) -> tuple[Limiter, tuple[Any, Any], Any] | None:
        """(limiter, (endpoint, has depends()), plan) of an HTTP route this
        middleware has seen, from its caches; None for anything else (the
        general path then finds them, and fills the caches)."""
        if scope["type"] != "http":
            return None
        app = scope.get("app")
        if app is None:  # served around the application, not inside it
            app = self.app
        if app is not self._routes_app:
            return None
        limiter = self._limiter
        values = self._state_values
        if (
            limiter is None
            and values is not None
            and getattr(app, "state", None) is self._state_object
        ):
            limiter = values.get("limiter")
        routes = self._routes
        if (
            limiter is None
            or routes is None
            or len(routes) != self._routes_len
            or (self._routers and _changed(self._routers))
        ):
            return None
        found = self._endpoints.get(
            ("http", scope.get("method"), scope.get("root_path", ""), scope["path"])
        )
        plan = limiter._endpoint_plans.get(found[0]) if found else None
        if plan is None:
            return None
        assert found is not None
        return limiter, found, plan

    def _looked_up(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The usual request when mw_route could not take it: the plan's
        spec is worked out first (or the plan is the general path's)."""
        looked = self._lookup(scope)
        if looked is not None:
            limiter, found, plan = looked
            if limiter.enabled and limiter._auto_check:
                return self._decided(scope, receive, send, limiter, found, plan)
        return self._general(scope, receive, send)

    def _decided(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        limiter: Limiter,
        found: tuple[Any, Any],
        plan: Any,
    ) -> Awaitable[None]:
        """An HTTP request's check once its plan is known: mw_decide when
        the plan has a spec (worked out on first use), else (or when
        mw_decide declines, having changed nothing) :meth:`_checked`."""
        spec = plan.fast
        if spec is _UNSET:
            spec = plan.fast = _middleware_spec(limiter, plan)
        if spec is not None:
            try:
                wrapped = _mw_decide(scope, spec, send)
            except Exception as exc:  # the state is marked
                return self._after_error(
                    scope, receive, send, limiter, found, plan, exc
                )
            if wrapped is False or type(wrapped) is tuple:
                return self._not_allowed(scope, receive, send, limiter, found, wrapped)
            if wrapped is not None:
                return self.app(scope, receive, wrapped)
        return self._checked(scope, receive, send, "http", limiter, found[1], plan)

    def _decision_failed(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception
    ) -> Awaitable[None]:
        """An error of mw_route's decision: the limiter's error policy."""
        looked = self._lookup(scope)
        if looked is None:  # mw_route found them: nothing can have changed
            raise exc
        limiter, found, plan = looked
        return self._after_error(scope, receive, send, limiter, found, plan, exc)

    def _after_error(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        limiter: Limiter,
        found: tuple[Any, Any],
        plan: Any,
        exc: Exception,
    ) -> Awaitable[None]:
        """An error of the core's decision (the state is marked already):
        the limiter's error policy, then the outcome it chose."""
        conn = _make_request(scope, receive, send)
        outcome = limiter._failed_in_endpoint(exc, conn, plan)
        return self._not_allowed(scope, receive, send, limiter, found, outcome)

    # asyncio's mark (Python < 3.12 and asyncio.iscoroutinefunction) and
    # inspect's (3.12+).
    __call__._is_coroutine = _asyncio_coroutine_mark  # type: ignore[attr-defined]
    if _mark_coroutine is not None:
        __call__ = _mark_coroutine(__call__)

    async def _not_allowed(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        limiter: Limiter,
        found: tuple[Any, Any] | None,
        outcome: Any,
    ) -> None:
        """mw_decide's rejection (False) or a storage failure's outcome
        (``found`` is needed for the latter only)."""
        state = scope["state"]
        if outcome is False:
            failed = limiter._rejected_by_core(state[_VIEW])
        else:  # (failure or None,) from _failed_in_endpoint
            failed = outcome[0]
        if failed is not None:
            await limiter._send_rejection(scope, receive, send, failed, state)
            return
        if limiter._headers_enabled and (
            (found is not None and found[1]) or state.get(_VIEW) is not None
        ):
            send = self._with_headers(limiter, state, send)
        await self.app(scope, receive, send)

    def _general(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Finds the request's limiter, endpoint and plan (filling the
        caches), then :meth:`_checked`."""
        kind = scope["type"]
        app = scope.get("app")
        if app is None:
            app = self.app
        if kind != "http" and kind != "websocket":
            return self.app(scope, receive, send)
        limiter = self._limiter
        if limiter is None:
            state_object = getattr(app, "state", None)
            if state_object is not self._state_object:
                self._state_object = state_object
                values = getattr(state_object, "_state", None)
                self._state_values = values if isinstance(values, dict) else None
            if self._state_values is not None:
                limiter = self._state_values.get("limiter")
            else:
                limiter = _app_limiter(app)
        if limiter is None or not limiter.enabled or not limiter._auto_check:
            return self.app(scope, receive, send)
        endpoint, has_depends = self._endpoint(app, scope)
        if endpoint is None:
            return self.app(scope, receive, send)
        plan = limiter._endpoint_plans.get(endpoint)
        if plan is None:
            plan = limiter._plan_for_endpoint(endpoint)
        if kind == "http":
            return self._decided(
                scope, receive, send, limiter, (endpoint, has_depends), plan
            )
        return self._checked(scope, receive, send, kind, limiter, has_depends, plan)

    async def _checked(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        kind: str,
        limiter: Limiter,
        has_depends: Any,
        plan: Any,
    ) -> None:
        """Checks ``plan``'s limits for the request and runs the app, or
        answers 429."""
        if plan.exempt:
            if has_depends and kind == "http" and limiter._headers_enabled:
                # Its depends() limits still apply, and their headers.
                state = scope.setdefault("state", {})
                send = self._with_headers(limiter, state, send)
            await self.app(scope, receive, send)
            return
        if plan.deferred:  # the decorator checks it, after the dependencies
            if plan.head_groups:
                _owe_application_limits(scope.setdefault("state", {}), limiter)
            await self.app(scope, receive, send)
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        elif (
            state.get("_rate_limiting_complete")
            and state.get("_rapidlimit_by", limiter) is limiter
        ):
            await self.app(scope, receive, send)
            return
        if limiter._remote:
            pending = None
            if kind == "http":
                pending = limiter._scope_check_async(scope, receive, send, plan, state)
            if pending is not None:
                outcome = await pending
                failed = None if type(outcome) is ViewRateLimit else outcome
            else:
                if kind == "http":
                    conn: Any = _make_request(scope, receive, send)
                else:
                    conn = WebSocket(scope, receive, send)
                failed = await limiter._check_async(conn, plan, state)
        elif kind == "http":  # _decided offered the plan to mw_decide first
            failed = limiter._check_http(scope, receive, send, plan, state)
        else:
            failed = limiter._check(WebSocket(scope, receive, send), plan, state)
        if failed is not None:
            if kind == "http":
                await limiter._send_rejection(scope, receive, send, failed, state)
            else:
                await limiter._reject_websocket_raw(scope, send, failed, state)
            return
        # A depends() dependency may record what the headers describe.
        if (
            kind != "http"
            or not limiter._headers_enabled
            or (state.get(_VIEW) is None and not has_depends)
        ):
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, self._with_headers(limiter, state, send))

    @staticmethod
    def _with_headers(limiter: Limiter, state: dict[str, Any], send: Send) -> Send:
        """``send``, adding the headers of what ``state`` records when the
        response starts (a decorator may replace it meanwhile)."""
        spec = limiter._send_spec()
        state[spec[5]] = spec[6]
        return _HeaderSend(send, state, spec)


def _middleware_spec(limiter: Limiter, plan: Any) -> tuple[Any, ...] | None:
    """``plan``'s mw_decide spec, or None when the middleware's general path
    must check it. (On Redis only mw_route decides with it: mw_decide,
    given no ``receive``, declines.)"""
    if plan.exempt or plan.deferred:
        return None
    return limiter._fast_spec(plan)


class SlowAPIMiddleware(SlowAPIASGIMiddleware):
    """slowapi's name for the middleware; the same pure ASGI implementation."""
