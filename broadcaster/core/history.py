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
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from typing import Callable, Deque, Generic, Iterator, List, Optional, Tuple, TypeVar

T = TypeVar("T")


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
    """

    def __init__(self, size: int, epoch: Optional[str] = None) -> None:
        self.epoch = epoch or new_epoch()
        self.seq = 0
        self._messages: Deque[Tuple[int, T]] = deque(maxlen=size)

    def next_seq(self) -> int:
        """
        Allocate the sequence number of the next message.
        """
        self.seq += 1
        return self.seq

    def record(self, seq: int, message: T) -> None:
        """
        Keep ``message`` (numbered ``seq`` by :meth:`next_seq`).
        """
        self._messages.append((seq, message))

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
    """

    def __init__(self, size: int, max_rooms: int, in_use: Callable[[str], bool]) -> None:
        self.size = size
        self.max_rooms = max_rooms
        self._in_use = in_use
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
            history = self._rooms[room] = RoomHistory(self.size)
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
                del self._rooms[room]
                excess -= 1
