"""Running a node as a process: event loop, sites, signals, workers.

``serve`` runs one node until SIGTERM/SIGINT. With ``workers > 1`` the parent
forks that many processes that share the port through SO_REUSEPORT (the kernel
spreads connections evenly), each with its own NATS connection and metrics;
worker k serves the admin port + k. The parent forwards signals and exits when
they have; a worker that fails (or ends unasked, or is killed for having
stalled: watchdog.py) stops the others, and the parent exits 1; workers whose
parent died drain and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from aiohttp import web

from broker import BrokerUnavailable
from broker.embedded import stop_with_parent
from broker.tasks import cancel_and_wait

from .app import create_admin_app, create_app
from .front import FrontRunner
from .heap import trim_heap_every
from .keys import FAST_ROUTES, NODE, NODE_API
from .metrics import Listener
from .settings import Settings
from .watchdog import Watchdog, beat

log = logging.getLogger("herald")


class CannotListen(Exception):
    """A site of the node could not take its address (the message names it)."""


class NodeFailed(Exception):
    """The node stopped on its own (its NATS connection closed for good): exit 1."""


def _reason(exc: OSError) -> str:
    """The errno's words ("Address already in use"), not asyncio's sentence around them."""
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return str(exc)


async def start_site(site: web.TCPSite, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {_reason(exc)}") from exc


LOG_FORMAT = "%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT.format(tag=""), stream=sys.stderr)
    # nats-py logs every reconnect attempt at error level; our callbacks say it once.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def app_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """The runner of a node's application: the front door first (front.py), no
    access log (per-request logging costs), handlers cancelled when their
    client goes, a request that is not complete within
    ``http.handshake_timeout`` (slow-header clients) cut."""
    http = settings.http
    return FrontRunner(
        app,
        FAST_ROUTES,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=http.shutdown_grace,
        keepalive_timeout=http.handshake_timeout,
        # A body the handler did not read (a refused publish) is not drained
        # (and decoded, and its errors logged): the connection is closed.
        lingering_time=0,
    )


async def listen(runner: web.AppRunner, settings: Settings, reuse_port: bool = False) -> web.TCPSite:
    """Serve ``runner``'s node on ``http.host``/``http.port``; its metrics
    watch the listening sockets' accept queue."""
    http = settings.http
    site = web.TCPSite(runner, http.host, http.port, backlog=http.backlog, reuse_port=reuse_port)
    await start_site(site, http.host, http.port)
    runner.app[NODE].metrics.watch_accept_queue(lambda: _listening_sockets(site))
    return site


def _listening_sockets(site: web.BaseSite) -> Sequence[Listener]:
    """The sockets ``site`` listens on (aiohttp keeps its asyncio server private)."""
    server = getattr(site, "_server", None)
    return list(getattr(server, "sockets", ()))


async def run_node(settings: Settings, reuse_port: bool = False, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (see Node.shutdown)."""
    if not reuse_port:  # a worker shares the port with its siblings: its parent checked it
        # Before NATS: a node started by mistake on a busy port changes no stream.
        check_port_free(settings.http.host, settings.http.port)
    check_port_free(settings.admin.host, settings.admin.port)
    app = create_app(settings)
    runner = app_runner(app, settings)
    await runner.setup()  # connects to NATS; raises BrokerUnavailable
    runners = [runner]
    stop_trimming = trim_heap_every(asyncio.get_running_loop(), settings.node.heap_trim_interval)
    try:
        http = settings.http
        await listen(runner, settings, reuse_port)
        if settings.admin.port:
            admin = FrontRunner(create_admin_app(app[NODE_API]), FAST_ROUTES, access_log=None)
            await admin.setup()
            runners.append(admin)
            admin_site = web.TCPSite(admin, settings.admin.host, settings.admin.port)
            await start_site(admin_site, settings.admin.host, settings.admin.port)
        node = app[NODE]
        stop = node.failure.stop  # set by a signal, or by the node's failure
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("node %s listening on %s:%s", settings.node.id, http.host, http.port)
        tune_gc()
        if on_ready is not None:
            on_ready()
        await stop.wait()
        failed = node.failure.reason
        if failed is None:
            log.info("node %s draining", settings.node.id)
        else:
            # A new connection would need every part bound to NATS bound anew
            # (subscriptions, buckets, relay, inbox): a restart does that, tested.
            log.error("node %s: %s: draining, then exiting 1 for the service manager to restart it", node.id, failed)
        # Still listening: readyz answers 503 while the clients are sent away.
        await node.shutdown()
        if failed is not None:
            raise NodeFailed(failed)
    finally:
        stop_trimming()
        for r in reversed(runners):
            await r.cleanup()


# Allocations between the cyclic GC's young passes (CPython: 700). A connect
# allocates hundreds of tracked objects, and a storm's connections pile up as
# long-lived ones: with 700, a 5,000-connect storm ran ~800 young passes and
# 6-8 full ones (~0.7-1 s of its ~4.5 s of CPU); with 10,000, ~60 and one.
# Herald makes little cyclic garbage (a closed connection makes none), so
# what waits for the rarer passes is small (make soak checks it).
YOUNG_GC_THRESHOLD = 10_000


def tune_gc() -> None:
    """Once the node serves, what exists (modules, classes, the node's parts:
    ~50,000 objects) is left out of the cyclic GC's passes for good (each
    full pass scanned them all again), and young passes are made rarer."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


def _run(
    settings: Settings, reuse_port: bool, on_ready: Callable[[], None] | None, heartbeat: int | None = None
) -> int:
    loop = new_event_loop()
    if heartbeat is not None:
        beat(loop, heartbeat)
    try:
        loop.run_until_complete(run_node(settings, reuse_port, on_ready))
    except BrokerUnavailable as exc:
        log.error("cannot start: %s", exc)
        return 1
    except CannotListen as exc:
        log.error("%s", exc)
        return 1
    except NodeFailed:
        return 1  # said when it happened
    finally:
        # What the node leaves running (connects waiting on a NATS gone, the
        # reads they share, nats-py's tasks when its close failed) ends here:
        # closed with the loop, each would be destroyed pending, and a shared
        # wait failed just before would leave its waiters' exceptions unread
        # ("Future exception was never retrieved").
        loop.run_until_complete(_end_tasks())
        loop.close()
    return 0


async def _end_tasks(rounds: int = 3) -> None:
    """Cancel and wait for the loop's other tasks; again for those they start
    as they end (a connect cancelled counts its connection out in a task)."""
    for _ in range(rounds):
        left = asyncio.all_tasks() - {asyncio.current_task()}
        if not left:
            return
        await cancel_and_wait(left)


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``: its own node id and admin port."""
    admin = settings.admin
    return dataclasses.replace(
        settings,
        node=dataclasses.replace(settings.node, id=f"{settings.node.id}-w{index}"),
        admin=dataclasses.replace(admin, port=admin.port + index if admin.port else 0),
    )


# What stops a node; the parent of workers passes them on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _worker(settings: Settings, parent: int, watchdog: Watchdog, index: int) -> None:
    # Forked with the stop signals blocked and the parent's handler: until its
    # loop takes them, a stop signal ends the worker at once (it serves nothing yet).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # It drains instead of serving on, orphaned, beside the node started next
    # (SIGTERM is still blocked here: one sent already waits for the loop).
    stop_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # The workers share the parent's stderr: each line says whose it is.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT.format(tag=f"[{settings.node.id}] ")))
    sys.exit(_run(settings, True, None, watchdog.worker_end(index)))


class Workers:
    """The parent of ``--workers`` processes: passes the stop signals on, and
    exits once all have; one that ends unasked (an exit code, killed: the OOM
    killer, or stopped on its own: a node would serve on with fewer; or killed
    here, its loop silent past ``http.worker_timeout``) stops the others and
    makes the exit code 1, so a supervisor (systemd's Restart=on-failure)
    starts the node again."""

    def __init__(self, processes: list[multiprocessing.process.BaseProcess], watchdog: Watchdog) -> None:
        self._processes = processes
        self._watchdog = watchdog
        self.stopping = False

    def stop(self, sig: int, _frame: object = None) -> None:
        self.stopping = True
        for process in self._processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def start(self) -> None:
        # Blocked while forking: a child never runs this process's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self.stop)
            for process in self._processes:
                process.start()
            self._watchdog.watch()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def wait(self) -> int:
        code = 0
        running = list(self._processes)
        while running:
            ended = self._watchdog.wait([p.sentinel for p in running])
            for index, silent in self._watchdog.silent():
                self._kill_stalled(self._processes[index], silent)
            for process in [p for p in running if p.sentinel in ended]:
                process.join()
                running.remove(process)
                if not self.stopping:
                    code = 1
                    log.error("worker %s exited (%s): stopping the others", process.name, process.exitcode)
                    self.stop(signal.SIGTERM)
                elif self._failed(process.exitcode):
                    code = 1
        return code

    def _kill_stalled(self, process: multiprocessing.process.BaseProcess, silent: float) -> None:
        """SIGKILL a worker whose loop stalled: its end is then a worker's that ended unasked."""
        if process.pid is None or process.exitcode is not None:
            return
        log.error(
            "worker %s (pid %d) silent for %.1f s (http.worker_timeout %g s): its event loop is stalled; killing it",
            process.name,
            process.pid,
            silent,
            self._watchdog.timeout,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)

    def _failed(self, exitcode: int | None) -> bool:
        """Not a clean stop: a stop signal kills a worker still starting."""
        if exitcode == 0:
            return False
        return not (self.stopping and exitcode is not None and -exitcode in STOP_SIGNALS)


def check_port_free(host: str, port: int) -> None:
    """Raise CannotListen if something listens on ``host``:``port`` already.
    The workers bind it with SO_REUSEPORT, which another such server of the
    same user (another herald --workers) would let them share in silence."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio: TIME_WAITs are no bar
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {_reason(exc)}") from exc


def serve(settings: Settings, workers: int = 1, on_ready: Callable[[], None] | None = None) -> int:
    """Run a node (or ``workers`` of them) until SIGINT/SIGTERM. Returns the exit code."""
    if workers <= 1:
        return _run(settings, False, on_ready)
    try:
        check_port_free(settings.http.host, settings.http.port)
    except CannotListen as exc:
        log.error("%s", exc)
        return 1
    if not settings.admin.port:
        log.warning(
            "%d workers share port %s: /metrics and /api/stats there answer for whichever worker takes the"
            " request; set admin.port (HERALD_ADMIN_PORT) and scrape admin.port + k of each worker k",
            workers,
            settings.http.port,
        )
    context = multiprocessing.get_context("fork")
    watchdog = Watchdog(workers, settings.http.worker_timeout)
    args = [(worker_settings(settings, k), os.getpid(), watchdog, k) for k in range(workers)]
    parent = Workers([context.Process(target=_worker, args=a, name=f"w{k}") for k, a in enumerate(args)], watchdog)
    parent.start()
    if on_ready is not None:
        on_ready()
    return parent.wait()
