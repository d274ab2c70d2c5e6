"""
Per-room sequence numbers and message history, for acknowledgements,
``history`` requests and recovery after a reconnect.

Every text message published in a room gets the room's next ``seq`` (1, 2,
3, ...).  The room keeps its last ``size`` messages.  A client that was
disconnected remembers the ``epoch`` and ``seq`` of the last message it saw
and asks for everything after it; the answer is *complete* when nothing it
missed has been forgotten.

``epoch`` names one run of a room's sequence.  It is random and changes
whenever the sequence restarts: when the server restarts, or when an idle
room's history is evicted to bound memory.  A client holding an old epoch
therefore learns that it cannot know what it missed.

What all rooms keep together is bounded in bytes too (``--history-memory``,
:class:`HistoryMemory`): past it, the rooms that keep the most lose their
oldest messages.  A message forgotten that way is forgotten as one pushed
out by ``--history-size`` is: the sequence goes on, and a client that
missed it is told its recovery is incomplete.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
from collections import OrderedDict, deque
from typing import Callable, Deque, Generic, Iterator, List, Optional, Set, Tuple, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

T = TypeVar("T")

#: ``--history-memory``'s default: 256 MiB.  It keeps the whole default
#: history (100 messages) of some 4,900 rooms of short messages (100
#: characters: about 550 bytes each, kept), or of 1,800 rooms of 1 KiB
#: messages, so ordinary traffic seldom meets it; and it bounds what was
#: 64 GB in the worst case (--max-rooms 10,000 x --history-size 100 x
#: 64 KiB, more with wide characters) to what a small server can spare.
DEFAULT_MEMORY = 256 * 1024 * 1024

#: Bytes a kept message costs besides its text: the event object, its
#: attribute dict and empty cache, its time stamp and sequence number,
#: and the history's entry for it; measured with tracemalloc at about 300
#: on CPython 3.11 (tests/core/test_hub.py checks it).  Its room, sender,
#: name and epoch are strings shared with the room and the member.
KEPT_OVERHEAD = 320

#: Seconds without an eviction after which an episode of evictions over
#: ``--history-memory`` is over (and logged as such).
EPISODE_QUIET = 60.0


def kept_size(message) -> int:
    """
    What keeping a text message costs, in bytes: its text as Python holds
    it (1, 2 or 4 bytes a character, as its widest character needs: one
    emoji makes a text of ASCII four times larger than its UTF-8) plus
    :data:`KEPT_OVERHEAD`.  Constant time: nothing is encoded.
    """
    return sys.getsizeof(message.text) + KEPT_OVERHEAD


#: Random epochs drawn but not yet handed out.  The Redis backplane offers
#: a candidate epoch with every message it publishes (used only if the
#: room's sequence has to start over), so one ``getrandom`` system call
#: per message would be a measurable part of its cost: they are drawn 256
#: at a time.  A forked child starts with none, so it shares none.
_epochs: List[str] = []
os.register_at_fork(after_in_child=_epochs.clear)


def new_epoch() -> str:
    """
    A fresh epoch: random, so no two runs of a sequence share one.
    """
    if not _epochs:
        drawn = os.urandom(6 * 256).hex()
        _epochs.extend(drawn[i : i + 12] for i in range(0, len(drawn), 12))
    return _epochs.pop()


class RoomHistory(Generic[T]):
    """
    The sequence and recent messages of one room.

    :param size: messages kept; 0 keeps none (sequence numbers still count).
    :param memory: the bound on the bytes kept by all rooms together
        (``None``: none).

    :ivar bytes: what the kept messages cost, as ``memory`` counts them.
    """

    def __init__(
        self, size: int, epoch: Optional[str] = None, memory: Optional["HistoryMemory"] = None
    ) -> None:
        self.epoch = epoch or new_epoch()
        self.seq = 0
        self.bytes = 0
        self._memory = memory
        self._messages: Deque[Tuple[int, T]] = deque(maxlen=size)

    def next_seq(self) -> int:
        """
        Allocate the sequence number of the next message.
        """
        self.seq += 1
        return self.seq

    def record(self, seq: int, message: T) -> None:
        """
        Keep ``message`` (numbered ``seq`` by :meth:`next_seq`), then let
        the memory bound make room for it.
        """
        messages = self._messages
        memory = self._memory
        if memory is None or not messages.maxlen:
            messages.append((seq, message))
            return
        grown = memory.sizeof(message)
        if len(messages) == messages.maxlen:
            # The oldest falls out by --history-size.
            grown -= memory.sizeof(messages[0][1])
        messages.append((seq, message))
        self.bytes += grown
        memory.grew(self, grown)

    def forget_oldest(self) -> int:
        """
        Forget the oldest kept message, as if --history-size had pushed it
        out: :meth:`after` then says that a client that missed it cannot
        have everything.

        :return: the bytes it cost.
        """
        _, message = self._messages.popleft()
        size = self._memory.sizeof(message) if self._memory is not None else 0
        self.bytes -= size
        return size

    def forget_all(self) -> None:
        """
        Forget every kept message (the room itself is being forgotten).
        """
        self._messages.clear()
        self.bytes = 0

    def last(self, limit: int, before: Optional[int] = None) -> List[T]:
        """
        Up to ``limit`` most recent messages (numbered below ``before``, if
        given), oldest first.
        """
        if limit <= 0:
            return []
        kept = list(self._messages)
        if before is not None:
            kept = [entry for entry in kept if entry[0] < before]
        return [message for _, message in kept[-limit:]]

    def after(self, epoch: str, seq: int, upto: Optional[int] = None) -> Tuple[List[T], bool]:
        """
        The messages after ``seq`` in ``epoch`` (and up to ``upto``, if
        given), oldest first, and whether that is all of them.

        :return: ``(messages, complete)``.  With another epoch, every kept
            message and ``complete`` false: what came before is unknowable.
        """
        last = self.seq if upto is None else min(upto, self.seq)
        kept = [(s, message) for s, message in self._messages if s <= last]
        if epoch != self.epoch:
            return [message for _, message in kept], False
        if seq >= last:
            return [], True
        missed = [message for s, message in kept if s > seq]
        oldest_kept = kept[0][0] if kept else last + 1
        return missed, oldest_kept <= seq + 1


class HistoryMemory:
    """
    The bytes that the histories of all rooms keep together, and their
    bound (``--history-memory``).

    When a message would take the total past :attr:`limit`, the room that
    keeps the most bytes forgets its oldest message, then whichever room
    keeps the most then, until the total fits.  The largest room first,
    rather than the server's oldest message first or the least recently
    active room first, because whoever fills the memory should pay for it:
    a client flooding big messages into many rooms trims its own rooms,
    down to the size of the others, before a quiet room loses anything.
    Oldest first would let such a flood wipe every room's history in
    seconds, and least recently active first would take the quiet rooms'
    first.  The price: under pressure a busy room keeps a shorter stretch
    of time than a quiet one.  Within a room the oldest message goes, as
    with ``--history-size``: a room always keeps its latest messages, and
    a replay that reaches past them says it is incomplete
    (:meth:`RoomHistory.after`).

    The largest room comes from a heap of ``(bytes, room)`` entries, one
    pushed whenever a room grows.  A room only shrinks between its pushes,
    so its latest entry is never below what it keeps: an entry on top that
    matches its room is the largest room, and one that does not is put
    right and the heap asked again.  The heap is rebuilt, an entry a room,
    when it holds more than two a room.  It is kept only from when the
    rooms keep half the bound (built then from every room) until they
    keep less than a quarter: below, nothing can be evicted, and keeping
    it would cost every message a push.

    Evictions are logged once per episode: at the first one, and when none
    has happened for :data:`EPISODE_QUIET` seconds (told at the next
    message kept), with how many messages and bytes went meanwhile.

    :param limit: the bound, in bytes.
    :param clock: times the episodes.
    :param sizeof: what keeping a message costs, in bytes.

    :ivar used: bytes kept now.
    :ivar evicted: messages forgotten to stay within :attr:`limit` since start.
    """

    _log = Logger()

    def __init__(
        self, limit: int, clock: IReactorTime, sizeof: Callable[[object], int] = kept_size
    ) -> None:
        self.limit = limit
        self.sizeof = sizeof
        self._clock = clock
        self.used = 0
        self.evicted = 0
        # The rooms that keep something, and the heap of (-bytes, order,
        # room), kept only while tracking.
        self._rooms: Set[RoomHistory] = set()
        self._heap: List[Tuple[int, int, RoomHistory]] = []
        self._tracking = False
        self._order = itertools.count()
        # The episode under way (started is None: none), and what it took.
        self._started: Optional[float] = None
        self._last_eviction = 0.0
        self._episode_messages = 0
        self._episode_bytes = 0

    def grew(self, history: RoomHistory, grown: int) -> None:
        """
        ``history`` keeps ``grown`` more bytes (fewer, if negative): make
        room if that passes the bound.
        """
        self.used += grown
        if grown > 0:
            self._rooms.add(history)
            if self._tracking:
                heapq.heappush(self._heap, (-history.bytes, next(self._order), history))
                if len(self._heap) > 2 * len(self._rooms) + 64:
                    self._rebuild()
            elif self.used > self.limit // 2:
                self._rebuild()
        if self.used > self.limit:
            self._evict()
        elif (
            self._started is not None
            and self._clock.seconds() - self._last_eviction >= EPISODE_QUIET
        ):
            self._end_episode()

    def release(self, history: RoomHistory) -> None:
        """
        ``history``'s room is being forgotten: so is what it keeps.
        """
        self.used -= history.bytes
        history.forget_all()
        self._rooms.discard(history)
        if self._tracking and self.used < self.limit // 4:
            self._tracking = False
            self._heap = []

    def _evict(self) -> None:
        heap = self._heap
        messages = freed = 0
        while self.used > self.limit and heap:
            negative, _, history = heap[0]
            if -negative == history.bytes:
                size = history.forget_oldest()
                self.used -= size
                messages += 1
                freed += size
            if history.bytes > 0:
                heapq.heapreplace(heap, (-history.bytes, next(self._order), history))
            else:
                heapq.heappop(heap)
                self._rooms.discard(history)
        now = self._clock.seconds()
        if self._started is None:
            self._started = now
            self._log.warn(
                "[HISTORY] over --history-memory ({limit} bytes); evicting the oldest"
                " messages of the rooms that keep the most",
                limit=self.limit,
            )
        self._last_eviction = now
        self._episode_messages += messages
        self._episode_bytes += freed
        self.evicted += messages

    def _end_episode(self) -> None:
        self._log.info(
            "[HISTORY] no eviction for {quiet:g} s: {count} messages ({size} bytes) were"
            " evicted over {seconds:.0f} s to stay within --history-memory ({limit} bytes)",
            quiet=EPISODE_QUIET,
            count=self._episode_messages,
            size=self._episode_bytes,
            seconds=self._last_eviction - self._started,
            limit=self.limit,
        )
        self._started = None
        self._episode_messages = self._episode_bytes = 0

    def _rebuild(self) -> None:
        self._tracking = True
        self._rooms = {history for history in self._rooms if history.bytes > 0}
        self._heap = [(-history.bytes, next(self._order), history) for history in self._rooms]
        heapq.heapify(self._heap)


class Histories(Generic[T]):
    """
    The :class:`RoomHistory` of every room, with a bound on how many rooms
    are remembered.

    Rooms are created on first use.  When more than ``max_rooms`` exist, the
    least recently used rooms that ``in_use`` says nobody is in are
    forgotten (their next use starts a new epoch).  Occupied rooms are never
    forgotten, so the bound can be exceeded only by rooms people are in.

    :param size: messages kept per room.
    :param in_use: tells whether anybody is in a room.
    :param memory: the bound on the bytes all rooms keep (``None``: none).
    """

    def __init__(
        self,
        size: int,
        max_rooms: int,
        in_use: Callable[[str], bool],
        memory: Optional[HistoryMemory] = None,
    ) -> None:
        self.size = size
        self.max_rooms = max_rooms
        self._in_use = in_use
        self.memory = memory
        self._rooms: "OrderedDict[str, RoomHistory[T]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._rooms)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rooms)

    def get(self, room: str) -> RoomHistory[T]:
        """
        The history of ``room``, created if need be, marked as recently used.
        """
        history = self._rooms.get(room)
        if history is None:
            history = self._rooms[room] = RoomHistory(self.size, memory=self.memory)
            self._evict()
        else:
            self._rooms.move_to_end(room)
        return history

    def peek(self, room: str) -> Optional[RoomHistory[T]]:
        """
        The history of ``room`` if it exists, without creating or touching it.
        """
        return self._rooms.get(room)

    def _evict(self) -> None:
        excess = len(self._rooms) - self.max_rooms
        if excess <= 0:
            return
        for room in list(self._rooms):
            if excess <= 0:
                break
            if not self._in_use(room):
                history = self._rooms.pop(room)
                if self.memory is not None:
                    self.memory.release(history)
                excess -= 1
