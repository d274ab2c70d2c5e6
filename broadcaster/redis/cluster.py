"""
Redis Cluster for the backplane (``--redis redis+cluster://host:port,...``).

txredisapi has no cluster client, and the backplane needs only a little of
one: every script it runs touches one slot (a room's keys and channel share
the room's hash tag, all nodes' keys the namespace's), and the few plain
commands it sends name their key or sharded channel first.  So this is a
small routing layer over the connections the backplane already uses: one
command connection and one subscribing connection to each master, the
slot of each command's key (CRC16 of its hash tag, as Redis computes it)
choosing the master.  Classic pub/sub (the channel every node receives)
reaches every node of a cluster, so it is subscribed on one master only;
each room's sharded channel is subscribed on the master that owns its slot.

Topology changes are followed the simple way: when any master's
connection is lost (a master failed over, a reshard moved slots and a
command came back ``MOVED``), the backplane goes through an outage as it
does when one Redis goes away, and the connections are made again from a
fresh ``CLUSTER SLOTS``, asked of any node that answers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import txredisapi
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.logger import Logger

from broadcaster.redis.address import CONNECT_TIMEOUT, RedisAddress
from broadcaster.redis.connections import ReconnectingFactory, _WatchedEndpoint

SLOTS = 16384


def _crc16_table() -> List[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
        table.append(crc)
    return table


_TABLE = _crc16_table()


def key_slot(key: Any) -> int:
    """
    The cluster slot of ``key``: CRC16 (XMODEM) of its hash tag, the text
    between the first ``{`` and the next ``}`` if not empty, else of all of
    it, modulo 16384 (the Redis Cluster specification's ``HASH_SLOT``).
    """
    data = key if isinstance(key, bytes) else str(key).encode("utf-8")
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


#: The commands the backplane sends outside scripts, and where their key is.
_KEYED = {"SPUBLISH": 0, "LRANGE": 0, "SSUBSCRIBE": 0, "SUNSUBSCRIBE": 0}


class SlotMap:
    """
    Which master owns each slot, from ``CLUSTER SLOTS``.
    """

    def __init__(self, ranges: List[Tuple[int, int, Tuple[str, int]]]) -> None:
        self._owner: List[Optional[Tuple[str, int]]] = [None] * SLOTS
        for start, end, master in ranges:
            for slot in range(start, end + 1):
                self._owner[slot] = master
        self.masters = sorted({master for _, _, master in ranges})

    @classmethod
    def from_reply(cls, reply) -> "SlotMap":
        ranges = []
        for entry in reply:
            host, port = entry[2][0], entry[2][1]
            if isinstance(host, bytes):
                host = host.decode("ascii")
            ranges.append((int(entry[0]), int(entry[1]), (host, int(port))))
        return cls(ranges)

    def owner(self, key: Any) -> Optional[Tuple[str, int]]:
        return self._owner[key_slot(key)]


class _Router:
    """
    The command connection the backplane sees: each call goes to the
    master of its key's slot.
    """

    def __init__(self, slots: SlotMap, protocols: Dict[Tuple[str, int], Any]) -> None:
        self._slots = slots
        self._protocols = protocols
        self.connected = 1

    def _to(self, key: Any):
        master = self._slots.owner(key) if key is not None else self._slots.masters[0]
        protocol = self._protocols.get(master)
        if protocol is None:
            raise txredisapi.ConnectionError("no connection to the master of slot {}".format(key_slot(key)))
        return protocol

    def run(self, *args: Any) -> Deferred:
        position = _KEYED.get(str(args[0]).upper())
        key = args[1 + position] if position is not None else None
        return maybeDeferred(lambda: self._to(key).run(*args))

    def run_script(self, script, keys: List[str], args: List[Any]) -> Deferred:
        return maybeDeferred(lambda: self._to(keys[0] if keys else None).run_script(script, keys, args))


class _SubscriptionRouter(_Router):
    """
    The subscribing connection the backplane sees: classic channels on
    one master (they reach every node), sharded ones on their slot's.
    """

    def subscribe(self, channels: List[str]) -> Deferred:
        return maybeDeferred(lambda: self._to(None).subscribe(channels))

    def ssubscribe(self, channel: str) -> Deferred:
        return maybeDeferred(lambda: self._to(channel).ssubscribe(channel))

    def sunsubscribe(self, channel: str) -> Deferred:
        return maybeDeferred(lambda: self._to(channel).sunsubscribe(channel))


class _Part:
    """
    What one master's connection tells: passed on to the cluster.
    """

    def __init__(self, cluster: "ClusterConnections", master, subscriber: bool) -> None:
        self._cluster = cluster
        self._master = master
        self._subscriber = subscriber

    def commands_ready(self, protocol) -> None:
        self._cluster._ready(self._master, False, protocol)

    def subscription_ready(self, protocol) -> None:
        self._cluster._ready(self._master, True, protocol)

    def commands_lost(self, protocol) -> None:
        self._cluster._lost(self._master, False, protocol)

    def subscription_lost(self, protocol) -> None:
        self._cluster._lost(self._master, True, protocol)

    def message_received(self, channel: bytes, message: bytes) -> None:
        self._cluster.listener.message_received(channel, message)

    def connect_failed(self, failure) -> None:
        self._cluster._connect_failed(failure)

    def gave_up(self, failure) -> None:
        self._cluster.listener.gave_up(failure)


class ClusterConnections:
    """
    The :class:`~broadcaster.redis.connections.Connections` of a Redis
    Cluster (see the module docstring).

    :param address: the seeds (``address.cluster``) and the credentials.
    """

    _log = Logger()

    #: Seconds between attempts to read the cluster's slots.
    RETRY = 1.0

    def __init__(self, address: RedisAddress, reactor: Any) -> None:
        self.address = address
        self._reactor = reactor
        self.listener = None
        self.factories: List[ReconnectingFactory] = []
        self._slots: Optional[SlotMap] = None
        self._protocols: Dict[bool, Dict[Tuple[str, int], Any]] = {False: {}, True: {}}
        self._routers: Dict[bool, Optional[_Router]] = {False: None, True: None}
        self._running = False
        self._discovering = False
        self._retry = None

    def connect(self, listener) -> None:
        self.listener = listener
        self._running = True
        self._discover()

    def disconnect(self) -> Deferred:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return self._drop_factories()

    def _drop_factories(self) -> Deferred:
        stopping = []
        for factory in self.factories:
            factory.continueTrying = False
            stopping.append(maybeDeferred(factory.disconnect))
        self.factories = []
        return DeferredList(stopping, consumeErrors=True)

    @inlineCallbacks
    def _slots_from(self, host: str, port: int):
        protocol = yield connectProtocol(
            HostnameEndpoint(self._reactor, host, port, timeout=CONNECT_TIMEOUT),
            txredisapi.RedisProtocol(
                charset="utf-8", password=self.address.password, replyTimeout=CONNECT_TIMEOUT,
            ),
        )
        try:
            yield protocol.whenConnected()
            reply = yield protocol.execute_command("CLUSTER", "SLOTS")
        finally:
            protocol.transport.loseConnection()
        return SlotMap.from_reply(reply)

    @inlineCallbacks
    def _discover(self):
        """
        Read the slots from the first node that answers (the seeds, then
        the masters last known), and connect to every master.
        """
        if self._discovering or not self._running:
            return
        self._discovering = True
        try:
            candidates = list(self.address.cluster)
            if self._slots is not None:
                candidates += [m for m in self._slots.masters if m not in candidates]
            slots = None
            for host, port in candidates:
                try:
                    slots = yield self._slots_from(host, port)
                    break
                except Exception as e:
                    self._log.info(
                        "cluster node {host}:{port} did not give its slots: {error}",
                        host=host, port=port, error=e,
                    )
            if slots is None or not slots.masters:
                self._retry = self._reactor.callLater(self.RETRY, self._discover)
                return
            yield self._drop_factories()
            self._slots = slots
            self._protocols = {False: {}, True: {}}
            self._routers = {False: None, True: None}
            for master in slots.masters:
                address = RedisAddress(
                    host=master[0], port=master[1], password=self.address.password,
                    username=self.address.username,
                )
                endpoint = _WatchedEndpoint(
                    address.endpoint(self._reactor), self._connect_failed, address.redacted()
                )
                for subscriber in (False, True):
                    factory = ReconnectingFactory(
                        address, _Part(self, master, subscriber), self._reactor, subscriber
                    )
                    self.factories.append(factory)
                    factory.startConnecting(endpoint)
        finally:
            self._discovering = False

    def _ready(self, master, subscriber: bool, protocol) -> None:
        protocols = self._protocols[subscriber]
        protocols[master] = protocol
        if self._slots is None or set(protocols) != set(self._slots.masters):
            return
        router_class = _SubscriptionRouter if subscriber else _Router
        router = self._routers[subscriber] = router_class(self._slots, dict(protocols))
        if subscriber:
            self.listener.subscription_ready(router)
        else:
            self.listener.commands_ready(router)

    def _lost(self, master, subscriber: bool, protocol) -> None:
        protocols = self._protocols[subscriber]
        if protocols.get(master) is not protocol:
            return
        del protocols[master]
        router = self._routers[subscriber]
        if router is not None:
            self._routers[subscriber] = None
            router.connected = 0
            if subscriber:
                self.listener.subscription_lost(router)
            else:
                self.listener.commands_lost(router)
        # A master gone: perhaps failed over; ask the cluster again.
        self._rediscover()

    def _connect_failed(self, failure) -> None:
        """
        A master could not be reached: perhaps it failed over; the slots
        are read again (its replica may own them now).
        """
        self.listener.connect_failed(failure)
        self._rediscover()

    def _rediscover(self) -> None:
        if self._running and not self._discovering and (self._retry is None or not self._retry.active()):
            self._retry = self._reactor.callLater(self.RETRY, self._discover)
