"""One run: connect, warm up, step the publish rate (or idle), measure, stop.

Everything is bounded: connections by ``--conns``, messages by rate x step,
time by ``--max-seconds`` (steps are shortened to fit; a hard timeout backs it
up). Whatever happened is reported, also when the deadline or Ctrl-C cuts the
run short.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from typing import Any

from . import report
from .cli import Config
from .clients import Client, failure_label, new_client, open_connection, tokens
from .procstat import ProcGroup, raise_fd_limit, self_cpu
from .publisher import HttpPublisher, NatsPublisher, Publisher
from .report import log, out
from .stats import Histogram, Tally, tally

MB = 1024 * 1024
BEHIND = 0.95  # a step falls behind below this share of expected deliveries
GENERATOR_BUSY_PCT = 85.0


class Run:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.server = ProcGroup(list(cfg.server_pids))
        self.aux = ProcGroup(list(cfg.aux_pids))
        self.hist = Histogram()
        self.lag = Histogram()  # how late the generator's own loop wakes up: its share of the latency
        self.rooms = [f"r{k}" for k in range(cfg.rooms)]
        self.clients: list[Client] = []
        self.clean: list[Client] = []  # counted, not stalling: the population the table is about
        self.clean_per_room = [0] * cfg.rooms
        self.publisher: Publisher | None = None
        self.connect_errors = 0
        self.rss_samples: list[tuple[float, int]] = []  # (loop time, server RSS)
        self.result: dict[str, Any] = {"config": cfg.public(), "steps": []}
        self.deadline = 0.0

    # -- the whole run ---------------------------------------------------------

    async def main(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.cfg.max_seconds
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, task.cancel)
        monitor = loop.create_task(self._monitor())
        lag_probe = loop.create_task(self._lag_probe())
        deadline = asyncio.timeout_at(self.deadline)
        try:
            async with deadline:
                await self._body()
        except TimeoutError as exc:
            if deadline.expired():
                self.result["aborted"] = "deadline (--max-seconds)"
                log("deadline reached: stopping")
            else:
                self.result["aborted"] = f"error: {exc!r}"
                log(f"stopping on error: {exc!r}")
        except asyncio.CancelledError:
            task.uncancel()
            self.result["aborted"] = "interrupted"
            log("interrupted: stopping")
        except Exception as exc:  # noqa: BLE001 - e.g. NATS unreachable: report what we have
            self.result["aborted"] = f"error: {exc!r}"
            log(f"stopping on error: {exc!r}")
        finally:
            monitor.cancel()
            lag_probe.cancel()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
            await self._finish()
        self.result["summary"] = self._summary()
        return self.result

    async def _body(self) -> None:
        cfg = self.cfg
        self.result["server_rss_before_mb"] = self._rss_mb()
        if cfg.conns:
            await self._connect_all()
        else:
            self.result["connect"] = {"requested": 0, "connected": 0, "rate_achieved": 0.0, "errors": {}}
            log("publishing only (--conns 0): no receivers")
        if cfg.conns and not self.clean and not cfg.idle:
            _no_clients(self.result)
            return
        if cfg.idle:
            await self._idle(cfg.idle)
            self.result["stopped"] = "idle done"
            return
        self.publisher = self._make_publisher()
        await self.publisher.start()
        await asyncio.sleep(cfg.warmup)
        out(report.header())
        loop = asyncio.get_running_loop()
        failed = None  # the first step that was not ok; later steps only up to --measure-up-to
        for rate in cfg.rates:
            if failed and rate > cfg.measure_up_to:
                break
            seconds = min(cfg.step_seconds, self.deadline - loop.time() - cfg.settle - 1.0)
            if seconds < min(1.0, cfg.step_seconds):
                self.result["stopped"] = "deadline (--max-seconds) before the next step"
                return
            step = await self._step(rate, seconds)
            self.result["steps"].append(step)
            out(report.row(step))
            if step["verdict"] != "ok" and failed is None:
                failed = f"{step['verdict']} at {rate:g} msg/s"
        self.result["stopped"] = failed or "all rates done"

    # -- connecting ------------------------------------------------------------

    async def _connect_all(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        raise_fd_limit(cfg.conns + 256)
        minted = tokens(cfg.jwt_secret, range(cfg.conns))
        errors: Counter[str] = Counter()
        ready_times: list[float] = []

        async def one(client: Client) -> None:
            rcvbuf = cfg.stall_rcvbuf if client.stall else 0
            try:
                timeout = min(cfg.connect_timeout, self.deadline - loop.time())
                await open_connection(client, timeout, rcvbuf)
            except Exception as exc:  # noqa: BLE001 - every failure is counted by its label
                errors[failure_label(exc, client)] += 1
            else:
                ready_times.append(loop.time())

        log(f"connecting {cfg.conns} {cfg.transport} connections at {cfg.connect_rate:g}/s to {cfg.url}")
        cpu0, gen0, start = self.server.cpu(), self_cpu(), loop.time()
        last_log = start
        tasks = []
        for i in range(cfg.conns):
            at = start + i / cfg.connect_rate
            if at > self.deadline - 0.5:
                errors["not attempted (deadline)"] += cfg.conns - i
                break
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            client = new_client(cfg, i, minted[i], self.hist)
            self.clients.append(client)
            tasks.append(loop.create_task(one(client)))
            if loop.time() - last_log >= 2:
                last_log = loop.time()
                log(f"  {len(ready_times)} ready, {sum(errors.values())} failed, {i + 1} started")
        await asyncio.gather(*tasks)
        wall = max(loop.time() - start, 1e-3)
        server_pct = round(100 * (self.server.cpu() - cpu0) / wall, 1) if self.server else None
        generator_pct = round(100 * (self_cpu() - gen0) / wall, 1)
        connected = len(ready_times)
        took = (max(ready_times) - start) if ready_times else loop.time() - start
        self.connect_errors = sum(errors.values())
        counted = [c for c in self.clients if c.alive]
        self.clean = [c for c in counted if not c.stall]
        for c in self.clean:
            self.clean_per_room[c.room] += 1
        self.result["connect"] = {
            "requested": cfg.conns,
            "connected": connected,
            "counted": len(counted),
            "clean": len(self.clean),
            "stalling": sum(1 for c in counted if c.stall),
            "errors": dict(errors),
            "seconds": round(took, 3),
            "rate_target": cfg.connect_rate,
            "rate_achieved": round(connected / took, 1) if took > 0 else 0.0,
            "server_cpu_pct": server_pct,
            "generator_cpu_pct": generator_pct,
        }
        out(report.connect_line(self.result["connect"]))

    # -- measuring -------------------------------------------------------------

    def _make_publisher(self) -> Publisher:
        cfg = self.cfg
        if cfg.publish_url:
            return HttpPublisher(
                self.rooms,
                cfg.payload_bytes,
                cfg.publish_url,
                dict(cfg.publish_headers),
                cfg.publish_body == "herald",
                cfg.publish_batch,
            )
        assert cfg.publish_nats
        return NatsPublisher(self.rooms, cfg.payload_bytes, cfg.publish_nats, cfg.subject)

    def _tally(self) -> Tally:
        assert self.publisher is not None
        published = self.publisher.published
        return tally([(c.track, published[c.room]) for c in self.clean])

    async def _monitor(self) -> None:
        """Once a second: server RSS, and whether stalled connections are still there."""
        loop = asyncio.get_running_loop()
        while True:
            if self.server:
                self.rss_samples.append((loop.time(), self.server.rss()))
            for c in self.clients:
                if c.paused:
                    c.probe()
            await asyncio.sleep(1.0)

    async def _lag_probe(self, interval: float = 0.01) -> None:
        """Sleep ``interval`` over and over and record how late each wake-up is:
        when the generator is busy, this is what it adds to measured latency."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.lag.record(loop.time() - due)

    def _rss_mb(self) -> float | None:
        return round(self.server.rss() / MB, 1) if self.server else None

    def _closes(self, start: float, end: float, stalling: bool) -> dict[str, int]:
        return dict(
            Counter(
                c.close_how or "?"
                for c in self.clients
                if c.stall == stalling and c.closed_at is not None and start <= c.closed_at < end
            )
        )

    async def _step(self, rate: float, seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        pub = self.publisher
        assert pub is not None
        loop = asyncio.get_running_loop()
        before = self._tally()
        other_before = sum(c.other for c in self.clean)
        published_before = list(pub.published)
        errors_before = Counter(pub.errors)
        self.hist.take()  # stragglers of the previous step are not this step's latency
        self.lag.take()
        http = pub if isinstance(pub, HttpPublisher) else None
        requests_before = http.requests if http else 0
        if http:
            http.latency.take()
        (cpu0, kernel0), aux0, gen0, t0 = self.server.cpu_and_kernel(), self.aux.cpu(), self_cpu(), loop.time()

        started = await pub.run(rate, seconds)
        cpu_p, aux_p, gen_p, t_pub = self.server.cpu(), self.aux.cpu(), self_cpu(), loop.time()
        abandoned = await pub.drain(cfg.settle)
        await asyncio.sleep(max(0.0, t_pub + cfg.settle - loop.time()))
        (cpu1, kernel1), aux1, t1 = self.server.cpu_and_kernel(), self.aux.cpu(), loop.time()
        kernel = kernel1 - kernel0

        diff = self._tally() - before
        hist = self.hist.take()
        lag = self.lag.take().summary_ms()
        per_room = [b - a for a, b in zip(published_before, pub.published, strict=True)]
        published = sum(per_room)
        expected = sum(n * conns for n, conns in zip(per_room, self.clean_per_room, strict=True))
        publish_window = max(t_pub - t0, 1e-3)
        latency = hist.summary_ms()
        server_cpu = cpu1 - cpu0

        verdicts = []
        if diff.received < BEHIND * expected:
            verdicts.append("behind")
        if latency["p99"] > cfg.max_p99_ms:
            verdicts.append("p99")
        target = round(rate * seconds)
        if published < BEHIND * target:
            verdicts.append("publisher behind")
        publish_errors = dict(Counter(pub.errors) - errors_before)
        if publish_errors:
            verdicts.append("publish errors")  # a message that was not taken is lost, whatever the receivers say
        notes = []
        gen_pct = 100 * (gen_p - gen0) / publish_window
        if gen_pct > GENERATOR_BUSY_PCT:
            notes.append(f"generator at {gen_pct:.0f}% of a core: it may be the bottleneck")
        if lag["p99"] > max(5.0, 0.2 * latency["p99"]):  # timer jitter of a few ms is normal
            notes.append(f"generator loop lag p99 {lag['p99']:.1f} ms: part of the latency is ours")
        if published < target:
            notes.append(f"published {published} of {target} ({started} started, {abandoned} abandoned)")
        stalled_closes = self._closes(t0, t1, stalling=True)
        if stalled_closes:
            notes.append("stalled connections ended: " + ", ".join(f"{k} x{n}" for k, n in stalled_closes.items()))
        window_rss = [r for t, r in self.rss_samples if t0 <= t <= t1]
        rss_end = self.server.rss() if self.server else None
        return {
            "rate": rate,
            "seconds": round(seconds, 3),
            "published": published,
            "published_per_s": round(published / seconds, 1),
            "expected": expected,
            "delivered": diff.received,
            "delivered_per_s": round(diff.received / seconds, 1),
            "lost": diff.lost,
            "duplicated": diff.dups,
            "other_messages": sum(c.other for c in self.clean) - other_before,  # control frames, foreign data
            "latency_ms": latency,
            "server": {
                "cpu_s": round(server_cpu, 3),
                "cpu_pct": round(100 * (cpu_p - cpu0) / publish_window, 1) if self.server else None,
                "us_per_delivery": round(server_cpu / diff.received * 1e6, 2)
                if self.server and diff.received
                else None,
                "kernel_us_per_delivery": round(kernel / diff.received * 1e6, 2)
                if self.server and diff.received
                else None,
                "rss_mb": round(rss_end / MB, 1) if rss_end is not None else None,
                "rss_peak_mb": round(max([*window_rss, rss_end or 0]) / MB, 1) if self.server else None,
                "us_per_publish": round(server_cpu / published * 1e6, 2) if self.server and published else None,
            },
            "aux": {
                "cpu_pct": round(100 * (aux_p - aux0) / publish_window, 1) if self.aux else None,
                "rss_mb": round(self.aux.rss() / MB, 1) if self.aux else None,
                "us_per_publish": round((aux1 - aux0) / published * 1e6, 2) if self.aux and published else None,
            },
            "publish": {
                "requests": (http.requests - requests_before) if http else None,
                "batch": http.batch if http else 1,
                "latency_ms": http.latency.take().summary_ms() if http else None,
            },
            "generator_cpu_pct": round(gen_pct, 1),
            "generator_lag_ms": lag,
            "connect_errors": self.connect_errors,
            "connect_rate_achieved": self.result["connect"]["rate_achieved"],
            "closed_by_server": self._closes(t0, t1, stalling=False),
            "stalled_closed": stalled_closes,
            "publish_errors": publish_errors,
            "verdict": "ok" if not verdicts else " + ".join(verdicts),
            "notes": notes,
        }

    async def _idle(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        before = self.result["server_rss_before_mb"]
        cpu0, gen0, t0 = self.server.cpu(), self_cpu(), loop.time()
        samples: list[float] = []
        end = t0 + seconds
        log(f"holding {sum(c.alive for c in self.clients)} connections for {seconds:g}s")
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(1.0, left))
            if self.server:
                samples.append(round(self.server.rss() / MB, 2))
        took = loop.time() - t0
        alive = sum(c.alive for c in self.clients)
        connected = self.result["connect"]["connected"]
        with_mb = samples[-1] if samples else None
        self.result["idle"] = {
            "seconds": round(took, 2),
            "connections": connected,
            "still_open": alive,
            "rss_before_mb": before,
            "rss_with_mb": with_mb,
            "rss_peak_mb": max(samples) if samples else None,
            "kib_per_connection": round((with_mb - before) * 1024 / connected, 2)
            if with_mb is not None and before is not None and connected
            else None,
            "rss_samples_mb": samples,
            "server_cpu_pct": round(100 * (self.server.cpu() - cpu0) / took, 2) if self.server else None,
            "generator_cpu_pct": round(100 * (self_cpu() - gen0) / took, 2),
            "closed_by_server": self._closes(t0, loop.time() + 1, stalling=False),
        }
        for line in report.idle_lines(self.result["idle"]):
            out(line)

    # -- ending ----------------------------------------------------------------

    async def _finish(self) -> None:
        """Learn how stalled connections ended, then close everything (bounded:
        a few seconds more, less if the deadline already struck)."""
        hurry = "aborted" in self.result
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3 if hurry else 10):
                stalled = [c for c in self.clients if c.stall and c.open]
                if stalled:
                    for c in stalled:
                        c.probe()
                        c.resume()
                    await _drained(stalled, limit=1.5 if hurry else 8.0)
                    self.result["stalled"] = _stalled_report(stalled)
                    for line in report.stalled_lines(self.result["stalled"]):
                        out(line)
                for c in self.clients:
                    c.close()
                if self.publisher is not None:
                    await self.publisher.close()
                await asyncio.sleep(0.2)
        for c in self.clients:
            if c.transport is not None and not c.transport.is_closing():
                c.transport.abort()

    def _summary(self) -> dict[str, Any]:
        best = None
        for step in self.result["steps"]:
            if step["verdict"] != "ok":
                break
            best = {
                "rate": step["rate"],
                "delivered_per_s": step["delivered_per_s"],
                "p99_ms": step["latency_ms"]["p99"],
                "us_per_delivery": step["server"]["us_per_delivery"],
            }
        stopped = self.result.get("aborted") or self.result.get("stopped") or "-"
        idle = self.result.get("idle")
        if idle is not None:
            return {"mode": "idle", "kib_per_connection": idle["kib_per_connection"], "stopped": stopped}
        return {"mode": "steps", "highest_sustained": best, "stopped": stopped}


async def _drained(clients: list[Client], quiet: float = 0.5, limit: float = 8.0) -> None:
    """Wait until resumed connections have ended or gone ``quiet`` (their
    backlog read), for at most ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while loop.time() < end:
        await asyncio.sleep(0.1)
        now = time.time()
        if all(c.closed_at is not None or now - c.last_rx > quiet for c in clients):
            return


def _stalled_report(stalled: list[Client]) -> dict[str, Any]:
    ended = [c for c in stalled if c.closed_at is not None and c.close_how != "client"]
    return {
        "count": len(stalled),
        "disconnected": len(ended),
        "how": dict(Counter(c.close_how or "?" for c in ended)),
        "close_codes": dict(Counter(str(c.close_code) for c in stalled if c.close_code is not None)),
        "still_open": sum(1 for c in stalled if c.closed_at is None),
    }


def _no_clients(result: dict[str, Any]) -> None:
    result["stopped"] = "no connection became ready"
    log("no connection became ready: nothing to measure")
