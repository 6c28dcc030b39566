import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from .app import app, limiter


def setup_function() -> None:
    limiter.reset()


def test_index() -> None:
    client = TestClient(app)
    assert client.get("/").json() == {"hello": "world"}
    client.get("/")
    page = client.get("/")
    assert page.status_code == 429
    assert "<h1>Slow down</h1><p>2 per 1 second</p>" in page.text
    assert page.headers["x-ratelimit-limit"] == "2"


def test_reports_share_one_budget() -> None:
    client = TestClient(app)
    codes = [
        client.get("/reports/daily").status_code,
        client.get("/reports/weekly").status_code,
        client.get("/reports/daily").status_code,
        client.get("/reports/weekly").status_code,
    ]
    assert codes == [200, 200, 200, 429]
