"""
Who is in which room on the other nodes, as last heard from them: kept up
to date from the join, leave and rename events the backplane delivers and
the snapshots nodes publish when they (re)register.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from broadcaster.core.events import Event, Joined, Left, Renamed


@dataclass(frozen=True)
class RemoteMember:
    """
    A client of another node, as listed in ``welcome`` and ``presence``.
    """

    id: str
    name: Optional[str]


class Presence:
    """
    Who is connected to the other nodes, in which rooms, as last heard:
    kept up to date by their join, leave and rename events and replaced
    wholesale by a node's ``state`` (when it registers or is declared dead)
    or a snapshot (when this node reconnects).
    """

    def __init__(self) -> None:
        # node -> member id -> [name, {room: None} in the order it joined]
        self._nodes: Dict[str, Dict[str, list]] = {}
        # room -> member id -> RemoteMember, in the order they joined
        self._rooms: Dict[str, Dict[str, RemoteMember]] = {}

    def members(self, room: str) -> List[RemoteMember]:
        """
        The other nodes' members of ``room``.
        """
        return list(self._rooms.get(room, {}).values())

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
            self._join(node, event.member, event.name, event.room)
        elif isinstance(event, Left):
            self._leave(node, event.member, event.room)
        elif isinstance(event, Renamed):
            self._rename(node, event.member, event.name)

    def replace(self, node: str, members: Dict[str, Dict[str, Any]], ts: float) -> List[Event]:
        """
        Make ``members`` (id -> ``{"name", "rooms"}``) the members of
        ``node``.

        :return: the leaves, renames and joins that the difference amounts
            to, for the hub to announce.
        """
        events: List[Event] = []
        for member, (name, rooms) in list(self._nodes.get(node, {}).items()):
            now_in = (members.get(member) or {}).get("rooms") or ()
            for room in list(rooms):
                if room not in now_in:
                    events.append(Left(ts=ts, room=room, member=member, name=name))
                    self._leave(node, member, room)
        for member, entry in members.items():
            name = entry.get("name")
            known = self._nodes.get(node, {}).get(member)
            if known is not None and known[0] != name:
                for room in known[1]:
                    events.append(Renamed(ts=ts, room=room, member=member, name=name))
                self._rename(node, member, name)
            for room in entry.get("rooms") or ():
                known = self._nodes.get(node, {}).get(member)
                if known is None or room not in known[1]:
                    events.append(Joined(ts=ts, room=room, member=member, name=name))
                    self._join(node, member, name, room)
        return events

    def _join(self, node: str, member: str, name: Optional[str], room: str) -> None:
        entry = self._nodes.setdefault(node, {}).setdefault(member, [name, {}])
        entry[1][room] = None
        self._rooms.setdefault(room, {})[member] = RemoteMember(member, entry[0])

    def _leave(self, node: str, member: str, room: str) -> None:
        members = self._nodes.get(node, {})
        entry = members.get(member)
        if entry is None or room not in entry[1]:
            return
        del entry[1][room]
        occupants = self._rooms[room]
        del occupants[member]
        if not occupants:
            del self._rooms[room]
        if not entry[1]:
            del members[member]
            if not members:
                del self._nodes[node]

    def _rename(self, node: str, member: str, name: Optional[str]) -> None:
        entry = self._nodes.get(node, {}).get(member)
        if entry is None:
            return
        entry[0] = name
        for room in entry[1]:
            self._rooms[room][member] = RemoteMember(member, name)
