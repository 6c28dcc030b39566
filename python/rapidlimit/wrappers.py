"""Limits and their context (``slowapi.wrappers``).

A :class:`Limit` is one parsed rate limit plus everything needed to apply it
to a request (key function, scope, methods, cost...). Everything that can be
worked out without a request, including how to call the user's callables, is
worked out here, once, so the per-request path only reads attributes.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from typing import Any, Union

from starlette.requests import HTTPConnection

from rapidlimit import _core, parse_many
from rapidlimit._core import RateLimitItem
from rapidlimit.util import get_remote_address

__all__ = ["Limit", "LimitGroup", "describe_item", "whole_cost"]

StrOrCallableStr = Union[str, Callable[..., str]]
CostType = Union[int, Callable[..., int]]

_POSITIONAL = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
)


def whole_cost(cost: CostType | float) -> CostType:
    """``cost`` as given for a callable, else as the whole number of hits it
    must be (``2.0`` is 2). Raises ``ValueError`` for a fraction or a
    negative number, ``TypeError`` for anything else.

    slowapi hands costs to ``limits``, whose memory storage counts fractions
    and whose Redis storage refuses them; rapidlimit counts whole hits
    everywhere and says so where the cost is given rather than per request.
    A callable's result is checked the same way when it is used.
    """
    if callable(cost):
        return cost
    if isinstance(cost, float):
        if not cost.is_integer():
            raise ValueError(f"cost must be a whole number, got {cost!r}")
        cost = int(cost)
    elif not isinstance(cost, int):
        raise TypeError(
            "cost must be a whole number or a callable returning one, "
            f"not {type(cost).__name__}"
        )
    if cost < 0:
        raise ValueError(f"cost must not be negative, got {cost!r}")
    return cost


def describe_item(item: RateLimitItem) -> str:
    """``"5 per 1 minute"``: the text ``limits`` gives a limit."""
    return f"{item.amount} per {item.multiples} {item.granularity}"


def _parameters(func: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None


def takes_request(func: Callable[..., Any]) -> bool:
    """Whether a key function (or cost, scope...) wants the request.

    slowapi passes the request when the function has a parameter named
    ``request``. A function that would otherwise fail for lack of an argument
    (one required positional parameter under another name) gets it too.
    """
    params = _parameters(func)
    if params is None:
        return True
    if "request" in params:
        return True
    return any(
        p.kind in _POSITIONAL and p.default is inspect.Parameter.empty
        for p in params.values()
    )


def _exempt_takes_request(func: Callable[..., Any] | None) -> bool:
    # slowapi passes the request when the function has exactly one parameter.
    if func is None:
        return False
    params = _parameters(func)
    return params is not None and len(params) == 1


def _json_error_body(detail: str) -> bytes:
    # Same bytes as JSONResponse({"error": ...}) renders.
    return json.dumps(
        {"error": f"Rate limit exceeded: {detail}"},
        ensure_ascii=False,
        allow_nan=False,
        indent=None,
        separators=(",", ":"),
    ).encode("utf-8")


class Limit:
    """One rate limit with its context (same constructor as slowapi's)."""

    def __init__(
        self,
        limit: RateLimitItem,
        key_func: Callable[..., str],
        scope: StrOrCallableStr | None,
        per_method: bool,
        methods: list[str] | None,
        error_message: StrOrCallableStr | None,
        exempt_when: Callable[..., bool] | None,
        cost: CostType,
        override_defaults: bool,
    ) -> None:
        self.limit = limit
        self.key_func = key_func
        self.per_method = per_method
        self.methods = [m.lower() for m in methods] if methods else methods
        self.error_message = error_message
        self.exempt_when = exempt_when
        self.cost = whole_cost(cost)
        self.override_defaults = override_defaults
        self._raw_scope = scope
        # Precomputed for the request path.
        self._exempt_when_takes_request = _exempt_takes_request(exempt_when)
        self._key_takes_request = takes_request(key_func)
        # The usual key function, read inline on the hot path.
        self._peer_key = key_func is get_remote_address
        self._methods_upper: frozenset[str] | None = (
            frozenset(m.upper() for m in methods) if methods else None
        )
        self._static_scope: str | None = None
        self._scope_func: Callable[..., str] | None = None
        self._scope_takes_request = False
        if callable(scope):
            self._scope_func = scope
            params = _parameters(scope)
            self._scope_takes_request = params is not None and "request" in params
        elif scope:
            self._static_scope = scope
        self._cost_callable = callable(cost)
        self._granularity_seconds = _core.granularity_seconds(limit.granularity)
        self._amount_header = str(limit.amount).encode("latin-1")
        # The last reset time seen and its header value (it changes once per
        # window, so formatting it once per window is enough).
        self._reset_cache: tuple[float, tuple[bytes, bytes]] = (-1.0, (b"", b""))
        self._limit_pair: tuple[bytes, bytes] = (b"", b"")
        self._text = describe_item(limit)
        self._body: bytes | None = (
            None if callable(error_message) else _json_error_body(self.describe_error())
        )
        # The headers JSONResponse gives that body.
        self._body_headers: tuple[tuple[bytes, bytes], ...] = (
            ()
            if self._body is None
            else (
                (b"content-length", b"%d" % len(self._body)),
                (b"content-type", b"application/json"),
            )
        )
        # True when nothing about this limit depends on the request except the
        # key: no exemption, no method filter, static cost.
        self._simple = (
            exempt_when is None
            and self._methods_upper is None
            and not per_method
            and not self._cost_callable
            and self._scope_func is None
        )

    @property
    def scope(self) -> str:
        """The static scope ("" when the route's own scope is used).

        A callable scope is resolved per request; this property then
        returns "".
        """
        return self._static_scope or ""

    def is_exempt(self, request: HTTPConnection | None = None) -> bool:
        """Whether ``exempt_when`` exempts this request from the limit."""
        if self.exempt_when is None:
            return False
        if self._exempt_when_takes_request and request is not None:
            return bool(self.exempt_when(request))
        return bool(self.exempt_when())

    def describe_error(self) -> str:
        """The 429 ``detail``: the error message, or e.g. ``5 per 1 minute``."""
        message = self.error_message
        if message:
            return str(message() if callable(message) else message)
        return self._text

    def error_body(self) -> bytes:
        """The JSON body of the default 429 response."""
        if self._body is not None:
            return self._body
        return _json_error_body(self.describe_error())

    def __repr__(self) -> str:
        return f"Limit({self._text!r}, scope={self._raw_scope!r})"


class LimitGroup:
    """Limits from one string or one callable returning a string.

    Same constructor as slowapi's. A string is parsed here, once; a bad one
    raises ``ValueError``. A callable is called per request (with the key
    when it has a ``key`` parameter) and its result parsed through a cache.
    """

    _DYNAMIC_CACHE_SIZE = 1024

    def __init__(
        self,
        limit_provider: StrOrCallableStr,
        key_function: Callable[..., str],
        scope: StrOrCallableStr | None,
        per_method: bool,
        methods: list[str] | None,
        error_message: StrOrCallableStr | None,
        exempt_when: Callable[..., bool] | None,
        cost: CostType,
        override_defaults: bool,
    ) -> None:
        self._limit_provider = limit_provider
        self._scope = scope
        self.key_function = key_function
        self.per_method = per_method
        self.methods = [m.lower() for m in methods] if methods else methods
        self.error_message = error_message
        self.exempt_when = exempt_when
        self.cost = whole_cost(cost)
        self.override_defaults = override_defaults
        self.request: HTTPConnection | None = None
        self._static: tuple[Limit, ...] | None = None
        self._cache: dict[str, tuple[Limit, ...]] = {}
        self._provider_takes_key = False
        self._key_takes_request = takes_request(key_function)
        if callable(limit_provider):
            params = _parameters(limit_provider)
            self._provider_takes_key = params is not None and "key" in params
        else:
            if not isinstance(limit_provider, str):
                raise TypeError(
                    "a limit must be a string such as '5/minute' or a callable "
                    f"returning one, not {type(limit_provider).__name__}"
                )
            self._static = self._build(limit_provider)

    @property
    def is_dynamic(self) -> bool:
        return self._static is None

    def _build(self, text: str) -> tuple[Limit, ...]:
        items = parse_many(text)
        if not items:
            raise ValueError(f"couldn't parse rate limit string {text!r}")
        return tuple(
            Limit(
                item,
                self.key_function,
                self._scope,
                self.per_method,
                self.methods,
                self.error_message,
                self.exempt_when,
                self.cost,
                self.override_defaults,
            )
            for item in items
        )

    def limits_for(self, request: HTTPConnection | None) -> tuple[Limit, ...]:
        """The limits that apply to ``request`` (parses a callable's result).

        Raises ``ValueError`` when a callable returns a bad limit string.
        """
        if self._static is not None:
            return self._static
        provider = self._limit_provider
        assert callable(provider)
        if self._provider_takes_key:
            if request is None:
                raise ValueError("a limit callable with a `key` needs the request")
            func = self.key_function
            key = func(request) if self._key_takes_request else func()
            text = provider(key)
        else:
            text = provider()
        cached = self._cache.get(text)
        if cached is None:
            cached = self._build(text)
            if len(self._cache) >= self._DYNAMIC_CACHE_SIZE:
                self._cache.clear()
            self._cache[text] = cached
        return cached

    def __iter__(self) -> Iterator[Limit]:
        return iter(self.limits_for(self.request))

    def with_request(self, request: HTTPConnection) -> LimitGroup:
        """slowapi API: binds a request for the next iteration.

        rapidlimit itself calls :meth:`limits_for`, which is thread-safe.
        """
        self.request = request
        return self
