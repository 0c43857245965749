"""tests/relay.py holds a frozen connection half-open: the node's side gets
no FIN, also after the client gave its side up (a network switch does not
tell the node either)."""

from __future__ import annotations

import asyncio
import gc

from ..relay import Relay


async def test_a_frozen_connection_stays_open_on_the_node_side_after_its_client_goes() -> None:
    ended = asyncio.Event()

    async def node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(100):
            pass
        ended.set()  # EOF: the relay closed the node's side

    server = await asyncio.start_server(node, "127.0.0.1", 0)
    relay = Relay(server.sockets[0].getsockname()[1])
    await relay.start()
    try:
        _, client = await asyncio.open_connection("127.0.0.1", relay.port)
        client.write(b"hello")
        await client.drain()
        await asyncio.sleep(0.1)
        relay.freeze()
        client.transport.abort()  # the client gives the half-open connection up
        await asyncio.sleep(0.1)
        gc.collect()  # the relay's task for it, were it held by nothing, goes now
        await asyncio.sleep(0.2)
        assert not ended.is_set(), "the node's side of a frozen connection was closed"
        await relay.stop()  # but dropped when the relay stops
        await asyncio.wait_for(ended.wait(), 2)
    finally:
        await relay.stop()
        server.close()
