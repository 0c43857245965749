"""Connections per user, counted across the cluster.

One KV key per user (``<stream>_conns``) holds that user's open connections —
``{conn id: [node instance, opened at]}`` — updated with compare-and-set, so
two nodes admitting the same user at once cannot both take the last place.
Entries of instances that stopped refreshing their liveness key (crashed) do
not count and are dropped at the user's next update; a node that was only
stalled writes its own back when it carries on (``recount``). A connection
chosen to make room, or named by its client's new stream (``replaces``), is
closed through a message to its node when that is another one (why: a
header, so a node that does not know it still closes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig

from .base import BrokerUnavailable, Kick, TooManyConnections
from .kv import Bucket, Current, allow_message_ttls, bind_bucket, compare_and_set, key_token, storage_type
from .link import NatsLink
from .tasks import spawn
from .throttle import Throttle

log = logging.getLogger("herald.connections")
warn = Throttle(log)
stuck = Throttle(log, level=logging.ERROR)
# Seconds a user's emptied table stays (a reload's reconnect finds it): then
# the server removes it, so the bucket holds the users with connections, not
# every user ever seen.
EMPTY_TABLE_TTL = 60

# The kick message's header saying why (absent: Kick.OLDEST).
KICK_HEADER = "Herald-Kick"

# conn id → [instance, opened at (unix seconds, and later than every entry
# before it: the order of admission, whatever the nodes' clocks)]
Table = dict[str, list[object]]


class _Unlisted(Exception):
    """A user's table names instances the live-node listing in hand lacks."""

    def __init__(self, instances: set[str]) -> None:
        super().__init__(instances)
        self.instances = instances


class KvConnections:
    """``broker.roles.Connections``: the per-user table in KV, and the kicks
    that make room for a newer connection (``kick`` is told of local ones;
    other nodes are sent theirs)."""

    def __init__(
        self,
        link: NatsLink,
        stream: str,
        instance: str,
        alive: Callable[[Collection[str]], Awaitable[set[str]]],
        kick: Callable[[str, Kick], None],
        timeout: float = 5.0,
    ) -> None:
        self._link = link
        self._stream = stream
        self._bucket = f"{stream}_conns"
        self._instance = instance
        self._alive = alive
        self._kick = kick
        self._timeout = timeout  # of each KV request (the JetStream context's)
        self._kv: Bucket | None = None
        self._expiring = False  # whether an emptied table is written with EMPTY_TABLE_TTL
        self.tasks: set[asyncio.Task[None]] = set()  # connections being counted out
        # The newest value and revision this node wrote (or read) of each user
        # it has connections of: the next write of that user tries it first,
        # so a count out (and a second tab's count in) need no read while
        # no other node changed the user's table.
        self._known: dict[str, Current] = {}
        # This node's counted connections: user -> {conn id: opened at}, to
        # write back when other nodes dropped them (``recount``).
        self._open: dict[str, dict[str, float]] = {}

    async def ensure(self, js: JetStreamContext, replicas: int, storage: str) -> None:
        kv = await bind_bucket(
            js, KeyValueConfig(bucket=self._bucket, history=1, replicas=replicas, storage=storage_type(storage))
        )
        self._kv = Bucket(self._link, kv, self._timeout)
        self._expiring = await allow_message_ttls(js, kv)
        # Bound again after NATS came back, maybe with a fresh store: what
        # this node last wrote may be gone, and revisions start over.
        self._known.clear()

    def _kick_subject(self, instance: str) -> str:
        # Core NATS only: outside the stream's subjects, never stored.
        return f"_herald.{self._stream}.kick.{instance}"

    async def listen(self) -> None:
        """Take the kicks other nodes send this one (once connected)."""
        await self._link.client().subscribe(self._kick_subject(self._instance), cb=self._on_kick)

    async def _on_kick(self, msg: Msg) -> None:
        why = Kick.REPLACES if (msg.headers or {}).get(KICK_HEADER) == Kick.REPLACES.value else Kick.OLDEST
        self._kick(msg.data.decode(errors="replace"), why)

    async def open(self, user: str, conn: str, limit: int, close_oldest: bool, replaces: str | None = None) -> None:
        """Count ``conn`` in, kicking ``replaces`` if it is one of the user's
        connections and the oldest to make room (close-oldest), or raise
        TooManyConnections (refuse-new). Without NATS it admits (a limit is
        protection, not authentication)."""
        victims, opened = await self._admit(user, conn, limit, close_oldest, replaces)
        conns = self._open.setdefault(user, {})
        conns[conn] = opened
        for instance, victim, why in victims:
            if instance == self._instance:
                conns.pop(victim, None)  # counted out by that write: its close has nothing to write
                self._kick(victim, why)
            elif self._link.nc is not None:
                headers = {KICK_HEADER: why.value} if why is not Kick.OLDEST else None
                with contextlib.suppress(nats.errors.Error):
                    await self._link.nc.publish(self._kick_subject(instance), victim.encode(), headers=headers)

    def close(self, user: str, conn: str) -> asyncio.Task[None] | None:
        conns = self._open.get(user)
        if conns is None or conns.pop(conn, None) is None:
            return None  # counted out already (a drain does so before its clients are told to go)
        if not conns:
            del self._open[user]
        return spawn(self.tasks, self._count_out(user, conn))

    async def settle(self, timeout: float, counting: Collection[asyncio.Future[None]] | None = None) -> None:
        """Return once ``counting`` (None: the count-outs begun so far) is
        written (or given up), or after ``timeout`` seconds, or once NATS is
        away (they cannot be)."""
        await self._link.wait_connected(self.tasks if counting is None else counting, timeout)

    def recount(self) -> None:
        """Write this node's connections back into their users' tables: it
        was taken for a dead node (a stall past ``presence.ttl``), and other
        nodes dropped them there. Until the users close some, they may hold
        more than their limit; no new one is admitted meanwhile."""
        for user, conns in list(self._open.items()):
            spawn(self.tasks, self._restore(user, dict(conns)))

    async def _restore(self, user: str, conns: dict[str, float]) -> None:
        instance = self._instance

        def restore(table: Table, alive: set[str]) -> Table | None:
            open_now = self._open.get(user, {})  # closed meanwhile: not written back
            missing = {c: [instance, at] for c, at in conns.items() if c not in table and c in open_now}
            if not missing:
                return None
            return {**{c: v for c, v in table.items() if v[0] in alive}, **missing}

        self._known.pop(user, None)  # what this node last wrote still holds them: read what others left
        await self._update(user, restore)

    async def _admit(
        self, user: str, conn: str, limit: int, close_oldest: bool, replaces: str | None
    ) -> tuple[list[tuple[str, str, Kick]], float]:
        """Count ``conn`` in (and ``replaces`` out, when the user's table has
        it); returns the (instance, conn, why) to close, and the time it is
        stamped with."""
        victims: list[tuple[str, str, Kick]] = []
        opened = time.time()

        def admit(table: Table, alive: set[str]) -> Table | None:
            nonlocal opened
            victims.clear()
            live = {c: v for c, v in table.items() if v[0] in alive}
            # Later than every connection in the table, whatever this node's
            # clock says: the table's writes are in admission order, the
            # nodes' clocks may not be (one a minute behind would stamp its
            # newest connection as the oldest, and close-oldest close it).
            opened = max([time.time(), *(float(v[1]) + 0.001 for v in table.values())])  # type: ignore[arg-type]
            # Only the user's own table is looked in: another user's connection,
            # or an unknown one, is not found, and the stream is admitted as usual.
            if replaces is not None and replaces in live:
                victims.append((str(live.pop(replaces)[0]), replaces, Kick.REPLACES))
            excess = len(live) + 1 - limit
            if excess > 0:
                if not close_oldest:
                    raise TooManyConnections(f"at most {limit} connections per user")
                for c in sorted(live, key=lambda c: float(live[c][1]))[:excess]:  # type: ignore[arg-type]
                    victims.append((str(live[c][0]), c, Kick.OLDEST))
                    del live[c]
            live[conn] = [self._instance, opened]
            return live

        await self._update(user, admit)
        return victims, opened

    async def _count_out(self, user: str, conn: str, attempts: int = 5) -> None:
        """Count ``conn`` out. Retried: a connection left counted would take
        one of the user's places for as long as this node lives."""

        def remove(table: Table, alive: set[str]) -> Table | None:
            if conn not in table:
                return None
            return {c: v for c, v in table.items() if c != conn and v[0] in alive}

        for attempt in range(attempts):
            if await self._update(user, remove):
                return
            if attempt < attempts - 1:  # no wait after the last: given up at once
                await asyncio.sleep(min(30.0, 2.0**attempt))
        self._known.pop(user, None)  # not kept for a user this node may never write again
        stuck("stuck", "a closed connection of a user stays counted until this node restarts")

    async def _update(self, user: str, change: Callable[[Table, set[str]], Table | None]) -> bool:
        """Apply ``change`` with compare-and-set; False if NATS failed."""
        kv = self._kv
        if kv is None:
            return False
        try:
            instance = self._instance
            alive = await self._alive(())
            alive.add(instance)
            asked: set[str] = set()  # instances the listing was asked about after their entry was read
            ours = False  # whether the table as left holds connections of this node

            def apply(value: bytes | None) -> bytes | None:
                nonlocal ours
                table = orjson.loads(value or b"{}")
                unknown = {str(v[0]) for v in table.values()} - alive - asked
                if unknown:
                    raise _Unlisted(unknown)
                new = change(table, alive)
                ours = any(v[0] == instance for v in (table if new is None else new).values())
                return None if new is None else orjson.dumps(new)

            # A conflict is another connection of this user counted meanwhile.
            key = key_token(user)
            known = self._known.get(user)
            for _ in range(5):
                try:
                    current = await compare_and_set(
                        kv, key, apply, tries=100, known=known, ttl=_ttl if self._expiring else None
                    )
                    break
                except _Unlisted as exc:
                    # Entries of instances the cached listing lacks: started since, or gone.
                    asked |= exc.instances
                    alive = await self._alive(exc.instances) | {instance}
                except TooManyConnections:
                    if known is None:
                        raise
                    # Judged on what this node last wrote: another may have counted some out since.
                    known = None
            else:
                warn("unlisted", "connection count of a user not updated: its table names nodes the listing lacks")
                return False
        except (TimeoutError, nats.errors.Error, BrokerUnavailable) as exc:
            detail = getattr(exc, "description", None)  # what the JetStream API said, if it answered
            warn("update", "connection count of a user not updated: %r%s", exc, f" ({detail})" if detail else "")
            return False
        if current is not None:
            self._remember(user, current, ours)
        return current is not None

    def _remember(self, user: str, current: Current, ours: bool) -> None:
        """Keep ``current`` as the user's newest known table while this node
        has connections of the user (writes may finish out of order)."""
        known = self._known.get(user)
        if known is not None and known[1] > current[1]:
            return
        if ours:
            self._known[user] = current
        else:
            self._known.pop(user, None)


def _ttl(table: bytes) -> int:
    """The TTL a user's table is written with: an empty one goes after a while."""
    return EMPTY_TABLE_TTL if table == b"{}" else 0
