import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from quickstart import app


def test_quickstart() -> None:
    client = TestClient(app)
    codes = [client.get("/home").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    rejected = client.get("/home")
    assert rejected.json() == {"error": "Rate limit exceeded: 5 per 1 minute"}
    assert rejected.headers["x-ratelimit-limit"] == "5"
    ok = client.get("/mars")
    assert ok.json() == {"key": "value"}
    assert ok.headers["x-ratelimit-remaining"] == "4"
