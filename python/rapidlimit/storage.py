"""Storages for the core strategies, named as in the ``limits`` package."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlparse

from rapidlimit._core import MemoryStorage, RedisStorage, Storage

__all__ = ["MemoryStorage", "RedisStorage", "Storage", "storage_from_string"]

_MEMORY_SCHEMES = frozenset({"memory", "rapidlimit+memory"})


def _is_redis_scheme(scheme: str) -> bool:
    """redis://, redis+unix://, unix://, valkey:// and their variants
    (rapidlimit+ prefixed, TLS, cluster, sentinel: RedisStorage explains
    which of those it does not support)."""
    name = scheme.lower()
    for prefix in ("async+", "rapidlimit+"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name == "unix" or name.startswith(("redis", "valkey"))


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

    Redis: ``redis://[[user]:password@]host:port/db``, ``redis+unix:///path``,
    ``unix:///path``, ``valkey://`` (each also as ``rapidlimit+redis://``
    and so on), with options from the query string or keywords (keywords
    win): ``timeout``/``socket_timeout``, ``connect_timeout``/
    ``socket_connect_timeout``, ``pool_size``, ``key_prefix``, ``on_error``
    (``fail-open``, ``fail-closed``, ``fallback``), ``blocked_cache`` and
    more (see ``RedisStorage``).
    """
    if not isinstance(uri, str):
        raise TypeError(f"a storage uri is a string such as 'memory://', not {uri!r}")
    parsed = urlparse(uri)
    if parsed.scheme and _is_redis_scheme(parsed.scheme):
        return RedisStorage(uri, **options)
    if not parsed.scheme or parsed.scheme not in _MEMORY_SCHEMES:
        raise ValueError(
            f"unsupported storage uri {uri!r}: expected memory://, "
            "redis://host:port/db, redis+unix:///path or valkey://"
        )
    merged: dict[str, Any] = dict(parse_qsl(parsed.query))
    merged.update(options)
    kwargs: dict[str, int] = {}
    for name, value in merged.items():
        if name not in ("max_keys", "shards"):
            raise ValueError(f"unknown storage option {name!r} for {uri!r}")
        kwargs[name] = _int_option(uri, name, value)
    try:
        return MemoryStorage(**kwargs)
    except ValueError as exc:  # e.g. shards above 65536: name the URI too
        raise ValueError(f"{exc} (storage uri {uri!r})") from None
