"""
What a reconnecting client remembers of its rooms, so that a new
connection carries on where the old one stopped: for each room it wants
to be in, the ``epoch`` and ``seq`` of the last message it has seen.

After a reconnect the lobby is recovered with ``?since=<epoch>:<seq>`` in
the URL and every other room with ``{"type": "join", "room": ...,
"since": {...}}``; the server replays what was missed and ends with
``recovered`` (``complete: false`` when some of it is gone, e.g. the
server restarted and its epoch changed).  A message at or before the
position already seen is a duplicate (a replay overlapping what arrived
live) and is dropped here, so the caller sees each message once.

Shared by ``broadcaster-client --reconnect`` and :class:`broadcaster.Client`;
nothing here does I/O: it reads the protocol's events as dicts and writes
its requests as dicts.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Set, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from broadcaster.core.names import LOBBY

Position = Tuple[str, int]

#: The most recent message numbers of a room remembered to tell a repeat
#: from a message replayed late: more than a replay can hold.
SEEN = 4096


class Positions:
    """
    The rooms a client wants to be in and where it stands in each.

    :param rooms: rooms to join besides the lobby (every connection is
        in the lobby from the start, unless its rights say otherwise).
    """

    def __init__(self, rooms: Iterable[str] = ()) -> None:
        # room -> the last message seen there, or None before any
        self._rooms: Dict[str, Optional[Position]] = {LOBBY: None}
        for room in rooms:
            self._rooms.setdefault(room, None)
        # room -> (epoch, its recent message numbers in order, as a set)
        self._seen: Dict[str, Tuple[str, Deque[int], Set[int]]] = {}

    def rooms(self) -> List[str]:
        """
        The rooms it wants to be in, the lobby first.
        """
        return list(self._rooms)

    def want(self, room: str) -> None:
        """
        Be in ``room`` from now on (and after every reconnect).
        """
        self._rooms.setdefault(room, None)

    def drop(self, room: str) -> None:
        """
        No longer be in ``room``.
        """
        if room != LOBBY:
            self._rooms.pop(room, None)

    def position(self, room: str) -> Optional[Position]:
        """
        ``(epoch, seq)`` of the last message seen in ``room``, or ``None``.
        """
        return self._rooms.get(room)

    def started(self, room: str, epoch: Optional[str], seq: Any) -> None:
        """
        A ``welcome`` (lobby) or ``presence`` answering a join said where
        ``room`` stands: the start, if nothing was seen there yet (a first
        connection has no gap to recover).
        """
        if room in self._rooms and self._rooms[room] is None and isinstance(epoch, str):
            if isinstance(seq, int) and not isinstance(seq, bool):
                self._rooms[room] = (epoch, seq)

    def saw(self, event: Dict[str, Any]) -> bool:
        """
        A ``message`` event arrived: remember its position.

        :return: whether it is new (``False``: a duplicate of one already
            seen, to drop).
        """
        room, epoch, seq = event.get("room"), event.get("epoch"), event.get("seq")
        if room not in self._rooms or not isinstance(epoch, str) or not isinstance(seq, int):
            return True
        # Replayed messages may come after newer live ones (with several
        # nodes): a repeat is a number already seen, not any smaller one.
        seen = self._seen.get(room)
        if seen is None or seen[0] != epoch:
            seen = self._seen[room] = (epoch, deque(), set())
        _, order, numbers = seen
        if seq in numbers:
            return False
        last = self._rooms[room]
        if last is not None and last[0] == epoch and seq <= last[1] - SEEN:
            # Older than anything remembered: seen before, long ago.
            return False
        order.append(seq)
        numbers.add(seq)
        if len(order) > SEEN:
            numbers.discard(order.popleft())
        if last is None or last[0] != epoch or seq > last[1]:
            self._rooms[room] = (epoch, seq)
        return True

    def recovered(self, room: str, epoch: Optional[str], seq: Any) -> None:
        """
        A replay of ``room`` ended (``recovered``); ``epoch`` and ``seq`` are
        where the room stood when it began, as that connection's
        ``welcome`` or ``presence`` said.

        If nothing of that epoch has been seen (the server restarted and
        the room has been quiet since), the position moves there: the old
        epoch is gone for good, and asking from it again after the next
        drop would report the same loss a second time.
        """
        last = self._rooms.get(room)
        if last is None or last[0] == epoch or not isinstance(epoch, str):
            return
        if isinstance(seq, int) and not isinstance(seq, bool):
            self._rooms[room] = (epoch, seq)

    def url(self, url: str) -> str:
        """
        ``url`` with the lobby's ``since`` set (or left out, if nothing was
        seen yet), other query parameters kept.
        """
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "since"]
        position = self._rooms[LOBBY]
        if position is not None:
            query.append(("since", "{}:{}".format(*position)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def joins(self) -> List[Dict[str, Any]]:
        """
        The join requests for every room but the lobby, each with its
        ``since`` if something was seen there.
        """
        requests = []
        for room, position in self._rooms.items():
            if room == LOBBY:
                continue
            request: Dict[str, Any] = {"type": "join", "room": room}
            if position is not None:
                request["since"] = {"epoch": position[0], "seq": position[1]}
            requests.append(request)
        return requests
