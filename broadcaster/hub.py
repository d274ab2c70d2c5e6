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
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


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
    """

    id: str

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


@dataclass(frozen=True)
class Joined(Event):
    """A member connected."""

    member: str


@dataclass(frozen=True)
class Left(Event):
    """A member disconnected."""

    member: str


@dataclass(frozen=True)
class TextMessage(Event):
    """A text message from a member, to be shown to everyone unchanged."""

    sender: str
    text: str


@dataclass(frozen=True)
class BinaryMessage(Event):
    """An opaque binary message from a member, passed on byte for byte."""

    sender: str
    data: bytes


@dataclass(frozen=True)
class ImageMessage(Event):
    """
    An image from a member, already checked and normalised to an RGB PNG.

    :ivar image_id: unique per image, so clients can match metadata to bytes.
    """

    sender: str
    image_id: str
    png: bytes
    width: int
    height: int


def encoded(event: Event, key: object, encode: Callable[[Event], object]) -> object:
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


class Hub:
    """
    The set of connected members and in-process fan-out between them.

    Ids are ``<node>-<n>``: ``n`` counts connections on this node and ``node``
    is random per process (or set by the operator), so ids stay unique when
    several nodes share one backplane.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, node_id: Optional[str] = None) -> None:
        self._clock = clock
        self.node_id = node_id or _random_node_id()
        self._counter = itertools.count(1)
        self._image_counter = itertools.count(1)
        self._members: Dict[str, Member] = {}
        self._pending: Deque[Event] = deque()
        self._empty_waiters: List[Deferred] = []
        self._delivering = False

    def new_id(self) -> str:
        """
        Allocate an id for a connection that is about to join.
        """
        return "{}-{}".format(self.node_id, next(self._counter))

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
        The ids of the connected members, in the order they joined.
        """
        return list(self._members)

    def join(self, member: Member) -> Joined:
        """
        Add ``member`` and announce it to everyone, the newcomer included, so
        that a client learns its own id the same way it learns others'.
        """
        if member.id in self._members:
            raise ValueError("member {!r} has already joined".format(member.id))
        self._members[member.id] = member
        event = Joined(ts=self._clock.seconds(), member=member.id)
        self._fan_out(event)
        return event

    def leave(self, member: Member) -> Optional[Left]:
        """
        Remove ``member`` and announce its departure to the others.

        Leaving twice, or leaving without having joined (a connection that
        failed its handshake), is harmless and announces nothing.
        """
        if self._members.get(member.id) is not member:
            return None
        del self._members[member.id]
        event = Left(ts=self._clock.seconds(), member=member.id)
        self._fan_out(event)
        if not self._members:
            waiting, self._empty_waiters = self._empty_waiters, []
            for d in waiting:
                d.callback(None)
        return event

    def members(self) -> List[Member]:
        """
        The connected members, in the order they joined.
        """
        return list(self._members.values())

    def when_empty(self) -> Deferred:
        """
        :return: a Deferred that fires once no member is left.
        """
        if not self._members:
            return succeed(None)
        d: Deferred = Deferred()
        self._empty_waiters.append(d)
        return d

    def publish_text(self, sender: str, text: str) -> TextMessage:
        """
        Send ``text`` from ``sender`` to every member, the sender included.
        """
        event = TextMessage(ts=self._clock.seconds(), sender=sender, text=text)
        self._fan_out(event)
        return event

    def publish_binary(self, sender: str, data: bytes) -> BinaryMessage:
        """
        Send ``data`` from ``sender`` to every member, the sender included.
        """
        event = BinaryMessage(ts=self._clock.seconds(), sender=sender, data=data)
        self._fan_out(event)
        return event

    def publish_image(self, sender: str, png: bytes, width: int, height: int) -> ImageMessage:
        """
        Send a normalised PNG from ``sender`` to every member.  Members decide
        whether the sender hears its own image (the image port does not).
        """
        event = ImageMessage(
            ts=self._clock.seconds(),
            sender=sender,
            image_id="{}-img{}".format(self.node_id, next(self._image_counter)),
            png=png,
            width=width,
            height=height,
        )
        self._fan_out(event)
        return event

    def _fan_out(self, event: Event) -> None:
        """
        Deliver ``event`` to every current member.

        A delivery can cause another event (a member whose transport fails
        synchronously leaves, and its departure is announced).  Such events
        wait until the current one has reached everyone, so every member sees
        all events in one and the same order.
        """
        self._pending.append(event)
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._pending:
                event = self._pending.popleft()
                # Copy: deliveries may change the membership under us.
                for member in list(self._members.values()):
                    try:
                        member.deliver(event)
                    except Exception:
                        self._log.failure(
                            "delivery of {kind} to {client} failed; continuing with the others",
                            kind=type(event).__name__,
                            client=member.id,
                        )
        finally:
            self._delivering = False
