"""The slowapi 0.1.10 surface: names, signatures, defaults and settings."""

from __future__ import annotations

import inspect
import logging
import tracemalloc

import pytest
import slowapi
import slowapi.errors
import slowapi.extension
import slowapi.middleware
import slowapi.util
import slowapi.wrappers
from starlette.exceptions import HTTPException
from starlette.requests import Request

import rapidlimit
import rapidlimit.errors
import rapidlimit.extension
import rapidlimit.middleware
import rapidlimit.util
import rapidlimit.wrappers
from rapidlimit import Limiter
from rapidlimit.errors import ConfigurationError, RateLimitExceeded
from rapidlimit.util import get_remote_address


def _request(headers: dict[str, str] | None = None, client: object = ("1.2.3.4", 1)):
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [
                (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
            ],
            "client": client,
        }
    )


# --------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("", ["Limiter", "_rate_limit_exceeded_handler"]),
        ("errors", ["RateLimitExceeded"]),
        ("middleware", ["SlowAPIMiddleware", "SlowAPIASGIMiddleware"]),
        ("util", ["get_remote_address", "get_ipaddr"]),
        ("wrappers", ["Limit", "LimitGroup"]),
        (
            "extension",
            ["Limiter", "_rate_limit_exceeded_handler", "C", "HEADERS"],
        ),
    ],
)
def test_every_slowapi_name_exists(module: str, names: list[str]) -> None:
    ours = rapidlimit if not module else getattr(rapidlimit, module)
    theirs = slowapi if not module else getattr(slowapi, module)
    for name in names:
        assert hasattr(theirs, name), name  # the name really is slowapi's
        assert hasattr(ours, name), name


def test_limiter_signature_matches_slowapi() -> None:
    ours = inspect.signature(Limiter.__init__).parameters
    theirs = inspect.signature(slowapi.Limiter.__init__).parameters
    assert list(ours) == list(theirs)
    for name in theirs:
        if name in ("self", "key_func"):
            continue
        # Mutable defaults ([] / {}) became None; the meaning is the same.
        expected = theirs[name].default
        got = ours[name].default
        if expected in ([], {}):
            assert got is None, name
        else:
            assert got == expected, name


@pytest.mark.parametrize(
    "method", ["limit", "shared_limit", "exempt", "reset", "_check_request_limit"]
)
def test_decorator_signatures_match_slowapi(method: str) -> None:
    ours = inspect.signature(getattr(Limiter, method)).parameters
    theirs = inspect.signature(getattr(slowapi.Limiter, method)).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert ours[name].default == param.default, name


@pytest.mark.parametrize("cls", ["Limit", "LimitGroup"])
def test_wrapper_constructors_match_slowapi(cls: str) -> None:
    ours = inspect.signature(getattr(rapidlimit.wrappers, cls)).parameters
    theirs = inspect.signature(getattr(slowapi.wrappers, cls)).parameters
    assert list(ours) == list(theirs)


def test_settings_names_are_slowapis() -> None:
    for name, value in vars(slowapi.extension.C).items():
        if name.isupper():
            assert getattr(rapidlimit.extension.C, name) == value
    for name in ("RESET", "REMAINING", "LIMIT", "RETRY_AFTER"):
        assert getattr(rapidlimit.extension.HEADERS, name) == getattr(
            slowapi.extension.HEADERS, name
        )


def test_extension_docstring_lists_differences() -> None:
    doc = rapidlimit.extension.__doc__ or ""
    assert "Intended differences from slowapi" in doc
    for topic in ("#163", "#239", "#253", "#249", "#281", "#75", "X-Forwarded-For"):
        assert topic in doc, topic


# --------------------------------------------------------------------------
# errors, wrappers, util


def test_rate_limit_exceeded_is_a_429_http_exception() -> None:
    item = rapidlimit.parse("5/minute")
    limit = rapidlimit.wrappers.Limit(
        item, get_remote_address, None, False, None, None, None, 1, False
    )
    exc = RateLimitExceeded(limit)
    assert isinstance(exc, HTTPException)
    assert exc.status_code == 429
    assert exc.detail == "5 per 1 minute"
    assert exc.limit is limit


def test_rate_limit_exceeded_uses_error_message() -> None:
    item = rapidlimit.parse("5/minute")
    for message, expected in [("slow down", "slow down"), (lambda: "calm", "calm")]:
        limit = rapidlimit.wrappers.Limit(
            item, get_remote_address, None, False, None, message, None, 1, False
        )
        assert RateLimitExceeded(limit).detail == expected


def test_limit_group_parses_once_and_yields_limits() -> None:
    group = rapidlimit.wrappers.LimitGroup(
        "5/minute;100 per day",
        get_remote_address,
        None,
        False,
        None,
        None,
        None,
        1,
        True,
    )
    limits = list(group)
    assert [str(lim.limit) for lim in limits] == ["5 per 1 minute", "100 per 1 day"]
    assert list(group)[0] is limits[0]  # parsed once
    assert limits[0].override_defaults is True


def test_limit_group_callable_gets_the_key() -> None:
    group = rapidlimit.wrappers.LimitGroup(
        lambda key: "2/second" if key == "1.2.3.4" else "9/second",
        get_remote_address,
        None,
        False,
        None,
        None,
        None,
        1,
        True,
    )
    assert group.is_dynamic
    [limit] = group.with_request(_request())
    assert limit.limit.amount == 2


def test_limit_group_rejects_bad_strings() -> None:
    with pytest.raises(ValueError):
        rapidlimit.wrappers.LimitGroup(
            "5 per fortnight",
            get_remote_address,
            None,
            False,
            None,
            None,
            None,
            1,
            True,
        )


def test_get_remote_address() -> None:
    assert get_remote_address(_request()) == "1.2.3.4"
    assert get_remote_address(_request(client=None)) == "127.0.0.1"
    assert slowapi.util.get_remote_address(_request()) == "1.2.3.4"


def test_get_ipaddr_reads_the_real_x_forwarded_for() -> None:
    request = _request({"X-Forwarded-For": "9.9.9.9, 10.0.0.1"})
    assert rapidlimit.util.get_ipaddr(request) == "9.9.9.9"
    # slowapi looked for a header literally named X_FORWARDED_FOR.
    assert slowapi.util.get_ipaddr(request) == "1.2.3.4"
    legacy = _request({"X_FORWARDED_FOR": "8.8.8.8"})
    assert rapidlimit.util.get_ipaddr(legacy) == "8.8.8.8"
    assert rapidlimit.util.get_ipaddr(_request()) == "1.2.3.4"


# --------------------------------------------------------------------------
# Limiter construction


def test_defaults() -> None:
    limiter = Limiter(key_func=get_remote_address)
    assert limiter.enabled is True
    assert limiter._headers_enabled is False
    assert limiter._auto_check is True
    assert limiter._swallow_errors is False
    assert limiter._strategy == "fixed-window"
    assert limiter._key_prefix == ""
    assert limiter._key_style == "url"
    assert limiter._route_limits == {}
    assert limiter._exempt_routes == set()
    assert isinstance(limiter.logger, logging.Logger)
    assert limiter._header_mapping == {
        1: "X-RateLimit-Reset",
        2: "X-RateLimit-Remaining",
        3: "X-RateLimit-Limit",
        4: "Retry-After",
    }


@pytest.mark.parametrize(
    "strategy",
    ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"],
)
def test_strategies(strategy: str) -> None:
    limiter = Limiter(key_func=get_remote_address, strategy=strategy)
    assert limiter.limiter.strategy == strategy


def test_unknown_strategy_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="leaky"):
        Limiter(key_func=get_remote_address, strategy="leaky")


def test_unsupported_storage_uri_is_named() -> None:
    with pytest.raises(ValueError, match="memcached://"):
        Limiter(key_func=get_remote_address, storage_uri="memcached://localhost")


def test_storage_options_reach_the_store() -> None:
    limiter = Limiter(key_func=get_remote_address, storage_options={"max_keys": 10})
    assert limiter._storage.max_keys == 10  # type: ignore[attr-defined]


def test_default_limits_as_a_single_string() -> None:
    limiter = Limiter(key_func=get_remote_address, default_limits="5/minute;9/hour")
    [group] = limiter._default_limits
    assert [lim.limit.amount for lim in group] == [5, 9]


def test_default_limits_keep_order_and_drop_duplicates() -> None:
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["5/minute", "1/second", "5/minute"],
    )
    assert [next(iter(g)).limit.amount for g in limiter._default_limits] == [5, 1]


def test_bad_default_limit_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="5 per fortnight"):
        Limiter(key_func=get_remote_address, default_limits=["5 per fortnight"])
    with pytest.raises(ConfigurationError):
        Limiter(key_func=get_remote_address, default_limits=[5])  # type: ignore[list-item]


def test_limiters_share_no_mutable_defaults() -> None:
    first = Limiter(key_func=get_remote_address)
    second = Limiter(key_func=get_remote_address)
    first._storage_options["x"] = 1
    assert second._storage_options == {}
    assert first._default_limits is not second._default_limits
    assert first._storage is not second._storage


def test_bad_limit_in_decorator_fails_at_decoration() -> None:
    limiter = Limiter(key_func=get_remote_address)
    with pytest.raises(ConfigurationError, match="nonsense"):
        limiter.limit("nonsense")


# --------------------------------------------------------------------------
# RATELIMIT_* settings


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATELIMIT_ENABLED", "false")
    monkeypatch.setenv("RATELIMIT_HEADERS_ENABLED", "true")
    monkeypatch.setenv("RATELIMIT_SWALLOW_ERRORS", "1")
    monkeypatch.setenv("RATELIMIT_STRATEGY", "moving-window")
    monkeypatch.setenv("RATELIMIT_STORAGE_URL", "memory://")
    monkeypatch.setenv("RATELIMIT_STORAGE_OPTIONS", '{"max_keys": 77}')
    monkeypatch.setenv("RATELIMIT_DEFAULT", "3/minute")
    monkeypatch.setenv("RATELIMIT_APPLICATION", "30/minute")
    monkeypatch.setenv("RATELIMIT_HEADER_LIMIT", "X-Limit")
    monkeypatch.setenv("RATELIMIT_HEADER_REMAINING", "X-Left")
    monkeypatch.setenv("RATELIMIT_HEADER_RESET", "X-Reset")
    monkeypatch.setenv("RATELIMIT_HEADER_RETRY_AFTER", "X-Retry")
    monkeypatch.setenv("RATELIMIT_HEADER_RETRY_AFTER_VALUE", "http-date")
    monkeypatch.setenv("RATELIMIT_KEY_PREFIX", "pre")
    monkeypatch.setenv("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", "true")
    limiter = Limiter(key_func=get_remote_address)
    assert limiter.enabled is False
    assert limiter._headers_enabled is True
    assert limiter._swallow_errors is True
    assert limiter._strategy == "moving-window"
    assert limiter._storage.max_keys == 77  # type: ignore[attr-defined]
    assert [lim.limit.amount for lim in limiter._default_limits[0]] == [3]
    assert [lim.limit.amount for lim in limiter._application_limits[0]] == [30]
    assert limiter._header_mapping[3] == "X-Limit"
    assert limiter._header_mapping[2] == "X-Left"
    assert limiter._header_mapping[1] == "X-Reset"
    assert limiter._header_mapping[4] == "X-Retry"
    assert limiter._retry_after == "http-date"
    assert limiter._key_prefix == "pre"
    assert limiter._in_memory_fallback_enabled is True


def test_false_strings_are_false(monkeypatch: pytest.MonkeyPatch) -> None:
    # slowapi read "false" as a true value for settings whose default is False.
    monkeypatch.setenv("RATELIMIT_HEADERS_ENABLED", "false")
    monkeypatch.setenv("RATELIMIT_SWALLOW_ERRORS", "0")
    limiter = Limiter(key_func=get_remote_address)
    assert limiter._headers_enabled is False
    assert limiter._swallow_errors is False


def test_constructor_arguments_win_over_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RATELIMIT_DEFAULT", "3/minute")
    monkeypatch.setenv("RATELIMIT_STRATEGY", "moving-window")
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["8/minute"],
        strategy="fixed-window",
    )
    assert [lim.limit.amount for lim in limiter._default_limits[0]] == [8]
    assert limiter._strategy == "fixed-window"


def test_settings_from_dotenv_file(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    with open(".env", "w") as handle:
        handle.write("RATELIMIT_DEFAULT=4/minute\nRATELIMIT_KEY_PREFIX=dot\n")
    limiter = Limiter(key_func=get_remote_address)
    assert limiter._key_prefix == "dot"
    assert [lim.limit.amount for lim in limiter._default_limits[0]] == [4]
    # And an explicit config file.
    with open("other.env", "w") as handle:
        handle.write("RATELIMIT_KEY_PREFIX=other\n")
    other = Limiter(key_func=get_remote_address, config_filename="other.env")
    assert other._key_prefix == "other"


def test_storage_options_as_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATELIMIT_STORAGE_OPTIONS", "max_keys=12,shards=4")
    limiter = Limiter(key_func=get_remote_address)
    assert limiter._storage.max_keys == 12  # type: ignore[attr-defined]


def test_get_app_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATELIMIT_ENABLED", "false")
    limiter = Limiter(key_func=get_remote_address)
    assert limiter.get_app_config("RATELIMIT_ENABLED", True) is False
    assert limiter.get_app_config("RATELIMIT_MISSING") is None
    assert limiter.get_app_config("RATELIMIT_MISSING", "x") == "x"


def test_reset_clears_counters() -> None:
    limiter = Limiter(key_func=get_remote_address)
    item = rapidlimit.parse("1/minute")
    assert limiter.limiter.hit(item, "a")
    assert not limiter.limiter.hit(item, "a")
    limiter.reset()
    assert limiter.limiter.hit(item, "a")


def test_a_limiter_per_application_costs_little_memory() -> None:
    # Limiters with the same header names share the core's ready header
    # pairs (about 220 KB): an application per test builds one limiter
    # each, and FastAPI's caches of endpoints keep thousands of them alive.
    Limiter(key_func=get_remote_address)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        limiters = [Limiter(key_func=get_remote_address) for _ in range(20)]
        per_limiter = (tracemalloc.get_traced_memory()[0] - before) / len(limiters)
    finally:
        tracemalloc.stop()
    assert per_limiter < 48 * 1024
    custom = Limiter(key_func=get_remote_address)
    custom._header_mapping[rapidlimit.extension.HEADERS.LIMIT] = "X-Custom-Limit"
    custom._encode_header_names()
    assert "x-custom-limit" in repr(custom._core_names)
    assert "x-custom-limit" not in repr(limiters[0]._core_names)
