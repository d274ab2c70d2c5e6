"""
The broadcast domain: who is connected, which rooms they are in, and what
they publish.

Nothing here knows about sockets, HTTP or Autobahn.  A connection of any
kind takes part by handing the hub a *member* (the contract is
:class:`broadcaster.core.members.Member`).  The hub keeps those members and
their rooms, stamps events (:mod:`broadcaster.core.events`) with the time
from an injected clock, hands them to its backplane to be numbered and
spread to every node, and gives what comes back to the fan-out engine
(:mod:`broadcaster.core.fanout`), which delivers each to the members of
its room.

Keeping the domain apart from the protocols is what lets a Redis backplane
replace in-process fan-out by swapping one object, and what lets the tests
drive it with plain Python objects and :class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from broadcaster.core.backplane import Backplane, LocalBackplane
from broadcaster.core.events import (
    SERVER_ID,
    BinaryMessage,
    Event,
    ImageMessage,
    Joined,
    Left,
    Renamed,
    TextMessage,
    uncached,
)
from broadcaster.core.fanout import FanOut
from broadcaster.core.permissions import HISTORY, JOIN, PRESENCE, PUBLISH, Grants
from broadcaster.core.history import DEFAULT_MEMORY
from broadcaster.core.members import Member
from broadcaster.core.moderation import Bans, Expulsion
from broadcaster.core.names import LOBBY
from broadcaster.core.roster import Roster, seat_event
from broadcaster.core.stats import Stats


def _random_node_id() -> str:
    return os.urandom(3).hex()


class NotInRoom(ValueError):
    """
    The member is not in the room it tried to speak in or read.
    """


class TooManyRooms(ValueError):
    """
    The member is already in as many rooms as it may be.
    """


class Hub:
    """
    Rooms, their members, and in-process fan-out between them.

    Every member is in the ``lobby`` from the moment it connects; JSON
    clients may join and leave other rooms.  An event about a room goes to
    the members of that room.

    Ids are ``<node>-<n>``: ``n`` counts connections on this node and ``node``
    is random per process (or set by the operator), so ids stay unique when
    several nodes share one backplane.

    :param history_size: text messages each room remembers (0: none).
    :param max_rooms: rooms whose history is remembered; beyond it, the
        least recently used empty rooms are forgotten.
    :param history_memory: bytes the rooms' histories may keep together
        (with the in-process backplane; a backplane given keeps its own bound).
    :param max_rooms_per_member: rooms one member may be in at once.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        node_id: Optional[str] = None,
        history_size: int = 100,
        max_rooms: int = 10000,
        max_rooms_per_member: int = 100,
        stats: Optional[Stats] = None,
        backplane: Optional[Backplane] = None,
        history_memory: int = DEFAULT_MEMORY,
    ) -> None:
        self._clock = clock
        self.stats = stats if stats is not None else Stats()
        self.node_id = node_id or _random_node_id()
        self.max_rooms_per_member = max_rooms_per_member
        self._counter = itertools.count(1)
        self._image_counter = itertools.count(1)
        self._members: Dict[str, Member] = {}
        # room -> member id -> member, in the order they joined
        self._rooms: Dict[str, Dict[str, Member]] = {}
        # member id -> rooms it is in, in the order it joined them, with the
        # room's (epoch, seq) when it joined (None if no message had been
        # delivered here yet): it has been sent every message after that.
        self._memberships: Dict[str, Dict[str, Optional[Tuple[str, int]]]] = {}
        # room -> (epoch, seq) of the last message delivered here: a member
        # joining now gets every later one live.
        self._positions: Dict[str, Tuple[str, int]] = {}
        #: Who each room lists: a seat per signed-in user (however many
        #: connections it has there) or anonymous connection, on every node.
        self.roster = Roster()
        # room -> member id -> member, for those in the room without the
        # right to see who comes and goes there: the fan-out keeps joins,
        # leaves and renames from them.
        self._blind: Dict[str, Dict[str, Member]] = {}
        self.backplane: Backplane = backplane or LocalBackplane(
            clock, history_size, max_rooms, history_memory
        )
        self.backplane.attach(self)
        #: Users whose new connections are refused for a while
        #: (``POST /api/disconnect``'s ``ban_seconds``).
        self.bans = Bans(clock)
        self._empty_waiters: List[Deferred] = []
        self._observers: List[Callable[[Event], None]] = []
        #: Delivers each event to the members of its room.
        self.fanout = FanOut(clock, self._rooms, self.stats, self._committed, self._blind)
        self.fanout.batch_delay = self.backplane.batch_delay

    def new_id(self) -> str:
        """
        Allocate an id for a connection that is about to connect.
        """
        return "{}-{}".format(self.node_id, next(self._counter))

    # Who is here

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._members

    def member(self, member_id: str) -> Optional[Member]:
        """
        The connected member with this id, or ``None``.
        """
        return self._members.get(member_id)

    def member_ids(self) -> List[str]:
        """
        The ids of the connected members, in the order they connected.
        """
        return list(self._members)

    def members(self) -> List[Member]:
        """
        The connected members, in the order they connected.
        """
        return list(self._members.values())

    def room_members(self, room: str) -> List[Member]:
        """
        The members of ``room``, in the order they joined it.
        """
        return list(self._rooms.get(room, {}).values())

    def presence(self, room: str) -> list:
        """
        Who is in ``room`` on every node sharing the backplane, for
        ``welcome`` and ``presence``: its seats (see
        :mod:`broadcaster.core.roster`), each with an ``id``, a ``name``, a
        ``user`` (``None`` for an anonymous connection) and, for a user,
        its number of ``connections``.
        """
        return self.roster.seats(room)

    def seat_of(self, member: Member, room: str) -> list:
        """
        ``member``'s own seat in ``room``, as a one-seat presence (what a
        member without the ``presence`` right is shown), or none.
        """
        seat = self.roster.seat(room, member.id, member.user)
        return [seat] if seat is not None else []

    def rooms_of(self, member_id: str) -> List[str]:
        """
        The rooms a member is in, in the order it joined them.
        """
        return list(self._memberships.get(member_id, ()))

    def occupied(self, room: str) -> bool:
        """
        Whether anybody on this node is in ``room``.
        """
        return room in self._rooms

    @property
    def history_size(self) -> int:
        """
        Messages each room keeps.
        """
        return self.backplane.history_size

    def rooms(self) -> List[str]:
        """
        The rooms somebody is in.
        """
        return list(self._rooms)

    def positions(self) -> Dict[str, Tuple[str, int]]:
        """
        Where the sequence of each room a message has gone through on this
        node stands: ``(epoch, seq)`` of its last kept message.  A room's
        ``seq`` counts its messages (on every node), so its message rate
        is read from here rather than counted again.

        :return: a copy, the caller's to keep.
        """
        return dict(self._positions)

    def add_observer(self, observer: Callable[[Event], None]) -> None:
        """
        Call ``observer(event)`` once for every event the hub fans out
        (joins, leaves, renames, messages, binary messages, images), after
        its members have been given it.  For webhooks and the like: it must
        not block, and an exception it raises is logged and ignored.
        """
        self._observers.append(observer)

    def remove_observer(self, observer: Callable[[Event], None]) -> None:
        self._observers.remove(observer)

    def when_empty(self) -> Deferred:
        """
        :return: a Deferred that fires once no member is left.
        """
        if not self._members:
            return succeed(None)
        d: Deferred = Deferred()
        self._empty_waiters.append(d)
        return d

    # Connections

    def connect(self, member: Member, lobby: bool = True) -> Optional[Joined]:
        """
        Add ``member`` and put it in the lobby, if its grants let it join
        the lobby.  Everyone in the lobby, the newcomer included, is told: a
        client learns its own id the same way it learns others'.

        :param lobby: ``False`` for a client that chose its rooms (an event
            stream): it is in none until it joins them.
        :return: the lobby's announcement, or ``None`` if it did not join it.
        """
        if member.id in self._members:
            raise ValueError("member {!r} is already connected".format(member.id))
        self._members[member.id] = member
        self._memberships[member.id] = {}
        self.stats.connected[member.kind] += 1
        if not lobby or not member.grants.allows(LOBBY, JOIN):
            return None
        return self._join(member, LOBBY, fresh=True)

    def may(self, member_id: str, room: str, right: str) -> Member:
        """
        The member, if it is in ``room`` and may do ``right`` there.

        :raise NotInRoom: if it is not in ``room`` (checked first: one
            cannot be refused a right in a room one has not joined).
        :raise Forbidden: if its grants do not allow ``right`` there.
        """
        member = self._members.get(member_id)
        if member is None or room not in self._memberships[member_id]:
            raise NotInRoom("not in room {!r}: join it first".format(room))
        member.grants.check(room, right)
        return member

    def check(self, member_id: str, room: str, right: str) -> None:
        """
        Refuse what a member may not do, before any work is done for it
        (an image decoded, a download made).

        :raise Forbidden: unless the member's grants allow ``right`` in
            ``room`` (see :mod:`broadcaster.core.permissions`).
        """
        member = self._members.get(member_id)
        if member is not None:
            member.grants.check(room, right)

    def disconnect(self, member: Member) -> List[Left]:
        """
        Remove ``member`` from every room and tell each room's other members.

        Disconnecting twice, or without having connected (a connection that
        failed its handshake), is harmless and announces nothing.
        """
        if self._members.get(member.id) is not member:
            return []
        departures = [
            event
            for event in (self.leave(member, room) for room in self.rooms_of(member.id))
            if event is not None
        ]
        del self._members[member.id]
        del self._memberships[member.id]
        self.stats.connected[member.kind] -= 1
        if not self._members:
            waiting, self._empty_waiters = self._empty_waiters, []
            for d in waiting:
                d.callback(None)
        return departures

    def expel(self, expulsion: Expulsion) -> Deferred:
        """
        Disconnect the members ``expulsion`` names, here and on every other
        node sharing the backplane, and ban its user as it says.

        :return: a Deferred firing with ``(count, everywhere)``: how many
            connections were closed on this node, and whether the other
            nodes were told (``False``: a networked backplane could not
            reach them; they were not).
        """
        count = self.expel_here(expulsion)
        return self.backplane.spread(expulsion).addCallback(lambda told: (count, told))

    def expel_here(self, expulsion: Expulsion, origin: Optional[str] = None) -> int:
        """
        Carry out ``expulsion`` on this node only: ban its user, and close
        each member it names with its reason.

        :param origin: the node that ordered it, if another (then the
            order is logged here, as that node logs its own).
        :return: how many connections were closed (one already closing is
            not counted).
        """
        if expulsion.user is not None and expulsion.ban_seconds:
            self.bans.ban(expulsion.user, expulsion.ban_seconds)
        count = 0
        for member in self.members():
            if expulsion.matches(member) and member.expel(expulsion.reason):
                count += 1
        if origin is not None:
            self._log.warn(
                "[DISCONNECT BY SERVER] node {origin}, key {key}: {target} ({count} connections"
                " here){banned}",
                origin=origin,
                key=expulsion.by,
                target=expulsion.target(),
                count=count,
                banned=expulsion.ban_text(),
                reason=expulsion.reason,
            )
        return count

    def banned(self, user: str) -> float:
        """
        Seconds until ``user`` may connect again (0: now): the WebSocket
        handshake asks, once sign-in has said who the client is.
        """
        return self.bans.remaining(user)

    # Rooms

    def join(self, member: Member, room: str) -> Optional[Joined]:
        """
        Put a connected member in ``room`` and tell the room, newcomer included.

        :return: the announcement, or ``None`` if it was already there.
        :raise TooManyRooms: if the member is in as many rooms as allowed.
        :raise Forbidden: if its grants do not let it join ``room``.
        """
        return self._join(member, room, fresh=False)

    def _join(self, member: Member, room: str, fresh: bool) -> Optional[Joined]:
        """
        :meth:`join`; ``fresh`` if the member has just connected, and so
        cannot be in any round under way.
        """
        rooms = self._memberships[member.id]
        if room in rooms:
            return None
        member.grants.check(room, JOIN)
        if len(rooms) >= self.max_rooms_per_member:
            raise TooManyRooms(
                "already in {} rooms, the most allowed".format(self.max_rooms_per_member)
            )
        position = self._positions.get(room)
        if position is None:
            # No message has gone out here yet; any on their way will reach
            # this member live.
            position = self.fanout.before_pending(room)
        rooms[room] = position
        occupants = self._rooms.get(room)
        if occupants is None:
            occupants = self._rooms[room] = {}
            # A networked backplane receives the rooms this node has members in.
            self.backplane.room_occupied(room)
        occupants[member.id] = member
        if not member.grants.allows(room, PRESENCE):
            self._blind.setdefault(room, {})[member.id] = member
        self.fanout.joined(member, room, fresh)
        known_as = self._known_as(member, room)
        event = self._told(Joined, member, room, self.roster.add(room, member.id, member.user, member.name, member))
        self.backplane.publish(event)
        self._renamed_by_the_way(member, room, known_as, event)
        return event

    def leave(self, member: Member, room: str) -> Optional[Left]:
        """
        Take a member out of ``room`` and tell the others there.

        :return: the announcement, or ``None`` if it was not there.
        """
        rooms = self._memberships.get(member.id)
        if rooms is None or room not in rooms:
            return None
        del rooms[room]
        occupants = self._rooms[room]
        del occupants[member.id]
        if not occupants:
            del self._rooms[room]
            self.backplane.room_vacated(room)
        self._unblind(member, room)
        known_as = self._known_as(member, room)
        event = self._told(Left, member, room, self.roster.remove(room, member.id, member.user))
        self.backplane.publish(event)
        self._renamed_by_the_way(member, room, known_as, event)
        return event

    def _known_as(self, member: Member, room: str) -> Optional[str]:
        named = self.roster.named_by(room, member.user) if member.user is not None else None
        return named[1] if named is not None else None

    def _renamed_by_the_way(self, member: Member, room: str, known_as, event) -> None:
        """
        A user's other connection coming or going (not told to the room)
        changed the name the room knows the user by: tell it that.
        """
        if member.user is None or event.announced:
            return
        named = self.roster.named_by(room, member.user)
        if named is None or named[1] == known_as:
            return
        connection, name = named
        self.backplane.publish(
            Renamed(
                ts=event.ts,
                origin=self.node_id,
                room=room,
                member=connection,
                name=name,
                user=member.user,
                connections=event.connections,
            )
        )

    def _told(self, kind, member: Member, room: str, seated: Tuple[int, bool]):
        """
        The ``kind`` (join, leave or rename) event of ``member`` in
        ``room``, with what the roster said of it: ``(connections,
        announced)``.
        """
        return seat_event(
            kind, room, member.id, member.name, member.user, seated,
            self._clock.seconds(), self.node_id,
        )

    def _unblind(self, member: Member, room: str) -> None:
        blind = self._blind.get(room)
        if blind is not None and blind.pop(member.id, None) is not None and not blind:
            del self._blind[room]

    def regrant(self, member: Member, grants: Grants) -> List[str]:
        """
        Give ``member`` new rights (a refreshed token's): it leaves the
        rooms they no longer let it join, as a leave request would, and
        sees or stops seeing who comes and goes where they say.

        :return: the rooms it left.
        """
        member.grants = grants
        left = [room for room in self.rooms_of(member.id) if not grants.allows(room, JOIN)]
        for room in left:
            self.leave(member, room)
        for room in self.rooms_of(member.id):
            if grants.allows(room, PRESENCE):
                self._unblind(member, room)
            else:
                self._blind.setdefault(room, {})[member.id] = member
        return left

    def rename(self, member: Member) -> List[Renamed]:
        """
        Tell every room ``member`` is in that it now goes by ``member.name``.
        """
        events = []
        for room in self.rooms_of(member.id):
            seated = self.roster.rename(room, member.id, member.user, member.name, member)
            event = self._told(Renamed, member, room, seated)
            self.backplane.publish(event)
            events.append(event)
        return events

    # Messages

    def publish_text(self, sender: str, text: str, room: str = LOBBY) -> Deferred:
        """
        Have ``text`` numbered in ``room``'s sequence, remembered, and sent
        to every member of the room on every node, the sender included.

        :return: a Deferred firing with the :class:`TextMessage` as
            delivered (with its ``seq`` and ``epoch``).
        :raise NotInRoom: if ``sender`` is not in ``room``.
        :raise Forbidden: if it may not publish there.
        """
        member = self.may(sender, room, PUBLISH)
        return self.backplane.publish(
            TextMessage(
                ts=self._clock.seconds(), origin=self.node_id, room=room, sender=sender, text=text, name=member.name
            )
        )

    def announce(self, text: str, room: str = LOBBY) -> Deferred:
        """
        Publish ``text`` in ``room`` from the server itself (id and name
        :data:`SERVER_ID`): numbered, remembered and delivered like a
        member's message, whether or not anybody is in the room.

        :return: a Deferred firing with the :class:`TextMessage` as
            delivered (with its ``seq`` and ``epoch``).
        """
        return self.backplane.publish(
            TextMessage(
                ts=self._clock.seconds(), origin=self.node_id, room=room, sender=SERVER_ID, text=text, name=SERVER_ID
            )
        )

    def publish_binary(self, sender: str, data: bytes) -> BinaryMessage:
        """
        Send ``data`` from ``sender`` to everyone in the lobby, the sender included.

        :raise Forbidden: if it may not publish in the lobby.
        """
        self.check(sender, LOBBY, PUBLISH)
        event = BinaryMessage(ts=self._clock.seconds(), origin=self.node_id, sender=sender, data=data)
        self.backplane.publish(event)
        return event

    def publish_image(
        self, sender: str, png: bytes, width: int, height: int, room: str = LOBBY
    ) -> ImageMessage:
        """
        Send a normalised PNG from ``sender`` to everyone in ``room`` (the
        image port's and ``image_url``'s go to the lobby, a JSON client's
        upload to the room it names).  Members decide whether the sender
        hears its own image (the image port does not).

        :raise Forbidden: if it may not publish in the room (the
            protocols ask :meth:`check` before decoding).
        """
        self.check(sender, room, PUBLISH)
        event = ImageMessage(
            ts=self._clock.seconds(),
            origin=self.node_id,
            sender=sender,
            image_id="{}-img{}".format(self.node_id, next(self._image_counter)),
            png=png,
            width=width,
            height=height,
            room=room,
        )
        self.backplane.publish(event)
        return event

    # History

    def history(
        self, member_id: str, room: str, limit: int, before: Optional[int] = None
    ) -> Deferred:
        """
        The last ``limit`` messages of a room the member is in (those
        numbered below ``before``, if given), oldest first.

        :return: a Deferred firing with the list.
        :raise NotInRoom: if the member is not in ``room``.
        """
        self.may(member_id, room, HISTORY)
        return self.backplane.history(room, limit, before)

    def who(self, member_id: str, room: str) -> Deferred:
        """
        Who is in a room the member is in, and where its sequence stands.

        Only members may ask: the answer is theirs to know, and asking must
        not make the server keep anything for a room nobody is in (a
        room's position is kept, and may push other rooms' histories out,
        once it is asked for).

        :return: a Deferred firing with ``(members, epoch, seq)``.
        :raise NotInRoom: if the member is not in ``room``.
        """
        self.may(member_id, room, PRESENCE)
        return self.backplane.position(room).addCallback(
            lambda position: (self.presence(room), *position)
        )

    def replay(self, member: Member, room: str, epoch: str, seq: int) -> Deferred:
        """
        Deliver to ``member`` alone, in order, the messages of ``room`` after
        ``seq`` of ``epoch`` (the last one it saw before it lost its
        connection) and up to the last one this node had delivered when the
        member joined the room: it has received every later one live.

        So nothing is missed or sent twice, whenever the request comes.
        With the in-process backplane, called in the same reactor turn as
        :meth:`join`, the replay also comes before any live message; with
        a networked one, live messages may overtake replayed older ones
        (their ``seq`` tells the order).

        :return: a Deferred firing with whether everything it missed could
            be replayed.
        :raise NotInRoom: if the member is not in ``room``.
        """
        self.may(member.id, room, HISTORY)

        def deliver(result):
            messages, complete = result
            for message in messages:
                # A copy: what the member caches on it must not stay with
                # the kept message (see broadcaster.core.events.uncached).
                member.deliver(uncached(message))
            return complete

        joined_at = self._memberships[member.id][room]
        return self.backplane.missed(room, epoch, seq, joined_at).addCallback(deliver)

    def positioned(self, room: str, epoch: str, seq: int) -> None:
        """
        The backplane receives ``room`` from now on, live after ``seq`` of
        ``epoch``: members who joined while it was not received have had
        none of its messages up to there (a replay gives them those).
        """
        self._positions[room] = (epoch, seq)
        for member_id in self._rooms.get(room, ()):
            joined = self._memberships[member_id]
            if joined.get(room) is None:
                joined[room] = (epoch, seq)

    def forget_position(self, room: str) -> None:
        """
        The backplane no longer receives ``room``: where it stood here says
        nothing of what members joining later have missed.
        """
        if room not in self._rooms:
            self._positions.pop(room, None)

    def position(self, room: str) -> Deferred:
        """
        :return: a Deferred firing with ``(epoch, seq)`` of ``room`` now.
        """
        return self.backplane.position(room)

    def deliver(self, event: Event) -> None:
        """
        Fan ``event`` out to this node's members of its room: the backplane
        calls this for every event, from this node or another.
        """
        self.fanout.deliver(event, event.room)

    def _committed(self, room: str, events: List[Event]) -> None:
        """
        ``events`` are on their way to every member of ``room``: a member
        joining from now on gets only later ones live, and the observers
        are told of each.
        """
        for event in reversed(events):
            if isinstance(event, TextMessage) and event.kept:
                self._positions[room] = (event.epoch, event.seq)
                break
        for event in events:
            for observer in self._observers:
                try:
                    observer(event)
                except Exception:
                    self._log.failure("hub observer {observer!r} failed", observer=observer)

    def flush(self) -> None:
        """
        Deliver pending events now (for shutdown and tests).
        """
        self.fanout.flush()
