"""``HeraldClient``: a Python client of Herald's WebSocket protocol that stays
subscribed through node failures, as herald.js does in a browser.

    async with HeraldClient("http://herald:8080", token=TOKEN, rooms=["lobby"]) as client:
        async for message in client:
            print(message.channel, message.id, message.event, message.data)

One task reads the socket and keeps it open: on any end it reconnects (to
the next URL of the list), by the close-code rules of ``reconnect.py``,
resuming from the last id received (``feed.py``). Commands are sent on the
open connection with a ``ref`` and answered by it (``calls.py``); what
each sends and returns is in ``commands.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from types import TracebackType
from typing import Any

import aiohttp

from ..frames import loads_exact
from .calls import Answer, Calls, Effect, encode, with_ref
from .commands import Commands
from .events import (
    CommandError,
    CommandTimeout,
    Event,
    HeraldError,
    Message,
    Reset,
    Stopped,
    Subscribed,
    Unsubscribed,
    Welcome,
    event_of,
)
from .feed import Feed
from .reconnect import Endpoints, Reconnect, refused_code
from .rooms import Rooms

log = logging.getLogger("herald.client")

TokenSource = Callable[[], str | Awaitable[str]]
ResetHandler = Callable[[Reset], Awaitable[None] | None]

_MAX_MESSAGE = 64 * 2**20  # bytes of one frame from the node (a history page can be large)
_CLOSE_WAIT = 2.0  # seconds to wait for the node's answer to our close
_MAX_FRAME = 65536  # bytes of the largest frame a node takes by default (its ws.max_frame)
# Refusals of a re-join that pass: asked again on the same connection (as herald.js does).
_PASSING = frozenset({"timeout", "unavailable", "rate_limited"})


class HeraldClient(Commands):
    """A connection to Herald that reconnects and resumes by itself.

    ``url``: a node's base URL (http, https, ws or wss; ``/ws`` is added), or
    a list of them, tried in turn on each reconnect. ``token`` or
    ``get_token`` (called for the first token when there is no ``token``, and
    once after the node refuses one with 4001; may be async). ``headers``:
    sent with every connect — e.g. the app's session ``Cookie`` for a node
    whose connect hook decides who it is (``auth.mode`` hook or either),
    which needs no token. ``rooms``: the
    rooms to be in from the start. ``since``: the position to start from (the
    last id of an earlier run). ``timeout``: seconds a command may take,
    waiting for the connection included. ``min_delay`` / ``max_delay``: the
    reconnect backoff bounds. ``heartbeat``: seconds between our pings (None:
    none). ``buffer``: events held for the application before the reader
    stops reading (answers to commands come after them: iterate, even if
    you mostly send commands). ``on_reset``: called (and awaited), in order, for each
    ``Reset`` while iterating over messages. ``max_frame``: the nodes'
    ``ws.max_frame``: a larger command is refused here (``too_large``), not
    sent (the node would close the connection 1009).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        headers: Mapping[str, str] | None = None,
        rooms: Iterable[str] = (),
        since: str | None = None,
        timeout: float = 10.0,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        heartbeat: float | None = 30.0,
        buffer: int = 1000,
        on_reset: ResetHandler | None = None,
        session: aiohttp.ClientSession | None = None,
        max_frame: int = _MAX_FRAME,
    ) -> None:
        if token is None and get_token is None and not headers:
            raise ValueError("give token, get_token or headers (a session cookie)")
        self._endpoints = Endpoints(url)
        self._token = token
        self._get_token = get_token
        self._headers = dict(headers or {})
        self._by_hook = token is None and get_token is None  # who the client is: the app's cookie says
        self._rooms = Rooms(rooms)
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._on_reset = on_reset
        self._max_frame = max_frame
        self._policy = Reconnect(min_delay, max_delay)
        self._feed = Feed(buffer, str(since) if since is not None else None)
        self._calls = Calls()
        self._session = session
        self._own_session = session is None
        self._socket: aiohttp.ClientWebSocketResponse | None = None  # open, welcomed or not
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # welcomed: commands go here
        self._open = asyncio.Event()  # set while _ws is usable, and once the client is over
        self._final: HeraldError | None = None  # why commands can no longer be sent
        self._welcome: Welcome | None = None
        self._task: asyncio.Task[None] | None = None
        self._rejoining: set[asyncio.Task[None]] = set()
        self._since_opened: str | None = None  # the position the current connection resumed from
        self._closing = False
        self._warned = False  # a connection ended: only the first, before any welcome, is a warning

    # --- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> HeraldClient:
        self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting (``async with`` does it); returns at once."""
        if self._task is None:
            if self._session is None:
                # sock_read bounds the wait for the upgrade's answer (a frozen node: nginx would wait an hour
                # for it); aiohttp lifts it once the socket is a WebSocket.
                timeout = aiohttp.ClientTimeout(
                    total=None, connect=self._timeout, sock_connect=self._timeout, sock_read=self._timeout
                )
                self._session = aiohttp.ClientSession(timeout=timeout)
            self._task = asyncio.create_task(self._run(), name="herald-client")

    async def close(self) -> None:
        """Close the connection cleanly (1000) and stop: iterators end, commands
        fail with ``closed``. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._end(CommandError("closed", "client closed"))
        self._feed.abort()
        socket = self._socket
        if socket is not None and not socket.closed:
            with suppress(Exception):
                await asyncio.wait_for(socket.close(), _CLOSE_WAIT)
        for task in (self._task, *self._rejoining):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()

    # --- what the application sees -----------------------------------------------------------------

    @property
    def welcome(self) -> Welcome | None:
        """The latest connection's ``welcome`` (None before the first)."""
        return self._welcome

    @property
    def connected(self) -> bool:
        """A connection is open and welcomed: commands go out at once."""
        return self._ws is not None and not self._ws.closed

    @property
    def rooms(self) -> tuple[str, ...]:
        """The rooms a reconnect joins: those asked for, then those the backend joined."""
        return self._rooms.all()

    @property
    def position(self) -> str | None:
        """Where the next connection resumes from: the last id received."""
        return self._feed.since

    def __aiter__(self) -> AsyncIterator[Message]:
        """The messages, in order. A ``Reset`` goes to ``on_reset`` (logged
        without one); the other events are skipped (see ``events``). Ends
        when the client is closed; raises ``Stopped`` when the node refused
        it for good."""
        self._check_started()
        return self._messages()

    def events(self) -> AsyncIterator[Event]:
        """Every event, in order: ``Welcome`` (one per connection), ``Message``,
        ``Reset``, ``Join``, ``Leave``, ``Subscribed``, ``Unsubscribed``. One
        iterator at a time, this or the client itself."""
        self._check_started()
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while (event := await self._feed.get()) is not None:
            yield event

    async def _messages(self) -> AsyncIterator[Message]:
        while (event := await self._feed.get()) is not None:
            if isinstance(event, Message):
                yield event
            elif isinstance(event, Reset):
                if self._on_reset is None:
                    log.warning("reset of %s: %s (refetch its state; pass on_reset)", event.channel, event.reason)
                else:
                    result = self._on_reset(event)
                    if inspect.isawaitable(result):
                        await result

    def _check_started(self) -> None:
        if self._task is None:
            raise RuntimeError("use 'async with HeraldClient(...)' (or call start()) first")

    async def _command(self, kind: str, fields: dict[str, Any], effect: Effect | None = None) -> Answer:
        """Send one command when a connection is open and await its answer,
        all within the timeout. ``effect`` is applied once, with the answer
        when it is read (even after the timeout: the node ran the command),
        or with None if none can come (not sent, or the connection ended)."""
        try:
            self._check_started()
            frame = encode(kind, fields, self._max_frame)  # refused now if too large, connected or not
            async with asyncio.timeout(self._timeout):
                failed: aiohttp.ClientWebSocketResponse | None = None
                while True:
                    ws = await self._connected(not_this=failed)
                    ref, answer = self._calls.open(ws, effect)
                    effect = None  # the calls apply it from now on
                    try:
                        try:
                            await ws.send_str(with_ref(frame, ref))
                        except (ConnectionError, aiohttp.ClientError):
                            failed = ws  # not sent: wait for the next connection
                            effect = self._calls.unsent(ref)
                            continue
                        return await answer
                    finally:
                        self._calls.forget(ref)
        except TimeoutError:
            raise CommandTimeout(f"no answer to {kind} within {self._timeout} s") from None
        finally:
            if effect is not None:
                effect(None)

    async def _connected(self, not_this: object = None) -> aiohttp.ClientWebSocketResponse:
        """The welcomed connection, once there is one."""
        while True:
            if self._final is not None:
                raise self._final
            ws = self._ws
            if ws is None:
                await self._open.wait()
            elif ws.closed or ws is not_this:
                await asyncio.sleep(0.02)  # the reader has not seen it end yet
            else:
                return ws

    # --- the connection ----------------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, read until the connection ends, decide, again: until a
        close code says stop, or the client is closed."""
        try:
            while not self._closing:
                url = self._endpoints.next()
                if self._token is None and self._get_token is not None and not await self._new_token():
                    continue
                code, reason = await self._connection(url)
                if self._closing:
                    return
                step = self._policy.after(code, reason, self._get_token is not None, self._by_hook)
                if step.stop:
                    log.info("stopped by %s: %s %s", url, code, reason)
                    self._end(Stopped(code or 0, reason))
                    return
                if step.new_token:
                    self._token = None
                why = f"{code} {reason}".rstrip() if code is not None else f"dropped: {reason}".rstrip(": ")
                # Said once if the first connection cannot be made (a wrong URL, no node); quiet after.
                level = logging.INFO if self._welcome is not None or self._warned else logging.WARNING
                self._warned = True
                log.log(level, "connection to %s ended (%s): reconnecting in %.3f s", url, why, step.delay)
                await asyncio.sleep(step.delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the client failed")
            self._end(HeraldError(f"the client failed: {exc!r}"))

    async def _new_token(self) -> bool:
        """Ask ``get_token``; on failure wait a backoff (False)."""
        assert self._get_token is not None
        try:
            token = self._get_token()
            self._token = await token if inspect.isawaitable(token) else token
            return True
        except Exception as exc:  # noqa: BLE001 - the application's callable: any failure is retried
            delay = self._policy.backoff()
            log.warning("get_token failed (%r): retrying in %.3f s", exc, delay)
            await asyncio.sleep(delay)
            return False

    async def _connection(self, url: str) -> tuple[int | None, str]:
        """One connection, from the upgrade to its end: (close code or None, reason)."""
        assert self._session is not None
        headers = self._headers
        if self._token is not None:
            headers = {**headers, "Authorization": f"Bearer {self._token}"}
        params = [("room", room) for room in self._rooms.in_url()]
        self._since_opened = self._feed.since
        if self._since_opened is not None:
            params.append(("since", self._since_opened))
        if self._welcome is not None and self._welcome.conn:
            # The connection given up (docs/protocol.md 1.4): the node closes it and counts it out as it
            # admits this one, so a half-open one does not hold one of the user's places until it times out.
            params.append(("replaces", self._welcome.conn))
        try:
            ws = await self._session.ws_connect(
                url,
                params=params,
                headers=headers,
                heartbeat=self._heartbeat,
                max_msg_size=_MAX_MESSAGE,
            )
        except aiohttp.WSServerHandshakeError as exc:
            # Refused before the upgrade: read as the close code a refusal after it gets.
            return refused_code(exc.status), f"upgrade refused: HTTP {exc.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        self._socket = ws
        try:
            return await self._read(ws)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            if self._ws is ws:
                self._ws = None
                if self._final is None:
                    self._open.clear()
            self._calls.fail(CommandError("disconnected", "the connection closed before the answer"), ws)
            if not ws.closed:
                with suppress(Exception):
                    await asyncio.wait_for(ws.close(), _CLOSE_WAIT)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
        """Frames until the connection ends; the first must come within the
        timeout (a proxy may accept the upgrade and pass nothing)."""
        while True:
            msg = await ws.receive(timeout=None if self._ws is ws else self._timeout)
            if msg.type is aiohttp.WSMsgType.TEXT:
                await self._frame(ws, msg.data)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            elif msg.type is aiohttp.WSMsgType.ERROR:
                # A frame aiohttp refused (its close code is ours, not the node's): as dropped.
                return None, repr(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                # Dropped without a close frame (1006 is never sent): no code.
                code = ws.close_code
                return (None if code in (None, 1006) else code), ""

    async def _frame(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        try:
            frame = loads_exact(text)  # data's integers exact at any size, as the node wrote them
        except ValueError:  # orjson.JSONDecodeError, and the stdlib's
            log.warning("ignored a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        if self._calls.answer(frame):  # its effect (Calls) is applied: before the frames after it
            return
        event = event_of(frame)
        if event is None:
            kind = frame.get("type")
            if kind == "error":
                log.warning("the node says: %s: %s", frame.get("code"), frame.get("message"))
            elif kind in ("message", "reset"):  # new types are ignored quietly; these are broken
                log.warning("ignored a %s frame with an invalid id or channel: %.200s", kind, text)
            return
        if isinstance(event, Welcome):
            self._welcomed(ws, event)
        elif isinstance(event, Subscribed):
            self._rooms.granted(event.room)
        elif isinstance(event, Unsubscribed):
            self._rooms.left(event.room)
        await self._feed.put(event)

    def _welcomed(self, ws: aiohttp.ClientWebSocketResponse, welcome: Welcome) -> None:
        self._welcome = welcome
        self._policy.opened()
        self._feed.welcomed(welcome)
        if self._final is None:
            self._ws = ws
            self._open.set()
        log.info("connected to %s as %s (conn %s)", welcome.node, welcome.user, welcome.conn)
        # A first connection's rooms past the URL (Rooms.in_url) join from where its own channels went live.
        for room, since in self._rooms.to_rejoin(welcome.channels, self._since_opened or welcome.position):
            task = asyncio.create_task(self._rejoin(ws, room, since))
            self._rejoining.add(task)
            task.add_done_callback(self._rejoining.discard)

    async def _rejoin(self, ws: aiohttp.ClientWebSocketResponse, room: str, since: str | None) -> None:
        """Ask again on ``ws`` for a room the backend had joined, from its
        position (Rooms.to_rejoin), while it is still wanted. Refused for now
        (``_PASSING``): asked again after ``retry_after`` or a backoff; for
        good: given up. Once ``ws`` is gone the next connection asks by itself."""
        fields = {"room": room} if since is None else {"room": room, "since": since}
        attempt = 0
        while self._rooms.is_granted(room) and self._ws is ws:  # left, or asked for, meanwhile: done
            try:
                await self._command("subscribe", fields)
            except CommandError as exc:
                if exc.code in ("disconnected", "closed"):
                    return  # the next connection asks from the same position
                if exc.code not in _PASSING:
                    log.warning("room %s (joined by the backend) is left: %s", room, exc)
                    self._rooms.left(room)
                    return
                delay = max(exc.retry_after or 0.0, self._policy.jitter(attempt))
                log.info("re-join of room %s refused for now (%s): again in %.3f s", room, exc, delay)
                await asyncio.sleep(delay)
                attempt += 1
            except HeraldError:
                return  # stopped
            else:
                self._rooms.rejoined(room)
                return

    def _end(self, why: HeraldError) -> None:
        """No more connections: waiting commands fail with ``why``, the feed ends with it
        (a ``Stopped`` is raised by iterators; ``closed`` just ends them)."""
        if self._final is not None:
            return
        self._final = why
        self._open.set()
        self._calls.fail(why)
        self._feed.end(None if isinstance(why, CommandError) else why)
