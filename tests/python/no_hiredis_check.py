"""Checks a rapidlimit built without hiredis (scripts/test.sh builds one:
README promises hiredis is optional at build time). Run with that build's
package first on PYTHONPATH, and examples/ after it:

    PYTHONPATH=<package dir>:examples \
        python tests/python/no_hiredis_check.py <package dir>

The memory store serves the quickstart as usual; a Redis URI fails at
start-up with an error naming the URI and what is missing. Not collected by
pytest (the suite needs the build with Redis)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


def main(package_dir: str) -> None:
    import rapidlimit
    from rapidlimit import Limiter, _core
    from rapidlimit.errors import ConfigurationError
    from rapidlimit.util import get_remote_address

    where = Path(rapidlimit.__file__).resolve()
    assert where.is_relative_to(Path(package_dir).resolve()), where
    assert _core.redis_available() is False
    assert not hasattr(_core, "RedisWaiter")

    uri = "redis://127.0.0.1:6379/0"
    try:
        Limiter(key_func=get_remote_address, storage_uri=uri)
    except ConfigurationError as exc:
        assert uri in str(exc) and "without hiredis" in str(exc), exc
    else:
        raise AssertionError("a Redis URI was accepted without hiredis")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's httpx deprecation
        from starlette.testclient import TestClient
    from quickstart import app

    client = TestClient(app)
    codes = [client.get("/home").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429], codes
    rejected = client.get("/home")
    assert rejected.json() == {"error": "Rate limit exceeded: 5 per 1 minute"}
    assert client.get("/mars").headers["x-ratelimit-remaining"] == "4"
    print("rapidlimit without hiredis: memory store and quickstart OK,", end=" ")
    print("a Redis URI refused with a clear error")


if __name__ == "__main__":
    main(sys.argv[1])
