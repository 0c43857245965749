"""The aiohttp application of a node."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from aiohttp import web

from .api import CommandApi, NodeApi, PublishApi, healthz
from .front import FastRoute
from .http import ALWAYS_HEADERS, valid_host
from .keys import FAST_ROUTES, NODE, NODE_API
from .malformed import quiet_malformed_requests
from .node import BrokerFactory, build_node
from .server_api import ServerApi
from .settings import Settings
from .transports.link import Opener
from .transports.registry import KINDS

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("herald")

# The demo page and the client: scripts and styles only from the node itself
# (no inline code), connections only back to it, never framed by another site.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``nosniff`` on every answer; the page's policy on the demo and its files.
    CORS headers only where ``limits.origins`` allows another site's pages
    (event streams, ``/api/command``): a page of another origin cannot read
    the rest of the API's answers (the publish API is for backends, with a key)."""
    response.headers.update(ALWAYS_HEADERS)
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers.update(PAGE_HEADERS)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def _add_admin_routes(app: web.Application, api: NodeApi) -> None:
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/api/stats", api.stats)
    app.router.add_get("/api/presence/{room}", api.presence)
    app.router.add_get("/api/history", api.history)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", api.readyz)


def create_app(settings: Settings, broker_factory: BrokerFactory | None = None) -> web.Application:
    """The node's public application: its composition root. ``/metrics`` and
    ``/api/stats`` are on it unless ``[admin] port`` puts them on the admin
    application instead."""
    quiet_malformed_requests()
    node = build_node(settings, broker_factory)
    opener = Opener(node.id, node.gate, node.sessions, node.resumer)
    # Bodies up to a publish batch's; each handler bounds its own (http.max_body for most).
    app = web.Application(
        client_max_size=max(settings.http.max_body, settings.publish.max_batch_body), middlewares=[valid_host]
    )
    endpoints = []
    fast: dict[tuple[bytes, bytes], FastRoute] = {}  # served by the front door first (front.py)
    for kind in KINDS:
        node.metrics.add_transport(kind.name)
        endpoint = kind.serve(node, opener)
        app.router.add_get(kind.path, endpoint.handle, allow_head=False)  # a HEAD would open a stream
        fast[(b"GET", kind.path.encode())] = endpoint
        endpoints.append(endpoint)
    commands = CommandApi(node.router, node.gate, settings.ws.max_frame, settings.http.command_timeout, node.metrics)
    publish = PublishApi(
        settings.limits.api_rate,
        settings.http.max_body,
        settings.http.handshake_timeout,
        settings.publish,
        node.broker.pubsub,
        node.metrics,
        node.proxies,
    )
    node_api = NodeApi(
        settings,
        node.broker,
        node.sessions,
        node.subscriptions,
        node.hub,
        node.broker.presence,
        node.broker.history,
        node.metrics,
        node.proxies,
    )
    server_api = ServerApi(
        settings.admin.bearer_keys,
        settings.limits.api_rate,
        node.broker.relay,
        settings.http.handshake_timeout,
        node.metrics,
        node.proxies,
    )
    app[NODE] = node
    app[NODE_API] = node_api
    app.router.add_post("/api/publish", publish.publish, expect_handler=publish.expect)
    fast[(b"POST", b"/api/publish")] = publish
    app[FAST_ROUTES] = fast
    app.router.add_post("/api/command", commands.command)
    app.router.add_route("OPTIONS", "/api/command", commands.preflight)
    app.router.add_post("/api/disconnect", server_api.disconnect)
    app.router.add_post("/api/subscribe", server_api.subscribe)
    app.router.add_post("/api/unsubscribe", server_api.unsubscribe)
    if settings.http.dev_tokens:
        app.router.add_post("/api/dev/token", node_api.dev_token)
        if not _loopback(settings.http.host):
            log.warning(
                "http.dev_tokens is on and the node listens on %s: whoever reaches it can mint a token"
                " for any user (POST /api/dev/token); development only",
                settings.http.host,
            )
    if settings.admin.port:
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", node_api.readyz)
    else:
        _add_admin_routes(app, node_api)
    app.router.add_get("/", _index)
    app.router.add_static("/static", STATIC)
    app.on_response_prepare.append(_security_headers)

    async def start(app: web.Application) -> None:
        await node.start()
        log.info("node %s ready", node.id)

    async def shutdown(app: web.Application) -> None:
        await node.shutdown()
        for endpoint in endpoints:
            await endpoint.wait_closed()

    async def cleanup(app: web.Application) -> None:
        await node.close()

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app


def _loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (an address or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def create_admin_app(node_api: NodeApi) -> web.Application:
    """Metrics, stats and health of a node for the admin port (no lifecycle of its own)."""
    app = web.Application()
    _add_admin_routes(app, node_api)
    app[FAST_ROUTES] = {}  # none: its front door only judges heads (front.py), as the public port's does
    return app
