"""Exceptions raised by the slowapi-compatible layer (``slowapi.errors``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from rapidlimit.wrappers import Limit

__all__ = ["ConfigurationError", "RateLimitExceeded"]


class ConfigurationError(ValueError):
    """A limiter setting is invalid (unknown strategy, bad limit string...).

    Raised at construction or decoration time, never while serving a request.
    It subclasses ``ValueError`` so code that catches parse errors keeps
    working.
    """


class RateLimitExceeded(HTTPException):
    """Raised when a request goes over one of its limits.

    An ``HTTPException`` with status 429; ``detail`` is the limit's error
    message, or its text such as ``"5 per 1 minute"``; ``limit`` is the
    :class:`~rapidlimit.wrappers.Limit` that failed.
    """

    limit: Limit | None = None

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        super().__init__(status_code=429, detail=limit.describe_error())
