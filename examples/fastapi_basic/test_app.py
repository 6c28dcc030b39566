import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from .app import app, limiter


def setup_function() -> None:
    limiter.reset()


def test_writes_have_their_own_limit() -> None:
    client = TestClient(app)
    codes = [client.post("/items").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    rejected = client.post("/items")
    assert rejected.json() == {"error": "Rate limit exceeded: 5 per 1 minute"}
    assert rejected.headers["x-ratelimit-remaining"] == "0"
    assert int(rejected.headers["retry-after"]) <= 61


def test_reads_get_the_default_limit() -> None:
    client = TestClient(app)
    first = client.get("/items")
    assert first.json() == ["apple", "pear"]
    # The headers describe the limit with the shortest period: the default.
    assert first.headers["x-ratelimit-limit"] == "60"
    codes = [client.get("/items").status_code for _ in range(60)]
    assert codes == [200] * 59 + [429]


def test_search_cost_depends_on_the_query() -> None:
    client = TestClient(app)
    assert (
        client.get("/items/search?q=a&page=2").headers["x-ratelimit-remaining"] == "7"
    )
    assert client.get("/items/search").headers["x-ratelimit-remaining"] == "6"


def test_health_is_exempt() -> None:
    client = TestClient(app)
    assert {client.get("/health").status_code for _ in range(100)} == {200}
    assert "x-ratelimit-limit" not in client.get("/health").headers
