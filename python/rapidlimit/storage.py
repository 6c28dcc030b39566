"""Storages for the core strategies, named as in the ``limits`` package."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlparse

from rapidlimit._core import MemoryStorage, Storage

__all__ = ["MemoryStorage", "Storage", "storage_from_string"]

_MEMORY_SCHEMES = frozenset({"memory", "rapidlimit+memory"})


def _int_option(uri: str, name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"storage option {name}={value!r} in {uri!r} is not an integer"
        ) from None
    if number <= 0:
        raise ValueError(f"storage option {name}={value!r} in {uri!r} must be > 0")
    return number


def storage_from_string(uri: str, **options: Any) -> Storage:
    """Builds a storage from a URI such as ``memory://`` or
    ``memory://?max_keys=100000``.

    Options may also be passed as keywords (``max_keys``, ``shards``).
    Unknown schemes and options raise ``ValueError`` naming the URI.
    """
    parsed = urlparse(uri)
    if not parsed.scheme or parsed.scheme not in _MEMORY_SCHEMES:
        raise ValueError(f"unsupported storage uri {uri!r}: expected memory://")
    merged: dict[str, Any] = dict(parse_qsl(parsed.query))
    merged.update(options)
    kwargs: dict[str, int] = {}
    for name, value in merged.items():
        if name not in ("max_keys", "shards"):
            raise ValueError(f"unknown storage option {name!r} for {uri!r}")
        kwargs[name] = _int_option(uri, name, value)
    return MemoryStorage(**kwargs)
