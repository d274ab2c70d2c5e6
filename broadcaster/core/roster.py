"""
Who is in each room, as its members see it: one *seat* per signed-in user,
however many connections (tabs, phones) it has there, and one per
anonymous connection.

A room's ``welcome``, ``presence`` and ``who`` list seats, each with its
connection count, and members are told of a user when its first
connection enters the room and when its last one leaves it: two tabs are
one person, not two who come and go.  Webhooks still hear of every
connection (the events say how many the user has left).

The roster holds this node's connections and, with a networked backplane,
the other nodes' as last heard (:mod:`broadcaster.redis.presence` feeds it),
so a user with a tab on each of two nodes is one seat on both.  Each node
decides whether to announce its own connections' comings and goings from
what it knows then; two connections of one user arriving on two nodes in
the same few milliseconds may both be announced (a client treats a join of
a user already listed as nothing new).

Nothing here knows about networks; the hub calls it as members come and go.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

#: A signed-in user's seat key: connection ids never contain ":", so it is
#: never one of theirs.
_USER_KEY = "user:"


class UserSeat:
    """
    A signed-in user in one room, with its connections there.

    :ivar id: the seat's key, ``user:<user>``: what a room's seats are
        ordered (and paged) by.
    :ivar user: who it signed in as.
    :ivar names: its connections there (id -> display name), the one that
        joined or renamed most recently last: the room knows the user by
        that one's name.
    """

    __slots__ = ("id", "user", "names")

    def __init__(self, user: str) -> None:
        self.id = _USER_KEY + user
        self.user = user
        self.names: Dict[str, Optional[str]] = {}

    @property
    def name(self) -> Optional[str]:
        """
        The name the room lists the user by.
        """
        return next(reversed(self.names.values())) if self.names else None

    @property
    def connections(self) -> int:
        return len(self.names)


def seat_key(member_id: str, user: Optional[str]) -> str:
    """
    The key of the seat a connection sits in: its user's, or its own.
    """
    return member_id if user is None else _USER_KEY + user


def seat_event(
    kind, room: str, member: str, name, user, seated: Tuple[int, bool], ts: float, origin: str = ""
):
    """
    The ``kind`` (:class:`~broadcaster.core.events.Joined`, ``Left`` or
    ``Renamed``) event of connection ``member`` in ``room``, with what the
    roster said of the change, ``seated``: ``(connections, announced)``.
    For this node's connections (the hub) and the others' (Redis presence).
    """
    connections, announced = seated
    return kind(
        ts=ts,
        origin=origin,
        room=room,
        member=member,
        name=name,
        user=user,
        connections=connections,
        announced=announced,
    )


def solo_seat(member) -> object:
    """
    The seat ``member`` would have alone (for one not in the room).
    """
    if member.user is None:
        return member
    seat = UserSeat(member.user)
    seat.names[member.id] = member.name
    return seat


class Roster:
    """
    The seats of every room (see the module docstring).

    An anonymous connection's seat is the object the caller gives for it
    (a hub member, or a :class:`~broadcaster.redis.presence.RemoteMember`):
    it has an ``id``, a ``name`` and ``user`` ``None``, and costs nothing
    more.  A user's seat is a :class:`UserSeat`.

    Each change answers ``(connections, announced)``: how many connections
    the user has in the room afterwards, and whether the room's members
    should be told.
    """

    def __init__(self) -> None:
        # room -> seat key -> seat, in the order the seats were taken
        self._rooms: Dict[str, Dict[str, object]] = {}

    def seats(self, room: str) -> list:
        """
        The seats of ``room``, in the order they were taken.
        """
        return list(self._rooms.get(room, {}).values())

    def seats_with(self, room: str, member) -> list:
        """
        The seats of ``room`` as they will be once ``member`` (not yet
        there) has joined: what its welcome lists, before its join goes out.
        """
        seats = self._rooms.get(room, {})
        if member.user is None:
            return [*seats.values(), member]
        current = seats.get(_USER_KEY + member.user)
        seat = solo_seat(member)
        if current is None:
            return [*seats.values(), seat]
        seat.names = dict(current.names)
        seat.names[member.id] = member.name
        return [seat if listed is current else listed for listed in seats.values()]

    def count(self, room: str) -> int:
        """
        How many seats ``room`` has.
        """
        return len(self._rooms.get(room, ()))

    def seat(self, room: str, member_id: str, user: Optional[str]) -> Optional[object]:
        """
        The seat of a connection in ``room``, or ``None`` if it is not there.
        """
        return self._rooms.get(room, {}).get(seat_key(member_id, user))

    def named_by(self, room: str, user: str) -> Optional[Tuple[str, Optional[str]]]:
        """
        The connection whose name the room lists ``user`` by, and that
        name, or ``None`` if the user is not there.
        """
        seat = self._rooms.get(room, {}).get(_USER_KEY + user)
        if seat is None or not seat.names:
            return None
        return next(reversed(seat.names.items()))

    def add(
        self, room: str, member_id: str, user: Optional[str], name: Optional[str], anonymous: object
    ) -> Tuple[int, bool]:
        """
        A connection entered ``room``: it is announced if it is its user's
        first there (an anonymous one always is).

        :param anonymous: the seat to list for it if ``user`` is ``None``.
        """
        seats = self._rooms.setdefault(room, {})
        if user is None:
            seats[member_id] = anonymous
            return 1, True
        key = _USER_KEY + user
        seat = seats.get(key)
        if seat is None:
            seat = seats[key] = UserSeat(user)
        seat.names.pop(member_id, None)
        seat.names[member_id] = name
        return seat.connections, seat.connections == 1

    def remove(self, room: str, member_id: str, user: Optional[str]) -> Tuple[int, bool]:
        """
        A connection left ``room``: announced if it was its user's last there.
        """
        seats = self._rooms.get(room)
        if seats is None:
            return 0, False
        key = seat_key(member_id, user)
        seat = seats.get(key)
        if seat is None:
            return 0, False
        left = 0
        if user is not None:
            seat.names.pop(member_id, None)
            left = seat.connections
        if not left:
            del seats[key]
            if not seats:
                del self._rooms[room]
        return left, not left

    def rename(
        self, room: str, member_id: str, user: Optional[str], name: Optional[str], anonymous: object
    ) -> Tuple[int, bool]:
        """
        A connection in ``room`` took ``name``: announced if the room now
        lists its seat by another name.

        :param anonymous: the seat to list for it from now on if ``user``
            is ``None`` (the same object, for a hub member).
        """
        seats = self._rooms.get(room)
        if seats is None:
            return 0, False
        if user is None:
            if member_id not in seats:
                return 0, False
            seats[member_id] = anonymous
            return 1, True
        seat = seats.get(_USER_KEY + user)
        if seat is None or member_id not in seat.names:
            return 0, False
        before = seat.name
        del seat.names[member_id]
        seat.names[member_id] = name
        return seat.connections, seat.name != before

    def rooms(self) -> List[str]:
        """
        The rooms that have seats.
        """
        return list(self._rooms)
