"""
Who may do what in which room: the ``rooms`` of a signed-in user.

A sign-in (a JWT's ``rooms`` claim, or the ``rooms`` field of the
``--auth-url`` answer) may list the rooms a user may use and, for each, what
it may do there:

``join``
    be in the room: receive its messages and events.  Every other right
    needs it (one cannot publish to, read the history of, or list a room
    one is not in).
``publish``
    send messages to the room (text, and in the lobby binary and images).
``history``
    ask for its ``history``, and recover what was missed (``since``).
``presence``
    see who is in it: ``who``, and the members listed in ``welcome`` and
    ``presence``.

Two spellings are accepted::

    "rooms": ["lobby", "team-*"]                          every right
    "rooms": {"support-u1842": ["join", "publish", "history"],
              "announcements": ["join", "history"],
              "team-*": "*"}

A name may end in ``*``, which matches any rest (``team-*`` matches
``team-`` and ``team-finance``); no other character is special.  The rights
in a room are those of every entry that matches it.  No ``rooms`` at all
means every right in every room, as before rooms had rights, so existing
deployments keep working; an empty list or object means none.

This module is the domain's: it knows no networking.  The hub checks every
request against the member's :class:`Grants` (:mod:`broadcaster.core.hub`);
the protocols turn a refusal into an ``error`` for the client.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Iterable, Tuple

JOIN = "join"
PUBLISH = "publish"
HISTORY = "history"
PRESENCE = "presence"

#: Every right, in the order they are listed.
RIGHTS: Tuple[str, ...] = (JOIN, PUBLISH, HISTORY, PRESENCE)

#: The most entries one ``rooms`` may hold: it comes from outside.
MAX_ENTRIES = 1000

#: The longest room name or pattern in one (room names are at most 64).
MAX_PATTERN_LENGTH = 65


class Forbidden(ValueError):
    """
    The member may not do this in this room; ``str()`` says what, for the
    client and the log.
    """


class Grants:
    """
    The rights of one member, room by room.

    :ivar everything: whether every right in every room is granted (no
        ``rooms`` given), so that checking costs nothing.
    """

    __slots__ = ("everything", "_exact", "_prefixes", "_source")

    def __init__(
        self, entries: Iterable[Tuple[str, FrozenSet[str]]] = (), everything: bool = False
    ) -> None:
        self.everything = everything
        self._exact: Dict[str, FrozenSet[str]] = {}
        prefixes = []
        for pattern, rights in entries:
            if pattern.endswith("*"):
                prefixes.append((pattern[:-1], rights))
            else:
                self._exact[pattern] = self._exact.get(pattern, frozenset()) | rights
        self._prefixes: Tuple[Tuple[str, FrozenSet[str]], ...] = tuple(prefixes)

    def __repr__(self) -> str:
        if self.everything:
            return "<Grants: everything>"
        return "<Grants: {} rooms, {} patterns>".format(len(self._exact), len(self._prefixes))

    def rights(self, room: str) -> FrozenSet[str]:
        """
        What the member may do in ``room``.
        """
        if self.everything:
            return frozenset(RIGHTS)
        rights = self._exact.get(room, frozenset())
        for prefix, granted in self._prefixes:
            if room.startswith(prefix):
                rights = rights | granted
        if JOIN not in rights:
            return frozenset()
        return rights

    def allows(self, room: str, right: str) -> bool:
        return self.everything or right in self.rights(room)

    def check(self, room: str, right: str) -> None:
        """
        :raise Forbidden: unless the member may do ``right`` in ``room``.
        """
        if not self.allows(room, right):
            raise Forbidden(_REFUSALS[right].format(room))

    def listed(self, room: str) -> list:
        """
        The rights in ``room``, in :data:`RIGHTS` order, for the client.
        """
        rights = self.rights(room)
        return [right for right in RIGHTS if right in rights]


_REFUSALS = {
    JOIN: "not allowed to join room {!r}",
    PUBLISH: "not allowed to publish in room {!r}",
    HISTORY: "not allowed to read the history of room {!r}",
    PRESENCE: "not allowed to see who is in room {!r}",
}

#: No ``rooms``: every right everywhere (the default).
EVERYTHING = Grants(everything=True)

#: An empty ``rooms``: no right anywhere.
NOTHING = Grants()


def parse_grants(value: Any) -> Grants:
    """
    Read a ``rooms`` value (see the module docstring).

    :param value: ``None`` (every right), a list of room names or patterns,
        or an object mapping each to a list of rights or ``"*"``.
    :raise ValueError: with a reason fit for a log line, if it is not that.
    """
    if value is None:
        return EVERYTHING
    if isinstance(value, list):
        items = [(pattern, "*") for pattern in value]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise ValueError('"rooms" must be a list of rooms or an object of rooms and rights')
    if len(items) > MAX_ENTRIES:
        raise ValueError('"rooms" has more than {} entries'.format(MAX_ENTRIES))
    entries = []
    for pattern, rights in items:
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError('a room in "rooms" must be a name or pattern of 1 to 65 characters')
        if "*" in pattern[:-1]:
            raise ValueError('"*" may only end a room pattern, as in "team-*"')
        entries.append((pattern, _rights(rights)))
    return Grants(entries)


def _rights(value: Any) -> FrozenSet[str]:
    if value == "*":
        return frozenset(RIGHTS)
    if not isinstance(value, list) or not all(isinstance(right, str) for right in value):
        raise ValueError('the rights of a room must be a list such as ["join", "publish"], or "*"')
    unknown = [right for right in value if right not in RIGHTS]
    if unknown:
        raise ValueError(
            "unknown right {!r}: the rights are {}".format(unknown[0], ", ".join(RIGHTS))
        )
    return frozenset(value)
