"""
Which rooms' channels a node receives: only those it has members in.

Every room has a sharded pub/sub channel (Redis 7 ``SSUBSCRIBE``; on a
cluster it lives on the shard of the room's keys), on which its messages
are published.  A node subscribes to a room's channel when its first member
joins the room and unsubscribes a grace period after its last one left (a
member who comes back meanwhile finds it still received), so a node pays
for the traffic of its own clients' rooms only.  The lobby, which nearly
every client is in, is always received.

*No gap, no repeat.*  A subscription is ready once Redis has confirmed it
and the room's position has been read after that: messages up to that
position were published before the node listened (a member who joined
meanwhile recovers them with ``since``), later ones arrive live.  What
arrives between the confirmation and the read is held
(:meth:`RoomChannels.receive`), then the messages numbered up to that
position are dropped and the rest delivered: none twice, none missed.
Until a room's subscription is ready, the backplane also holds the node's
own publications to it and the answers that tell a member where the room
stands.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from broadcaster.core.events import Event, TextMessage
from broadcaster.core.names import LOBBY

#: Seconds a room's channel is kept after its last member here left.
GRACE = 10.0


class _Room:
    """
    One room's subscription.

    :ivar live_from: ``(epoch, seq)`` once ready: later messages arrive live.
    :ivar waiting: Deferreds fired once it is ready (or cannot be).
    :ivar occupied: whether this node has members there.
    :ivar drop: the grace timer, once the last member left.
    """

    __slots__ = ("live_from", "waiting", "occupied", "drop", "attempt", "held", "positioning")

    def __init__(self) -> None:
        self.live_from: Optional[Tuple[str, int]] = None
        #: Between the subscription and the read of the position: what
        #: arrives is held.
        self.positioning = False
        self.waiting: List[Deferred] = []
        #: Messages that arrived before it was ready, in order.
        self.held: List[Event] = []
        self.occupied = True
        self.drop = None
        self.attempt = 0


class RoomChannels:
    """
    The rooms whose channels this node receives (see the module docstring).

    :param channel: the channel of a room.
    :param position: reads where a room stands now: a Deferred of
        ``(epoch, seq)``.
    :param positioned: told ``(room, epoch, seq)`` when a room's
        subscription is ready (the hub: members who joined meanwhile have
        received none of its messages up to there).
    :param forget: told a room no longer received (the hub forgets where
        it stood there: messages will be missed from now on).
    :param deliver: delivers a message to the hub.
    :param always: the rooms received whether or not this node has members
        there (the lobby, which nearly every client joins; none on a Redis
        server that does not hold the lobby, see :mod:`broadcaster.redis.ring`).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        channel: Callable[[str], str],
        position: Callable[[str], Deferred],
        positioned: Callable[[str, str, int], None],
        forget: Callable[[str], None],
        deliver: Callable[[Event], None],
        grace: float = GRACE,
        always: Iterable[str] = (LOBBY,),
    ) -> None:
        self._deliver = deliver
        self._clock = clock
        self._channel = channel
        self._position = position
        self._positioned = positioned
        self._forget = forget
        self.grace = grace
        self._rooms: Dict[str, _Room] = {}
        self._always: Set[str] = set(always)
        self._subscription = None
        for room in self._always:
            self._rooms[room] = _Room()

    def rooms(self) -> List[str]:
        """
        The rooms received (or being subscribed to) now.
        """
        return list(self._rooms)

    def received(self, room: str) -> bool:
        """
        Whether this node listens to ``room``'s channel (ready or not).
        """
        return room in self._rooms

    def ready(self, room: str) -> bool:
        room_state = self._rooms.get(room)
        return room_state is not None and room_state.live_from is not None

    def when_ready(self, room: str) -> Deferred:
        """
        A Deferred fired (with ``None``) once ``room``'s subscription is
        ready, or at once if it is, or is not wanted; also fired if it
        cannot be made now (Redis went away): the caller then finds Redis
        unreachable and serves locally.
        """
        room_state = self._rooms.get(room)
        if room_state is None or room_state.live_from is not None or self._subscription is None:
            return succeed(None)
        if not room_state.positioning:
            # Its subscription failed on this connection: nothing to wait for.
            return succeed(None)
        d: Deferred = Deferred()
        room_state.waiting.append(d)
        return d

    # The hub's members come and go

    def occupy(self, room: str) -> None:
        """
        This node's first member of ``room`` joined it.
        """
        room_state = self._rooms.get(room)
        if room_state is not None:
            room_state.occupied = True
            if room_state.drop is not None and room_state.drop.active():
                room_state.drop.cancel()
            room_state.drop = None
            return
        room_state = self._rooms[room] = _Room()
        if self._subscription is not None:
            self._subscribe(room, room_state)

    def vacate(self, room: str) -> None:
        """
        This node's last member of ``room`` left it: stop receiving it after
        the grace period, unless a member comes back.
        """
        room_state = self._rooms.get(room)
        if room_state is None or room in self._always:
            return
        room_state.occupied = False
        if room_state.drop is None:
            room_state.drop = self._clock.callLater(self.grace, self._drop, room)

    def _drop(self, room: str) -> None:
        room_state = self._rooms.pop(room, None)
        if room_state is None:
            return
        self._fire(room_state)
        self._release(room_state)
        self._forget(room)
        if self._subscription is not None:
            self._subscription.sunsubscribe(self._channel(room)).addErrback(
                self._failed, "unsubscribing from", room
            )

    # The subscribing connection comes and goes

    def attach(self, subscription) -> None:
        """
        A subscribing connection is up: subscribe to every room wanted.
        """
        self._subscription = subscription
        for room, room_state in list(self._rooms.items()):
            self._subscribe(room, room_state)

    def detach(self) -> None:
        """
        The subscribing connection is gone: every room must be subscribed
        to again, and its position read again, on the next one.
        """
        self._subscription = None
        for room, room_state in self._rooms.items():
            room_state.live_from = None
            room_state.positioning = False
            room_state.attempt += 1
            self._fire(room_state)
            self._release(room_state)

    def stop(self) -> None:
        """
        The node is stopping: no grace timer is left behind.
        """
        for room_state in self._rooms.values():
            if room_state.drop is not None and room_state.drop.active():
                room_state.drop.cancel()
            room_state.drop = None
            self._fire(room_state)

    def _subscribe(self, room: str, room_state: _Room) -> None:
        room_state.live_from = None
        room_state.positioning = True
        room_state.attempt += 1
        attempt = room_state.attempt
        subscription = self._subscription

        def still_wanted() -> bool:
            return (
                self._rooms.get(room) is room_state
                and room_state.attempt == attempt
                and self._subscription is subscription
            )

        def subscribed(_):
            if still_wanted():
                return self._position(room).addCallback(positioned)

        def positioned(position):
            if not still_wanted():
                return
            epoch, seq = position
            room_state.live_from = (epoch, seq)
            room_state.positioning = False
            self._positioned(room, epoch, seq)
            self._release(room_state)
            self._fire(room_state)

        def failed(failure):
            self._failed(failure, "subscribing to", room)
            if still_wanted():
                # Delivered as it comes until the next connection tries again.
                room_state.positioning = False
                self._release(room_state)
                self._fire(room_state)

        subscription.ssubscribe(self._channel(room)).addCallback(subscribed).addErrback(failed)

    def _release(self, room_state: _Room) -> None:
        """
        Deliver what was held for a room: once it is ready, those numbered
        after its position; else (it will not be ready on this
        connection) all of it, rather than lose any.
        """
        held, room_state.held = room_state.held, []
        for event in held:
            if self._admissible(room_state, event):
                self._deliver(event)

    def _fire(self, room_state: _Room) -> None:
        waiting, room_state.waiting = room_state.waiting, []
        for d in waiting:
            d.callback(None)

    def _failed(self, failure, what: str, room: str) -> None:
        self._log.warn(
            "{what} the channel of room {room} failed: {error}",
            what=what,
            room=room,
            error=failure.getErrorMessage(),
        )

    # Messages

    def receive(self, event: Event) -> None:
        """
        A message arrived on a room's channel: deliver it, hold it until
        the room's subscription is ready, or drop it if it was numbered
        before (see the module docstring).
        """
        room_state = self._rooms.get(event.room)
        if room_state is None:
            self._deliver(event)
        elif room_state.positioning:
            room_state.held.append(event)
        elif self._admissible(room_state, event):
            self._deliver(event)

    @staticmethod
    def _admissible(room_state: _Room, event: Event) -> bool:
        if room_state.live_from is None or not isinstance(event, TextMessage):
            return True
        epoch, seq = room_state.live_from
        return event.epoch != epoch or event.seq > seq
