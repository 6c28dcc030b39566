"""``rapidlimit.storage_from_string`` for in-memory storages: ``memory://``
with options from the query string or keywords, and errors that name the
URI. (Redis URIs belong to the Redis storage's own tests.)"""

from __future__ import annotations

import pytest

import rapidlimit
from rapidlimit.storage import MemoryStorage, Storage, storage_from_string
from rapidlimit.strategies import FixedWindowRateLimiter


def test_memory_uri_gives_a_usable_memory_storage() -> None:
    storage = storage_from_string("memory://")
    assert isinstance(storage, MemoryStorage)
    assert isinstance(storage, Storage)
    assert storage.max_keys == 1_000_000
    assert storage.check()
    limiter = FixedWindowRateLimiter(storage)
    item = rapidlimit.parse("1/minute")
    assert limiter.hit(item, "k", now=1000.0)
    assert not limiter.hit(item, "k", now=1000.0)
    assert len(storage) == 1


def test_each_call_builds_a_new_storage() -> None:
    a = storage_from_string("memory://")
    b = storage_from_string("memory://")
    assert a is not b
    FixedWindowRateLimiter(a).hit(rapidlimit.parse("1/minute"), "k", now=1.0)
    assert len(a) == 1
    assert len(b) == 0


def test_package_level_export() -> None:
    assert rapidlimit.storage_from_string is storage_from_string
    assert rapidlimit.MemoryStorage is MemoryStorage


@pytest.mark.parametrize(
    "uri",
    ["memory://", "memory:", "MEMORY://", "Memory://", "rapidlimit+memory://"],
)
def test_accepted_spellings(uri: str) -> None:
    assert isinstance(storage_from_string(uri), MemoryStorage)


def test_options_from_the_query_string() -> None:
    storage = storage_from_string("memory://?max_keys=100&shards=4")
    assert storage.max_keys == 100
    # A host part is ignored, as limits ignores it.
    assert storage_from_string("memory://localhost?max_keys=7").max_keys == 7


def test_keyword_options_override_the_query_string() -> None:
    storage = storage_from_string("memory://?max_keys=100", max_keys=50, shards=2)
    assert storage.max_keys == 50
    assert storage_from_string("memory://", max_keys="12").max_keys == 12


def test_max_keys_is_enforced() -> None:
    storage = storage_from_string("memory://?max_keys=10&shards=64")
    limiter = FixedWindowRateLimiter(storage)
    item = rapidlimit.parse("5/hour")
    for i in range(1000):
        limiter.hit(item, str(i), now=1000.0 + i / 100)
        assert len(storage) <= 10


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "memory",
        "localhost",
        "memcached://localhost:11211",
        "mongodb://localhost",
        "async+memory://",
        "file:///tmp/x",
    ],
)
def test_unsupported_schemes_name_the_uri(uri: str) -> None:
    with pytest.raises(ValueError, match="unsupported storage uri") as info:
        storage_from_string(uri)
    assert repr(uri) in str(info.value)


@pytest.mark.parametrize("uri", [123, None, b"memory://", "redis//localhost:6379"])
def test_a_limiter_with_a_bad_uri_fails_at_construction_naming_it(uri: object) -> None:
    from rapidlimit import Limiter
    from rapidlimit.errors import ConfigurationError
    from rapidlimit.util import get_remote_address

    if uri is None:  # None is the default (memory://), not an error
        assert Limiter(key_func=get_remote_address, storage_uri=uri)
        return
    with pytest.raises(ConfigurationError) as info:
        Limiter(key_func=get_remote_address, storage_uri=uri)  # type: ignore[arg-type]
    assert repr(uri) in str(info.value)
    if isinstance(uri, str):  # the schemes that would work
        assert "redis://" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "options", "message"),
    [
        ("memory://?max_keys=lots", {}, "max_keys='lots'.*is not an integer"),
        ("memory://?max_keys=0", {}, "max_keys='0'.*must be > 0"),
        ("memory://?shards=-2", {}, "shards='-2'.*must be > 0"),
        ("memory://", {"max_keys": None}, "max_keys=None.*is not an integer"),
        ("memory://?shards=100000", {}, "shards must be between 1 and 65536"),
        ("memory://?ttl=5", {}, "unknown storage option 'ttl'"),
        ("memory://", {"socket_timeout": 3}, "unknown storage option"),
    ],
)
def test_bad_options_name_the_uri(
    uri: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        storage_from_string(uri, **options)
    assert repr(uri) in str(info.value)
