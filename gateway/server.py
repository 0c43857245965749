"""Running a node as a process: event loop, logging, signals, graceful exit."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from aiohttp import web

from broker import BrokerUnavailable

from .app import create_app
from .settings import Settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # nats-py logs every reconnect attempt at error level; our callbacks say it once.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    """Run a node until SIGINT/SIGTERM. Returns the process exit code."""
    app = create_app(settings)
    if on_ready is not None:

        async def ready(app: web.Application) -> None:
            on_ready()

        app.on_startup.append(ready)
    try:
        web.run_app(
            app,
            host=settings.http.host,
            port=settings.http.port,
            backlog=settings.http.backlog,
            access_log=None,
            shutdown_timeout=settings.http.shutdown_grace,
            handler_cancellation=True,
            loop=new_event_loop(),
            print=None,
        )
    except BrokerUnavailable as exc:
        logging.getLogger("herald").error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        logging.getLogger("herald").error(
            "cannot listen on %s:%s: %s", settings.http.host, settings.http.port, exc.strerror
        )
        return 1
    return 0
