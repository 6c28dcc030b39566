import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from rapidlimit.contrib.limits import RapidlimitStorage

from .app import app, limiter


def test_slowapi_counts_in_the_native_store() -> None:
    limiter.reset()
    assert isinstance(limiter._storage, RapidlimitStorage)
    client = TestClient(app)
    codes = [client.get("/home").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert client.get("/home").json() == {
        "error": "Rate limit exceeded: 3 per 1 minute"
    }
