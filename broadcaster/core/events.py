"""
What happens in the chat, as immutable values: members joining, leaving and
renaming, text and binary messages and images (:class:`Event` and its
kinds), and a room's events of one reactor turn (:class:`EventBatch`).

Each event and batch carries a small cache (``wire``) that protocol
adapters fill through :func:`encoded`, to encode and frame it once per wire
format: a message sent to ten thousand clients is serialised once, not ten
thousand times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, TypeVar

from broadcaster.core.names import LOBBY

E = TypeVar("E", bound="Event")


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

    #: Whether members are told of it (not a field: only joins, leaves
    #: and renames of a user with several connections may be quiet).
    announced = True


@dataclass(frozen=True)
class Joined(Event):
    """
    A connection joined a room (every member joins the lobby on connecting).

    :ivar user: who the connection signed in as, or ``None``.
    :ivar connections: the user's connections in the room now, this one
        included (1 for an anonymous connection).
    :ivar announced: whether members are told: only of a user's first
        connection there (see :mod:`broadcaster.core.roster`).  Observers
        (webhooks) hear of every connection.
    """

    room: str
    member: str
    name: Optional[str] = None
    user: Optional[str] = None
    connections: int = 1
    announced: bool = True


@dataclass(frozen=True)
class Left(Event):
    """
    A connection left a room, or disconnected and so left all of its rooms.

    ``connections`` counts the user's connections still there; members are
    told (``announced``) when its last one goes.
    """

    room: str
    member: str
    name: Optional[str] = None
    user: Optional[str] = None
    connections: int = 0
    announced: bool = True


@dataclass(frozen=True)
class Renamed(Event):
    """
    A connection chose a new display name; told to each room it is in
    (``announced`` if that changes the name the room lists its user by).
    """

    room: str
    member: str
    name: str
    user: Optional[str] = None
    connections: int = 1
    announced: bool = True


#: Who comes and goes: what a member without the ``presence`` right in a
#: room is not told of there.
PRESENCE_EVENTS = (Joined, Left, Renamed)


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
    An image from a member, already checked and normalised to an RGB PNG
    (in the lobby, unless a JSON client uploaded it to another room).

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


def uncached(event: E) -> E:
    """
    A copy of ``event`` with an empty :attr:`~Event.wire` cache, for keeping
    it (room history).

    The fan-out caches on the event it delivers the encodings it made: a
    framed copy of the text per wire format, each as large as the text or
    larger (a text message delivered to JSON, plain and line-bridge clients
    holds about six times its text).  They serve the one delivery; kept
    with the message they would multiply what history costs.
    """
    # Not dataclasses.replace: this is on the path of every text message,
    # and copying the attribute dict is seven times faster.
    copy = object.__new__(type(event))
    fields = copy.__dict__
    fields.update(event.__dict__)
    fields["wire"] = {}
    return copy


#: The sender id and display name of messages the server itself publishes
#: (the publish API).  Member ids always contain a "-", so it is never one.
SERVER_ID = "server"
