"""Typed keys for what the aiohttp application carries."""

from aiohttp import web

from .commands import Commands
from .node import Node
from .wslink import WsContext

NODE = web.AppKey("herald_node", Node)
COMMANDS = web.AppKey("herald_commands", Commands)
WS_LINKS = web.AppKey("herald_ws_links", WsContext)
