"""Exceptions raised by the slowapi-compatible layer (``slowapi.errors``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from rapidlimit.wrappers import Limit

__all__ = ["ConfigurationError", "RateLimitExceeded", "RateLimitStorageUnavailable"]


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


class RateLimitStorageUnavailable(HTTPException):
    """The limits could not be checked and the storage's policy is to refuse
    (a Redis storage with ``on_error="fail-closed"``, the default when the
    limiter is neither told to swallow errors nor to fall back to memory).

    An ``HTTPException`` with status 503 and a ``Retry-After`` header (whole
    seconds, at least 1); ``retry_after`` is the storage's value in seconds.
    """

    def __init__(self, retry_after: float = 1.0) -> None:
        self.retry_after = float(retry_after)
        super().__init__(
            status_code=503,
            detail="Rate limit storage unavailable",
            headers={"Retry-After": str(retry_after_seconds(self.retry_after))},
        )


def retry_after_seconds(value: float) -> int:
    """``Retry-After`` in whole seconds: rounded up, at least 1."""
    whole = int(value)
    if whole < value:
        whole += 1
    return max(1, whole)
