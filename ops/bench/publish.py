"""The node's CPU per message published through ``POST /api/publish``:
single messages, and the same messages in batches (``make bench-publish``).

    python -m ops.bench.publish [--messages 5000] [--batch 100] [--storage file|memory]

Starts nats-server (core 1) and one node (core 0) as ``make bench`` does,
with no subscribers; publishes ``--messages`` single messages (``--concurrency``
requests in flight), then as many in batches of ``--batch``; prints the
node's CPU (user + system, from /proc) per message for each way.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from ops.loadtest.procstat import live_cpu_seconds

from .servers import PUBLISH_HEADERS, against_one_node


def item(i: int) -> dict[str, object]:
    return {"channel": f"room:r{i % 10}", "data": {"text": "x" * 80, "n": i}}


async def run(base: str, pid: int, messages: int, batch: int, concurrency: int) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        url = f"{base}/api/publish"

        async def post(body: object) -> None:
            async with http.post(url, json=body, headers=PUBLISH_HEADERS) as resp:
                resp.raise_for_status()
                await resp.read()

        async def drive(bodies: list[object]) -> tuple[float, float]:
            queue = iter(bodies)

            async def worker() -> None:
                for body in queue:
                    await post(body)

            cpu0, wall0 = live_cpu_seconds(pid), time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return live_cpu_seconds(pid) - cpu0, time.perf_counter() - wall0

        await drive([item(i) for i in range(200)])  # warm up
        single_cpu, single_wall = await drive([item(i) for i in range(messages)])
        batches: list[object] = [[item(i) for i in range(s, s + batch)] for s in range(0, messages, batch)]
        batch_cpu, batch_wall = await drive(batches)
    return {
        "single_us": single_cpu / messages * 1e6,
        "single_per_s": messages / single_wall,
        "batch_us": batch_cpu / messages * 1e6,
        "batch_per_s": messages / batch_wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.publish", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--storage", choices=("file", "memory"), default="file")
    args = p.parse_args(argv)
    unlimited = {"HERALD_LIMITS_API_RATE": "1000000"}
    r = against_one_node(
        "publish",
        {"HERALD_STREAM_STORAGE": args.storage, **unlimited},
        lambda base, pid: run(base, pid, args.messages, args.batch, args.concurrency),
    )
    print(
        f"POST /api/publish ({args.storage} stream, no subscribers, {args.concurrency} requests in flight): "
        f"single {r['single_us']:.0f} µs of node CPU per message ({r['single_per_s']:.0f}/s); "
        f"batches of {args.batch} {r['batch_us']:.0f} µs per message ({r['batch_per_s']:.0f}/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
