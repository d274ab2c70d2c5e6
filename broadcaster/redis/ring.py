"""
Which of several independent Redis servers holds a room (``--redis``
given more than once): consistent hashing of the room's name.

Each server stands on a ring at :data:`POINTS` places, hashes of its
*name* (``host:port/db``, ``unix:<path>/db``, or ``sentinel:<master>/db``:
where it is, never its password) and a counter; a room belongs to the
first server point at or after the hash of the room's name, going round.
So the choice depends on the servers' names only, not on the order they
are given in, and adding a server moves to it about a share
``1 / (servers + 1)`` of the rooms and no other room anywhere else;
removing one moves only its own rooms.  Every node of a deployment must be
given the same servers.

The hash is the first 8 bytes of SHA-1: not for secrecy, for an even
spread that every Python computes alike (``hash()`` is salted per process).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from typing import Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

#: Places on the ring per server: enough that each server's share of the
#: rooms is within a few percent of even.
POINTS = 160

T = TypeVar("T")


def _point(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


class Ring(Generic[T]):
    """
    A consistent-hashing ring of named shards.

    :param shards: ``(name, shard)`` pairs; the names must differ.
    :raise ValueError: for no shard, or two of one name.
    """

    def __init__(self, shards: Sequence[Tuple[str, T]], points: int = POINTS) -> None:
        if not shards:
            raise ValueError("a ring needs at least one shard")
        names = [name for name, _ in shards]
        if len(set(names)) != len(names):
            raise ValueError("two shards named {!r}".format(_first_repeated(names)))
        self.shards: List[T] = [shard for _, shard in shards]
        placed: List[Tuple[int, str, int]] = []
        for index, name in enumerate(names):
            for i in range(points):
                # The name breaks the (astronomically unlikely) tie of two
                # equal points the same way on every node.
                placed.append((_point("{}#{}".format(name, i)), name, index))
        placed.sort()
        self._points = [point for point, _, _ in placed]
        self._owners = [index for _, _, index in placed]
        # A room's shard is asked for every publication: remember the answers.
        self._cache: Dict[str, T] = {}

    def __len__(self) -> int:
        return len(self.shards)

    def index(self, room: str) -> int:
        """
        The position in ``shards`` of the shard holding ``room``.
        """
        at = bisect_left(self._points, _point(room))
        return self._owners[at if at < len(self._points) else 0]

    def shard(self, room: str) -> T:
        """
        The shard holding ``room``.
        """
        shard = self._cache.get(room)
        if shard is None:
            shard = self.shards[self.index(room)]
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[room] = shard
        return shard


def _first_repeated(names: Sequence[str]) -> str:
    seen = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return ""


class Shard:
    """
    One Redis server's part in a deployment, as its backplane sees it:
    which rooms are its, and what it shares with the other servers'
    backplanes of this node.

    The default is the whole of a deployment with one Redis (or one
    cluster): every room, nothing shared.

    :param owns: whether a room is this server's (default: every one).
    :param memory: the one ``--history-memory`` budget of this node's
        outage histories, shared by every server's backplane (``None``: the
        backplane makes its own).
    :param index: this server's position in ``--redis``, from 0.
    :param count: how many servers share the rooms.
    :param servers: their names (``None``: this one alone).
    :param seen: the ids of the control messages carried out, shared by
        every server's shard (a message sent through each server is carried
        out once; default: this shard's own).
    """

    def __init__(
        self,
        owns=None,
        memory=None,
        index: int = 0,
        count: int = 1,
        servers=None,
        seen: Optional[Dict[str, None]] = None,
    ) -> None:
        self.owns = owns if owns is not None else (lambda room: True)
        self.servers: Optional[List[str]] = list(servers) if servers is not None else None
        self.memory = memory
        self.index = index
        self.count = count
        self._seen: Dict[str, None] = seen if seen is not None else {}

    @property
    def scope(self) -> str:
        """
        What an outage of this server affects, for the logs.
        """
        if self.count == 1:
            return "this node's clients"
        return "this node's clients in the rooms of Redis server {} of {}".format(
            self.index + 1, self.count
        )

    def first_time(self, ident: str) -> bool:
        """
        Whether a control message with this id is new here: a message sent
        to every server reaches a node once through each (the last 1024
        ids are kept, in ``seen``).
        """
        if ident in self._seen:
            return False
        self._seen[ident] = None
        if len(self._seen) > 1024:
            del self._seen[next(iter(self._seen))]
        return True
