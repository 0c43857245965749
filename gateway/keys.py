"""Typed keys for what the aiohttp application carries."""

from aiohttp import web

from .api import NodeApi
from .front import FastRoute
from .node import Node

# The node's parts: for the server's lifecycle (drain) and for tests.
NODE = web.AppKey("herald_node", Node)
# Served on the admin port too, when there is one.
NODE_API = web.AppKey("herald_node_api", NodeApi)
# What the front door serves itself: (method, path) -> route (see front.py).
FAST_ROUTES = web.AppKey("herald_fast_routes", dict[tuple[bytes, bytes], FastRoute])
