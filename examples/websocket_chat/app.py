"""Limits on WebSocket connections.

The middleware applies the default limit to every websocket route; the
decorator sets a tighter one on ``/chat``. A rejected handshake gets an HTTP
429 when the server supports denial responses, else it is closed with code
1008 before being accepted.
"""

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from rapidlimit import Limiter
from rapidlimit.middleware import SlowAPIASGIMiddleware
from rapidlimit.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, default_limits=["30/minute"])


async def feed(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"price": 42})
    await websocket.close()


@limiter.limit("2/minute")
async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    async for message in websocket.iter_text():
        await websocket.send_text(f"echo: {message}")


app = Starlette(routes=[WebSocketRoute("/feed", feed), WebSocketRoute("/chat", chat)])
app.state.limiter = limiter
app.add_middleware(SlowAPIASGIMiddleware)
