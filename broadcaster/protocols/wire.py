"""
How hub events look on the wire, and how JSON-mode client input is read.

Two WebSocket wire formats exist, chosen per connection by subprotocol:

Plain (no subprotocol; the classic TwistedWebsocket example's format)
    Plain clients live in the lobby.  ``<id> connected`` and ``<id>
    disconnected`` text messages announce the lobby's members; a text
    message is passed on unchanged; a binary message is passed on unchanged
    as binary; an image arrives as a binary PNG.

JSON (subprotocol ``broadcaster.json``)
    Every server message is one JSON object with a ``type``; docs/protocols.rst
    documents each.  Server to client: ``welcome`` (first), ``join``,
    ``leave``, ``rename``, ``message``, ``binary`` and ``image`` (each
    followed by one binary message), ``ack``, ``presence``, ``history``,
    ``recovered``, ``expiring``, ``refreshed``, ``error``.  Client to
    server: ``message``, ``join``, ``leave``, ``hello``, ``who``,
    ``history``, ``image_url``, ``refresh`` (see :data:`CLIENT_TYPES`), or
    a binary message.

A codec turns one hub event into a list of ``(payload, is_binary)`` frames.
These functions are pure, so they are tested without any network.
"""

from __future__ import annotations

import heapq
import json
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

from broadcaster.core.events import (
    BinaryMessage,
    Event,
    ImageMessage,
    Joined,
    Left,
    Renamed,
    TextMessage,
)
from broadcaster.core.members import Member
from broadcaster.core.names import LOBBY, InvalidName, check_display_name, check_room

JSON_SUBPROTOCOL = "broadcaster.json"

Frame = Tuple[bytes, bool]


def dumps(obj: Dict[str, Any]) -> bytes:
    """
    Compact UTF-8 JSON, as every JSON-mode server message is written.
    """
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _ts(event: Event) -> float:
    # Milliseconds are plenty for a chat and keep the JSON short.
    return round(event.ts, 3)


class PlainCodec:
    """The plain text format: lobby announcements as sentences, messages unchanged."""

    name = "plain"

    def encode(self, event: Event) -> List[Frame]:
        if isinstance(event, TextMessage):
            return [(event.text.encode("utf-8"), False)]
        if isinstance(event, BinaryMessage):
            return [(event.data, True)]
        if isinstance(event, ImageMessage):
            return [(event.png, True)]
        if isinstance(event, Joined) and event.room == LOBBY:
            return [("{} connected".format(event.member).encode("utf-8"), False)]
        if isinstance(event, Left) and event.room == LOBBY:
            return [("{} disconnected".format(event.member).encode("utf-8"), False)]
        return []


def message_event(event: TextMessage) -> Dict[str, Any]:
    """
    The JSON form of a text message, as sent live, in history and in replays.
    """
    return {
        "type": "message",
        "room": event.room,
        "from": event.sender,
        "name": event.name,
        "text": event.text,
        "ts": _ts(event),
        "seq": event.seq,
        "epoch": event.epoch,
    }


#: Most members listed in one ``welcome`` or ``presence``; ``who`` pages
#: through the rest (see :func:`members_page`).
MEMBERS_PAGE = 100

#: Bytes of message events one ``history`` reply holds at most (but one
#: message of any allowed size always fits); ``before`` pages further back.
HISTORY_REPLY_SIZE = 256 * 1024


def _member_id(member: Member) -> str:
    return member.id


def members_page(
    members: Iterable[Member], after: Optional[str] = None, limit: int = MEMBERS_PAGE
) -> Tuple[List[Member], Optional[str]]:
    """
    One page of a room's members (its seats: see
    :mod:`broadcaster.core.roster`): those whose id sorts after ``after``,
    in id order, at most ``limit`` of them.

    A seat's id (a connection's id, or ``user:<user>``) is stable while
    it is in the room, so paging by them lists every member that stays in
    the room exactly once, whoever comes and goes between pages; a member
    who joins meanwhile is listed if its id sorts after the cursor, and
    announced by its ``join`` event either way.

    :return: the page and the cursor of the next one (``None``: this is the last).
    """
    if after is not None:
        members = [m for m in members if m.id > after]
    page = heapq.nsmallest(limit + 1, members, key=_member_id)
    if len(page) > limit:
        del page[limit:]
        return page, page[-1].id
    return page, None


def member_entry(seat: Any) -> Dict[str, Any]:
    """
    How a seat of a room (:mod:`broadcaster.core.roster`) is listed in
    ``welcome`` and ``presence``: an anonymous connection by its ``id``, a
    signed-in user by its ``user``, with its number of ``connections``.
    """
    user = seat.user
    if user is None:
        return {"id": seat.id, "name": seat.name}
    return {"user": user, "name": seat.name, "connections": seat.connections}


def presence_event(
    room: str, members: List[Member], after: Optional[str] = None, limit: int = MEMBERS_PAGE
) -> Dict[str, Any]:
    """
    Who is in ``room``: its member count and one page of its members (those
    after the cursor ``after``), as a ``presence`` event lists them and the
    server API's ``GET /api/rooms/<room>/presence`` answers.
    """
    page, cursor = members_page(members, after, limit)
    return {
        "type": "presence",
        "room": room,
        "members": [member_entry(m) for m in page],
        "count": len(members),
        "next": cursor,
        "cursor": after,
    }


def event_json(event: Event) -> Optional[Dict[str, Any]]:
    """
    The JSON-mode object for a hub event (for ``binary`` and ``image``, the
    header that precedes the bytes), or ``None`` for an event JSON clients
    do not get.  Webhooks post the same objects.
    """
    if isinstance(event, TextMessage):
        return message_event(event)
    if isinstance(event, BinaryMessage):
        return {
            "type": "binary",
            "room": event.room,
            "from": event.sender,
            "size": len(event.data),
            "ts": _ts(event),
        }
    if isinstance(event, ImageMessage):
        return {
            "type": "image",
            "room": event.room,
            "id": event.image_id,
            "from": event.sender,
            "width": event.width,
            "height": event.height,
            "format": "png",
            "size": len(event.png),
            "ts": _ts(event),
        }
    if isinstance(event, (Joined, Left, Renamed)):
        told = {
            "type": _MEMBER_EVENT_TYPES[type(event)],
            "room": event.room,
            "id": event.member,
            "name": event.name,
            "ts": _ts(event),
        }
        if event.user is not None:
            # Members hear of a user's first connection and its last
            # (webhooks of every one): "connections" says how many it has.
            told["user"] = event.user
            told["connections"] = event.connections
        return told
    return None


_MEMBER_EVENT_TYPES = {Joined: "join", Left: "leave", Renamed: "rename"}


class JSONCodec:
    """The ``broadcaster.json`` format: one JSON object per event."""

    name = "json"

    def encode(self, event: Event) -> List[Frame]:
        obj = event_json(event)
        if obj is None:
            return []
        frames = [(dumps(obj), False)]
        if isinstance(event, BinaryMessage):
            frames.append((event.data, True))
        elif isinstance(event, ImageMessage):
            frames.append((event.png, True))
        return frames

    def welcome(
        self,
        member: Member,
        members: List[Member],
        epoch: str,
        seq: int,
        limits: Dict[str, int],
        rights: Optional[List[str]] = None,
    ) -> bytes:
        """
        The first message a JSON client receives: who it is, the lobby's
        member count and first page of members (itself included), where the
        lobby's sequence stands (for recovery after a reconnect) and the
        limits it must keep to; with ``--auth-url``, also the ``user`` the
        auth service named.  ``rights``: what it may do in the lobby (see
        :mod:`broadcaster.core.permissions`; none if it may not join it).
        """
        page, cursor = members_page(members)
        welcome = {
            "type": "welcome",
            "id": member.id,
            "name": member.name,
            "room": LOBBY,
            "members": [member_entry(m) for m in page],
            "count": len(members),
            "next": cursor,
            "epoch": epoch,
            "seq": seq,
            "limits": limits,
        }
        if rights is not None:
            welcome["rights"] = rights
        user = getattr(member, "user", None)
        if user is not None:
            welcome["user"] = user
        return dumps(welcome)

    def presence(
        self,
        room: str,
        members: List[Member],
        epoch: Optional[str],
        seq: int,
        after: Optional[str] = None,
        limit: int = MEMBERS_PAGE,
        rights: Optional[List[str]] = None,
    ) -> bytes:
        """
        Who is in ``room`` (its member count, and one page of its members:
        those after the cursor ``after``), and where its sequence stands
        (``epoch`` is ``None`` for a room that has no sequence yet).
        """
        event = presence_event(room, members, after, limit)
        event["epoch"] = epoch
        event["seq"] = seq
        if rights is not None:
            # The answer to a join: what the member may do in the room.
            event["rights"] = rights
        return dumps(event)

    def history(
        self,
        room: str,
        messages: List[TextMessage],
        more: bool,
        max_size: int = HISTORY_REPLY_SIZE,
    ) -> bytes:
        """
        The answer to a ``history`` request: message events, oldest first,
        the newest of ``messages`` that fit in ``max_size`` bytes (at least
        one), and whether older ones are kept (``more``: ask again with
        ``before`` set to the oldest ``seq`` received).
        """
        encoded: List[bytes] = []
        size = 0
        for message in reversed(messages):
            entry = dumps(message_event(message))
            size += len(entry) + 1
            if encoded and size > max_size:
                more = True
                break
            encoded.append(entry)
        encoded.reverse()
        head = dumps({"type": "history", "room": room, "more": more})
        return head[:-1] + b',"messages":[' + b",".join(encoded) + b"]}"

    def ack(self, ref: Any, event: TextMessage) -> bytes:
        """
        Tells a sender its message was accepted and numbered.
        """
        return dumps(
            {"type": "ack", "ref": ref, "room": event.room, "seq": event.seq, "epoch": event.epoch}
        )

    def image_ack(self, ref: Any, event: ImageMessage) -> bytes:
        """
        The answer to an ``image`` request: shared, as the ``image`` event
        with this ``id``.
        """
        return dumps({"type": "ack", "ref": ref, "room": event.room, "image": event.image_id})

    def recovered(self, room: str, complete: bool) -> bytes:
        """
        Ends a replay: ``complete`` false means some messages were lost for good.
        """
        return dumps({"type": "recovered", "room": room, "complete": complete})

    def expiring(self, expires: float, seconds: float) -> bytes:
        """
        Warns a client signed in with a token that its ``exp`` is near:
        ``seconds`` from now (0 once passed).  It should send a ``refresh``
        before the server closes it (4001).
        """
        return dumps({"type": "expiring", "expires": expires, "in": round(max(seconds, 0.0), 3)})

    def refreshed(
        self, expires: Optional[float], rights: Dict[str, List[str]], left: List[str], ref: Any
    ) -> bytes:
        """
        The answer to a ``refresh`` that was accepted: the new token's
        ``exp`` (``None``: it has none), what the client may now do in each
        room it is still in, and the rooms it was taken out of because the
        new token no longer lets it join them.
        """
        event: Dict[str, Any] = {
            "type": "refreshed",
            "expires": expires,
            "rights": rights,
            "left": left,
        }
        if ref is not None:
            event["ref"] = ref
        return dumps(event)

    def error(self, reason: str, ref: Any = None) -> bytes:
        """
        The answer to input the server could not accept.
        """
        event: Dict[str, Any] = {"type": "error", "reason": reason}
        if ref is not None:
            event["ref"] = ref
        return dumps(event)


class BadRequest(ValueError):
    """
    Client input that cannot be accepted; ``str()`` is the reason sent back.

    :ivar ref: the request's ``ref``, if it had a usable one, to echo back.
    :ivar kind: the request's ``type``, once it was known to be a valid one.
    """

    kind: Optional[str] = None

    def __init__(self, reason: str, ref: Any = None) -> None:
        super().__init__(reason)
        self.ref = ref


#: The client message types JSON mode understands.
CLIENT_TYPES = (
    "message", "join", "leave", "hello", "who", "history", "image", "image_url", "refresh",
)

#: Longest ``cursor`` a ``who`` may carry: a member's id, or ``user:`` and
#: a signed-in user's id.
MAX_CURSOR_LENGTH = 1024

#: Longest token a ``refresh`` may carry, in characters: real tokens are a
#: few hundred bytes, a few KiB with many ``rooms``.
MAX_TOKEN_LENGTH = 8 * 1024

#: Longest URL an ``image_url`` request may carry.
MAX_IMAGE_URL_LENGTH = 2048

#: Longest ``ref`` string a client may attach.
MAX_REF_LENGTH = 128


def _ref(request: Dict[str, Any]) -> Any:
    ref = request.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, (str, int)):
        raise BadRequest('"ref" must be a string or an integer')
    if isinstance(ref, str) and len(ref) > MAX_REF_LENGTH:
        raise BadRequest('"ref" must be at most {} characters'.format(MAX_REF_LENGTH))
    if isinstance(ref, int) and abs(ref) > MAX_SAFE_INTEGER:
        raise BadRequest('"ref" must be an integer JavaScript can hold exactly')
    return ref


def _room(request: Dict[str, Any], required: bool, ref: Any) -> str:
    if "room" not in request:
        if required:
            raise BadRequest('a "{}" needs a "room"'.format(request["type"]), ref)
        return LOBBY
    try:
        return check_room(request["room"])
    except InvalidName as e:
        raise BadRequest(str(e), ref) from None


#: The largest integer a client may send (``seq``, ``limit``, ``before``,
#: ``ref``): the largest JavaScript holds exactly.
MAX_SAFE_INTEGER = 2**53

#: Longest epoch a client may name (the server's are 16 characters, or
#: ``local-<node>-<n>``).
MAX_EPOCH_LENGTH = 128

# ?since=<epoch>:<seq>: printable ASCII, then ASCII digits (str.isdigit()
# also accepts "²" and "٣", which int() then refuses or reads).
_SINCE_PARAM = re.compile(r"([!-~]{1,%d}):([0-9]{1,16})" % MAX_EPOCH_LENGTH, re.ASCII)


def parse_since_param(value: str) -> Optional[Tuple[str, int]]:
    """
    Read ``?since=<epoch>:<seq>``; ``None`` if it is not that, within the
    bounds a ``since`` object has.
    """
    match = _SINCE_PARAM.fullmatch(value)
    if match is None or int(match.group(2)) > MAX_SAFE_INTEGER:
        return None
    return match.group(1), int(match.group(2))


_POSITIVE_PARAM = re.compile(r"[0-9]{1,16}", re.ASCII)


def parse_positive_param(value: str) -> Optional[int]:
    """
    Read a positive integer from a query string (``?limit=``, ``?before=``):
    ASCII digits only, 1 to :data:`MAX_SAFE_INTEGER`; ``None`` if it is not one.
    """
    if _POSITIVE_PARAM.fullmatch(value) is None:
        return None
    number = int(value)
    return number if 1 <= number <= MAX_SAFE_INTEGER else None


def _since(value: Any, ref: Any) -> Optional[Tuple[str, int]]:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("epoch"), str)
        or len(value["epoch"]) > MAX_EPOCH_LENGTH
        or isinstance(value.get("seq"), bool)
        or not isinstance(value.get("seq"), int)
        or not 0 <= value["seq"] <= MAX_SAFE_INTEGER
    ):
        raise BadRequest(
            '"since" must be {"epoch": <string>, "seq": <integer >= 0>},'
            " from the last message seen",
            ref,
        )
    return value["epoch"], value["seq"]


def _positive_int(request: Dict[str, Any], field: str, default: Any, ref: Any) -> int:
    value = request.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SAFE_INTEGER:
        raise BadRequest('"{}" must be a positive integer'.format(field), ref)
    return value


def parse_client_message(
    payload: bytes, max_name_length: int = 32, max_history: int = 100
) -> Dict[str, Any]:
    """
    Read one JSON-mode client message.

    :param payload: the UTF-8 bytes of a WebSocket text message (Autobahn has
        already checked that they are valid UTF-8).
    :param max_name_length: longest display name accepted by ``hello``.
    :param max_history: largest ``limit`` a ``history`` request gets.
    :return: the request: ``type``, ``ref`` (or ``None``) and the checked
        fields of that type (``room``, ``text``, ``name``, ``since`` as
        ``(epoch, seq)`` or ``None``, ``limit``, ``url``, ``token``).
    :raise BadRequest: with a reason fit to send back to the client.
    """
    try:
        request = json.loads(payload)
    except ValueError as e:
        raise BadRequest("malformed JSON: {}".format(e)) from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    try:
        # JSON's \uXXXX escapes can encode lone surrogates, which are not
        # text: they could be neither sent on to anyone nor stored.
        json.dumps(request, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("malformed JSON: contains a lone surrogate (\\ud800-\\udfff)") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    if not isinstance(request, dict):
        raise BadRequest("expected a JSON object, got {}".format(type(request).__name__))
    ref = _ref(request)
    kind = request.get("type")
    if not isinstance(kind, str):
        raise BadRequest('missing "type" (one of: {})'.format(", ".join(CLIENT_TYPES)), ref)
    if kind not in CLIENT_TYPES:
        raise BadRequest(
            "unknown type {!r} (expected one of: {})".format(kind, ", ".join(CLIENT_TYPES)), ref
        )
    try:
        return _parse_fields(request, kind, ref, max_name_length, max_history)
    except BadRequest as e:
        e.kind = kind
        raise


def _parse_fields(
    request: Dict[str, Any], kind: str, ref: Any, max_name_length: int, max_history: int
) -> Dict[str, Any]:
    """
    The fields of a request of type ``kind`` (see :func:`parse_client_message`).
    """
    parsed: Dict[str, Any] = {"type": kind, "ref": ref}
    if kind == "message":
        text = request.get("text")
        if not isinstance(text, str):
            raise BadRequest('a "message" needs a "text" string', ref)
        parsed["text"] = text
        parsed["room"] = _room(request, required=False, ref=ref)
    elif kind in ("join", "leave"):
        parsed["room"] = _room(request, required=True, ref=ref)
        if kind == "join":
            parsed["since"] = _since(request.get("since"), ref)
    elif kind == "hello":
        try:
            parsed["name"] = check_display_name(request.get("name"), max_name_length)
        except InvalidName as e:
            raise BadRequest(str(e), ref) from None
    elif kind == "who":
        parsed["room"] = _room(request, required=False, ref=ref)
        cursor = request.get("cursor")
        if cursor is not None and (not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_LENGTH):
            raise BadRequest(
                '"cursor" must be the "next" of an earlier presence (a string)', ref
            )
        parsed["cursor"] = cursor
        parsed["limit"] = min(_positive_int(request, "limit", MEMBERS_PAGE, ref), MEMBERS_PAGE)
    elif kind == "history":
        parsed["room"] = _room(request, required=False, ref=ref)
        parsed["limit"] = min(_positive_int(request, "limit", max_history, ref), max_history)
        parsed["before"] = None
        if request.get("before") is not None:
            parsed["before"] = _positive_int(request, "before", None, ref)
    elif kind == "image":
        # The bytes follow as the next (binary) message; the protocol
        # checks the size against --max-image-size.
        parsed["room"] = _room(request, required=False, ref=ref)
        parsed["size"] = _positive_int(request, "size", None, ref)
    elif kind == "image_url":
        parsed["url"] = _string(request, "url", MAX_IMAGE_URL_LENGTH, ref, 'an "image_url"')
    elif kind == "refresh":
        parsed["token"] = _string(request, "token", MAX_TOKEN_LENGTH, ref, 'a "refresh"')
    return parsed


def _string(request: Dict[str, Any], field: str, max_length: int, ref: Any, what: str) -> str:
    """
    A required, non-empty string field of at most ``max_length`` characters
    (``what`` names the request in the refusal).
    """
    value = request.get(field)
    if not isinstance(value, str) or not value:
        raise BadRequest('{} needs a "{}" string'.format(what, field), ref)
    if len(value) > max_length:
        raise BadRequest('"{}" must be at most {} characters'.format(field, max_length), ref)
    return value
