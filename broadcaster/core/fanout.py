"""
The fan-out engine: how events reach the members of their room.

The events of one reactor turn go out together: each member gets a room's
new events in one call (an :class:`~broadcaster.core.events.EventBatch`),
so a WebSocket client gets them in one write, framed once for every client
of its kind.  A round of such deliveries to thousands of members takes
milliseconds of ``send()`` calls; under load it is delivered in slices
(:data:`SWEEP_SLICE`), and events read between slices join the round for
the members still waiting, so each message waits for its member's next
turn rather than for the whole round.

Members are served a run at a time through their class's ``fan_out`` (see
:class:`broadcaster.core.members.Member`): a kind with a fast path serves
its whole run in one loop.

There is one engine, and one way through it.  :attr:`FanOut.immediate`
only decides *when* it runs: at the end of the reactor turn (the server's
way), or at once (once the server has stopped, so that nothing is left on
a timer).
"""

from __future__ import annotations

from collections import deque
from time import perf_counter
from typing import Callable, Deque, Dict, FrozenSet, List, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from broadcaster.core.events import PRESENCE_EVENTS, Event, EventBatch, TextMessage
from broadcaster.core.members import Member
from broadcaster.core.stats import Stats

#: Seconds the fan-out delivers before letting the reactor read again,
#: when messages come faster than rounds end.  One send() to a loopback
#: client costs about 10 µs on a virtual machine, so a message to 1000
#: clients takes 10 ms: in 1 ms slices, a message arriving meanwhile joins
#: the round under way instead of waiting for it.
SWEEP_SLICE = 0.001

#: A batch of joins, leaves and renames alone (a connection storm) waits
#: until this many times the last round's length has passed since it
#: ended: the rounds that tell thousands of members of each other's
#: arrivals then take at most a quarter of the time, and their events are
#: sent in fewer, larger writes.  A message flushes them at once.
PRESENCE_PACE = 3.0

#: ... but never longer than this (seconds) ...
PRESENCE_WAIT_MAX = 0.25

#: ... and not at all for a wait shorter than this: small rooms' presence
#: goes out at the end of the turn, as messages do.
PRESENCE_WAIT_MIN = 0.001

#: ... and no longer once no join, leave or rename has come for this long
#: (seconds): the storm is over (or paused), and its last arrivals are not
#: held for a pace set for the arrivals that no longer come.
PRESENCE_QUIET = 0.005

#: Nobody: the members of a room that has none.
_NOBODY: Dict[str, Member] = {}


class _Sweep:
    """
    Events of one room on their way to some of its members, a slice of
    members at a time (see :meth:`FanOut._sweep`).

    Its events are those of the round's log (every event committed in the
    room since the round began) from :attr:`start` on: every commit during
    the round adds its events to every sweep still waiting, so they are
    never copied into each sweep; the batch is made when the sweep is
    served.  (Copied, a long round's waiting sweeps held events growing
    with the square of its commits.)

    :ivar members: who gets :attr:`batch`, in order; those before
        :attr:`next` have had it.
    :ivar seconds: time spent delivering it so far.
    :ivar blind: whether its members are not told who comes and goes
        (they lack the ``presence`` right in the room): its events never
        include joins, leaves or renames.
    :ivar skip: the ids of events its members are not to get (the presence
        events that waited when they joined; see :meth:`FanOut.joined`).
    """

    __slots__ = ("_log", "start", "_batch", "members", "next", "seconds", "blind", "skip")

    def __init__(
        self,
        log: List[Event],
        start: int,
        members: List[Member],
        blind: bool = False,
        skip: FrozenSet[int] = frozenset(),
    ) -> None:
        self._log = log
        self.start = start
        self._batch: Optional[EventBatch] = None
        self.members = members
        self.next = 0
        self.seconds = 0.0
        self.blind = blind
        self.skip = skip

    @property
    def batch(self) -> EventBatch:
        """Its events, as one batch for its members."""
        batch = self._batch
        if batch is None:
            events = self._log[self.start :]
            if self.blind:
                events = _unseen(events)
            if self.skip:
                events = [event for event in events if id(event) not in self.skip]
            batch = self._batch = EventBatch(events)
        return batch

    def extend(self) -> None:
        """
        Events were added to the round's log: the members still waiting
        get them too; the ones already served are dropped (they get them
        in a sweep of their own).
        """
        del self.members[: self.next]
        self.next = 0
        self._batch = None


def _late_groups(late: Dict[str, Tuple[Member, int]], placed) -> List[Tuple[FrozenSet[int], List[Member]]]:
    """
    The members who joined a room while presence events waited, grouped
    by where the batch stood then, each group with the ids of the events
    it is not to get: the presence events before that.
    """
    groups: Dict[int, List[Member]] = {}
    for member, cut in late.values():
        groups.setdefault(cut, []).append(member)
    return [
        (
            frozenset(
                id(event)
                for index, event in placed
                if index < cut and isinstance(event, PRESENCE_EVENTS)
            ),
            members,
        )
        for cut, members in groups.items()
    ]


def _unseen(events: List[Event]) -> List[Event]:
    """
    ``events`` without the joins, leaves and renames.
    """
    return [event for event in events if not isinstance(event, PRESENCE_EVENTS)]


class FanOut:
    """
    Delivers events to the members of their room (see the module docstring).

    :param clock: when a batch is delivered (``callLater``).
    :param rooms: room -> member id -> member, in join order: the hub's own
        table, read as it changes.
    :param committed: called with ``(room, events)`` once a room's events of
        a turn are on their way to every member there: the hub moves the
        room's join position and tells its observers.
    :param blind: room -> member id -> member, for the members of a room
        who are not told who comes and goes there (the hub's table, read
        as it changes).
    """

    _log = Logger()

    #: Members served between looks at the clock.
    SLICE_CHECK = 16

    def __init__(
        self,
        clock: IReactorTime,
        rooms: Dict[str, Dict[str, Member]],
        stats: Stats,
        committed: Callable[[str, List[Event]], None],
        blind: Optional[Dict[str, Dict[str, Member]]] = None,
    ) -> None:
        self._clock = clock
        self._rooms = rooms
        self._blind = blind if blind is not None else {}
        self.stats = stats
        self._committed = committed
        #: Seconds to wait before delivering a batch: 0 is the end of this
        #: reactor turn, which holds every event of one network read.  A
        #: backplane that hands over events a turn apart needs a few
        #: milliseconds for them to go out together.
        self.batch_delay = 0.0
        #: Deliver at once instead of at the end of the turn (see the
        #: module docstring).
        self.immediate = False
        self._batch: List[Tuple[Event, str]] = []
        self._flush_call = None
        # Whether that flush waits for the pace of presence rounds: then
        # until when at most, and when the last presence event came.
        self._paced = False
        self._paced_until = self._last_presence = 0.0
        #: Seconds without presence events after which a paced batch goes
        #: out (:data:`PRESENCE_QUIET`).
        self.presence_quiet = PRESENCE_QUIET
        #: How many times the last round's length presence-only batches
        #: wait (:data:`PRESENCE_PACE`; 0: not at all).
        self.presence_pace = PRESENCE_PACE
        # room -> joins, leaves and renames in the batch
        self._pending_presence: Dict[str, int] = {}
        # room -> its first kept message in the batch (before_pending: a
        # scan of the batch for each join was quadratic in a storm).
        self._first_kept: Dict[str, TextMessage] = {}
        # room -> member id -> (member, where the batch stood when it
        # joined): the presence events before that are in what it was told
        # of the room, not for it.
        self._cutoffs: Dict[str, Dict[str, Tuple[Member, int]]] = {}
        # room -> deliveries under way there, oldest first; each member of
        # the room is waiting in at most one of them.
        self._sweeps: Dict[str, Deque[_Sweep]] = {}
        # room -> its members in none of its sweeps while some are under
        # way: served by one that is done, or joined since they began.
        self._outside: Dict[str, List[Member]] = {}
        # room -> the events of its round under way, in order, each once:
        # the log its sweeps take their events from (see _Sweep), and
        # whose cached encodings are dropped when the round is done.
        self._round_events: Dict[str, List[Event]] = {}
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

    def deliver(self, event: Event, room: str) -> None:
        """
        Deliver ``event`` to every current member of ``room``, with the
        room's other events of this reactor turn.

        A delivery can cause another event (a member whose transport fails
        synchronously leaves, and its departure is announced).  Such events
        go out in the next batch, so every member sees all events in one and
        the same order.
        """
        self._batch.append((event, room))
        presence = isinstance(event, PRESENCE_EVENTS)
        if presence:
            self._pending_presence[room] = self._pending_presence.get(room, 0) + 1
        elif room not in self._first_kept and isinstance(event, TextMessage) and event.kept:
            self._first_kept[room] = event
        if self.immediate:
            if not self._delivering:
                self.flush()
        elif self._flush_call is None:
            wait = self._presence_wait() if presence else 0.0
            self._paced = wait > self.batch_delay
            if self._paced:
                now = self._last_presence = self._clock.seconds()
                self._paced_until = now + wait
                self._flush_call = self._clock.callLater(
                    min(wait, self.presence_quiet), self._paced_check
                )
            else:
                self._flush_call = self._clock.callLater(max(wait, self.batch_delay), self._flush)
        elif self._paced:
            if presence:
                self._last_presence = self._clock.seconds()
            else:
                # A message goes out at the end of this turn, with the
                # joins and leaves before it.
                self._flush_call.cancel()
                self._paced = False
                self._flush_call = self._clock.callLater(self.batch_delay, self._flush)

    def _paced_check(self) -> None:
        """
        A paced batch goes out when its pace is up, or as soon as no
        presence event has come for :attr:`presence_quiet` seconds.
        """
        now = self._clock.seconds()
        quiet = now - self._last_presence
        # (A little slack: timers fire on float sums of their delays.)
        if quiet >= self.presence_quiet - 1e-9 or now >= self._paced_until - 1e-9:
            self._flush()
            return
        self._flush_call = self._clock.callLater(
            min(self.presence_quiet - quiet, self._paced_until - now), self._paced_check
        )

    def _presence_wait(self) -> float:
        """
        Seconds a batch of presence events waits (see :data:`PRESENCE_PACE`).
        """
        if not self.presence_pace:
            return 0.0
        now = self.timer()
        if self._sweeps:
            # A round is under way: as long again as it has lasted, at least.
            length = max(self._last_round, now - self._round_started)
            wait = self.presence_pace * length
        elif self._quiet_since is None:
            return 0.0
        else:
            wait = self.presence_pace * self._last_round - (now - self._quiet_since)
        if wait < PRESENCE_WAIT_MIN:
            return 0.0
        return min(wait, PRESENCE_WAIT_MAX)

    _delivering = False

    def joined(self, member: Member, room: str, fresh: bool) -> None:
        """
        ``member`` has just joined ``room`` (``fresh``: it has just
        connected, so it cannot be in any round under way).  It gets only
        events committed from now on: if a round is under way there it
        waits outside it, and if it was still waiting in one (it left and
        came back) it is taken out.  If it is told the room's members on
        joining (:attr:`~broadcaster.core.members.Member.lists_members`),
        the joins, leaves and renames of the room still waiting to go out
        are not for it: that list holds them already.
        """
        if self._pending_presence.get(room) and member.lists_members:
            self._cutoffs.setdefault(room, {})[member.id] = (member, len(self._batch))
        queue = self._sweeps.get(room)
        if not queue:
            return
        outside = self._outside.setdefault(room, [])
        if not fresh:
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

    def before_pending(self, room: str) -> Optional[Tuple[str, int]]:
        """
        Where ``room``'s sequence stood before the first kept message still
        waiting for the end of this turn, or ``None`` if none waits.  A
        member joining now gets those live, so they are not what it missed.
        """
        event = self._first_kept.get(room)
        if event is None:
            return None
        return event.epoch, event.seq - 1

    def _flush(self) -> None:
        """
        Hand the events of the reactor turn that just ended to their rooms'
        sweeps (:meth:`_commit`) and start delivering them.  Events the
        deliveries cause go into the next batch.
        """
        self._flush_call = None
        self._paced = False
        self._pending_presence = {}
        cutoffs, self._cutoffs = self._cutoffs, {}
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
        self._first_kept = {}
        by_room: Dict[str, List[Event]] = {}
        # Events nobody is told of (a user's second connection coming or
        # going): only the observers (webhooks) hear of them.
        quiet: Optional[Dict[str, List[Event]]] = None
        # For the rooms where a member joined while presence events waited:
        # each event with its place in the batch.
        placed: Dict[str, List[Tuple[int, Event]]] = {}
        for index, (event, room) in enumerate(batch):
            if event.announced:
                by_room.setdefault(room, []).append(event)
                if room in cutoffs:
                    placed.setdefault(room, []).append((index, event))
            else:
                if quiet is None:
                    quiet = {}
                quiet.setdefault(room, []).append(event)
        stats = self.stats
        for room, events in by_room.items():
            stats.deliveries += len(self._rooms.get(room, _NOBODY)) * len(events)
            late = cutoffs.get(room)
            self._commit(room, events, _late_groups(late, placed.get(room, ())) if late else None)
            self._committed(room, events)
        if quiet is not None:
            for room, events in quiet.items():
                self._committed(room, events)
        if self._sweep_call is not None:
            # Continue the round here, with the new events merged in.
            self._sweep_call.cancel()
        self._sweep(sliced=busy and not self.immediate)

    def _commit(
        self,
        room: str,
        events: List[Event],
        late: Optional[List[Tuple[FrozenSet[int], List[Member]]]] = None,
    ) -> None:
        """
        Queue ``events`` for every member of ``room``.

        ``late`` are the members who joined while presence events of the
        room waited, in groups, each with the events it is not to get:
        those, which what it was told of the room on joining holds already.

        A member still waiting in a sweep under way gets them with that
        sweep's events, in the same write; the others (served already, or
        new) get them in a new sweep.  So while a delivery to thousands of
        members takes several slices, a message arriving meanwhile waits for
        the member's next turn, not for the end of the whole round.
        """
        queue = self._sweeps.get(room)
        late_ids = {member.id for _, group in late for member in group} if late else ()
        if not queue:
            self._outside.pop(room, None)
            occupants = self._rooms.get(room, _NOBODY)
            if occupants:
                log = list(events)
                members = list(occupants.values())
                if late_ids:
                    members = [member for member in members if member.id not in late_ids]
                sweeps = self._new_sweeps(log, 0, members, room) if members else []
                if late:
                    sweeps += self._late_sweeps(room, late, log, 0, occupants)
                if sweeps:
                    self._round_events[room] = log
                    self._sweeps[room] = deque(sweeps)
            return
        log = self._round_events[room]
        start = len(log)
        log.extend(events)
        # Everyone in the room is either waiting in a sweep, served already
        # by the one under way, or outside them (served by one that is
        # done, or joined since they began).  Only the last two are listed
        # here, so this costs what was served since the last commit, not
        # the size of the room.
        rest: List[Member] = self._outside.pop(room, [])
        for sweep in queue:
            rest.extend(sweep.members[: sweep.next])
            sweep.extend()
        if late_ids:
            rest = [member for member in rest if member.id not in late_ids]
        if rest:
            queue.extend(self._new_sweeps(log, start, rest, room))
        if late:
            queue.extend(self._late_sweeps(room, late, log, start, self._rooms.get(room, _NOBODY)))

    def _late_sweeps(
        self, room: str, late, log: List[Event], start: int, occupants: Dict[str, Member]
    ) -> List[_Sweep]:
        """
        The sweeps of the members who joined while presence events waited
        (see :meth:`_commit`).
        """
        sweeps: List[_Sweep] = []
        for skip, group in late:
            group = [member for member in group if occupants.get(member.id) is member]
            if group:
                sweeps += self._new_sweeps(log, start, group, room, skip)
        return sweeps

    def _new_sweeps(
        self,
        log: List[Event],
        start: int,
        members: List[Member],
        room: str,
        skip: FrozenSet[int] = frozenset(),
    ) -> List[_Sweep]:
        """
        The sweeps that take the events of the round's ``log`` from
        ``start`` on to ``members``: one, unless some of them may not see
        who comes and goes in ``room`` (then those have one of their own).
        """
        blind = self._blind.get(room)
        if not blind:
            return [_Sweep(log, start, members, skip=skip)]
        seeing = [member for member in members if member.id not in blind]
        unseeing = [member for member in members if member.id in blind]
        sweeps = [_Sweep(log, start, seeing, skip=skip)] if seeing else []
        if unseeing:
            sweeps.append(_Sweep(log, start, unseeing, blind=True, skip=skip))
        return sweeps

    def _sweep(self, until_done: bool = False, sliced: bool = True) -> None:
        """
        Deliver the queued sweeps: each member gets a room's events in one
        call, through its class's ``fan_out``.

        If ``sliced``, after :attr:`sweep_slice` seconds the rest waits for
        the next reactor turn: the reactor reads what arrived meanwhile, and
        :meth:`_commit` merges it into the members' turns still to come.
        """
        self._sweep_call = None
        if self._flush_call is not None and not self.batch_delay and not self._paced:
            # What the reactor read since the last slice: merge it into the
            # round first (that flush continues the round).
            self._flush_call.cancel()
            self._flush()
            return
        timer = self.timer
        deadline = None if until_done or not sliced else timer() + self.sweep_slice
        self._delivering = True
        try:
            for room in list(self._sweeps):
                queue = self._sweeps[room]
                # Members leave this dict when they leave the room; one
                # coming back is taken out of the sweeps (joined), so this
                # one will do.
                occupants = self._rooms.get(room, _NOBODY)
                while queue:
                    sweep = queue[0]
                    members = sweep.members
                    batch = sweep.batch
                    index = sweep.next
                    started = timer()
                    if not batch.events:
                        # Presence events, for members not told of them.
                        index = len(members)
                    while index < len(members):
                        # The run of members of this kind that starts here.
                        index = members[index].fan_out(
                            self, batch, members, index, occupants, deadline
                        )
                        if deadline is not None and timer() > deadline:
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
                # The room's round is done: the encodings cached on its
                # events served it and are dropped, so that a message kept
                # in history keeps only itself.  (Only a cache: a replay
                # encodes again.)
                for event in self._round_events.pop(room, ()):
                    event.wire.clear()
        finally:
            self._delivering = False
        self._quiet_since = timer()
        self._last_round = self._quiet_since - self._round_started
        if self.immediate and self._batch:
            # Events the deliveries caused (a failed member's departure).
            self.flush()

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
        Deliver everything pending now (for shutdown and tests).
        """
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        if self._batch:
            self._flush()
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        if self._sweeps:
            self._sweep(until_done=True)
