"""`make bench-floor` (ops/bench/floor.py): its minimal servers answer what
they are sent, on a real nats-server, so the floors it prints are of servers
that did the work (a short run; the figures are the bench's, not a test's)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from broker.embedded import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_the_floor_servers_answer_every_publish_and_connect() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ops.bench.floor", "--seconds", "0.5", "--warmup", "0.2", "--conns", "40"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(run.stdout[run.stdout.index("{\n") :])
    for mode in ("http", "publish"):
        steps = results[mode]
        assert [s["rate"] for s in steps] == [500, 2000]
        # CPU is read in clock ticks (10 ms): a half-second step may read 0.
        assert all(s["sent"] > 0 and not s["errors"] and s["us_per_publish"] >= 0 for s in steps), steps
    for mode in ("handshake", "connect"):
        assert results[mode]["connected"] == 40, results[mode]
    # nats-server's CPU and the cores' load (None: a storm too short for two samples).
    assert results["connect"]["nats_us_per_connect"] >= 0 and "cores_busy_pct" in results["connect"]


async def test_the_fanout_floor_writes_each_publish_to_its_room() -> None:
    """``--serve fanout`` (the bench's ``floor`` server): a room's WebSockets
    and event streams get each body published to it, other rooms nothing."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ops.bench.floor", "--serve", "fanout", "--port", str(port)], cwd=REPO
    )
    try:
        assert wait_for_port("127.0.0.1", port, 15)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{base}/ws?room=r1")
            other = await http.ws_connect(f"{base}/ws?room=r2")
            sse = await http.get(f"{base}/sse?room=r1")
            assert sse.headers["Content-Type"] == "text/event-stream"
            for body in ("one", "x" * 300):  # a WebSocket frame's short and 16-bit lengths
                async with http.post(f"{base}/pub/r1", data=body) as answer:
                    assert answer.status == 200
                assert (await ws.receive_str(timeout=5)) == body
                assert (await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 5)) == f"data: {body}\n\n".encode()
            await ws.close()  # a closed connection leaves its room
            async with http.post(f"{base}/pub/r1", data="two") as answer:
                assert answer.status == 200
            assert (await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 5)) == b"data: two\n\n"
            with pytest.raises(asyncio.TimeoutError):
                await other.receive(timeout=0.3)
            sse.close()
            await other.close()
    finally:
        server.terminate()
        server.wait(10)
