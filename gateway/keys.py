"""Typed keys for what the aiohttp application carries."""

from aiohttp import web

from .node import Node

NODE = web.AppKey("herald_node", Node)
