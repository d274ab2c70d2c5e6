"""
The Redis backplane: several broadcaster nodes behind one Redis act as one
server (``--redis``).

Every node publishes what its hub hands it on one pub/sub channel and
delivers to its hub what arrives there, its own events included; so a node
delivers each of its clients' messages exactly once, and every node sees the
events of a room in one and the same order.  Text messages are numbered,
kept and published by one Lua script, atomically: a room's sequence has no
gaps and no two messages share a number, whichever node they came through.

What lives in Redis (every key starts with ``broadcaster:<namespace>:``)::

    room:<room>:epoch    the room's epoch (random; set when missing, which
                         restarts the sequence: Redis lost its data)
    room:<room>:seq      the room's last sequence number
    room:<room>:history  its last --history-size messages, as published
    nodes                the ids of the registered nodes
    node:<id>:alive      the node's random token, expiring --node-timeout
                         seconds after its last heartbeat
    node:<id>:members    client id -> {"name": ..., "rooms": [...]}

Channels: ``broadcaster:<namespace>:events`` (``...:events:db<N>`` for a
database other than 0, since pub/sub ignores databases) carries every event;
``broadcaster:<namespace>:node:<id>`` carries the presence snapshot a node
asks for when it (re)connects.

Wire format of a published event (and of a history entry)::

    <seq> SP <epoch> SP <JSON> [LF <bytes>]

``seq`` and ``epoch`` are ``0`` and ``-`` for anything but a text message.
The JSON object has ``t`` (the event's class name, ``state`` or
``snapshot``), ``o`` (the origin node), ``p`` (the origin's publication
number) and the event's fields; a ``bytes`` field (a binary message's data,
an image's PNG) follows the JSON raw, after a newline, named by ``blob``.
JSON never contains a raw newline, so the first one ends it.

Presence across nodes: each node keeps its clients in its ``members`` hash,
changed in the same script that publishes the join, leave or rename, and
refreshes its ``alive`` key every --node-timeout / 3 seconds.  A node whose
key expired is removed by the first heartbeat (of any node) that notices,
which publishes an empty ``state`` for it: every node then announces that its
clients left.  Remote members are not hub members; this module keeps them
(:class:`Presence`) for ``welcome`` and ``presence`` lists.

When Redis is unreachable a node goes on serving its own clients: what they
publish is delivered locally, numbered in a local epoch
(``local-<node>-<n>``) that is never stored.  The outage is logged once,
and again when Redis is back, with how many messages were delivered only
locally; on reconnecting the node registers again and publishes its
presence, so the others catch up with who came and went meanwhile.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from broadcaster.core.history import RoomHistory, new_epoch
from broadcaster.core.backplane import Attached
from broadcaster.core.events import (
    BinaryMessage,
    Event,
    ImageMessage,
    Joined,
    Left,
    Renamed,
    TextMessage,
)
from broadcaster.redis.commands import BackplaneConnection, CommandProtocol, Script

#: Seconds a command may wait for Redis's answer before the connection is
#: given up as dead (and re-established).
REPLY_TIMEOUT = 5.0

#: Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5.0

#: Whether txredisapi parses replies with hiredis (a dependency).  Its
#: pure-Python parser, the fallback, handles one bulk string of a reply per
#: reactor turn (it pauses the connection and goes on with a ``callLater(0)``,
#: two epoll changes each time), so the events of one read reach the hub
#: turns apart, and each goes out on its own unless the hub waits for the
#: next.  With hiredis a read's events reach the hub in the turn that read
#: them, and go out together as a single node's do.
HIREDIS = txredisapi.hiredis is not None

_EVENT_CLASSES = {
    cls.__name__: cls for cls in (Joined, Left, Renamed, TextMessage, BinaryMessage, ImageMessage)
}
#: Each event class's fields, and those :func:`encode_event` sends (the
#: rest are the wire cache and what the publishing script sets), looked up
#: once rather than per message.
_FIELDS = {cls: tuple(field.name for field in fields(cls)) for cls in _EVENT_CLASSES.values()}
_SENT_FIELDS = {
    cls: tuple(name for name in names if name not in ("wire", "seq", "epoch", "kept"))
    for cls, names in _FIELDS.items()
}
_PRESENCE = (Joined, Left, Renamed)
_MESSAGES = (TextMessage, BinaryMessage, ImageMessage)


# Addresses


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is: a TCP host and port, or a Unix socket path.
    """

    host: Optional[str] = None
    port: int = 6379
    path: Optional[str] = None
    db: int = 0
    password: Optional[str] = None
    username: Optional[str] = None

    def endpoint(self, reactor) -> IStreamClientEndpoint:
        """
        A client endpoint that connects to it.
        """
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=CONNECT_TIMEOUT)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)

    def redacted(self) -> str:
        """
        The address as a URL without the password, for logs and /healthz.
        """
        if self.path is not None:
            return "unix:{}{}".format(self.path, "?db={}".format(self.db) if self.db else "")
        credentials = ""
        if self.password is not None:
            credentials = "{}:***@".format(self.username or "")
        host = "[{}]".format(self.host) if ":" in self.host else self.host
        return "redis://{}{}:{}/{}".format(credentials, host, self.port, self.db)


_URL_FORMS = "redis://[[user]:password@]host[:port][/db] or unix:/path/to/redis.sock[?db=N]"


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("the database must be a number, not {!r}".format(text))
    return int(text)


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read ``redis://[[user]:password@]host[:port][/db]`` or
    ``unix:/path/to/redis.sock[?db=N][&password=...]``.

    :raise ValueError: with the reason, if ``url`` is neither.
    """
    if url.startswith("unix:"):
        path, _, query = url[len("unix:") :].partition("?")
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise ValueError(
                "a unix: address needs an absolute socket path, e.g. {}".format(_URL_FORMS)
            )
        params = parse_qs(query, keep_blank_values=True)
        unknown = set(params) - {"db", "password"}
        if unknown:
            raise ValueError(
                "unknown parameter {!r} (db and password are known)".format(sorted(unknown)[0])
            )
        db = _db(params["db"][-1]) if "db" in params else 0
        password = params["password"][-1] if "password" in params else None
        return RedisAddress(path=unquote(path), db=db, password=password or None)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError("{} (expected {})".format(e, _URL_FORMS)) from None
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("expected {}".format(_URL_FORMS))
    if parts.query or parts.fragment:
        raise ValueError("unexpected query or fragment in {!r}".format(url))
    db_path = parts.path.strip("/")
    return RedisAddress(
        host=parts.hostname,
        port=port or 6379,
        db=_db(db_path) if db_path else 0,
        password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None,
    )


# Events on the wire


def encode_event(event: Event, node: str, pid: int) -> bytes:
    """
    The JSON (and raw bytes) of ``event``, without the ``seq``/``epoch``
    prefix; a text message's ``seq`` and ``epoch`` are left out (the
    publishing script sets them in the prefix).
    """
    cls = type(event)
    body: Dict[str, Any] = {"t": cls.__name__, "o": node, "p": pid}
    blob = None
    for name in _SENT_FIELDS[cls]:
        value = getattr(event, name)
        if isinstance(value, bytes):
            body["blob"] = name
            blob = value
        else:
            body[name] = value
    head = _dumps(body)
    return head if blob is None else head + b"\n" + blob


#: One encoder for every event: ``json.dumps`` with options builds a new
#: one per call.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(obj: Any) -> bytes:
    return _encode_json(obj).encode("utf-8")


def decode_entry(entry: bytes) -> Tuple[Dict[str, Any], Optional[bytes], int, str]:
    """
    Split a published event or history entry.

    :return: ``(body, blob, seq, epoch)``.
    :raise ValueError: if it is not one.
    """
    seq, epoch, rest = entry.split(b" ", 2)
    head, newline, blob = rest.partition(b"\n")
    body = json.loads(head)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body, (blob if newline else None), int(seq), epoch.decode("ascii")


def event_from(body: Dict[str, Any], blob: Optional[bytes], seq: int, epoch: str) -> Event:
    """
    The hub event that :func:`encode_event` encoded.

    :raise ValueError: for anything else.
    """
    cls = _EVENT_CLASSES.get(body.get("t"))
    if cls is None:
        raise ValueError("unknown event type {!r}".format(body.get("t")))
    values = {name: body[name] for name in _FIELDS[cls] if name in body}
    if "blob" in body:
        values[body["blob"]] = blob or b""
    if cls is TextMessage:
        values.update(seq=seq, epoch=epoch)
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(str(e)) from None


def parse_event(entry: bytes) -> Event:
    """
    The hub event of a published message or history entry.
    """
    return event_from(*decode_entry(entry))


# Presence of the other nodes


@dataclass(frozen=True)
class RemoteMember:
    """
    A client of another node, as listed in ``welcome`` and ``presence``.
    """

    id: str
    name: Optional[str]


class Presence:
    """
    Who is connected to the other nodes, in which rooms, as last heard:
    kept up to date by their join, leave and rename events and replaced
    wholesale by a node's ``state`` (when it registers or is declared dead)
    or a snapshot (when this node reconnects).
    """

    def __init__(self) -> None:
        # node -> member id -> [name, {room: None} in the order it joined]
        self._nodes: Dict[str, Dict[str, list]] = {}
        # room -> member id -> RemoteMember, in the order they joined
        self._rooms: Dict[str, Dict[str, RemoteMember]] = {}

    def members(self, room: str) -> List[RemoteMember]:
        """
        The other nodes' members of ``room``.
        """
        return list(self._rooms.get(room, {}).values())

    def nodes(self) -> List[str]:
        """
        The nodes that have members.
        """
        return list(self._nodes)

    def apply(self, node: str, event: Event) -> None:
        """
        Take a join, leave or rename from ``node`` into account.
        """
        if isinstance(event, Joined):
            self._join(node, event.member, event.name, event.room)
        elif isinstance(event, Left):
            self._leave(node, event.member, event.room)
        elif isinstance(event, Renamed):
            self._rename(node, event.member, event.name)

    def replace(self, node: str, members: Dict[str, Dict[str, Any]], ts: float) -> List[Event]:
        """
        Make ``members`` (id -> ``{"name", "rooms"}``) the members of
        ``node``.

        :return: the leaves, renames and joins that the difference amounts
            to, for the hub to announce.
        """
        events: List[Event] = []
        for member, (name, rooms) in list(self._nodes.get(node, {}).items()):
            now_in = (members.get(member) or {}).get("rooms") or ()
            for room in list(rooms):
                if room not in now_in:
                    events.append(Left(ts=ts, room=room, member=member, name=name))
                    self._leave(node, member, room)
        for member, entry in members.items():
            name = entry.get("name")
            known = self._nodes.get(node, {}).get(member)
            if known is not None and known[0] != name:
                for room in known[1]:
                    events.append(Renamed(ts=ts, room=room, member=member, name=name))
                self._rename(node, member, name)
            for room in entry.get("rooms") or ():
                known = self._nodes.get(node, {}).get(member)
                if known is None or room not in known[1]:
                    events.append(Joined(ts=ts, room=room, member=member, name=name))
                    self._join(node, member, name, room)
        return events

    def _join(self, node: str, member: str, name: Optional[str], room: str) -> None:
        entry = self._nodes.setdefault(node, {}).setdefault(member, [name, {}])
        entry[1][room] = None
        self._rooms.setdefault(room, {})[member] = RemoteMember(member, entry[0])

    def _leave(self, node: str, member: str, room: str) -> None:
        members = self._nodes.get(node, {})
        entry = members.get(member)
        if entry is None or room not in entry[1]:
            return
        del entry[1][room]
        occupants = self._rooms[room]
        del occupants[member]
        if not occupants:
            del self._rooms[room]
        if not entry[1]:
            del members[member]
            if not members:
                del self._nodes[node]

    def _rename(self, node: str, member: str, name: Optional[str]) -> None:
        entry = self._nodes.get(node, {}).get(member)
        if entry is None:
            return
        entry[0] = name
        for room in entry[1]:
            self._rooms[room][member] = RemoteMember(member, name)


# Lua scripts: each runs atomically, so every node sees their effects and
# their publications in one order.

_CURRENT_EPOCH = """
local function current_epoch(seq_key, epoch_key, history_key, candidate)
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    -- A new run of the room's sequence: nothing of an older one may linger.
    epoch = candidate
    redis.call('SET', epoch_key, epoch)
    redis.call('SET', seq_key, 0)
    redis.call('DEL', history_key)
  end
  return epoch
end
"""

# KEYS: seq, epoch, history.  ARGV: channel, body, candidate epoch, history size.
PUBLISH_TEXT = Script(_CURRENT_EPOCH + """
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[3])
local seq = redis.call('INCR', KEYS[1])
local entry = string.format('%d %s ', seq, epoch) .. ARGV[2]
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('RPUSH', KEYS[3], entry)
  redis.call('LTRIM', KEYS[3], -size, -1)
end
redis.call('PUBLISH', ARGV[1], entry)
return {seq, epoch}
""")

# KEYS: seq, epoch, history.  ARGV: candidate epoch.
POSITION = Script(_CURRENT_EPOCH + """
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return {epoch, tonumber(redis.call('GET', KEYS[1]) or '0')}
""")

# KEYS: seq, epoch, history.  ARGV: candidate epoch.
MISSED = Script(_CURRENT_EPOCH + """
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return {epoch, tonumber(redis.call('GET', KEYS[1]) or '0'), redis.call('LRANGE', KEYS[3], 0, -1)}
""")

# KEYS: alive, members.  ARGV: token, channel, member id, entry ('' once
# it is in no room), event.  Refused (0) unless this node is registered, so
# a node declared dead cannot leave members behind.
PRESENCE = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
redis.call('PUBLISH', ARGV[2], ARGV[5])
return 1
""")

# KEYS: nodes, alive, members.  ARGV: node, token, ttl (ms), channel, state
# event, private channel, key prefix, then member id and entry pairs.
# Returns {0} if another live server holds this node id, else {1, nodes}.
REGISTER = Script("""
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return {0} end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
-- Everybody else's members, for this node alone, at this point of the
-- event stream: it applies what follows on top.
local nodes = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] and redis.call('EXISTS', ARGV[7] .. 'node:' .. node .. ':alive') == 1 then
    nodes[node] = redis.call('HGETALL', ARGV[7] .. 'node:' .. node .. ':members')
  end
end
redis.call('PUBLISH', ARGV[6], '0 - ' .. cjson.encode({t = 'snapshot', nodes = nodes}))
return {1, redis.call('SCARD', KEYS[1])}
""")

# KEYS: nodes, alive.  ARGV: node, token, ttl (ms), channel, key prefix.
# Returns {-1} if this node is no longer registered, else {nodes, {dead...}}.
HEARTBEAT = Script("""
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return {-1} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local dead = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] and redis.call('EXISTS', ARGV[5] .. 'node:' .. node .. ':alive') == 0 then
    -- Its heartbeat stopped.  Removing it here, in one script, means one
    -- node alone announces it: every node then says its clients left.
    redis.call('SREM', KEYS[1], node)
    redis.call('DEL', ARGV[5] .. 'node:' .. node .. ':members')
    local state = {t = 'state', node = node, alive = false, members = {}}
    redis.call('PUBLISH', ARGV[4], '0 - ' .. cjson.encode(state))
    table.insert(dead, node)
  end
end
return {redis.call('SCARD', KEYS[1]), dead}
""")

# KEYS: nodes, alive, members.  ARGV: node, token, channel, empty state event.
DEREGISTER = Script("""
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
""")


# Connections


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """
    Tells the backplane about each failed connection attempt (txredisapi
    retries them quietly).
    """

    def __init__(self, endpoint: IStreamClientEndpoint, failed, url: str) -> None:
        self._endpoint = endpoint
        self._failed = failed
        self._url = url

    def __repr__(self) -> str:
        # Twisted logs it with every reconnection attempt.
        return "Redis at {}".format(self._url)

    def connect(self, factory) -> Deferred:
        def failed(failure):
            self._failed(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)


class _Subscriber(BackplaneConnection, txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message) -> None:
        self.factory.backplane._received(channel, message)


class _Factory(txredisapi.RedisFactory):
    """
    One reconnecting connection that tells the backplane when it is ready
    and when it is lost.  Replies stay bytes: numbers and text are decoded
    here, where their meaning is known.
    """

    initialDelay = 0.5
    maxDelay = 10

    def __init__(self, backplane: "RedisBackplane", subscriber: bool) -> None:
        address = backplane.address
        super().__init__(
            address.redacted(),
            None if subscriber else address.db,
            1,
            isLazy=True,
            charset=None,
            password=address.password,
            replyTimeout=None if subscriber else REPLY_TIMEOUT,
            convertNumbers=False,
            username=address.username,
        )
        self.protocol = _Subscriber if subscriber else CommandProtocol
        self.clock = backplane._clock
        self.backplane = backplane
        self._subscriber = subscriber
        # Fires once the first connection is ready, fails only if txredisapi
        # gives up (e.g. a wrong password): the backplane logs that.
        self.deferred.addErrback(backplane._gave_up)

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        ready, lost = (
            (self.backplane._subscriber_ready, self.backplane._subscriber_lost)
            if self._subscriber
            else (self.backplane._commands_ready, self.backplane._commands_lost)
        )
        protocol.whenConnected().addCallback(ready)
        protocol.whenDisconnected().addCallback(lost)
        return protocol


class _Pending:
    """
    A publication of this node that its subscription has not brought back yet.

    :ivar stored: whether Redis answered that it took it.
    """

    __slots__ = ("event", "deferred", "stored")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.deferred: Deferred = Deferred()
        self.stored = False

    def fire(self, event: Event) -> None:
        if not self.deferred.called:
            self.deferred.callback(event)


class RedisBackplane:
    """
    The hubs of every node sharing one Redis, as one server.

    :param address: where Redis is.
    :param namespace: keeps apart deployments that share one Redis.
    :param history_size: text messages each room keeps (0: none).
    :param node_timeout: seconds after which a node that stopped
        heartbeating is declared dead and its clients announced as gone.
    :param clock: the reactor whose time stamps synthesized events and
        which :meth:`start` connects with unless given another (default:
        the global one).
    """

    name = "redis"
    _log = Logger()

    def __init__(
        self,
        address: RedisAddress,
        namespace: str = "default",
        history_size: int = 100,
        node_timeout: float = 15.0,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.address = address
        self.namespace = namespace
        self.history_size = history_size
        self.node_timeout = node_timeout
        self._clock = clock
        self._prefix = "broadcaster:{}:".format(namespace)
        self.channel = self._prefix + "events" + (":db{}".format(address.db) if address.db else "")
        self.presence = Presence()
        self._token = os.urandom(8).hex()
        self._hub: Optional[Attached] = None
        self.node_id = ""
        self._running = False
        self._factories: List[_Factory] = []
        self._commands = None
        self._subscriber = None
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

    # Set-up

    def attach(self, hub: Attached) -> None:
        self._hub = hub
        self.node_id = hub.node_id
        self._private_channel = self._prefix + "node:" + self.node_id
        self._nodes_key = self._prefix + "nodes"
        self._alive_key = self._node_key("alive")
        self._members_key = self._node_key("members")

    def _node_key(self, what: str) -> str:
        return "{}node:{}:{}".format(self._prefix, self.node_id, what)

    def _room_keys(self, room: str) -> List[str]:
        base = "{}room:{}:".format(self._prefix, room)
        return [base + "seq", base + "epoch", base + "history"]

    @property
    def connected(self) -> bool:
        """
        Whether events go through Redis now.
        """
        return self._down_since is None

    def start(self, reactor=None) -> None:
        """
        Connect (and keep reconnecting) to Redis; until connected, serve
        this node's clients locally.
        """
        if reactor is None:
            reactor = self._clock
        self._running = True
        self._begin_outage()
        endpoint = _WatchedEndpoint(
            self.address.endpoint(reactor), self._connect_failed, self.address.redacted()
        )
        self._factories = [_Factory(self, subscriber=False), _Factory(self, subscriber=True)]
        for factory in self._factories:
            factory.startConnecting(endpoint)
        self._log.info(
            "connecting to Redis at {url} as node {node} (namespace {namespace})",
            url=self.address.redacted(),
            node=self.node_id,
            namespace=self.namespace,
        )
        if not HIREDIS:
            self._log.warn(
                "hiredis is not installed: Redis replies are parsed in Python, one"
                " at a time (pip install hiredis for the cross-node throughput)"
            )

    def stop(self) -> Deferred:
        """
        Tell the other nodes this node's clients are gone, and disconnect.
        """
        self._running = False
        if self.connected:
            self._down_since = self._clock.seconds()
            done = self._eval(
                DEREGISTER,
                [self._nodes_key, self._alive_key, self._members_key],
                [self.node_id, self._token, self.channel, self._state_event({}, alive=False)],
            ).addErrback(lambda failure: None)
        else:
            done = succeed(None)

        def disconnect(_):
            return gatherResults(
                [factory.disconnect() for factory in self._factories], consumeErrors=True
            ).addErrback(lambda failure: None)

        return done.addCallback(disconnect)

    # The connections

    def _commands_ready(self, protocol) -> None:
        if not self._running:
            return
        self._commands = protocol
        self._try_register()

    def _commands_lost(self, protocol) -> None:
        if self._commands is protocol:
            self._commands = None
            self._went_down("lost the connection")

    def _subscriber_ready(self, protocol) -> None:
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

    def _subscriber_lost(self, protocol) -> None:
        if self._subscriber is protocol:
            self._subscriber = None
            self._went_down("lost the subscription")

    def _connect_failed(self, failure) -> None:
        if self._running and not failure.check(CancelledError):
            self._went_down("cannot connect: {}".format(failure.getErrorMessage()))

    def _gave_up(self, failure) -> None:
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
        return b"0 - " + _dumps(
            {
                "t": "state",
                "o": self.node_id,
                "node": self.node_id,
                "alive": alive,
                "members": members,
            }
        )

    def _entry(self, member_id: str) -> str:
        """
        The ``members`` hash entry of a local member ('' once it is in no room).
        """
        member = self._hub.member(member_id)
        rooms = self._hub.rooms_of(member_id)
        if member is None or not rooms:
            return ""
        return json.dumps({"name": member.name, "rooms": rooms})

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
                self._prefix,
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
            [self.node_id, self._token, int(self.node_timeout * 1000), self.channel, self._prefix],
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
        self._fallback = {}

    def _went_down(self, reason: str) -> None:
        if not self._running:
            return
        if self.connected:
            self._begin_outage()
            # What Redis has not brought back yet may never come: deliver it here.
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
                "Redis at {url} unavailable ({reason}); serving this node's clients"
                " locally until it is back",
                url=self.address.redacted(),
                reason=reason,
                node=self.node_id,
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
                    self.history_size, epoch=self._local_epoch
                )
            seq = history.next_seq()
            event = replace(event, seq=seq, epoch=history.epoch, kept=False)
            history.record(seq, event)
        self._hub.deliver(event)
        if isinstance(event, _MESSAGES) and self._running:
            self._local_only += 1
        if publication is not None:
            publication.fire(event)
        return succeed(event)

    # The Backplane interface

    def publish(self, event: Event) -> Deferred:
        if not self.connected:
            return self._deliver_locally(event)
        pid = next(self._pids)
        publication = self._unconfirmed[pid] = _Pending(event)
        body = encode_event(event, self.node_id, pid)
        if isinstance(event, TextMessage):
            d = self._eval(
                PUBLISH_TEXT,
                self._room_keys(event.room),
                [self.channel, body, new_epoch(), self.history_size],
            )
        elif isinstance(event, _PRESENCE):
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

    def _published(self, reply, pid: int, publication: _Pending) -> None:
        if isinstance(publication.event, _PRESENCE) and reply == 0:
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
        publication.fire(publication.event)

    def _publish_failed(self, failure, pid: int, publication: _Pending) -> None:
        if self._unconfirmed.pop(pid, None) is None:
            # Already delivered: back through the subscription, or locally
            # when the outage began.
            publication.fire(publication.event)
            return
        self._abandoned.add(pid)
        self._went_down("publishing failed: {}".format(failure.getErrorMessage()))
        self._deliver_locally(publication.event, publication)

    def _received(self, channel: bytes, message: bytes) -> None:
        """
        An event from the subscription: deliver it to the hub.
        """
        try:
            body, blob, seq, epoch = decode_entry(message)
            kind = body.get("t")
            if kind == "snapshot":
                if channel.decode("utf-8", "replace") == self._private_channel:
                    self._apply_snapshot(body.get("nodes"))
                return
            if kind == "state":
                node = body.get("node")
                if node != self.node_id:
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
        elif isinstance(event, _PRESENCE):
            self.presence.apply(origin, event)
        self._hub.deliver(event)

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
        d = self._eval(POSITION, self._room_keys(room), [new_epoch()])
        d.addCallback(lambda reply: (reply[0].decode("ascii"), int(reply[1])))
        # The welcome waits for this: never leave a client without one.
        return d.addErrback(lambda failure: self._local_position(room))

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

        return self._eval(MISSED, self._room_keys(room), [new_epoch()]).addCallback(answered)

    def members(self, room: str) -> list:
        """
        The members of ``room`` on this node, then on the others.
        """
        return self._hub.room_members(room) + self.presence.members(room)

    def state(self) -> dict:
        """
        For /healthz.
        """
        return {
            "kind": self.name,
            "connected": self.connected,
            "url": self.address.redacted(),
            "node": self.node_id,
            # This one and the others it knows of.
            "nodes": 1 + len(self._peers),
            "namespace": self.namespace,
        }


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
        self.backplane.start(self._reactor)
        super().startService()

    def stopService(self) -> Deferred:
        d = maybeDeferred(super().stopService)
        return d.addCallback(lambda _: self.backplane.stop())
