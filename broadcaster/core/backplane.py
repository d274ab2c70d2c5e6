"""
The backplane: how events travel between the hubs of every node, and where
room sequences and histories live.

The hub (:mod:`broadcaster.core.hub`) owns the local members and hands every
event it wants everyone to see to its backplane; the backplane numbers text
messages, keeps history, and gives events back to the hub of *each* node
(:meth:`Hub.deliver`) for fan-out to that node's members.  A node therefore
delivers its own clients' messages exactly once, through the same path as
everyone else's.

:class:`LocalBackplane` is the in-process one: a single node, everything
synchronous.  A Redis backplane implements the same interface with
sequences and histories in Redis, so several nodes act as one server.
Every method returns a Deferred, because a networked backplane answers
later; the local one answers at once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Protocol, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from broadcaster.core.events import Event, TextMessage
from broadcaster.core.history import DEFAULT_MEMORY, Histories, HistoryMemory
from broadcaster.core.members import Member
from broadcaster.core.moderation import Expulsion
from broadcaster.core.roster import Roster


class Attached(Protocol):
    """
    What a backplane may call on the hub it delivers to (the hub is one).
    """

    node_id: str
    #: Who each room lists; a networked backplane adds the other nodes'
    #: connections as it hears of them.
    roster: Roster

    def deliver(self, event: Event) -> None:
        """Fan ``event`` out to this node's members of its room."""

    def occupied(self, room: str) -> bool:
        """Whether anybody on this node is in ``room``."""

    def member(self, member_id: str) -> Optional[Member]:
        """The connected member with this id, or ``None``."""

    def members(self) -> List[Member]:
        """This node's members."""

    def rooms_of(self, member_id: str) -> List[str]:
        """The rooms a member is in."""

    def expel_here(self, expulsion: Expulsion, origin: Optional[str] = None) -> int:
        """Carry out an expulsion another node (``origin``) ordered."""

    def positioned(self, room: str, epoch: str, seq: int) -> None:
        """``room`` is received from now on, live after ``seq`` of ``epoch``."""

    def forget_position(self, room: str) -> None:
        """``room`` is no longer received."""


class Backplane(Protocol):
    """
    What the hub needs from a backplane.
    """

    #: Messages each room keeps (0: none).
    history_size: int

    #: The bytes of room history this process keeps (all of it in process;
    #: a networked backplane's fallback while its store is unreachable), and
    #: their bound, ``--history-memory``.  /metrics reports them.
    memory: HistoryMemory

    #: Seconds the fan-out should wait for a turn's events to gather
    #: before delivering them (see :attr:`broadcaster.core.fanout.FanOut.batch_delay`):
    #: 0 unless the backplane hands over one read's events turns apart.
    batch_delay: float

    def attach(self, hub: "Attached") -> None:
        """
        Deliver events to ``hub`` from now on.
        """

    def publish(self, event: Event) -> Deferred:
        """
        Send ``event`` to every node's hub, numbering it first if it is a
        text message.

        :return: a Deferred firing with the event as delivered (with its
            ``seq`` and ``epoch``).
        """

    def position(self, room: str) -> Deferred:
        """
        :return: a Deferred firing with ``(epoch, seq)``: where ``room``'s
            sequence stands now.
        """

    def history(self, room: str, limit: int, before: Optional[int] = None) -> Deferred:
        """
        :return: a Deferred firing with the last ``limit`` messages of
            ``room`` (those numbered below ``before``, if given), oldest first.
        """

    def missed(
        self, room: str, epoch: str, seq: int, joined_at: Optional[Tuple[str, int]]
    ) -> Deferred:
        """
        :param joined_at: ``(epoch, seq)`` of the last message delivered
            live before the member joined (``None``: none yet); later ones
            it has received live and must not get again.
        :return: a Deferred firing with ``(messages, complete)``: the
            messages of ``room`` after ``seq`` of ``epoch``, up to
            ``joined_at``, and whether that is all of them.
        """

    def room_occupied(self, room: str) -> None:
        """
        This node's first member of ``room`` joined it: a networked
        backplane receives the rooms its node has members in.
        """

    def room_vacated(self, room: str) -> None:
        """
        This node's last member of ``room`` left it.
        """

    def spread(self, expulsion: Expulsion) -> Deferred:
        """
        Have every other node carry out ``expulsion`` (the hub has carried
        it out on this one): a control message between nodes, never
        delivered to clients.

        :return: a Deferred firing with whether the other nodes were told
            (``False`` if they could not be; it never fails).
        """

    def state(self) -> dict:
        """
        :return: what /healthz shows: ``kind``, ``connected`` and whatever
            else helps an operator.
        """

    def nodes(self) -> Deferred:
        """
        Every node sharing the backplane, for the operator dashboard.

        :return: a Deferred firing with a list of :func:`node_entry`
            dicts, this node's included (``here``).
        """


def node_entry(
    node: str, connections: int, heartbeat_age: Optional[float], here: bool, alive: bool = True
) -> dict:
    """
    One node as :meth:`Backplane.nodes` lists it.

    :param connections: its clients (as the backplane knows them).
    :param heartbeat_age: seconds since its last heartbeat (``None``: not
        known, or nodes do not heartbeat).
    :param here: whether it is this node.
    :param alive: ``False`` once its heartbeat has stopped for good.
    """
    return {
        "node": node,
        "connections": connections,
        "heartbeat_age": heartbeat_age,
        "here": here,
        "alive": alive,
    }


def this_node(hub: "Attached") -> dict:
    """
    This node, as it knows itself: every client it has, no heartbeat.
    """
    return node_entry(hub.node_id, len(hub.members()), None, True)


class LocalBackplane:
    """
    A single node: sequences and histories in memory, delivery in the same
    call.

    :param clock: times the episodes of evictions over ``history_memory``.
    :param history_size: text messages each room keeps.
    :param max_rooms: rooms whose history is kept; beyond it, the least
        recently used rooms nobody is in are forgotten.
    :param history_memory: bytes all rooms' histories may keep together;
        beyond it, the rooms that keep the most forget their oldest
        messages (see :class:`~broadcaster.core.history.HistoryMemory`).
    """

    name = "local"
    batch_delay = 0.0

    def __init__(
        self,
        clock: IReactorTime,
        history_size: int = 100,
        max_rooms: int = 10000,
        history_memory: int = DEFAULT_MEMORY,
    ) -> None:
        self.history_size = history_size
        self._max_rooms = max_rooms
        self.memory = HistoryMemory(history_memory, clock)
        self._hub: Optional["Attached"] = None
        self.histories: Optional[Histories] = None

    def attach(self, hub: "Attached") -> None:
        self._hub = hub
        self.histories = Histories(
            self.history_size, self._max_rooms, hub.occupied, memory=self.memory
        )

    def publish(self, event: Event) -> Deferred:
        if isinstance(event, TextMessage):
            history = self.histories.get(event.room)
            seq = history.next_seq()
            event = replace(event, seq=seq, epoch=history.epoch)
            # Kept as delivered: the fan-out drops the encodings it cached
            # on it once the room's round is done (a copy per message, to
            # keep none, measured 14% of S1's throughput at 1000 clients).
            history.record(seq, event)
        self._hub.deliver(event)
        return succeed(event)

    def position(self, room: str) -> Deferred:
        history = self.histories.peek(room)
        if history is None:
            history = self.histories.get(room)
        return succeed((history.epoch, history.seq))

    def history(self, room: str, limit: int, before: Optional[int] = None) -> Deferred:
        history = self.histories.peek(room)
        return succeed(history.last(limit, before) if history is not None else [])

    def missed(
        self, room: str, epoch: str, seq: int, joined_at: Optional[Tuple[str, int]]
    ) -> Deferred:
        history = self.histories.get(room)
        if joined_at is None:
            upto = None
        elif joined_at[0] == history.epoch:
            upto = joined_at[1]
        else:
            # The sequence restarted since the member joined: all of the
            # current epoch has been delivered to it live.
            upto = 0
        result: Tuple[List[TextMessage], bool] = history.after(epoch, seq, upto=upto)
        return succeed(result)

    def room_occupied(self, room: str) -> None:
        # Every event is delivered in this process.
        pass

    def room_vacated(self, room: str) -> None:
        pass

    def spread(self, expulsion: Expulsion) -> Deferred:
        # There is no other node.
        return succeed(True)

    def state(self) -> dict:
        """
        For /healthz.
        """
        return {"kind": self.name, "connected": True}

    def nodes(self) -> Deferred:
        # There is no other node.
        return succeed([this_node(self._hub)])
