"""
The Redis backplane: several broadcaster nodes behind one Redis act as one
server (``--redis``).

Every node publishes what its hub hands it and delivers to its hub what
comes back, its own events included; so a node delivers each of its
clients' messages exactly once, and every node sees the messages of a room
in one and the same order.  Text messages are numbered, kept and published
by one Lua script, atomically: a room's sequence has no gaps and no two
messages share a number, whichever node they came through.

A room's messages travel on the room's own sharded channel (``SPUBLISH``),
which a node receives only while it has members in the room
(:mod:`broadcaster.redis.rooms`): a node pays for its own clients' rooms,
not for all of them.  Who comes and goes (joins, leaves, renames, node
states) stays on one channel every node receives, so that every node can
list every room's members.

What lives in Redis (every room key starts with ``broadcaster:<namespace>:``,
every node key with ``broadcaster:{<namespace>}:``)::

    room:{<room>}:epoch    the room's epoch (random; set when missing, which
                           restarts the sequence: Redis lost its data)
    room:{<room>}:seq      the room's last sequence number
    room:{<room>}:history  its last --history-size messages, as published
                         (the three expire --room-ttl after the room's last
                         join, recovery or message)
    nodes                the ids of the registered nodes
    node:<id>:alive      the node's random token, expiring --node-timeout
                         seconds after its last heartbeat
    node:<id>:members    client id -> {"name": ..., "rooms": [...]}

The braces are hash tags: a room's keys and its channel share one slot,
and so do all the nodes' keys, so each script touches one shard of a
Redis Cluster.

Channels: ``broadcaster:<namespace>:room:{<room>}`` (sharded; ``...:db<N>``
appended for a database other than 0, since pub/sub ignores databases)
carries the room's messages; ``broadcaster:<namespace>:events`` carries
joins, leaves, renames and the control messages below;
``broadcaster:<namespace>:node:<id>`` carries the presence snapshot a node
asks for when it (re)connects.

Wire format of a published event (and of a history entry)::

    <seq> SP <epoch> SP <JSON> [LF <bytes>]

``seq`` and ``epoch`` are ``0`` and ``-`` for anything but a text message.
A node publishes the text messages of one room that one reactor turn
gives it together (at most 64): one script numbers and keeps them, and
one publication carries them, as a batch, ``*`` and each entry's length
(space-separated), a newline, then the entries back to back::

    *52 52
    7 Yx3k {"t":"TextMessage",...}8 Yx3k {"t":"TextMessage",...}

(Nodes of versions before batches cannot read them: upgrade every node of
a deployment together.)
The JSON object has ``t`` (the event's class name, ``state``,
``snapshot`` or ``expel``), ``o`` (the origin node), ``p`` (the origin's
publication number) and the event's fields; a ``bytes`` field (a binary
message's data, an image's PNG) follows the JSON raw, after a newline,
named by ``blob``.  JSON never contains a raw newline, so the first one
ends it.

``expel`` is the one control message: ``POST /api/disconnect`` on node
``o`` (see :mod:`broadcaster.core.moderation`), for every other node to
carry out on its own clients and bans; it is never delivered to a client,
and its origin ignores it::

    0 - {"t":"expel","o":"<node>","x":"<id>","by":"<API key id>","user":"u-1842",
         "client":null,"reason":"disconnected by the server","ban_seconds":600}

``x`` is the message's random id: with several ``--redis`` servers it is
published through each, and carried out once.

Presence across nodes: each node keeps its clients in its ``members`` hash,
changed in the same script that publishes the join, leave or rename, and
refreshes its ``alive`` key every --node-timeout / 3 seconds.  A node whose
key expired is removed by the first heartbeat (of any node) that notices,
which publishes an empty ``state`` for it: every node then announces that its
clients left.  Remote members are not hub members;
:mod:`broadcaster.redis.presence` keeps them for ``welcome`` and
``presence`` lists.

The parts: :mod:`broadcaster.redis.address` (``--redis`` URLs),
:mod:`broadcaster.redis.codec` (the wire format above),
:mod:`broadcaster.redis.presence`, :mod:`broadcaster.redis.scripts` (the Lua
scripts, ``.lua`` files beside it), :mod:`broadcaster.redis.commands` (the
command path), :mod:`broadcaster.redis.connections` (the two connections,
kept up), :mod:`broadcaster.redis.cluster` (the same over a Redis Cluster),
:mod:`broadcaster.redis.rooms` (which room channels are received),
:mod:`broadcaster.redis.ring` and :mod:`broadcaster.redis.shards` (rooms
spread over several servers, one such backplane each) and this module
(the backplane of one Redis).

When Redis is unreachable a node goes on serving its own clients: what they
publish is delivered locally, numbered in a local epoch
(``local-<node>-<n>``) that is never stored in Redis (the node keeps it,
within ``--history-memory``, until Redis is back).  The outage is logged once,
and again when Redis is back, with how many messages were delivered only
locally; on reconnecting the node registers again and publishes its
presence, so the others catch up with who came and went meanwhile.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional, Set, Tuple

import txredisapi
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.logger import Logger

from broadcaster.core.history import DEFAULT_MEMORY, HistoryMemory, RoomHistory, new_epoch
from broadcaster.core.backplane import Attached, node_entry, this_node
from broadcaster.core.events import PRESENCE_EVENTS, Event, TextMessage, uncached
from broadcaster.core.moderation import Expulsion, InvalidExpulsion, parse_expulsion
from broadcaster.core.names import LOBBY
from broadcaster.redis.address import RedisAddress
from broadcaster.redis.codec import (
    MESSAGES,
    decode_entry,
    dumps,
    encode_event,
    event_from,
    parse_event,
    split_batch,
)
from broadcaster.redis.commands import Script
from broadcaster.redis.connections import (
    HIREDIS,
    Commands,
    Connections,
    RedisConnections,
    Subscription,
)
from broadcaster.redis.presence import Presence
from broadcaster.redis.ring import Shard
from broadcaster.redis.rooms import GRACE, RoomChannels
from broadcaster.redis.scripts import (
    DEREGISTER,
    HEARTBEAT,
    MISSED,
    NODES,
    POSITION,
    PRESENCE,
    PUBLISH_TEXT,
    REGISTER,
)

#: Text messages of one room that one script numbers and publishes together.
MAX_BATCH = 64


class _Pending:
    """
    A publication of this node that its subscription has not brought back yet.

    :ivar stored: whether Redis answered that it took it.
    """

    __slots__ = ("event", "deferred", "stored", "comes_back")

    def __init__(self, event: Event, comes_back: bool = True) -> None:
        self.event = event
        self.deferred: Deferred = Deferred()
        self.stored = False
        #: Whether the subscription brings it back (not: a message to a
        #: room this node does not receive).
        self.comes_back = comes_back

    def fire(self, event: Event) -> None:
        if not self.deferred.called:
            self.deferred.callback(event)


class RedisBackplane:
    """
    The hubs of every node sharing one Redis, as one server.

    :param address: where Redis is.
    :param namespace: keeps apart deployments that share one Redis.
    :param history_size: text messages each room keeps (0: none).
    :param history_memory: bytes the outage fallback's histories may keep
        together (Redis's own memory is Redis's to bound: ``maxmemory``).
    :param node_timeout: seconds after which a node that stopped
        heartbeating is declared dead and its clients announced as gone.
    :param room_ttl: seconds a room's keys outlive its last use (a join,
        a recovery, a message; ``--room-ttl``); 0: for ever.
    :param clock: the reactor whose time stamps synthesized events
        (default: the global one).
    :param connections: the connections to Redis (default:
        :class:`~broadcaster.redis.connections.RedisConnections` to
        ``address``, made with ``clock``).  The backplane is their
        :class:`~broadcaster.redis.connections.Listener`.
    """

    name = "redis"

    #: Without hiredis, events from Redis reach the hub one reactor turn
    #: apart; without a short wait each would go out on its own (a send per
    #: client per message).  See :data:`~broadcaster.redis.connections.HIREDIS`.
    batch_delay = 0.0 if HIREDIS else 0.003
    _log = Logger()

    def __init__(
        self,
        address: RedisAddress,
        namespace: str = "default",
        history_size: int = 100,
        node_timeout: float = 15.0,
        clock: Optional[IReactorTime] = None,
        connections: Optional[Connections] = None,
        room_ttl: float = 7 * 24 * 3600,
        history_memory: int = DEFAULT_MEMORY,
        room_grace: float = GRACE,
        shard: Optional[Shard] = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        if connections is None:
            connections = RedisConnections(address, clock)
        self._connections = connections
        self.address = address
        self.namespace = namespace
        self.history_size = history_size
        self.node_timeout = node_timeout
        self._room_ttl = int(room_ttl * 1000)
        self._clock = clock
        self._prefix = "broadcaster:{}:".format(namespace)
        # The nodes' keys share one hash tag: the scripts that register
        # nodes and find the dead touch one slot of a cluster.
        self._node_prefix = "broadcaster:{{{}}}:".format(namespace)
        self.channel = self._prefix + "events" + (":db{}".format(address.db) if address.db else "")
        self.presence = Presence()
        self._token = os.urandom(8).hex()
        self._hub: Optional[Attached] = None
        self.node_id = ""
        self._running = False
        self._commands: Optional[Commands] = None
        self._subscriber: Optional[Subscription] = None
        self._registering = False
        self._conflict_logged = False
        self._gave_up_logged = False
        # The other live nodes, as last heard.
        self._peers: Set[str] = set()
        self._pids = itertools.count(1)
        # pid -> publication not yet back through the subscription
        self._unconfirmed: Dict[int, _Pending] = {}
        # pids delivered locally that the subscription must skip if they come
        self._abandoned: Set[int] = set()
        # Outages: while _down_since is set, publications are delivered
        # locally, text messages numbered in _local_epoch.
        self._outages = 0
        self._down_since: Optional[float] = None
        self._outage_logged = False
        self._local_only = 0
        self._local_epoch = ""
        self._fallback: Dict[str, RoomHistory] = {}
        # room -> text messages of this turn, not sent yet: (pid, publication, body)
        self._texts: Dict[str, List[Tuple[int, _Pending, bytes]]] = {}
        self._flush_call: Optional[IDelayedCall] = None
        #: Which rooms are this Redis's, when it is one of several.
        self.shard = shard if shard is not None else Shard()
        self.memory = self.shard.memory or HistoryMemory(history_memory, clock)
        #: Every --redis server of this node, by name: a node with others
        #: would keep some rooms on other servers (told in ``state``).
        self._servers = sorted(self.shard.servers or [address.shard_name()])
        self._told_servers: Set[str] = set()
        self._room_grace = room_grace
        #: The rooms whose channels this node receives (set when attached).
        self.rooms: Optional[RoomChannels] = None

    # Set-up

    def attach(self, hub: Attached) -> None:
        self._hub = hub
        self.node_id = hub.node_id
        self.presence = Presence(hub.roster)
        self.rooms = RoomChannels(
            self._clock,
            self._room_channel,
            self._read_position,
            hub.positioned,
            self._room_dropped,
            hub.deliver,
            self._room_grace,
            always=[room for room in (LOBBY,) if self.shard.owns(room)],
        )
        self._private_channel = self._prefix + "node:" + self.node_id
        self._nodes_key = self._node_prefix + "nodes"
        self._alive_key = self._node_key("alive")
        self._members_key = self._node_key("members")

    def _node_key(self, what: str) -> str:
        return "{}node:{}:{}".format(self._node_prefix, self.node_id, what)

    def _room_keys(self, room: str) -> List[str]:
        # One hash tag for all of a room's keys and its channel: one slot,
        # so that a script touches one shard of a cluster.
        base = "{}room:{{{}}}:".format(self._prefix, room)
        return [base + "seq", base + "epoch", base + "history"]

    def _room_channel(self, room: str) -> str:
        """
        The sharded channel a room's messages are published on.
        """
        return "{}room:{{{}}}{}".format(self._prefix, room, self._db_suffix)

    @property
    def _db_suffix(self) -> str:
        # Pub/sub ignores databases: deployments in two databases of one
        # Redis must not hear each other.
        return ":db{}".format(self.address.db) if self.address.db else ""

    @property
    def connected(self) -> bool:
        """
        Whether events go through Redis now.
        """
        return self._down_since is None

    def start(self) -> None:
        """
        Connect (and keep reconnecting) to Redis; until connected, serve
        this node's clients locally.
        """
        self._running = True
        self._begin_outage()
        self._log.info(
            "connecting to Redis at {url} as node {node} (namespace {namespace})",
            url=self.address.redacted(),
            node=self.node_id,
            namespace=self.namespace,
        )
        self._connections.connect(self)

    def stop(self) -> Deferred:
        """
        Tell the other nodes this node's clients are gone, and disconnect.
        """
        self._running = False
        if self.rooms is not None:
            self.rooms.stop()
        if self.connected:
            self._flush_texts()
            self._down_since = self._clock.seconds()
            done = self._eval(
                DEREGISTER,
                [self._nodes_key, self._alive_key, self._members_key],
                [self.node_id, self._token, self.channel, self._state_event({}, alive=False)],
            )
            done.addCallbacks(
                lambda _: self._log.info(
                    "node {node} left Redis: the other nodes know its clients are gone",
                    node=self.node_id,
                ),
                lambda failure: self._log.warn(
                    "node {node} could not leave Redis ({error}): the other nodes will"
                    " announce its clients gone within --node-timeout",
                    node=self.node_id,
                    error=failure.getErrorMessage(),
                ),
            )
        else:
            done = succeed(None)

        return done.addCallback(lambda _: self._connections.disconnect())

    # The connections tell (the Listener interface)

    def commands_ready(self, protocol: Commands) -> None:
        if not self._running:
            return
        self._commands = protocol
        self._try_register()

    def commands_lost(self, protocol: Commands) -> None:
        if self._commands is protocol:
            self._commands = None
            self._went_down("lost the connection")

    def subscription_ready(self, protocol: Subscription) -> None:
        if not self._running:
            return

        def subscribed(_):
            if protocol.connected and self._running:
                self._subscriber = protocol
                # Messages published before this subscription never come.
                self._abandoned.clear()
                self._try_register()

        protocol.subscribe([self.channel, self._private_channel]).addCallbacks(
            subscribed, lambda failure: None
        )

    def subscription_lost(self, protocol: Subscription) -> None:
        if self._subscriber is protocol:
            self._subscriber = None
            self.rooms.detach()
            self._went_down("lost the subscription")

    def connect_failed(self, failure: Failure) -> None:
        if self._running and not failure.check(CancelledError):
            self._went_down("cannot connect: {}".format(failure.getErrorMessage()))

    def gave_up(self, failure: Failure) -> None:
        # txredisapi stops retrying after a refused AUTH or SELECT: both
        # connections say so, once is enough.
        if self._gave_up_logged:
            return
        self._gave_up_logged = True
        self._log.error(
            "giving up on Redis at {url}: {error}; serving this node's clients only"
            " until restarted with a working --redis",
            url=self.address.redacted(),
            error=failure.getErrorMessage(),
            node=self.node_id,
        )

    def _run(self, *args) -> Deferred:
        """
        Send a command on the command connection.
        """
        return self._on_commands("run", *args)

    def _eval(self, script: Script, keys: List[str], args: List[Any]) -> Deferred:
        """
        Run a script on the command connection.
        """
        return self._on_commands("run_script", script, keys, args)

    def _on_commands(self, method: str, *args) -> Deferred:
        protocol = self._commands
        if protocol is None:
            return fail(txredisapi.ConnectionError("not connected to Redis"))
        return maybeDeferred(getattr(protocol, method), *args)

    # Registration and heartbeat

    def _state_event(self, members: Dict[str, Any], alive: bool = True) -> bytes:
        return b"0 - " + dumps(
            {
                "t": "state",
                "o": self.node_id,
                "node": self.node_id,
                "alive": alive,
                "members": members,
                "servers": self._servers,
            }
        )

    def _entry(self, member_id: str) -> str:
        """
        The ``members`` hash entry of a local member ('' once it is in no room).
        """
        member = self._hub.member(member_id)
        rooms = [room for room in self._hub.rooms_of(member_id) if self.shard.owns(room)]
        if member is None or not rooms:
            return ""
        return json.dumps({"name": member.name, "user": member.user, "rooms": rooms})

    def _try_register(self) -> None:
        """
        Once both connections are up: register this node and its members,
        publish its presence, and ask for everybody else's.
        """
        if (
            self._registering
            or self.connected
            or not self._running
            or self._commands is None
            or self._subscriber is None
        ):
            return
        self._registering = True
        members = {}
        pairs: List[str] = []
        for member in self._hub.members():
            entry = self._entry(member.id)
            if entry:
                members[member.id] = json.loads(entry)
                pairs += [member.id, entry]
        d = self._eval(
            REGISTER,
            [self._nodes_key, self._alive_key, self._members_key],
            [
                self.node_id,
                self._token,
                int(self.node_timeout * 1000),
                self.channel,
                self._state_event(members),
                self._private_channel,
                self._node_prefix,
                *pairs,
            ],
        )

        def registered(reply):
            if reply[0] == 0:
                if not self._conflict_logged:
                    self._conflict_logged = True
                    self._log.error(
                        "node id {node} is in use by another live server (or by one that"
                        " stopped less than --node-timeout ago); serving this node's clients"
                        " locally and retrying",
                        node=self.node_id,
                    )
                return
            self._conflict_logged = False
            if self._commands is not None and self._subscriber is not None and self._running:
                self._came_up()

        def failed(failure):
            self._log.warn(
                "registering with Redis failed ({error}); retrying",
                error=failure.getErrorMessage(),
            )

        def done(_):
            self._registering = False

        d.addCallbacks(registered, failed).addBoth(done)

    def heartbeat(self) -> None:
        """
        Keep this node alive in Redis and declare dead the nodes whose
        heartbeat stopped (called every --node-timeout / 3 seconds).
        """
        if not self._running or self._commands is None:
            return
        if not self.connected:
            self._try_register()
            return
        d = self._eval(
            HEARTBEAT,
            [self._nodes_key, self._alive_key],
            [self.node_id, self._token, int(self.node_timeout * 1000), self.channel, self._node_prefix],
        )

        def answered(reply):
            if int(reply[0]) == -1:
                self._went_down(
                    "this node's registration expired: was it blocked for longer than"
                    " --node-timeout?"
                )
                self._try_register()
                return
            for node in reply[1]:
                self._log.warn(
                    "node {dead} stopped heartbeating for {timeout:g} s; its clients are"
                    " announced as gone",
                    dead=node.decode("utf-8", "replace"),
                    timeout=self.node_timeout,
                )

        def failed(failure):
            if not failure.check(txredisapi.ConnectionError):
                self._went_down("heartbeat failed: {}".format(failure.getErrorMessage()))

        d.addCallbacks(answered, failed)

    # Up and down

    def _begin_outage(self) -> None:
        self._outages += 1
        self._down_since = self._clock.seconds()
        self._outage_logged = False
        self._local_only = 0
        self._local_epoch = "local-{}-{}".format(self.node_id, self._outages)
        self._forget_fallback()

    def _went_down(self, reason: str) -> None:
        if not self._running:
            return
        if self.connected:
            self._begin_outage()
            # What Redis has not brought back yet may never come: deliver it here.
            self._drop_queued_texts()
            pending, self._unconfirmed = self._unconfirmed, {}
            for pid, publication in pending.items():
                self._abandoned.add(pid)
                if publication.stored:
                    self._hub.deliver(publication.event)
                else:
                    self._deliver_locally(publication.event, publication)
        if not self._outage_logged:
            self._outage_logged = True
            self._log.error(
                "Redis at {url} unavailable ({reason}); serving {scope}"
                " locally until it is back",
                url=self.address.redacted(),
                reason=reason,
                node=self.node_id,
                scope=self.shard.scope,
            )

    def _came_up(self) -> None:
        if self._outage_logged:
            self._log.info(
                "Redis back after {seconds:.1f} s; {count} messages were delivered only locally",
                seconds=self._clock.seconds() - self._down_since,
                count=self._local_only,
                node=self.node_id,
            )
        else:
            self._log.info(
                "connected to Redis at {url} as node {node}",
                url=self.address.redacted(),
                node=self.node_id,
            )
        self._down_since = None
        self._forget_fallback()
        # With both connections up: receive the rooms this node has
        # members in, each from a position read after subscribing.
        self.rooms.attach(self._subscriber)

    def _forget_fallback(self) -> None:
        """
        Forget the histories kept locally during an outage, and their bytes.
        """
        for history in self._fallback.values():
            self.memory.release(history)
        self._fallback = {}

    def _deliver_locally(self, event: Event, publication: Optional[_Pending] = None) -> Deferred:
        """
        Deliver ``event`` to this node's clients only, numbering a text
        message in the outage's local epoch.
        """
        if isinstance(event, TextMessage):
            history = self._fallback.get(event.room)
            if history is None:
                history = self._fallback[event.room] = RoomHistory(
                    self.history_size, epoch=self._local_epoch, memory=self.memory
                )
            seq = history.next_seq()
            event = replace(event, seq=seq, epoch=history.epoch, kept=False)
            history.record(seq, uncached(event))
        self._hub.deliver(event)
        if isinstance(event, MESSAGES) and self._running:
            self._local_only += 1
        if publication is not None:
            publication.fire(event)
        return succeed(event)

    # The Backplane interface

    def publish(self, event: Event) -> Deferred:
        if not self.connected:
            return self._deliver_locally(event)
        if isinstance(event, MESSAGES) and self.rooms.received(event.room) and not self.rooms.ready(
            event.room
        ):
            # Published once the room's channel is received here, so that
            # it comes back (and after the position a joining member was told).
            return self.rooms.when_ready(event.room).addCallback(lambda _: self._publish(event))
        return self._publish(event)

    def _publish(self, event: Event) -> Deferred:
        if not self.connected:
            return self._deliver_locally(event)
        pid = next(self._pids)
        publication = _Pending(
            event, comes_back=not isinstance(event, MESSAGES) or self.rooms.ready(event.room)
        )
        if publication.comes_back:
            self._unconfirmed[pid] = publication
        body = encode_event(event, self.node_id, pid)
        if isinstance(event, TextMessage):
            self._queue_text(pid, publication, body)
            return publication.deferred
        # This node's publications reach Redis in the order they were made.
        self._flush_texts()
        if isinstance(event, MESSAGES):
            d = self._run("SPUBLISH", self._room_channel(event.room), b"0 - " + body)
        elif isinstance(event, PRESENCE_EVENTS):
            d = self._eval(
                PRESENCE,
                [self._alive_key, self._members_key],
                [
                    self._token,
                    self.channel,
                    event.member,
                    self._entry(event.member),
                    b"0 - " + body,
                ],
            )
        else:
            d = self._run("PUBLISH", self.channel, b"0 - " + body)
        d.addCallbacks(
            self._published,
            self._publish_failed,
            callbackArgs=(pid, publication),
            errbackArgs=(pid, publication),
        )
        return publication.deferred

    def _queue_text(self, pid: int, publication: _Pending, body: bytes) -> None:
        """
        Publish a text message with the others of its room that this
        reactor turn publishes: one script numbers them all, and one
        publication carries them to every node.  Per message, that spares
        Redis a script run and the nodes a message to read (S4: publisher
        and subscribers on two nodes).
        """
        self._texts.setdefault(publication.event.room, []).append((pid, publication, body))
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush_texts)

    def _flush_texts(self) -> None:
        """
        Send the text messages queued by :meth:`_queue_text`, at most
        :data:`MAX_BATCH` per script.
        """
        for room, queued in self._take_queued_texts().items():
            for start in range(0, len(queued), MAX_BATCH):
                batch = queued[start : start + MAX_BATCH]
                d = self._eval(
                    PUBLISH_TEXT,
                    self._room_keys(room),
                    [
                        self._room_channel(room),
                        new_epoch(),
                        self.history_size,
                        self._room_ttl,
                        *[body for _, _, body in batch],
                    ],
                )
                d.addCallbacks(
                    self._published_texts,
                    self._texts_failed,
                    callbackArgs=(batch,),
                    errbackArgs=(batch,),
                )

    def _published_texts(self, reply, batch) -> None:
        first, epoch = int(reply[0]), reply[1]
        for i, (pid, publication, _) in enumerate(batch):
            self._published((first + i, epoch), pid, publication)

    def _texts_failed(self, failure: Failure, batch) -> None:
        for pid, publication, _ in batch:
            self._publish_failed(failure, pid, publication)

    def _take_queued_texts(self) -> Dict[str, List[Tuple[int, _Pending, bytes]]]:
        """
        The text messages queued so far, by room, leaving none queued and
        no flush to come.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        texts, self._texts = self._texts, {}
        return texts

    def _drop_queued_texts(self) -> None:
        """
        Redis went away before the queued text messages were sent: those
        its subscription would have brought back are delivered locally
        with the others in flight (:meth:`_went_down`), the rest here.
        """
        for queued in self._take_queued_texts().values():
            for _, publication, _ in queued:
                if not publication.comes_back:
                    self._deliver_locally(publication.event, publication)

    def _published(self, reply, pid: int, publication: _Pending) -> None:
        if isinstance(publication.event, PRESENCE_EVENTS) and reply == 0:
            # Declared dead meanwhile: not published.  Registering again
            # tells the others the whole state, this change included.
            if self._unconfirmed.pop(pid, None) is not None:
                self._deliver_locally(publication.event, publication)
            self._went_down("this node's registration expired")
            self._try_register()
            return
        if isinstance(publication.event, TextMessage):
            seq, epoch = reply
            publication.event = replace(
                publication.event, seq=int(seq), epoch=epoch.decode("ascii")
            )
        publication.stored = True
        event = publication.event
        if not publication.comes_back:
            # In a room this node does not receive: it will not come back,
            # and is delivered here (for webhooks) as it would have been.
            self._hub.deliver(event)
        elif (
            isinstance(event, MESSAGES)
            and not self.rooms.received(event.room)
            and self._unconfirmed.pop(pid, None) is not None
        ):
            # Its room stopped being received meanwhile: likewise.
            self._abandoned.add(pid)
            self._hub.deliver(event)
        publication.fire(publication.event)

    def _publish_failed(self, failure, pid: int, publication: _Pending) -> None:
        if publication.comes_back and pid not in self._unconfirmed:
            # Already delivered: back through the subscription, or locally
            # when the outage began.
            publication.fire(publication.event)
            return
        # The outage delivers what is unconfirmed here, this one with the
        # others, in the order they were published.
        self._went_down("publishing failed: {}".format(failure.getErrorMessage()))
        if self._unconfirmed.pop(pid, None) is not None or not publication.comes_back:
            self._abandoned.add(pid)
            self._deliver_locally(publication.event, publication)

    def message_received(self, channel: bytes, message: bytes) -> None:
        """
        An event from the subscription: deliver it to the hub.
        """
        if message[:1] == b"*":
            # Several text messages of a room, published together.
            try:
                entries = split_batch(message)
            except ValueError as e:
                self._log.error(
                    "ignored an unreadable batch ({size} bytes) on {channel}: {error}",
                    size=len(message),
                    channel=channel,
                    error=e,
                )
                return
            for entry in entries:
                self.message_received(channel, entry)
            return
        try:
            body, blob, seq, epoch = decode_entry(message)
            kind = body.get("t")
            if kind == "snapshot":
                if channel.decode("utf-8", "replace") == self._private_channel:
                    self._apply_snapshot(body.get("nodes"))
                return
            if kind == "expel":
                self._expelled(body)
                return
            if kind == "state":
                node = body.get("node")
                if node != self.node_id:
                    self._compare_servers(node, body.get("servers"))
                    if body.get("alive"):
                        self._peers.add(node)
                    else:
                        self._peers.discard(node)
                    self._replace(node, body.get("members"))
                return
            event = event_from(body, blob, seq, epoch)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._log.error(
                "ignored an unreadable message ({size} bytes) on {channel}: {error}",
                size=len(message),
                channel=channel,
                error=e,
            )
            return
        origin = body.get("o")
        if origin == self.node_id:
            pid = body.get("p")
            if pid in self._abandoned:
                self._abandoned.discard(pid)
                return
            publication = self._unconfirmed.pop(pid, None)
            if publication is not None:
                publication.event = event
        elif isinstance(event, PRESENCE_EVENTS):
            self.presence.apply(origin, event)
        if isinstance(event, MESSAGES):
            self.rooms.receive(event)
        else:
            self._hub.deliver(event)

    def spread(self, expulsion: Expulsion, ident: Optional[str] = None) -> Deferred:
        """
        Publish an ``expel`` control message on the events channel: every
        other node carries it out (:meth:`_expelled`).

        :param ident: the message's id (default: a new one); the same id
            sent through several Redis servers is carried out once.
        """
        if not self.connected:
            return succeed(False)
        body = {
            "t": "expel",
            "o": self.node_id,
            "x": ident or os.urandom(8).hex(),
            "by": expulsion.by,
            **expulsion.fields(),
        }

        def failed(failure: Failure) -> bool:
            self._log.error(
                "could not tell the other nodes to disconnect {target}: {error}",
                target=expulsion.target(),
                error=failure.getErrorMessage(),
            )
            return False

        d = self._run("PUBLISH", self.channel, b"0 - " + dumps(body))
        return d.addCallbacks(lambda _: True, failed)

    def _compare_servers(self, node: Any, servers: Any) -> None:
        """
        Say (once per node) if ``node`` was given other ``--redis`` servers
        than this one: the two would each put some rooms on a server where
        the other does not look for them.
        """
        if not isinstance(servers, list) or servers == self._servers or node in self._told_servers:
            return
        self._told_servers.add(node)
        self._log.error(
            "node {other} was given other --redis servers ({theirs}) than this node"
            " ({ours}): some rooms are kept on one server by one and on another by the"
            " other, and their members do not hear each other; give every node the same"
            " --redis servers",
            other=str(node),
            theirs=", ".join(map(str, servers)),
            ours=", ".join(self._servers),
            node=self.node_id,
        )

    def _expelled(self, body: Dict[str, Any]) -> None:
        """
        Carry out an ``expel`` control message from another node (this
        node carried out its own already); it goes to no client.
        """
        origin = body.get("o")
        if origin == self.node_id:
            return
        ident = body.get("x")
        if isinstance(ident, str) and not self.shard.first_time(ident):
            # Heard already through another --redis server.
            return
        try:
            expulsion = parse_expulsion(body, by=str(body.get("by"))[:16])
        except InvalidExpulsion as e:
            self._log.error(
                "ignored an expel message from node {origin}: {error}", origin=origin, error=e
            )
            return
        self._hub.expel_here(expulsion, origin=str(origin))

    def _replace(self, node: str, members: Any) -> None:
        if not isinstance(members, dict):
            members = {}
        for event in self.presence.replace(node, members, self._clock.seconds()):
            self._hub.deliver(event)

    def _apply_snapshot(self, nodes: Any) -> None:
        if not isinstance(nodes, dict):  # cjson writes an empty table as {}
            nodes = {}
        self._peers = set(nodes) - {self.node_id}
        for node, flat in nodes.items():
            if node == self.node_id:
                continue
            members = {}
            if isinstance(flat, list):
                for i in range(0, len(flat) - 1, 2):
                    members[flat[i]] = json.loads(flat[i + 1])
            self._replace(node, members)
        for node in self.presence.nodes():
            if node not in nodes:
                self._replace(node, {})

    def position(self, room: str) -> Deferred:
        if not self.connected:
            return succeed(self._local_position(room))
        # Once the room is received here: later messages arrive live.
        d = self.rooms.when_ready(room).addCallback(lambda _: self._read_position(room))
        # The welcome waits for this: never leave a client without one.
        return d.addErrback(lambda failure: self._local_position(room))

    def _read_position(self, room: str) -> Deferred:
        """
        Where ``room``'s sequence stands in Redis now.
        """
        d = self._eval(POSITION, self._room_keys(room), [new_epoch(), self._room_ttl])
        return d.addCallback(lambda reply: (reply[0].decode("ascii"), int(reply[1])))

    def room_occupied(self, room: str) -> None:
        self.rooms.occupy(room)

    def room_vacated(self, room: str) -> None:
        self.rooms.vacate(room)

    def _room_dropped(self, room: str) -> None:
        """
        ``room``'s channel is no longer received: its publications of this
        node that Redis took will not come back, and are delivered here.
        """
        self._hub.forget_position(room)
        for pid, publication in list(self._unconfirmed.items()):
            if publication.stored and getattr(publication.event, "room", None) == room:
                del self._unconfirmed[pid]
                self._abandoned.add(pid)
                self._hub.deliver(publication.event)

    def _local_position(self, room: str) -> Tuple[str, int]:
        history = self._fallback.get(room)
        return self._local_epoch, (history.seq if history is not None else 0)

    def history(self, room: str, limit: int, before: Optional[int] = None) -> Deferred:
        if limit <= 0:
            return succeed([])
        if not self.connected:
            history = self._fallback.get(room)
            return succeed(history.last(limit, before) if history is not None else [])
        if before is None:
            d = self._run("LRANGE", self._room_keys(room)[2], -limit, -1)
            return d.addCallback(lambda entries: [parse_event(entry) for entry in entries])

        def older(entries):
            # The whole kept history (--history-size entries) is read, then
            # those before the cursor picked.
            messages = [parse_event(entry) for entry in entries]
            return [m for m in messages if m.seq < before][-limit:]

        return self._run("LRANGE", self._room_keys(room)[2], 0, -1).addCallback(older)

    def missed(
        self, room: str, epoch: str, seq: int, joined_at: Optional[Tuple[str, int]]
    ) -> Deferred:
        if not self.connected:
            history = self._fallback.get(room)
            if history is not None and epoch == history.epoch:
                return succeed(history.after(epoch, seq))
            # What happened elsewhere meanwhile cannot be known now.
            return succeed(([], False))

        def answered(reply):
            current, last, entries = reply[0].decode("ascii"), int(reply[1]), reply[2]
            history: RoomHistory = RoomHistory(self.history_size, epoch=current)
            history.seq = last
            for entry in entries:
                message = parse_event(entry)
                history.record(message.seq, message)
            if joined_at is None:
                upto = None
            elif joined_at[0] == current:
                upto = joined_at[1]
            else:
                # The sequence restarted since the member joined (Redis
                # lost its data): all of this epoch reached it live.
                upto = 0
            return history.after(epoch, seq, upto=upto)

        return self._eval(
            MISSED, self._room_keys(room), [new_epoch(), self._room_ttl]
        ).addCallback(answered)

    def state(self) -> dict:
        """
        For /healthz: while Redis is unreachable, also for how long and how
        many messages this node delivered to its own clients only meanwhile.
        """
        state = {
            "kind": self.name,
            "connected": self.connected,
            "url": self.address.redacted(),
            "node": self.node_id,
            # This one and the others it knows of.
            "nodes": 1 + len(self._peers),
            "namespace": self.namespace,
        }
        if not self.connected:
            state["down_for"] = round(self._clock.seconds() - self._down_since, 1)
            state["local_only"] = self._local_only
        return state

    def nodes(self) -> Deferred:
        """
        The nodes registered in Redis, each with the clients its members
        hash lists (those in at least one room) and the seconds since its
        last heartbeat (taken from what its ``alive`` key has left to live:
        nodes of one deployment share ``--node-timeout``).  While Redis is
        unreachable, this node alone, as it knows itself.
        """
        if not self.connected:
            return succeed([this_node(self._hub)])

        def answered(reply) -> List[dict]:
            nodes = []
            for i in range(0, len(reply) - 2, 3):
                node = reply[i].decode("utf-8", "replace")
                left = int(reply[i + 1])
                alive = left > 0
                age = round(max(0.0, self.node_timeout - left / 1000), 1) if alive else None
                nodes.append(node_entry(node, int(reply[i + 2]), age, node == self.node_id, alive))
            return sorted(nodes, key=lambda entry: entry["node"])

        return self._eval(NODES, [self._nodes_key], [self._node_prefix]).addCallback(answered)


class RedisBackplaneService(MultiService):
    """
    Connects the backplane when started (without waiting: until Redis is
    reachable the node serves its own clients), heartbeats every
    --node-timeout / 3 seconds, and deregisters and disconnects when stopped.
    """

    def __init__(self, backplane: RedisBackplane, reactor) -> None:
        super().__init__()
        self.backplane = backplane
        self._reactor = reactor
        heartbeat = TimerService(backplane.node_timeout / 3, backplane.heartbeat)
        heartbeat.clock = reactor
        heartbeat.setServiceParent(self)

    def startService(self) -> None:
        self.backplane.start()
        super().startService()

    def stopService(self) -> Deferred:
        d = maybeDeferred(super().stopService)
        return d.addCallback(lambda _: self.backplane.stop())
