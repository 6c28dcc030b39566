import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from .app import app, limiter


def setup_function() -> None:
    limiter.reset()


def test_public_route() -> None:
    client = TestClient(app)
    responses = [client.get("/public") for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert responses[0].json() == {"data": "public"}
    # The middleware checks the default (1000/day), the dependency the
    # route's limit; the headers describe the one of the shortest period,
    # as in slowapi.
    assert responses[0].headers["x-ratelimit-remaining"] == "2"


def test_partner_budget_is_per_api_key_and_shared() -> None:
    client = TestClient(app)
    first = client.get("/partner/orders", headers={"x-api-key": "acme"})
    assert first.headers["x-ratelimit-remaining"] == "99"
    second = client.get("/partner/invoices", headers={"x-api-key": "acme"})
    assert second.headers["x-ratelimit-remaining"] == "98"
    other = client.get("/partner/orders", headers={"x-api-key": "globex"})
    assert other.headers["x-ratelimit-remaining"] == "99"


def test_per_user_limit_after_authentication() -> None:
    client = TestClient(app)
    # Refused tokens use up none of the user's limit; they count towards
    # the default (per address, checked before the app).
    assert [client.get("/me").status_code for _ in range(3)] == [401] * 3
    alice = {"authorization": "token-alice"}
    responses = [client.get("/me", headers=alice) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].json() == {"user": "alice"}
    assert responses[2].json() == {"error": "Rate limit exceeded: 2 per 1 minute"}
    bob = client.get("/me", headers={"authorization": "token-bob"})
    assert bob.status_code == 200
