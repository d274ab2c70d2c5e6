"""
Who is in which room on the other nodes, as last heard from them: kept up
to date from the join, leave and rename events the backplane delivers and
the snapshots nodes publish when they (re)register, and written into the
hub's :class:`~broadcaster.core.roster.Roster`, so that a room lists a
user with connections on several nodes once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from broadcaster.core.events import Event, Joined, Left, Renamed
from broadcaster.core.roster import Roster, seat_event


@dataclass(frozen=True)
class RemoteMember:
    """
    An anonymous client of another node, as a room lists it.
    """

    id: str
    name: Optional[str]
    user: Optional[str] = None


class _Known:
    """
    A connection of another node: its name, user and rooms (in the order
    it joined them).
    """

    __slots__ = ("name", "user", "rooms")

    def __init__(self, name: Optional[str], user: Optional[str]) -> None:
        self.name = name
        self.user = user
        self.rooms: Dict[str, None] = {}


class Presence:
    """
    Who is connected to the other nodes, in which rooms, as last heard:
    kept up to date by their join, leave and rename events and replaced
    wholesale by a node's ``state`` (when it registers or is declared dead)
    or a snapshot (when this node reconnects).

    :param roster: the hub's, which lists this node's connections too.
    """

    def __init__(self, roster: Optional[Roster] = None) -> None:
        self.roster = roster if roster is not None else Roster()
        # node -> member id -> what is known of it
        self._nodes: Dict[str, Dict[str, _Known]] = {}

    def nodes(self) -> List[str]:
        """
        The nodes that have members.
        """
        return list(self._nodes)

    def apply(self, node: str, event: Event) -> None:
        """
        Take a join, leave or rename from ``node`` into account.
        """
        if isinstance(event, Joined):
            self._join(node, event.member, event.name, event.user, event.room)
        elif isinstance(event, Left):
            self._leave(node, event.member, event.room)
        elif isinstance(event, Renamed):
            self._rename(node, event.member, event.name)

    def replace(self, node: str, members: Dict[str, Dict[str, Any]], ts: float) -> List[Event]:
        """
        Make ``members`` (id -> ``{"name", "user", "rooms"}``) the members of
        ``node``.

        :return: the leaves, renames and joins that the difference amounts
            to, for the hub to deliver (announced as the roster says).
        """
        events: List[Event] = []
        for member, known in list(self._nodes.get(node, {}).items()):
            entry = members.get(member) or {}
            now_in = entry.get("rooms") or ()
            if entry and entry.get("user") != known.user:
                # Not the same connection (a node restarted with its ids).
                now_in = ()
            for room in list(known.rooms):
                if room not in now_in:
                    events.append(self._leave(node, member, room, ts))
        for member, entry in members.items():
            name = entry.get("name")
            user = entry.get("user")
            known = self._nodes.get(node, {}).get(member)
            if known is not None and known.name != name:
                events.extend(self._rename(node, member, name, ts))
            for room in entry.get("rooms") or ():
                known = self._nodes.get(node, {}).get(member)
                if known is None or room not in known.rooms:
                    events.append(self._join(node, member, name, user, room, ts))
        return events

    def _join(
        self,
        node: str,
        member: str,
        name: Optional[str],
        user: Optional[str],
        room: str,
        ts: float = 0.0,
    ) -> Joined:
        known = self._nodes.setdefault(node, {}).get(member)
        if known is None:
            known = self._nodes[node][member] = _Known(name, user)
        known.rooms[room] = None
        seated = self.roster.add(room, member, known.user, known.name, RemoteMember(member, known.name))
        return _told(Joined, member, known, room, ts, seated)

    def _leave(self, node: str, member: str, room: str, ts: float = 0.0) -> Optional[Left]:
        members = self._nodes.get(node, {})
        known = members.get(member)
        if known is None or room not in known.rooms:
            return None
        del known.rooms[room]
        seated = self.roster.remove(room, member, known.user)
        if not known.rooms:
            del members[member]
            if not members:
                del self._nodes[node]
        return _told(Left, member, known, room, ts, seated)

    def _rename(self, node: str, member: str, name: Optional[str], ts: float = 0.0) -> List[Renamed]:
        known = self._nodes.get(node, {}).get(member)
        if known is None:
            return []
        known.name = name
        events = []
        for room in known.rooms:
            seated = self.roster.rename(room, member, known.user, name, RemoteMember(member, name))
            events.append(_told(Renamed, member, known, room, ts, seated))
        return events


def _told(kind, member: str, known: _Known, room: str, ts: float, seated: Tuple[int, bool]):
    """
    The ``kind`` (join, leave or rename) event of another node's
    connection, with what the roster said of it: ``(connections, announced)``.
    """
    return seat_event(kind, room, member, known.name, known.user, seated, ts)
