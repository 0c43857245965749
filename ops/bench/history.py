"""The cost of a page of history: ``make bench-history``.

    python -m ops.bench.history [--requests 1000] [--limit 50] [--storage file|memory]

Starts nats-server (core 1) and one node (core 0) as ``make bench`` does,
publishes ``--messages`` messages over 10 rooms through the HTTP API (so a
room's messages are spread through the stream, as in real use), then sends
``--requests`` ``history`` commands over one WebSocket, one after the other,
each for the newest page of a room or a page further back. Prints the
latency p50 / p99 the client sees and the node's CPU per request (its
process's user + system time over the run, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import aiohttp

from gateway.auth import mint_token
from ops.loadtest.procstat import live_cpu_seconds

from .servers import JWT_SECRET, PUBLISH_HEADERS, against_one_node

ROOMS = 10


async def fill(http: aiohttp.ClientSession, base: str, messages: int) -> None:
    body = {"text": "x" * 80}

    async def one(i: int) -> None:
        channel = f"room:r{i % ROOMS}"
        async with http.post(
            f"{base}/api/publish", json={"channel": channel, "data": body}, headers=PUBLISH_HEADERS
        ) as r:
            r.raise_for_status()

    for start in range(0, messages, 200):
        await asyncio.gather(*(one(i) for i in range(start, min(messages, start + 200))))


async def measure(base: str, pid: int, messages: int, requests: int, limit: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        await fill(http, base, messages)
        token = mint_token(JWT_SECRET, "bench", rooms=["*"], publish=[], ttl=3600)
        ws_url = base.replace("http", "ws", 1) + f"/ws?token={token}"
        async with http.ws_connect(ws_url) as ws:
            await ws.receive_json()  # welcome
            newest: dict[str, str] = {}
            for name in (f"r{n}" for n in range(ROOMS)):
                await ws.send_json({"type": "history", "room": name, "limit": limit})
                page = await ws.receive_json()
                newest[name] = page["messages"][0]["id"]
            latencies = []
            cpu0 = live_cpu_seconds(pid)
            for i in range(requests):
                room = f"r{i % ROOMS}"
                cmd: dict[str, object] = {"type": "history", "room": room, "limit": limit, "ref": i}
                if i % 2:  # every other one a page further back, at a random depth
                    cmd["before"] = str(random.randint(1, int(newest[room])))
                started = time.perf_counter()
                await ws.send_json(cmd)
                answer = await ws.receive_json()
                latencies.append(time.perf_counter() - started)
                assert answer["type"] == "history", answer
            cpu = live_cpu_seconds(pid) - cpu0
    latencies.sort()
    return {
        "requests": requests,
        "limit": limit,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
        "node_cpu_us_per_request": cpu / requests * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.history", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000, help="messages published over 10 rooms first")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--storage", choices=("file", "memory"), default="file")
    args = p.parse_args(argv)
    unlimited = {"HERALD_LIMITS_API_RATE": "100000", "HERALD_LIMITS_COMMAND_RATE": "100000"}
    result = against_one_node(
        "history",
        {"HERALD_STREAM_STORAGE": args.storage, **unlimited},
        lambda base, pid: measure(base, pid, args.messages, args.requests, args.limit),
    )
    print(
        f"history pages of {result['limit']} ({args.storage} stream, {args.messages} messages over {ROOMS} rooms): "
        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
        f"node CPU {result['node_cpu_us_per_request']:.0f} µs per request ({result['requests']} requests)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
