"""
Rooms spread over several independent Redis servers (``--redis`` given
more than once), for deployments that prefer a few small Redis servers to
a cluster.

Each room belongs to one server, chosen by consistent hashing of its name
(:mod:`broadcaster.redis.ring`), and everything about it lives there: its
sequence, epoch and history, its channel, and the presence of its
members.  Each server has a whole :class:`~broadcaster.redis.backplane.RedisBackplane`
of its own, which sees this node's hub through a :class:`_ShareOfHub`
that shows only that server's rooms: a node registers with every server,
heartbeats to each, and lists in each server's ``members`` hash its
clients' rooms there.

So one server down is an outage of its rooms only: their messages are
delivered on each node locally (numbered in a local epoch, recovered as
incomplete afterwards, exactly as with one Redis), while the rooms of the
other servers go on crossing nodes.  What concerns nodes rather than rooms
is asked of any server that answers (the node list) or sent through all
(a disconnection ordered through the server API, carried out once).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime

from broadcaster.core.backplane import Attached, node_entry, this_node
from broadcaster.core.events import Event
from broadcaster.core.history import HistoryMemory
from broadcaster.core.moderation import Expulsion
from broadcaster.core.names import LOBBY
from broadcaster.redis.backplane import RedisBackplane
from broadcaster.redis.ring import Ring, Shard


class _ShareOfHub:
    """
    The hub as one server's backplane sees it: its members are in the
    rooms of that server only.
    """

    def __init__(self, hub: Attached, owns) -> None:
        self._hub = hub
        self._owns = owns
        self.node_id = hub.node_id
        self.roster = hub.roster
        self.deliver = hub.deliver
        self.occupied = hub.occupied
        self.member = hub.member
        self.members = hub.members
        self.expel_here = hub.expel_here
        self.positioned = hub.positioned
        self.forget_position = hub.forget_position

    def rooms_of(self, member_id: str) -> List[str]:
        return [room for room in self._hub.rooms_of(member_id) if self._owns(room)]


class ShardedBackplane:
    """
    The :class:`~broadcaster.core.backplane.Backplane` of several Redis
    servers, each holding the rooms the ring gives it.

    :param backplanes: one per server, made with a
        :class:`~broadcaster.redis.ring.Shard` saying which rooms are its
        (see :func:`sharded`).
    :param ring: which of them holds a room: the ring of their positions
        in ``backplanes``, the one their shards' ``owns`` ask too.
    """

    name = "redis"

    def __init__(self, backplanes: Sequence[RedisBackplane], ring: Ring[int]) -> None:
        self._ring = ring
        self.shards: List[RedisBackplane] = list(backplanes)
        first = self.shards[0]
        self.history_size = first.history_size
        self.node_timeout = first.node_timeout
        self.batch_delay = max(shard.batch_delay for shard in self.shards)
        self.memory: HistoryMemory = first.memory
        self.namespace = first.namespace
        self._hub: Optional[Attached] = None

    def shard_of(self, room: str) -> RedisBackplane:
        """
        The backplane of the server holding ``room``.
        """
        return self.shards[self._ring.shard(room)]

    @property
    def connected(self) -> bool:
        """
        Whether every server is reachable (rooms of one that is not are
        served locally meanwhile).
        """
        return all(shard.connected for shard in self.shards)

    @property
    def node_id(self) -> str:
        return self.shards[0].node_id

    # Set-up and the service's calls

    def attach(self, hub: Attached) -> None:
        self._hub = hub
        for shard in self.shards:
            shard.attach(_ShareOfHub(hub, shard.shard.owns))

    def start(self) -> None:
        for shard in self.shards:
            shard.start()

    def stop(self) -> Deferred:
        return DeferredList([shard.stop() for shard in self.shards], consumeErrors=True)

    def heartbeat(self) -> None:
        for shard in self.shards:
            shard.heartbeat()

    # The Backplane interface: a room's business goes to its server

    def publish(self, event: Event) -> Deferred:
        return self.shard_of(getattr(event, "room", LOBBY)).publish(event)

    def position(self, room: str) -> Deferred:
        return self.shard_of(room).position(room)

    def history(self, room: str, limit: int, before: Optional[int] = None) -> Deferred:
        return self.shard_of(room).history(room, limit, before)

    def missed(self, room: str, epoch: str, seq: int, joined_at) -> Deferred:
        return self.shard_of(room).missed(room, epoch, seq, joined_at)

    def room_occupied(self, room: str) -> None:
        self.shard_of(room).room_occupied(room)

    def room_vacated(self, room: str) -> None:
        self.shard_of(room).room_vacated(room)

    # What concerns nodes

    def spread(self, expulsion: Expulsion) -> Deferred:
        """
        Through every reachable server, under one id: a node carries it
        out once, whichever servers it can hear.
        """
        ident = os.urandom(8).hex()
        told = [shard.spread(expulsion, ident) for shard in self.shards]
        return gatherResults(told).addCallback(any)

    def state(self) -> dict:
        """
        For /healthz and /metrics: connected while every server is; each
        server's own state under ``shards``.
        """
        shards = [shard.state() for shard in self.shards]
        state: Dict[str, Any] = {
            "kind": self.name,
            "connected": all(s["connected"] for s in shards),
            "node": self.node_id,
            "nodes": max(s["nodes"] for s in shards),
            "namespace": self.namespace,
            "shards": shards,
        }
        down = [s for s in shards if not s["connected"]]
        if down:
            state["down_for"] = max(s["down_for"] for s in down)
            state["local_only"] = sum(s["local_only"] for s in down)
        return state

    def nodes(self) -> Deferred:
        """
        Every node any reachable server knows of, with the most clients
        one of them lists (each lists those in its rooms; the lobby's
        server, nearly all of them).
        """
        reachable = [shard for shard in self.shards if shard.connected]
        if not reachable:
            return succeed([this_node(self._hub)])

        def merged(answers) -> List[dict]:
            nodes: Dict[str, dict] = {}
            for ok, listed in answers:
                if not ok:
                    continue
                for entry in listed:
                    known = nodes.get(entry["node"])
                    if known is None:
                        nodes[entry["node"]] = dict(entry)
                        continue
                    known["connections"] = max(known["connections"], entry["connections"])
                    known["alive"] = known["alive"] or entry["alive"]
                    ages = [a for a in (known["heartbeat_age"], entry["heartbeat_age"]) if a is not None]
                    known["heartbeat_age"] = min(ages) if ages else None
            if not nodes:
                return [this_node(self._hub)]
            return [
                node_entry(n["node"], n["connections"], n["heartbeat_age"], n["here"], n["alive"])
                for _, n in sorted(nodes.items())
            ]

        return DeferredList([shard.nodes() for shard in reachable], consumeErrors=True).addCallback(
            merged
        )


def sharded(addresses: Sequence[Any], make, clock: IReactorTime, history_memory: int) -> ShardedBackplane:
    """
    A :class:`ShardedBackplane` over ``addresses``
    (:class:`~broadcaster.redis.address.RedisAddress`).

    :param make: ``make(address, shard)`` makes one server's
        :class:`~broadcaster.redis.backplane.RedisBackplane`, given its
        :class:`~broadcaster.redis.ring.Shard`.
    """
    memory = HistoryMemory(history_memory, clock)
    names = [address.shard_name() for address in addresses]
    ring = Ring([(name, i) for i, name in enumerate(names)])
    # Control messages come through every server: one memory of their ids.
    seen: Dict[str, None] = {}
    backplanes = [
        make(
            address,
            Shard(
                owns=lambda room, i=i: ring.shard(room) == i,
                memory=memory,
                index=i,
                count=len(addresses),
                servers=names,
                seen=seen,
            ),
        )
        for i, address in enumerate(addresses)
    ]
    return ShardedBackplane(backplanes, ring)
