"""
The member contract: everything the hub and the fan-out engine call on a
connection, declared here (as ``twisted/words`` declares ``IChatClient``)
rather than discovered with ``getattr``.

A connection of any kind takes part in the chat by handing the hub a
*member*.  :class:`Member` says what a member is; :class:`MemberBase`
gives the parts most kinds share: delivering a batch event by event, and
serving a run of members of one kind one call each.  A kind whose
delivery costs less than a call per member (the WebSocket protocol's fast
path) overrides :meth:`MemberBase.fan_out`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Protocol

from broadcaster.core.events import Event, EventBatch
from broadcaster.core.permissions import EVERYTHING, Grants
from broadcaster.core.stats import Stats


class Engine(Protocol):
    """
    What a member kind's ``fan_out`` may use of the engine that calls it
    (:class:`broadcaster.core.fanout.FanOut` is one).
    """

    #: The clock slices are timed with.
    timer: Callable[[], float]
    #: Members to serve between looks at :attr:`timer`.
    SLICE_CHECK: int
    stats: Stats

    def delivery_failed(self, member: "Member", batch: EventBatch) -> None:
        """Log the exception being handled: delivering to ``member`` raised."""


class Member(Protocol):
    """
    What the hub needs from a connection.

    ``deliver`` and ``deliver_many`` must not block: they queue the bytes
    of an event, or of a room's events of one reactor turn, on the
    connection and return.  If they raise, the failure is logged and the
    other members are still served.

    ``fan_out``, a function on the member's class, delivers a batch to a
    whole run of members of that class:
    ``fan_out(engine, batch, members, index, occupants, deadline)`` serves
    ``members[index:]`` while they are of its class, skipping those no
    longer in ``occupants`` (the room), and returns the index of the first
    member it did not serve.  It looks at ``engine.timer()`` every
    ``engine.SLICE_CHECK`` members and stops once past ``deadline`` (if not
    ``None``); a member's failure goes to ``engine.delivery_failed`` and
    the others are still served.

    ``shut_down`` asks the connection to close politely because the server
    is stopping (a WebSocket sends close code 1001); ``abort`` drops it
    when it has not gone in time.  ``expel`` closes it because the server
    was told to (:mod:`broadcaster.core.moderation`; a WebSocket sends
    close code 4003 with ``reason``) and answers whether it did (``False``:
    it was closing already).  Either way the member leaves the hub when
    its connection is lost.
    """

    id: str
    name: Optional[str]
    #: What kind of client it is (``plain``, ``json``, ``line``, ``image``,
    #: ``sse``), for the counts by kind; fixed once it has connected.
    kind: str
    #: Whether joining a room tells it the room's members (a JSON
    #: WebSocket's ``welcome`` and ``presence``): then the joins, leaves and
    #: renames of the room still waiting to go out are not for it (the list
    #: holds them); a client told no list hears them all.
    lists_members: bool
    #: Who sign-in says the client is, or ``None``.
    user: Optional[str]
    #: What it may do in which room (:mod:`broadcaster.core.permissions`).
    grants: Grants

    def deliver(self, event: Event) -> None: ...

    def deliver_many(self, batch: EventBatch) -> None: ...

    @staticmethod
    def fan_out(
        engine: Engine,
        batch: EventBatch,
        members: List["Member"],
        index: int,
        occupants: Dict[str, "Member"],
        deadline: Optional[float],
    ) -> int: ...

    def shut_down(self) -> None: ...

    def abort(self) -> None: ...

    def expel(self, reason: str) -> bool: ...


class MemberBase:
    """
    The parts of :class:`Member` most kinds of connection share; a kind
    implements ``deliver``, ``shut_down`` and ``abort``.
    """

    __slots__ = ()

    #: Every right in every room, unless the connection's sign-in said
    #: otherwise.
    grants: Grants = EVERYTHING
    #: Nobody in particular, unless sign-in said who.
    user: Optional[str] = None
    #: A kind of client the metrics do not name, unless the class says.
    kind: str = "other"
    #: Told no member list on joining, unless the class says.
    lists_members: bool = False

    def deliver_many(self, batch: EventBatch) -> None:
        """
        Deliver a room's events of one reactor turn, one by one.
        """
        for event in batch:
            self.deliver(event)

    @staticmethod
    def fan_out(engine, batch, members, index, occupants, deadline) -> int:
        """
        Serve the run of members of one class from ``members[index]``, one
        :meth:`deliver_many` each (see :class:`Member`).
        """
        kind = members[index].__class__
        timer = engine.timer
        check = engine.SLICE_CHECK
        count = len(members)
        while index < count:
            member = members[index]
            if member.__class__ is not kind:
                break
            index += 1
            # Gone from the room since (a leave, or a failed delivery).
            if occupants.get(member.id) is member:
                try:
                    member.deliver_many(batch)
                except Exception:
                    engine.delivery_failed(member, batch)
            if deadline is not None and not index % check and timer() > deadline:
                break
        return index

    def shut_down(self) -> None:
        """The server is stopping: nothing to close by default."""

    def abort(self) -> None:
        """The server is stopping and this member did not go in time."""

    def expel(self, reason: str) -> bool:
        """The server was told to disconnect this member: nothing to close by default."""
        return False
