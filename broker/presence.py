"""Cluster-wide presence: which users are in which room, on any node.

Two KV buckets. ``<stream>_presence`` holds one key per (node instance, room,
user) — ``<instance>.<room>.<user>`` — written by the node that has the user's
connections, so a query is one server-side filtered listing
(``*.<room>.*``) and users with tabs on several nodes appear once.
``<stream>_nodes`` holds one key per live instance, refreshed every ttl/3 and
expiring after ``ttl``: a query counts only entries of live instances, so a
node that crashed drops out of every room within ``ttl``, without anyone
having to clean up first. Each node also sweeps the entries of instances that
are gone (listed under ``_inst.<instance>``) so the bucket does not grow.

Writes are queued and applied in order by one task, latest state per key:
joining and leaving never wait for NATS. What is queued goes out as one
pipelined batch (a connect storm queues one entry per connect).

NATS may come back with a new store, without the join / leave markers:
``_store_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import re
import uuid
from collections.abc import Callable, Collection

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from .acks import AckedPublisher, Outgoing
from .base import BrokerUnavailable
from .channels import Channel, InvalidChannel, Subjects, channel_id, glob_match, is_room, parse_channel
from .kv import Bucket, bind_bucket, from_key_token, key_token, live_keys, storage_type
from .link import NatsLink
from .liveness import LiveInstances
from .tasks import cancel_and_wait, shielded

log = logging.getLogger("herald.presence")

REGISTRY = "_inst"
# Most entries written in one pipelined batch.
WRITE_BATCH = 256
# How long a close waits for the write loop to end the batch it is writing.
BATCH_WAIT = 5.0
# Why a node writes its state again after its liveness key lapsed.
LAPSED = "this node was taken for a dead one (a stall, or NATS away)"
# Leaves of one room in a batch from which one listing of the room's entries
# is cheaper than a listing per user (a consumer each).
ROOM_LISTING = 8


def instance_id(node_id: str) -> str:
    """This process's presence identity: the node id plus a random suffix, so a
    restarted node never mistakes a dead predecessor's entries for its own."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", node_id)[:64] + "-" + uuid.uuid4().hex[:8]


# Set on join / leave announcements (by nodes, on live subjects only).
PRESENCE_HEADER = "Herald-Presence"


class KvPresence:
    """``broker.roles.Presence`` in two KV buckets, with the join / leave
    announcements of the rooms that have them."""

    def __init__(
        self,
        link: NatsLink,
        subjects: Subjects,
        stream: str,
        node_id: str,
        ttl: float,
        join_leave: tuple[str, ...] = (),
        timeout: float = 5.0,
    ) -> None:
        self.instance = instance_id(node_id)
        self._link = link
        self._subjects = subjects
        self._join_leave = join_leave
        self._bucket = f"{stream}_presence"
        self._nodes_bucket = f"{stream}_nodes"
        self._ttl = ttl
        self._timeout = timeout  # of each write (the JetStream context's)
        self._kv: KeyValue | None = None
        self._acks: AckedPublisher | None = None
        self._nodes: KeyValue | None = None
        # What this node wants the bucket to say: (room, user) present here.
        self._local: set[tuple[Channel, str]] = set()
        self._pending: dict[tuple[Channel, str], bool] = {}
        self._wake = asyncio.Event()
        # Pairs whose join this node judged and whose leave it has not: the markers it counts on.
        self._marked: set[tuple[Channel, str]] = set()
        # Set once ensure() has seen whether the bucket is new (its stream's
        # creation time: ``_created``); cleared while NATS is away.
        self._bound = asyncio.Event()
        self._created: float | None = None
        # For a ttl after a store loss: the pairs whose join / leave is held back.
        self._settling: asyncio.TimerHandle | None = None
        self._held: set[tuple[Channel, str]] = set()
        # Set by a close: the write loop ends after the batch it is writing
        # (its entries written and their leaves judged), never in between.
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        # Join / leave claims, shielded: a cancel must not separate a marker from
        # its announcement. A close gives them the write loop's wait, then ends them.
        self._claims: set[asyncio.Task[None]] = set()
        self._live = LiveInstances(self.instance, ttl)
        self.alive = self._live.alive
        self.alive_now = self._live.alive_now
        self._revision = 0  # of this instance's liveness key, as last written
        # Called when this instance was taken for a dead one (its liveness key
        # lapsed: a stall, NATS away past the ttl) and is back: what others
        # dropped of it (its users' connection counts) is written again.
        self.on_lapse: Callable[[], None] | None = None

    async def ensure(self, js: JetStreamContext, replicas: int, storage: str) -> None:
        """Bind (or create) the buckets, announce this instance, start writing."""
        kind = storage_type(storage)
        self._kv = await bind_bucket(
            js, KeyValueConfig(bucket=self._bucket, history=1, replicas=replicas, storage=kind)
        )
        self._nodes = await bind_bucket(
            js, KeyValueConfig(bucket=self._nodes_bucket, history=1, ttl=self._ttl, replicas=replicas, storage=kind)
        )
        self._live.nodes = self._nodes
        # Waits while NATS reconnects, as nats-py's put did.
        self._acks = AckedPublisher(self._link, self._kv._stream, self._timeout, buffered=True)
        created = (await js.stream_info(self._kv._stream)).created
        stamp = created.timestamp() if created else 0.0
        if not self._tasks:  # the first connect
            await self._keep_ttl(js)
            await self._register()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._write_loop()), loop.create_task(self._heartbeat_loop())]
        elif stamp != self._created:  # a reconnect to a new store
            await self._store_lost()
            await self._come_back("NATS has a new store (joins and leaves are held back for the ttl)")
        elif not await self._refresh():  # a reconnect, after the ttl: taken for dead meanwhile
            await self._come_back(LAPSED)
        else:  # the same bucket: everything written again all the same
            self._rewrite()
        self._created = stamp
        self._bound.set()

    def pause(self) -> None:
        """NATS is away, and may come back with a new store: nothing is judged until ensure() has looked."""
        self._bound.clear()

    async def _store_lost(self) -> None:
        """The bucket is new (memory storage, a disk lost): the markers are
        gone. Those this node counts on are put back where the new bucket never
        had the key (a leave announced since stays announced), and joins and
        leaves are held back for a ttl, until every live node has done the same
        and written its users again (on its own reconnect): a missing marker
        then means again that the user is out, not that the marker was lost."""
        assert self._kv is not None
        if self._settling is not None:
            self._settling.cancel()
        self._settling = asyncio.get_running_loop().call_later(self._ttl, self._settle)
        bucket = Bucket(self._link, self._kv, self._timeout)
        markers = [self._marker(*key) for key in self._marked]
        for start in range(0, len(markers), WRITE_BATCH):
            await asyncio.gather(*(bucket.write(key, b"1", 0) for key in markers[start : start + WRITE_BATCH]))

    def _settle(self) -> None:
        """The ttl after a store loss is over (or a close cuts it short): what was held back is judged, as it is now."""
        if self._settling is not None:
            self._settling.cancel()
        self._settling = None
        self._pending.update({key: key in self._local for key in self._held - self._pending.keys()})
        self._held.clear()
        self._wake.set()

    async def _keep_ttl(self, js: JetStreamContext) -> None:
        """Give the nodes bucket this node's ``presence.ttl``: it keeps the ttl
        it was made with, and a key refreshed every ttl/3 of a longer ttl than
        the bucket's lapses between refreshes (the node taken for a dead one)."""
        assert self._nodes is not None
        config = (await js.stream_info(self._nodes._stream)).config
        if abs((config.max_age or 0.0) - self._ttl) > 0.001:
            warning = "presence: bucket %s had a ttl of %g s, now presence.ttl: %g s (every node must have the same)"
            log.warning(warning, self._nodes_bucket, config.max_age or 0.0, self._ttl)
            await js.update_stream(dataclasses.replace(config, max_age=self._ttl))

    async def _register(self) -> None:
        """Say this instance is alive, and that its entries are to be swept if it dies."""
        assert self._nodes is not None and self._kv is not None
        self._revision = await self._nodes.put(self.instance, b"1")
        await self._kv.put(f"{REGISTRY}.{self.instance}", b"1")

    async def _refresh(self) -> bool:
        """Refresh this instance's liveness key; False if it had lapsed (it
        expired, or a sweep took this instance for a dead one): nothing is written then."""
        assert self._nodes is not None and self._kv is not None
        try:
            self._revision = await self._nodes.update(self.instance, b"1", last=self._revision)
            await self._kv.get(f"{REGISTRY}.{self.instance}")
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.NotFoundError):
            return False
        return True

    async def _come_back(self, why: str) -> None:
        """After a lapse (or a store loss): register again, write every entry
        again (a sweep deleted them, or is deleting them: the next refresh then
        finds the registration gone and comes here again), and tell ``on_lapse``."""
        log.warning("presence: %s; writing its state again", why)
        await self._register()
        self._rewrite()
        if self.on_lapse is not None:
            self.on_lapse()

    def _rewrite(self) -> None:
        for key in self._local:
            self._pending.setdefault(key, True)
        self._wake.set()

    # -- this node's members ----------------------------------------------------

    def mark(self, room: Channel, user: str, present: bool) -> None:
        """``user`` has (or no longer has) a connection in ``room`` on this node."""
        key = (room, user)
        if present:
            self._local.add(key)
        else:
            self._local.discard(key)
        self._pending[key] = present
        self._wake.set()

    def _entry(self, room: str, user: str) -> str:
        return f"{self.instance}.{key_token(room)}.{key_token(user)}"

    async def _write_loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._stopping and self._kv is not None and self._acks is not None:
                await self._bound.wait()
                batch = list(itertools.islice(self._pending.items(), WRITE_BATCH))
                try:
                    await self._write_batch(batch)
                except (TimeoutError, nats.errors.Error, BrokerUnavailable) as exc:
                    log.warning("presence write failed (%r); retrying", exc)
                    await asyncio.sleep(1.0)

    async def _write_batch(self, batch: list[tuple[tuple[Channel, str], bool]]) -> None:
        # What kv.put / kv.delete publish, pipelined: one ack wait for the batch.
        assert self._acks is not None
        await self._acks.publish([self._write(key, present) for key, present in batch])
        # Then the joins / leaves of rooms that announce them, each after its own
        # entry is written; judged at once (keys of different users or rooms),
        # not one after another.
        judged = [((room, user), present) for (room, user), present in batch if self._announces(room)]
        if judged:
            await self._bound.wait()  # NATS went away meanwhile: the store may be new
        if judged and self._settling is not None:
            self._held.update(key for key, _ in judged)
        elif judged:
            leaves: dict[Channel, list[str]] = {}
            for (room, user), present in judged:
                if not present:
                    leaves.setdefault(room, []).append(user)
            joins = (
                shielded(self._claims, self._claim_join(room, user)) for (room, user), present in judged if present
            )
            await asyncio.gather(*joins, *(self._left(room, users) for room, users in leaves.items()))
            self._marked.update(key for key, present in judged if present)
            self._marked.difference_update(key for key, present in judged if not present)
        for key, present in batch:
            if self._pending.get(key) is present:  # not changed meanwhile
                del self._pending[key]

    def _write(self, key: tuple[Channel, str], present: bool) -> Outgoing:
        assert self._kv is not None
        subject = self._kv._pre + self._entry(*key)
        return (subject, b"1", None) if present else (subject, b"", {"KV-Operation": "DEL"})

    # -- join / leave, once per user across the cluster ---------------------------
    #
    # A marker key per (room, user) is created by the first node to see the
    # user arrive (KV create: one winner) and deleted with compare-and-set by
    # the node that sees no live entry left: one join and one leave per stay,
    # however many tabs and nodes.

    def _announces(self, room: Channel) -> bool:
        return bool(self._join_leave) and is_room(room) and glob_match(self._join_leave, channel_id(room))

    async def _announce(self, room: Channel, user: str, joined: bool) -> None:
        """A join / leave frame to the room's members: live only, never stored."""
        if self._link.connected:
            headers = {PRESENCE_HEADER: "join" if joined else "leave"}
            await self._link.client().publish(self._subjects.live_subject(room), user.encode(), headers=headers)

    def _marker(self, room: Channel, user: str) -> str:
        return f"_j.m.{key_token(room)}.{key_token(user)}"

    async def _claim_join(self, room: Channel, user: str) -> None:
        assert self._kv is not None
        marker = self._marker(room, user)
        for _ in range(10):
            try:
                await self._kv.create(marker, b"1")
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # in the room already, through another node or tab
            else:
                await self._announce(room, user, True)
                return
            # Move the marker's revision on: a leave judged on entries read
            # before this node's was written then fails to delete it (_left).
            try:
                current = await self._kv.get(marker)
                await self._kv.update(marker, b"1", last=current.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return  # moved on by another node meanwhile: as good
            except nats.js.errors.NotFoundError:
                continue  # left meanwhile: this is a new stay, announced
            return

    async def _left(self, room: Channel, users: Collection[str]) -> None:
        """Announce the leave of each of ``users`` unless an entry of a live
        instance is left. The marker's revision is read first: a join written
        after it moves it on, and the delete expecting it fails (_claim_join).
        Many leaves of one room (a drain, a blip) are judged on one listing of
        the room's entries, not one each (a consumer made and deleted per listing)."""
        assert self._kv is not None
        revisions = await asyncio.gather(*(self._marker_revision(room, user) for user in users))
        waiting = {key_token(user): (user, rev) for user, rev in zip(users, revisions, strict=True) if rev is not None}
        if not waiting:
            return  # announced by other nodes already
        room_token = key_token(room)
        if len(waiting) >= ROOM_LISTING:
            listings = [await live_keys(self._kv, f"*.{room_token}.*")]
        else:
            listings = await asyncio.gather(*(live_keys(self._kv, f"*.{room_token}.{t}") for t in waiting))
        present: dict[str, set[str]] = {}  # user token -> instances with an entry
        for entry in itertools.chain.from_iterable(listings):
            instance, _, user_token = entry.split(".")
            present.setdefault(user_token, set()).add(instance)
        alive = await self.alive(set().union(*present.values()))
        gone = [user_rev for token, user_rev in waiting.items() if not present.get(token, set()) & alive]
        await asyncio.gather(*(shielded(self._claims, self._claim_leave(room, user, rev)) for user, rev in gone))

    async def _marker_revision(self, room: Channel, user: str) -> int | None:
        """The revision of the user's marker in ``room``; None: announced left already."""
        assert self._kv is not None
        try:
            return (await self._kv.get(self._marker(room, user))).revision or 0
        except nats.js.errors.NotFoundError:
            return None

    async def _claim_leave(self, room: Channel, user: str, revision: int) -> None:
        assert self._kv is not None
        try:
            await self._kv.delete(self._marker(room, user), last=revision)
        except (nats.js.errors.NotFoundError, nats.js.errors.KeyWrongLastSequenceError):
            return  # announced by another node already, or joined again meanwhile
        await self._announce(room, user, False)

    async def _heartbeat_loop(self) -> None:
        beat = self._ttl / 3
        while True:
            await asyncio.sleep(beat)
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                if not await self._refresh():
                    await self._come_back(LAPSED)
            # Every beat (two small listings while no node is gone): a dead
            # node's users leave in announcements within ttl/3 of leaving
            # presence answers (its key expired), not up to a ttl after.
            try:
                await self._sweep()
            except (TimeoutError, nats.errors.Error) as exc:
                log.debug("presence sweep failed: %r", exc)

    async def _sweep(self) -> None:
        """Delete the entries of instances that stopped refreshing their key."""
        assert self._kv is not None
        registered = await live_keys(self._kv, f"{REGISTRY}.*")
        alive = await self.alive_now()  # listed after: a node registered since is in it
        for key in registered:
            dead = key.split(".", 1)[1]
            if dead in alive or dead == self.instance:
                continue
            by_room: dict[str, list[str]] = {}
            for entry in await live_keys(self._kv, f"{dead}.*.*"):
                _, room_token, user_token = entry.split(".")
                by_room.setdefault(room_token, []).append(user_token)
            for room_token, user_tokens in by_room.items():
                # A room at a time: its entries deleted, then its leaves judged together.
                await asyncio.gather(*(self._kv.delete(f"{dead}.{room_token}.{t}") for t in user_tokens))
                try:
                    room = parse_channel(from_key_token(room_token))
                except InvalidChannel:
                    continue  # not written by a node
                if self._announces(room):
                    await self._left(room, [from_key_token(t) for t in user_tokens])
            await self._kv.delete(key)
            log.info("presence: removed the entries of instance %s (gone)", dead)

    # -- queries -----------------------------------------------------------------

    async def members(self, room: Channel) -> list[str]:
        """Users with a connection in ``room`` on any live node, sorted."""
        self._link.jetstream()  # fails at once while NATS is away
        if self._kv is None or self._nodes is None:
            raise BrokerUnavailable("presence is not available yet")
        try:
            entries = await live_keys(self._kv, f"*.{key_token(room)}.*")
            alive = await self.alive_now()  # listed after: a node that wrote an entry is in it
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"presence lookup failed: {exc.__class__.__name__}") from None
        # This node's own users as it knows them now: its writes to the bucket
        # are queued, and a client asking right after its welcome is one of them.
        users = {user for present, user in self._local if present == room}
        for entry in entries:
            instance, _, user = entry.split(".")
            if instance in alive and instance != self.instance:
                users.add(from_key_token(user))
        return sorted(users)

    async def close(self, timeout: float = 1.0) -> None:
        """Stop counting as live. Writes still queued (the leaves of the
        connections a drain just closed) get ``timeout`` to finish; whatever
        is left stays for a survivor's sweep, which announces those leaves.
        Call it while NATS is still connected: announcements go out on it."""
        self._settle()  # what is held back after a store loss is judged now, or never
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._pending and self._tasks and loop.time() < deadline and self._link.connected:
            await asyncio.sleep(0.01)
        # Not cancelled mid-batch: an entry deleted whose leave was not judged
        # would be announced by no one (a survivor's sweep finds no entry).
        self._stopping = True
        self._wake.set()
        # The write loop, and the claims of a sweep's leaves (a cancel leaves them running).
        await self._link.wait_connected([*self._tasks[:1], *self._claims], BATCH_WAIT)
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait([*tasks, *self._claims])  # ended, not destroyed pending later
        if self._nodes is None or not self._link.connected:
            return  # without NATS, the entry lapses after the ttl
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self._nodes.delete(self.instance)
