"""rapidlimit: a C++ rate limiter for Python web APIs.

The core API mirrors the ``limits`` package (``parse``, ``parse_many``,
``RateLimitItem``, ``rapidlimit.storage``, ``rapidlimit.strategies``); the
slowapi-compatible API (``Limiter`` and friends) lives beside it so that
``from slowapi import X`` becomes ``from rapidlimit import X``.
"""

from __future__ import annotations

from functools import lru_cache

from rapidlimit import _core
from rapidlimit._core import Decision, RateLimitItem
from rapidlimit.storage import MemoryStorage, storage_from_string

__version__: str = _core.__version__

# Limit strings come from decorators and settings: a small, fixed set, so
# caching makes every parse after the first a dict lookup.
parse = lru_cache(maxsize=4096)(_core.parse)
_parse_many_cached = lru_cache(maxsize=4096)(lambda text: tuple(_core.parse_many(text)))


def parse_many(text: str) -> list[RateLimitItem]:
    """Parses ``"5/minute;100 per day"`` like ``limits.parse_many``."""
    # A fresh list each time: callers may mutate it, the cache must not see it.
    return list(_parse_many_cached(text))


__all__ = [
    "Decision",
    "MemoryStorage",
    "RateLimitItem",
    "__version__",
    "parse",
    "parse_many",
    "storage_from_string",
]

# slowapi-compatible API: ``from slowapi import X`` -> ``from rapidlimit import X``.
# Imported last: these modules use parse_many and need Starlette.
try:
    from rapidlimit.errors import RateLimitExceeded
    from rapidlimit.extension import Limiter, _rate_limit_exceeded_handler
except ImportError as _exc:  # pragma: no cover - Starlette is not installed
    if not (getattr(_exc, "name", None) or "").startswith("starlette"):
        raise
else:
    __all__ += ["Limiter", "RateLimitExceeded", "_rate_limit_exceeded_handler"]
