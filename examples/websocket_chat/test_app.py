import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

from .app import app, limiter


def setup_function() -> None:
    limiter.reset()


def test_chat_connections_are_limited() -> None:
    client = TestClient(app)
    for _ in range(2):
        with client.websocket_connect("/chat") as ws:
            ws.send_text("hi")
            assert ws.receive_text() == "echo: hi"
    chat = "/chat"
    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect(chat),
    ):
        pass
    assert denied.value.status_code == 429
    assert denied.value.json() == {"error": "Rate limit exceeded: 2 per 1 minute"}


def test_feed_gets_the_default() -> None:
    client = TestClient(app)
    for _ in range(30):
        with client.websocket_connect("/feed") as ws:
            assert ws.receive_json() == {"price": 42}
    with pytest.raises(WebSocketDenialResponse), client.websocket_connect("/feed"):
        pass
