"""broker/dispatch.py's coalesced writes on the loop the node runs on (uvloop,
gateway.server.new_event_loop), across the loss of the connection."""

from __future__ import annotations

import asyncio
import logging

import pytest

from broker.dispatch import DispatchingClient
from broker.embedded import NatsServer
from gateway.server import new_event_loop

from ..helpers import wait_for


def test_a_write_the_socket_closed_under_is_sent_after_the_reconnect(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket lost (a server killed, a reset) is closed by uvloop a pass or
    more before nats-py sees it: the writes of that pass raised RuntimeError
    in ``_write_out`` — lost, and logged by asyncio as "Exception in callback"
    with a traceback (seen with nats-server killed under load). They wait in
    the pending buffer now, sent once reconnected, as the writes of a client
    that knows it is disconnected do. Here the reset and the pass's write
    are put in that order for certain."""
    got: list[bytes] = []

    async def quiet(*_: object) -> None:
        pass

    async def take(msg: object) -> None:
        got.append(msg.data)  # type: ignore[attr-defined]

    async def run() -> None:
        nc = DispatchingClient()
        await nc.connect(
            servers=[nats_server.url],
            reconnect_time_wait=0.2,
            max_reconnect_attempts=-1,
            error_cb=quiet,
            disconnected_cb=quiet,
            reconnected_cb=quiet,
        )
        try:
            await nc.subscribe("kept", cb=take)  # made again on the reconnect, before the buffer goes out
            await nc.flush()
            nc._transport._io_writer.transport.abort()  # type: ignore[union-attr]  # a reset: closed next pass
            await asyncio.sleep(0)
            assert nc.is_connected  # not seen by nats-py yet
            assert nc.write_soon(b"PUB kept 4\r\nkept\r\n")
            nc._write_out()  # the end of the pass, before nats-py's reader runs (the order seen under load)
            await wait_for(lambda: got == [b"kept"], timeout=10)
        finally:
            await asyncio.wait_for(nc.close(), 5)

    loop = new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.run_until_complete(run())
    finally:
        loop.close()
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]
