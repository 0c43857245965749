"""Soak one Herald node (``python -m ops.soak --minutes 30 --out artifacts/soak``): connection, subscription
and publish churn, slow consumers, resumes and nats-server restarts, sampled every 10 s. Churn stops after the
warm-up (the first 30 %) and at the end; with every client gone the node is measured at rest (5 samples 1 s apart)
and the two quiescent points must agree: RSS medians within 5 %, fds within 2; tasks, NATS subscriptions, channels
back to the idle baseline. Writes soak.csv, soak.png, summary.txt; exits 1 with a ``SOAK FAILED:`` line each."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib.pyplot as plt
import orjson
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded import NatsServer, free_port
from gateway.auth import mint_token

SECRET, PUBLISH_KEY, ADMIN_KEY = "soak-secret-long-enough-for-hs256-0123456789", "soak-publish", "soak-admin"
ROOMS, USERS, RSS_LIMIT, FD_SLACK = [f"r{i}" for i in range(20)], 300, 0.05, 2
SLOW_ROOM, SLOW_BURST, BIG = "slow", 60, 48_000  # 60 x 48 KB: well past the 1 MiB queue and the socket buffers
# tasks, subs_node (nats.subscriptions), channels, conns_*: /api/stats; subs_server: nats-server's /connz for the
# node's connection (-1: NATS down); clients: ours alive; slow_cuts, nats_reconnects: /metrics
COLUMNS = ["t", "phase", "rss_kib", "fds", "threads", "tasks", "conns_ws", "conns_sse", "channels", "subs_node"]
COLUMNS += ["subs_server", "nats_connected", "clients", "published", "received", "slow_cuts", "nats_reconnects"]
Sample = dict[str, Any]
Failed = (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError)  # ValueError: a frame not JSON


def proc_figures(pid: int) -> tuple[int, int, int]:
    """VmRSS (KiB), open fds and threads of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    return rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def small_rcvbuf(addr_info: Any) -> socket.socket:
    """Slow clients' sockets: a 4 KiB receive buffer, so not reading is felt at once."""
    sock = socket.socket(addr_info[0], addr_info[1], addr_info[2])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def median(rows: list[Sample], key: str) -> float:
    return float(statistics.median(s[key] for s in rows))


class Soak:
    def __init__(self, minutes: float, out: Path, rate: float, restart_every: float) -> None:
        self.seconds, self.out, self.rate = minutes * 60, out, rate
        self.restart_every = min(restart_every, self.seconds / 5)  # at least one in the warm-up, more after
        self.tmp = Path(tempfile.mkdtemp(prefix="herald-soak-"))
        self.nats = NatsServer(store_dir=str(self.tmp / "js"), monitor_port=free_port(), log_file=str(out / "nats.log"))
        self.base = f"http://127.0.0.1:{free_port()}"
        self.node: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession  # opened by run()
        # One token per user, reused as browsers do (the node caches verified tokens); the last user is the slow one.
        self.tokens = [mint_token(SECRET, f"u{i}", ["*"], [], self.seconds + 7200) for i in range(USERS + 1)]
        self.c: Counter[str] = Counter()  # what the clients saw
        self.samples: list[Sample] = []
        self.quiet: dict[str, list[Sample]] = {}
        self.failures: list[str] = []
        self.events: list[tuple[float, str]] = []  # (t, "restart" | checkpoint), for the plot
        self.phase, self.alive, self.churning, self.churned = "start", 0, False, 0.0
        self.sse_last: str | None = None
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def start(self) -> None:
        await asyncio.to_thread(self.nats.start)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        own = dict(NATS_URLS=self.nats.url, HTTP_HOST="127.0.0.1", HTTP_PORT=self.base.split(":")[2], NODE_ID="soak")
        own |= dict(JWT_SECRET=SECRET, PUBLISH_KEY=PUBLISH_KEY, ADMIN_KEY=ADMIN_KEY, STREAM_NAME=f"SOAK{os.getpid()}")
        env |= {f"HERALD_{k}": v for k, v in own.items()}
        # glibc hands freed big buffers (payloads, full queues) back at once: RSS then follows what is in use
        env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        # and the heap's free pages below in-use chunks every 2 s, not every minute: a quiescent point's 5 samples
        # then all follow a trim, so the verdict compares what is held, not where each point fell in the minute
        env["HERALD_NODE_HEAP_TRIM_INTERVAL"] = "2"
        with open(self.out / "node.log", "wb") as log:
            cmd = [sys.executable, "-m", "gateway", "serve"]
            self.node = subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[1], stdout=log, stderr=log)
        if not await self.wait_ready(30):
            raise RuntimeError(f"the node was not ready within 30 s (see {self.out / 'node.log'})")

    async def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.node is not None and self.node.poll() is None:
            if await self.fetch(self.base + "/readyz") is not None:
                return True
            await asyncio.sleep(0.2)
        return False

    async def restart_nats(self) -> None:
        """nats-server stopped and started again on the same port and store: the node must come back alone."""
        self.events.append((self.now(), "restart"))
        await asyncio.to_thread(self.nats.stop)
        await asyncio.sleep(2)
        await asyncio.to_thread(self.nats.start)
        began, self.c["nats restarts"] = time.monotonic(), self.c["nats restarts"] + 1
        if not await self.wait_ready(60):
            self.failures.append(f"the node was not ready within 60 s of the nats-server restart at {self.now():.0f}s")
        self.c["nats restarts: ms until the node was ready (sum)"] += int((time.monotonic() - began) * 1000)

    async def stop(self) -> None:
        if self.node is not None and self.node.poll() is None:
            self.node.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.node.wait, 15)
            self.node.kill()  # a no-op once it has exited
        await asyncio.to_thread(self.nats.cleanup)
        await asyncio.to_thread(shutil.rmtree, self.tmp, True)

    async def fetch(self, url: str) -> bytes | None:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with contextlib.suppress(*Failed):
            async with self.http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return await r.read() if r.status == 200 else None
        return None

    async def probe(self) -> Sample:
        assert self.node is not None
        rss, fds, threads = proc_figures(self.node.pid)
        stats = orjson.loads(await self.fetch(self.base + "/api/stats") or b"{}")
        connz = await self.fetch(f"http://127.0.0.1:{self.nats.monitor_port}/connz?subs=1&limit=4096")
        conns = [c for c in orjson.loads(connz)["connections"] if c.get("name") == "herald-soak"] if connz else None
        m: Counter[str] = Counter()
        for family in text_string_to_metric_families((await self.fetch(self.base + "/metrics") or b"").decode()):
            for s in family.samples:
                m[s.name] += int(s.value)
        ours, nats = stats.get("connections", {}), stats.get("nats", {})
        values = (
            round(self.now(), 1), self.phase, rss, fds, threads, stats.get("tasks", -1), ours.get("ws", -1),
            ours.get("sse", -1), stats.get("channels", -1), nats.get("subscriptions", -1),
            -1 if conns is None else sum(c.get("subscriptions", 0) for c in conns),
            int(bool(nats.get("connected"))), self.alive, self.c["published"], self.c["received"],
            m["herald_slow_consumer_disconnects_total"], m["herald_nats_reconnects_total"],
        )  # fmt: skip
        subjects = sorted(x for c in conns or [] for x in c.get("subscriptions_list", []) if "_INBOX" not in x)
        return dict(zip(COLUMNS, values, strict=True)) | {"subjects": subjects}  # what nats-server says it holds

    async def sampler(self) -> None:
        while self.node is not None and self.node.poll() is None:
            self.samples.append(await self.probe())
            await asyncio.sleep(10)
        self.failures.append(f"the node exited (code {self.node and self.node.returncode}) at {self.now():.0f}s")

    async def checkpoint(self, name: str) -> None:
        """Let every client leave and the node settle: the 5 samples (1 s apart) of a quiescent point."""
        self.phase = name
        self.events.append((self.now(), name))
        idle, rows = (self.quiet["q0"][-1] if self.quiet else None), list[Sample]()
        for _ in range(90):  # 5 samples in a row: clients gone, subscriptions as when idle, the same fds
            s = await self.probe()
            settled = self.alive == s["conns_ws"] == s["conns_sse"] == s["channels"] == 0 and s["nats_connected"]
            settled &= idle is None or all(s[k] == idle[k] for k in ("subs_node", "subs_server"))
            rows = [*rows, s] if settled and (not rows or s["fds"] == rows[-1]["fds"]) else [s] if settled else []
            if len(rows) == 5:
                break
            await asyncio.sleep(1)
        self.quiet[name] = rows or [s]  # never settled: the last sample, for the verdict to show

    async def publish(self, channel: str, data: Any) -> int | None:
        body, headers = orjson.dumps({"channel": channel, "data": data}), {"Authorization": f"Bearer {PUBLISH_KEY}"}
        try:
            async with self.http.post(self.base + "/api/publish", data=body, headers=headers) as r:
                self.c["published" if r.status == 200 else f"publish refused {r.status}"] += 1
                return int(orjson.loads(await r.read())["id"]) if r.status == 200 else None
        except Failed as exc:
            self.c[f"publish failed {type(exc).__name__}"] += 1
            return None

    async def publisher(self) -> None:
        """A steady rate: 60 % rooms, 30 % users, 10 % broadcast."""
        n, began = 0, time.monotonic()
        while self.churning:
            n, roll = n + 1, random.random()
            target = f"room:{random.choice(ROOMS)}" if roll < 0.6 else f"user:u{random.randrange(USERS)}"
            await self.publish("broadcast" if roll > 0.9 else target, {"n": n, "at": time.time()})
            await asyncio.sleep(max(0.0, began + n / self.rate - time.monotonic()))

    async def tracked(self, what: str, client: Coroutine[Any, Any, None]) -> None:
        self.alive += 1
        try:
            await client
        except Failed as exc:
            self.c[f"{what} failed {type(exc).__name__}"] += 1
        finally:
            self.alive -= 1

    async def ws_session(self, user: int, rooms: list[str], stay: float, since: int | None = None) -> list[int]:
        """One WebSocket: welcome, then read (checking per-channel order) and (un)subscribe; the ids it got."""
        params = [("token", self.tokens[user]), *(("room", r) for r in rooms)]
        params += [("since", str(since))] if since else []
        last, got, held, ref = dict[str, int](), list[int](), set(rooms), 0
        async with self.http.ws_connect(self.base + "/ws", params=params) as ws:
            first = await ws.receive(timeout=10)
            if first.type is not aiohttp.WSMsgType.TEXT or orjson.loads(first.data).get("type") != "welcome":
                self.c[f"ws refused {ws.close_code}"] += 1
                return got
            self.c["ws opened"] += 1
            deadline = time.monotonic() + stay
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await ws.receive(timeout=min(left, random.uniform(0.3, 1.0)))
                except TimeoutError:  # between messages: subscribe to a room, or leave one
                    ref, room = ref + 1, random.choice(ROOMS)
                    kind = "unsubscribe" if room in held else "subscribe"
                    held ^= {room}
                    await ws.send_str(orjson.dumps({"type": kind, "room": room, "ref": str(ref)}).decode())
                    continue
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    self.c[f"ws closed by the node {ws.close_code}"] += 1
                    break
                frame = orjson.loads(msg.data)
                self.c[f"ws frames {frame.get('type')}"] += 1
                if frame.get("type") == "error":  # which: a rate limit, NATS away...
                    self.c[f"ws frames error {frame.get('code')}"] += 1
                if frame.get("type") == "message" and "id" in frame:
                    seq, channel = int(frame["id"]), frame["channel"]
                    self.c["received"] += 1
                    self.c["ws out of order or repeated"] += seq <= last.get(channel, 0)
                    last[channel] = seq
                    got.append(seq)
        return got

    async def ws_client(self, resume: bool) -> None:
        user, rooms = random.randrange(USERS), random.sample(ROOMS, random.randint(1, 2))
        got = await self.ws_session(user, rooms, random.uniform(2, 8))
        if resume and got:
            await asyncio.sleep(random.uniform(0.5, 2))  # miss a few messages, then come back for them
            self.c["ws resumes"] += 1
            await self.ws_session(user, rooms, random.uniform(1, 4), since=got[-1])

    async def sse_client(self, resume: bool) -> None:
        params = [("token", self.tokens[random.randrange(USERS)]), ("room", random.choice(ROOMS))]
        headers = {"Last-Event-ID": self.sse_last} if resume and self.sse_last else {}
        self.c["sse resumes"] += bool(headers)
        async with self.http.get(self.base + "/sse", params=params, headers=headers) as r:
            self.c[f"sse status {r.status}"] += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(random.uniform(2, 8)):
                    after_id = False
                    while r.status == 200 and (line := await r.content.readline()):
                        if after_id and line.strip():  # not the new stream's id-only block: a message
                            self.c["received"] += 1
                        after_id = line.startswith(b"id:")
                        if after_id:
                            self.sse_last = line[3:].strip().decode()

    async def spawner(self) -> None:
        """Keep 50 to 200 clients alive (a swing with a ~2 minute period); each stays 2-8 s."""
        async with asyncio.TaskGroup() as group:  # waits for the last ones to leave
            while self.churning:
                while self.alive < 125 + 75 * math.sin(self.now() / 20) and self.churning:
                    resume = random.random() < 0.25
                    client = self.sse_client(resume) if random.random() < 0.3 else self.ws_client(resume)
                    group.create_task(self.tracked("client", client))
                    await asyncio.sleep(0)
                await asyncio.sleep(0.1)

    async def slow_client(self, session: aiohttp.ClientSession) -> None:
        """A WebSocket that stops reading while big messages come: cut (4008), then resumed with since."""
        params = [("token", self.tokens[USERS]), ("room", SLOW_ROOM)]
        async with session.ws_connect(self.base + "/ws", params=params) as ws:
            if (await ws.receive(timeout=10)).type is not aiohttp.WSMsgType.TEXT:
                self.c[f"slow refused {ws.close_code}"] += 1
                return
            burst = [self.publish(f"room:{SLOW_ROOM}", {"pad": "x" * BIG, "i": i}) for i in range(SLOW_BURST)]
            ids = sorted(seq for seq in await asyncio.gather(*burst) if seq is not None)  # not reading meanwhile
            await asyncio.sleep(3)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    while (await ws.receive()).type is aiohttp.WSMsgType.TEXT:
                        pass
            self.c[f"slow ended {ws.close_code} (1006: aborted, the 4008 frame stuck behind the data)"] += 1
        got = await self.ws_session(USERS, [SLOW_ROOM], 5, since=ids[0] - 1 if ids else None)  # resume
        self.c["slow resumed: got all it missed" if set(ids) <= set(got) else "slow resumed: some missing"] += 1

    async def slow_loop(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_rcvbuf)) as session:
            while self.churning:
                await self.tracked("slow", self.slow_client(session))
                await asyncio.sleep(random.uniform(3, 10))

    async def churn(self, name: str, seconds: float) -> None:
        self.phase, self.churning = name, True
        tasks = [asyncio.create_task(f()) for f in (self.spawner, self.publisher, self.slow_loop)]
        began, end = self.churned, time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.churned = began + seconds - left
            if self.churned >= self.restart_every * (self.c["nats restarts"] + 1) and left > 10:
                await self.restart_nats()
            await asyncio.sleep(0.5)
        self.churning = False
        await asyncio.gather(*tasks)

    async def run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as self.http:
            try:
                await self.start()
                sampler = asyncio.create_task(self.sampler())
                await self.checkpoint("q0")  # idle: the baseline
                for n, (phase, share) in enumerate((("warmup", 0.3), ("run", 0.7)), 1):
                    await self.churn(phase, self.seconds * share)
                    await self.checkpoint(f"q{n}")
                sampler.cancel()
            finally:
                await self.stop()


def verdict(soak: Soak, rss_limit: float = RSS_LIMIT) -> list[str]:
    fails = list(soak.failures)
    q0, q1, q2 = (soak.quiet.get(k, []) for k in ("q0", "q1", "q2"))
    if not (q0 and q1 and q2):
        return [*fails, "the run did not reach its quiescent checkpoints"]
    if (rss2 := median(q2, "rss_kib")) > (rss1 := median(q1, "rss_kib")) * (1 + rss_limit):
        fails.append(f"RSS grew {100 * (rss2 / rss1 - 1):.1f}% between quiescent points: {rss1:.0f} -> {rss2:.0f} KiB")
    if (fd1 := median(q1, "fds")) + FD_SLACK < (fd2 := median(q2, "fds")):
        fails.append(f"open fds grew between the quiescent points: {fd1:.0f} -> {fd2:.0f}")
    for name, rows in (("q1", q1), ("q2", q2)):
        for key in ("tasks", "subs_node", "subs_server", "conns_ws", "conns_sse", "channels"):
            was, now = median(q0, key), median(rows, key)
            if now > was or (now < was and key != "tasks"):  # a startup task may have ended since the idle point
                fails.append(f"{key} not back to the idle baseline at {name}: {now:.0f} (idle: {was:.0f})")
                fails[-1] += f"; nats-server holds {rows[-1]['subjects']}" if key == "subs_server" else ""
    fails += [] if soak.c["nats restarts"] else ["no nats-server restart happened"]
    fails += [] if soak.samples and soak.samples[-1]["slow_cuts"] else ["no slow consumer was cut"]
    return fails + ([] if soak.c["received"] else ["no client received a message"])


def report(soak: Soak, wall: float, fails: list[str]) -> str:
    keys = ("rss_kib", "fds", "threads", "tasks", "subs_node", "subs_server", "channels", "conns_ws", "conns_sse")
    rows = [["point", "t s", *keys]]
    rows += [[name, f"{qs[0]['t']:.0f}", *(f"{median(qs, k):.0f}" for k in keys)] for name, qs in soak.quiet.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["quiescent points (medians of 5 samples):"]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if len(run := [s for s in soak.samples if s["phase"] == "run"]) >= 2:
        k = max(1, min(len(run) // 3, 6))
        a, b = median(run[:k], "rss_kib"), median(run[-k:], "rss_kib")
        lines.append(f"under load: RSS median of the first {k} samples after the warm-up {a:.0f} KiB, ")
        lines[-1] += f"of the last {k} {b:.0f} KiB ({100 * (b / a - 1):+.1f}%)"
    lines.append(f"samples: {len(soak.samples)} every 10 s + {sum(map(len, soak.quiet.values()))} quiescent")
    lines += [f"  {k}: {v}" for k, v in sorted(soak.c.items())] + [f"wall time: {wall:.0f} s"]
    return "\n".join(lines + ([f"SOAK FAILED: {f}" for f in fails] or ["SOAK OK: no drift, nothing leaked"]))


def write_outputs(soak: Soak, text: str) -> None:
    plt.switch_backend("Agg")
    rows = sorted([*soak.samples, *(s for qs in soak.quiet.values() for s in qs)], key=lambda s: float(s["t"]))
    with open(soak.out / "soak.csv", "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *([s[k] for k in COLUMNS] for s in rows)])
    (soak.out / "summary.txt").write_text(text + "\n")
    panels = {"RSS KiB": ["rss_kib"], "fds, threads, tasks": ["fds", "threads", "tasks"]}
    panels |= {"connections": ["conns_ws", "conns_sse"], "NATS subscriptions": ["subs_node", "subs_server", "channels"]}
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 11), sharex=True)
    for ax, (title, columns) in zip(axes, panels.items(), strict=True):
        for col in columns:
            ax.plot([s["t"] / 60 for s in rows], [s[col] for s in rows], marker=".", label=col)
        for when, what in soak.events:
            ax.axvline(when / 60, color="red" if what == "restart" else "green", alpha=0.4)
        ax.set_ylabel(title)
        ax.legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("minutes (green: quiescent checkpoints, red: nats-server restarts)")
    fig.tight_layout()
    fig.savefig(soak.out / "soak.png", dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.soak", description="Soak one Herald node; fail on drift.")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=Path("artifacts/soak"))
    p.add_argument("--rate", type=float, default=20.0, help="publishes/s through /api/publish (default 20)")
    p.add_argument("--nats-restart-every", type=float, default=180.0, help="seconds, at most a fifth of the run")
    p.add_argument("--rss-limit", type=float, default=RSS_LIMIT, help="RSS growth allowed between quiescent points")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run((soak := Soak(args.minutes, args.out, args.rate, args.nats_restart_every)).run())
    text = report(soak, soak.now(), fails := verdict(soak, args.rss_limit))
    write_outputs(soak, text)
    print(text)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
