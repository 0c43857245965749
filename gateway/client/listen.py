"""``herald listen CHANNEL…``: a node's messages as JSON lines on stdout.

Each message of a channel named on the command line is one line
``{"channel","id","event","data"}`` (and ``"from"``, the publishing user,
for a message a client published), written at once (pipe it to jq). The
connection is a ``HeraldClient``: it reconnects and resumes, so a node that
goes away loses nothing. SIGINT / SIGTERM end it with 0, even while a reader
that stops reading holds its output back, and so does the end of the pipe's
reader (``| head -1``: at once, not at the next message); a node refusing it
for good (4000, 4003, 4403, a refused token) ends it with 1 and one line on stderr.
A first connection that fails (a wrong URL, no node) is one line on stderr (the
client's warning); the retries after it are said only with -v.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from broker.channels import (
    BROADCAST_NAME,
    InvalidChannel,
    channel_id,
    check_id,
    client_name,
    is_room,
    is_user,
    parse_channel,
    parse_seq,
)

from ..auth import mint_token
from ..frames import TooDeep, dumps_exact
from ..settings import ConfigError, Settings
from .events import Message, Reset, Stopped, Welcome
from .herald import HeraldClient
from .stdout import Stdout

TOKEN_TTL = 3600.0  # seconds of a token minted with --user (a new one is minted when it expires)


@dataclass(frozen=True)
class Wanted:
    """What the command line asks for: the rooms to join, the channels to
    print (by the names a client sees), and the user ``user:<id>`` named."""

    rooms: tuple[str, ...]
    printed: frozenset[str]
    user: str | None


def wanted(names: Sequence[str]) -> Wanted:
    """``room:<id>``, ``user``, ``user:<id>`` (the token's own user) or ``broadcast``."""
    rooms: list[str] = []
    printed: set[str] = set()
    user: str | None = None
    for name in names:
        if name in ("user", BROADCAST_NAME):
            printed.add(name)
            continue
        channel = parse_channel(name)
        ident = channel_id(channel)
        if is_user(channel):
            if user is not None and user != ident:
                raise InvalidChannel(f"invalid channel {name!r}: one user channel, the token's own")
            user = ident
        elif is_room(channel) and ident not in rooms:
            rooms.append(ident)
        printed.add(client_name(channel))
    return Wanted(tuple(rooms), frozenset(printed), user)


def listen(
    settings: Settings,
    channels: Sequence[str],
    urls: Sequence[str],
    token: str | None,
    user: str | None,
    since: str | None,
    verbose: bool = False,
) -> int:
    """Run ``herald listen``; returns the exit status."""
    want = wanted(channels)
    if since is not None:
        parse_seq(since)
    token = token or os.environ.get("HERALD_TOKEN") or None
    if user is not None:
        check_id("user", user)
        if want.user is not None and want.user != user:
            raise InvalidChannel(f"user:{want.user} is not --user {user}: only your own user channel")
    jwt = settings.jwt
    secret = jwt.secret
    if token is None and (user is None or not secret):
        raise ConfigError(
            "listen needs a token: --token, $HERALD_TOKEN, or --user with jwt.secret (HERALD_JWT_SECRET) set"
        )

    def minted() -> str:
        assert user is not None
        return mint_token(secret, user, list(want.rooms), [], TOKEN_TTL, audience=jwt.audience, issuer=jwt.issuer)

    if sys.stdout is None:  # started with >&-
        raise ConfigError("listen: standard output is closed")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="herald: %(message)s")
    try:
        client = HeraldClient(
            list(urls) or [_default_url(settings)],
            token=token,
            get_token=minted if token is None else None,
            rooms=want.rooms,
            since=since,
        )
    except ValueError as exc:  # a URL
        raise ConfigError(f"--url: {exc}") from None
    try:
        return asyncio.run(_run(client, want))
    except BrokenPipeError:  # the reader went away (| head): as good as an interrupt
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _default_url(settings: Settings) -> str:
    host = settings.http.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.http.port}"


async def _run(client: HeraldClient, want: Wanted) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    out = Stdout(sys.stdout.fileno(), gone=stop.set)  # its reader gone (| head): as good as an interrupt
    try:
        async with client:
            printing = asyncio.create_task(_print(client, want, out))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({printing, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not printing.done():
                printing.cancel()
                await asyncio.gather(printing, return_exceptions=True)
                return 0
    finally:
        out.close()
    try:
        return printing.result()
    except Stopped as exc:
        print(f"herald: the node refused the connection: {exc.code} {exc.reason}".rstrip(), file=sys.stderr)
        return 1


async def _print(client: HeraldClient, want: Wanted, out: Stdout) -> int:
    async for event in client.events():
        if isinstance(event, Message):
            if event.channel in want.printed:
                try:
                    line = dumps_exact(event.as_json())  # data's integers exact at any size, as the node wrote them
                except TooDeep as exc:
                    print(f"herald: message {event.id} of {event.channel} not printed: {exc}", file=sys.stderr)
                    continue
                await out.write(line + b"\n")
        elif isinstance(event, Welcome):
            if want.user is not None and event.user != want.user:
                print(f"herald: user:{want.user} is not this token's user ({event.user})", file=sys.stderr)
                return 2
        elif isinstance(event, Reset) and event.channel in want.printed:
            print(f"herald: reset of {event.channel}: {event.reason} (messages were lost)", file=sys.stderr)
    return 0
