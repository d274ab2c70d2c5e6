"""
Rules for the names clients choose: room names and display names.

Both are checked where they enter (the JSON protocol, the handshake's query
string) so the hub only ever holds valid ones, and the reason for a refusal
goes back to the client word for word.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Optional

LOBBY = "lobby"

#: Longest room name.
MAX_ROOM_LENGTH = 64

_ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class InvalidName(ValueError):
    """
    A room or display name that is not allowed; ``str()`` says why.
    """


def check_room(room: object) -> str:
    """
    :return: ``room`` if it is a valid room name: 1 to 64 characters,
        letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit.
    :raise InvalidName: otherwise.
    """
    if not isinstance(room, str):
        raise InvalidName("a room name must be a string")
    if not 1 <= len(room) <= MAX_ROOM_LENGTH:
        raise InvalidName("a room name must be 1 to {} characters".format(MAX_ROOM_LENGTH))
    if not _ROOM.match(room):
        raise InvalidName(
            "room name {!r} may contain only letters, digits, '_', '.' and '-',"
            " and must start with a letter or digit".format(room)
        )
    return room


def check_display_name(name: object, max_length: int) -> str:
    """
    :return: ``name`` with surrounding white space removed, if it is a valid
        display name: 1 to ``max_length`` characters, no control or
        formatting characters (which could forge line breaks or reverse
        text in other clients' displays).
    :raise InvalidName: otherwise.
    """
    if not isinstance(name, str):
        raise InvalidName("a name must be a string")
    name = name.strip()
    if not name:
        raise InvalidName("a name must not be empty")
    if len(name) > max_length:
        raise InvalidName("a name must be at most {} characters".format(max_length))
    found = control_character(name)
    if found is not None:
        raise InvalidName(
            "a name must not contain control characters (found U+{:04X})".format(ord(found))
        )
    return name


def check_user_id(user: object, max_length: int) -> str:
    """
    :return: ``user``, unchanged, if it can name a user: as a display name
        must be, and without surrounding white space, which is refused
        rather than removed (two tokens whose ``sub`` differ must never
        sign in as one user, share its presence and its bans).
    :raise InvalidName: otherwise.
    """
    checked = check_display_name(user, max_length)
    if checked != user:
        raise InvalidName("a user id must not start or end with white space")
    return checked


def control_character(text: str) -> Optional[str]:
    """
    The first character of ``text`` that has no place in text shown to
    people (control, formatting, private-use, unassigned characters, line
    and paragraph separators), or ``None``.
    """
    for character in text:
        if unicodedata.category(character) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            return character
    return None
