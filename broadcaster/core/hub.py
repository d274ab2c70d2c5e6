"""
The broadcast domain: who is connected, and fan-out of events to them.

Nothing here knows about sockets, HTTP or Autobahn.  A connection of any kind
(WebSocket today, raw TCP later) takes part by handing the hub a *member*: an
object with an ``id`` and a ``deliver(event)`` method.  The hub keeps those
members, stamps events with the time from an injected clock, and hands every
event to every member it concerns.

Keeping the domain apart from the protocols is what lets a Redis backplane
replace in-process fan-out later by swapping one object, and what lets the
tests drive it with plain Python objects and :class:`twisted.internet.task.Clock`.

Events are immutable values.  Each carries a small cache (:attr:`Event.wire`)
that protocol adapters use to encode and frame it once per wire format, so a
message sent to ten thousand clients is serialised once, not ten thousand times.

With ``batching`` (the server's setting), the events of one reactor turn go
out together: each member gets a room's new events in one call, so a
WebSocket client gets them in one write.  A round of such deliveries to
thousands of members takes milliseconds of ``send()`` calls; under load it
is delivered in slices (:data:`SWEEP_SLICE`), and events read between
slices join the round for the members still waiting, so each message waits
for its member's next turn rather than for the whole round.
"""

from __future__ import annotations

import itertools
import os
from time import perf_counter
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Protocol, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from broadcaster.core.backplane import Backplane, LocalBackplane
from broadcaster.core.history import Histories
from broadcaster.core.names import LOBBY
from broadcaster.core.stats import Stats


class Member(Protocol):
    """
    What the hub needs from a connection.

    ``deliver`` must not block; it should queue the event's bytes on the
    connection's transport and return.  If it raises, the hub logs the
    failure and carries on with the other members.

    ``shut_down`` asks the connection to close politely because the server
    is stopping (a WebSocket sends close code 1001); ``abort`` drops it
    when it has not gone in time.  Either way the member leaves the hub
    when its connection is lost.

    Optionally, with ``batching``:

    - ``deliver_many(batch)`` takes a room's events of one reactor turn (an
      :class:`EventBatch`) at once; without it they come one by one.
    - ``fan_out``, a function on the member's class, delivers a batch to a
      whole run of members of that class, where one call per member would
      cost more than the delivery itself:
      ``fan_out(hub, batch, members, index, occupants, deadline)`` serves
      ``members[index:]`` while they are of its class, skipping those no
      longer in ``occupants`` (the room), and returns the index of the
      first member it did not serve.  It looks at ``hub.timer()`` every
      ``hub.SLICE_CHECK`` members and stops once past ``deadline`` (if not
      ``None``); a member's failure goes to ``hub.delivery_failed`` and
      the others are still served.
    """

    id: str
    name: Optional[str]

    def deliver(self, event: "Event") -> None: ...

    def shut_down(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class Event:
    """
    Something that happened, to be told to members.

    :ivar ts: when it happened, in seconds since the epoch (from the hub's clock).
    :ivar wire: per-format cache of encoded bytes, filled by protocol adapters
        (see :func:`encoded`); not part of the event's value.
    """

    ts: float
    wire: Dict[object, object] = field(
        default_factory=dict, compare=False, repr=False, kw_only=True
    )
    #: The node whose hub created the event ("" if unknown): with several
    #: nodes, things that must happen once per event (webhooks) happen there.
    origin: str = field(default="", compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Joined(Event):
    """A member joined a room (every member joins the lobby on connecting)."""

    room: str
    member: str
    name: Optional[str] = None


@dataclass(frozen=True)
class Left(Event):
    """A member left a room, or disconnected and so left all of its rooms."""

    room: str
    member: str
    name: Optional[str] = None


@dataclass(frozen=True)
class Renamed(Event):
    """A member chose a new display name; told to each room it is in."""

    room: str
    member: str
    name: str


@dataclass(frozen=True)
class TextMessage(Event):
    """
    A text message from a member to a room, shown to everyone there unchanged.

    :ivar seq: its number in the room's sequence (see :mod:`broadcaster.core.history`).
    :ivar epoch: the run of the room's sequence that ``seq`` belongs to.
    :ivar kept: whether the backplane keeps it for replays.  A message
        delivered on this node only (the Redis backplane while Redis is
        unreachable) is not, and does not move the room's join position.
    """

    room: str
    sender: str
    text: str
    name: Optional[str] = None
    seq: int = 0
    epoch: str = ""
    kept: bool = field(default=True, compare=False)


@dataclass(frozen=True)
class BinaryMessage(Event):
    """An opaque binary message from a member, passed on byte for byte (lobby)."""

    sender: str
    data: bytes
    room: str = LOBBY


@dataclass(frozen=True)
class ImageMessage(Event):
    """
    An image from a member, already checked and normalised to an RGB PNG (lobby).

    :ivar image_id: unique per image, so clients can match metadata to bytes.
    """

    sender: str
    image_id: str
    png: bytes
    width: int
    height: int
    room: str = LOBBY


class EventBatch:
    """
    The events one room got in one reactor turn, in order, with a cache
    (:attr:`wire`) like :class:`Event`'s, so a member kind encodes the whole
    batch once for all its members.
    """

    __slots__ = ("events", "wire")

    def __init__(self, events: List[Event]) -> None:
        self.events = events
        self.wire: Dict[object, object] = {}

    def __iter__(self):
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


class _Sweep:
    """
    Events of one room on their way to some of its members, a slice of
    members at a time (see :meth:`Hub._sweep`).

    :ivar members: who gets :attr:`batch`, in order; those before
        :attr:`next` have had it.
    :ivar seconds: time spent delivering it so far.
    """

    __slots__ = ("events", "batch", "members", "next", "seconds")

    def __init__(self, events: List[Event], members: List[Member]) -> None:
        self.events = events
        self.batch = EventBatch(events)
        self.members = members
        self.next = 0
        self.seconds = 0.0

    def extend(self, events: List[Event]) -> None:
        """
        Add ``events`` for the members still waiting; the ones already
        served are dropped (they get ``events`` in a sweep of their own).
        """
        del self.members[: self.next]
        self.next = 0
        self.events = self.events + events
        self.batch = EventBatch(self.events)


#: Nobody: the members of a room that has none.
_NOBODY: Dict[str, Member] = {}


def encoded(event, key: object, encode: Callable[..., object]) -> object:
    """
    Encode ``event`` with ``encode`` once per ``key`` and reuse the result.

    Fan-out calls this for every recipient; only the first call for a given
    wire format does any work.

    :param key: identifies the wire format (e.g. the codec object).
    :param encode: produces the encoded form of the event.
    """
    try:
        return event.wire[key]
    except KeyError:
        result = event.wire[key] = encode(event)
        return result


def _random_node_id() -> str:
    return os.urandom(3).hex()


#: Seconds the fan-out delivers before letting the reactor read again,
#: when messages come faster than rounds end.  One send() to a loopback
#: client costs about 10 µs on a virtual machine, so a message to 1000
#: clients takes 10 ms: in 1 ms slices, a message arriving meanwhile joins
#: the round under way instead of waiting for it.
SWEEP_SLICE = 0.001

#: The sender id and display name of messages the server itself publishes
#: (the publish API).  Member ids always contain a "-", so it is never one.
SERVER_ID = "server"


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
        batching: bool = False,
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
        self.backplane: Backplane = backplane or LocalBackplane(history_size, max_rooms)
        self.backplane.attach(self)
        self._pending: Deque[Tuple[Event, str]] = deque()
        self._empty_waiters: List[Deferred] = []
        self._observers: List[Callable[[Event], None]] = []
        #: Deliver the events of one reactor turn together (see :meth:`_flush`).
        self.batching = batching
        #: Seconds to wait before delivering a batch: 0 is the end of this
        #: reactor turn, which holds every event of one network read.  A
        #: backplane that hands over events a turn apart needs a few
        #: milliseconds for them to go out together.
        self.batch_delay = 0.0
        self._batch: List[Tuple[Event, str]] = []
        self._flush_call = None
        # room -> deliveries under way there, oldest first; each member of
        # the room is waiting in at most one of them.
        self._sweeps: Dict[str, Deque[_Sweep]] = {}
        # room -> its members in none of its sweeps while some are under
        # way: served by one that is done, or joined since they began.
        self._outside: Dict[str, List[Member]] = {}
        self._sweep_call = None
        #: Seconds of delivering before the reactor gets to read again.
        self.sweep_slice = SWEEP_SLICE
        #: What slices are timed with (a member kind's ``fan_out`` looks at
        #: it too); tests put a fake one here.
        self.timer = perf_counter
        # When the last round began and ended (None: none yet), and how
        # long it took.
        self._round_started = 0.0
        self._quiet_since: Optional[float] = None
        self._last_round = 0.0
        self._delivering = False

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
        ``welcome`` and ``presence``: this node's members, then (with a
        networked backplane) the others' as last heard from them.  Each has
        an ``id`` and a ``name``.
        """
        return self.backplane.members(room)

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
    def histories(self) -> Histories:
        """
        The rooms' histories, with the in-process backplane.
        """
        return self.backplane.histories

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

    def connect(self, member: Member) -> Joined:
        """
        Add ``member`` and put it in the lobby.  Everyone in the lobby, the
        newcomer included, is told: a client learns its own id the same way
        it learns others'.
        """
        if member.id in self._members:
            raise ValueError("member {!r} is already connected".format(member.id))
        self._members[member.id] = member
        self._memberships[member.id] = {}
        joined = self._join(member, LOBBY, fresh=True)
        assert joined is not None
        return joined

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
        if not self._members:
            waiting, self._empty_waiters = self._empty_waiters, []
            for d in waiting:
                d.callback(None)
        return departures

    # Rooms

    def join(self, member: Member, room: str) -> Optional[Joined]:
        """
        Put a connected member in ``room`` and tell the room, newcomer included.

        :return: the announcement, or ``None`` if it was already there.
        :raise TooManyRooms: if the member is in as many rooms as allowed.
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
        if len(rooms) >= self.max_rooms_per_member:
            raise TooManyRooms(
                "already in {} rooms, the most allowed".format(self.max_rooms_per_member)
            )
        rooms[room] = self._positions.get(room)
        self._rooms.setdefault(room, {})[member.id] = member
        queue = self._sweeps.get(room)
        if queue:
            outside = self._outside.setdefault(room, [])
            if not fresh:
                # Back in a room it left while a round there was under way:
                # it must not get that round's events, older than its
                # position; it is a newcomer to the room.
                for sweep in queue:
                    try:
                        index = sweep.members.index(member)
                    except ValueError:
                        continue
                    del sweep.members[index]
                    if index < sweep.next:
                        sweep.next -= 1
                if member in outside:
                    outside.remove(member)
            outside.append(member)
        event = Joined(ts=self._clock.seconds(), origin=self.node_id, room=room, member=member.id, name=member.name)
        self.backplane.publish(event)
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
        event = Left(ts=self._clock.seconds(), origin=self.node_id, room=room, member=member.id, name=member.name)
        self.backplane.publish(event)
        return event

    def rename(self, member: Member) -> List[Renamed]:
        """
        Tell every room ``member`` is in that it now goes by ``member.name``.
        """
        events = []
        for room in self.rooms_of(member.id):
            event = Renamed(ts=self._clock.seconds(), origin=self.node_id, room=room, member=member.id, name=member.name)
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
        """
        member = self._members.get(sender)
        if member is None or room not in self._memberships[sender]:
            raise NotInRoom("not in room {!r}: join it first".format(room))
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
        """
        event = BinaryMessage(ts=self._clock.seconds(), origin=self.node_id, sender=sender, data=data)
        self.backplane.publish(event)
        return event

    def publish_image(self, sender: str, png: bytes, width: int, height: int) -> ImageMessage:
        """
        Send a normalised PNG from ``sender`` to everyone in the lobby.
        Members decide whether the sender hears its own image (the image
        port does not).
        """
        event = ImageMessage(
            ts=self._clock.seconds(),
            origin=self.node_id,
            sender=sender,
            image_id="{}-img{}".format(self.node_id, next(self._image_counter)),
            png=png,
            width=width,
            height=height,
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
        if room not in self._memberships.get(member_id, ()):
            raise NotInRoom("not in room {!r}: join it first".format(room))
        return self.backplane.history(room, limit, before)

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
        rooms = self._memberships.get(member.id, {})
        if room not in rooms:
            raise NotInRoom("not in room {!r}: join it first".format(room))
        def deliver(result):
            messages, complete = result
            for message in messages:
                member.deliver(message)
            return complete

        return self.backplane.missed(room, epoch, seq, rooms[room]).addCallback(deliver)

    def position(self, room: str) -> Deferred:
        """
        :return: a Deferred firing with ``(epoch, seq)`` of ``room`` now.
        """
        return self.backplane.position(room)

    def epoch(self, room: str) -> str:
        """
        The current epoch of ``room``'s sequence (in-process backplane).
        """
        return self.histories.get(room).epoch

    def deliver(self, event: Event) -> None:
        """
        Fan ``event`` out to this node's members of its room: the backplane
        calls this for every event, from this node or another.
        """
        self._fan_out(event, event.room)

    def _fan_out(self, event: Event, room: str) -> None:
        """
        Deliver ``event`` to every current member of ``room``, now, or with
        :attr:`batching` at the end of this reactor turn together with the
        room's other events of the turn.

        A delivery can cause another event (a member whose transport fails
        synchronously leaves, and its departure is announced).  Such events
        wait until the current one has reached everyone, so every member sees
        all events in one and the same order.
        """
        if self.batching:
            self._batch.append((event, room))
            if self._flush_call is None:
                self._flush_call = self._clock.callLater(self.batch_delay, self._flush)
            return
        self._pending.append((event, room))
        if self._delivering:
            return
        self._delivering = True
        stats = self.stats
        try:
            while self._pending:
                event, room = self._pending.popleft()
                if isinstance(event, TextMessage) and event.kept:
                    self._positions[room] = (event.epoch, event.seq)
                started = perf_counter()
                # Copy: deliveries may change the membership under us.
                recipients = list(self._rooms.get(room, {}).values())
                stats.deliveries += len(recipients)
                for member in recipients:
                    try:
                        member.deliver(event)
                    except Exception:
                        self._log.failure(
                            "delivery of {kind} to {client} failed; continuing with the others",
                            kind=type(event).__name__,
                            client=member.id,
                        )
                stats.fan_out_seconds.observe(perf_counter() - started)
                for observer in self._observers:
                    try:
                        observer(event)
                    except Exception:
                        self._log.failure("hub observer {observer!r} failed", observer=observer)
        finally:
            self._delivering = False

    def _flush(self) -> None:
        """
        Hand the events of the reactor turn that just ended to their rooms'
        sweeps (:meth:`_commit`) and start delivering them.  Events the
        deliveries cause go into the next batch.
        """
        self._flush_call = None
        # Under load: a round is under way, or the last one ended less time
        # ago than it took (the fan-out has been busy more than half the
        # time).  Only then is slicing worth its reactor turns; a lone
        # message goes out in one go.
        now = self.timer()
        busy = bool(self._sweeps) or (
            self._quiet_since is not None
            and now - self._quiet_since < max(self.sweep_slice, self._last_round)
        )
        if not self._sweeps:
            self._round_started = now
        batch, self._batch = self._batch, []
        by_room: Dict[str, List[Event]] = {}
        for event, room in batch:
            by_room.setdefault(room, []).append(event)
        stats = self.stats
        for room, events in by_room.items():
            for event in reversed(events):
                if isinstance(event, TextMessage) and event.kept:
                    # Joining from now on, a member gets only later ones
                    # live: these are on their way to everyone there now.
                    self._positions[room] = (event.epoch, event.seq)
                    break
            stats.deliveries += len(self._rooms.get(room, _NOBODY)) * len(events)
            self._commit(room, events)
            for event in events:
                for observer in self._observers:
                    try:
                        observer(event)
                    except Exception:
                        self._log.failure("hub observer {observer!r} failed", observer=observer)
        if self._sweep_call is not None:
            # Continue the round here, with the new events merged in.
            self._sweep_call.cancel()
        self._sweep(sliced=busy)

    def _commit(self, room: str, events: List[Event]) -> None:
        """
        Queue ``events`` for every member of ``room``.

        A member still waiting in a sweep under way gets them with that
        sweep's events, in the same write; the others (served already, or
        new) get them in a new sweep.  So while a delivery to thousands of
        members takes several slices, a message arriving meanwhile waits for
        the member's next turn, not for the end of the whole round.
        """
        queue = self._sweeps.get(room)
        if not queue:
            self._outside.pop(room, None)
            occupants = self._rooms.get(room, _NOBODY)
            if occupants:
                self._sweeps[room] = deque([_Sweep(events, list(occupants.values()))])
            return
        # Everyone in the room is either waiting in a sweep, served already
        # by the one under way, or outside them (served by one that is
        # done, or joined since they began).  Only the last two are listed
        # here, so this costs what was served since the last commit, not
        # the size of the room.
        rest: List[Member] = self._outside.pop(room, [])
        for sweep in queue:
            rest.extend(sweep.members[: sweep.next])
            sweep.extend(events)
        if rest:
            queue.append(_Sweep(events, rest))

    def _sweep(self, until_done: bool = False, sliced: bool = True) -> None:
        """
        Deliver the queued sweeps: each member gets a room's events in one
        call (:class:`EventBatch`), so a WebSocket client gets them in one
        write, framed once for every client of its kind.

        If ``sliced``, after :attr:`sweep_slice` seconds the rest waits for
        the next reactor turn: the reactor reads what arrived meanwhile, and
        :meth:`_commit` merges it into the members' turns still to come.
        """
        self._sweep_call = None
        if self._flush_call is not None and not self.batch_delay:
            # What the reactor read since the last slice: merge it into the
            # round first (that flush continues the round).
            self._flush_call.cancel()
            self._flush()
            return
        timer = self.timer
        deadline = None if until_done or not sliced else timer() + self.sweep_slice
        check = self.SLICE_CHECK
        for room in list(self._sweeps):
            queue = self._sweeps[room]
            # Members leave this dict when they leave the room; one coming
            # back is taken out of the sweeps (join), so this one will do.
            occupants = self._rooms.get(room, _NOBODY)
            while queue:
                sweep = queue[0]
                members = sweep.members
                batch = sweep.batch
                events = sweep.events
                index = sweep.next
                started = timer()
                while index < len(members):
                    member = members[index]
                    fan_out = getattr(member, "fan_out", None)
                    if fan_out is not None:
                        # The run of members of this kind that starts here.
                        index = fan_out(self, batch, members, index, occupants, deadline)
                        if deadline is not None and timer() > deadline:
                            break
                        continue
                    index += 1
                    # Gone from the room since (a leave, or a failed delivery).
                    if occupants.get(member.id) is not member:
                        continue
                    try:
                        deliver_many = getattr(member, "deliver_many", None)
                        if deliver_many is not None:
                            deliver_many(batch)
                        else:
                            for event in events:
                                member.deliver(event)
                    except Exception:
                        self.delivery_failed(member, batch)
                    if deadline is not None and not index % check and timer() > deadline:
                        break
                sweep.next = index
                sweep.seconds += timer() - started
                if index < len(members):
                    self._sweep_call = self._clock.callLater(0, self._sweep)
                    return
                queue.popleft()
                self.stats.fan_out_seconds.observe(sweep.seconds)
                if queue:
                    self._outside.setdefault(room, []).extend(members)
            del self._sweeps[room]
            self._outside.pop(room, None)
        self._quiet_since = timer()
        self._last_round = self._quiet_since - self._round_started

    #: Members served between looks at the clock.
    SLICE_CHECK = 16

    def delivery_failed(self, member: Member, batch: EventBatch) -> None:
        """
        Log the exception being handled: delivering ``batch`` to ``member``
        raised.  The round goes on with the other members.
        """
        self._log.failure(
            "delivery of {count} events to {client} failed; continuing with the others",
            count=len(batch),
            client=member.id,
        )

    def flush(self) -> None:
        """
        Deliver pending batched events now (for shutdown and tests).
        """
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush()
        if self._sweep_call is not None:
            self._sweep_call.cancel()
        if self._sweeps:
            self._sweep(until_done=True)
