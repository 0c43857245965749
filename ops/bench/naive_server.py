"""The naive baseline of `make bench`: what a first aiohttp push server looks like.

Deliberately naive: default aiohttp settings (permessage-deflate on, default
event loop), one set of sockets per room, and a publish that awaits every
recipient's send in turn, so one slow client holds up the room. Only its
accept queue is not aiohttp's default (128, Herald's 2,048): in a connect
storm a full queue drops SYNs, and the 1 s retransmits measured the queue,
not the server.
    python ops/bench/naive_server.py --port P
GET /ws?room=R · GET /sse?room=R · POST /pub/R (body = message)
"""

import argparse
import contextlib
from collections import defaultdict

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

ws_rooms: defaultdict[str, set[web.WebSocketResponse]] = defaultdict(set)
sse_rooms: defaultdict[str, set[EventSourceResponse]] = defaultdict(set)


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws, room = web.WebSocketResponse(), request.query.get("room", "")
    await ws.prepare(request)
    ws_rooms[room].add(ws)
    try:
        async for _ in ws:  # the receive loop also answers pings
            pass
    finally:
        ws_rooms[room].discard(ws)
    return ws


async def sse_handler(request: web.Request) -> web.StreamResponse:
    room = request.query.get("room", "")
    async with sse_response(request) as sse:
        sse_rooms[room].add(sse)
        try:
            await sse.wait()
        finally:
            sse_rooms[room].discard(sse)
    return sse


async def publish(request: web.Request) -> web.Response:
    room, body = request.match_info["room"], await request.text()
    for ws in list(ws_rooms[room]):
        with contextlib.suppress(ConnectionError):
            await ws.send_str(body)
    for sse in list(sse_rooms[room]):
        with contextlib.suppress(ConnectionError):
            await sse.send(body)
    return web.Response(status=202)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/sse", sse_handler)
    app.router.add_post("/pub/{room}", publish)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=2048)
