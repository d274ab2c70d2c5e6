"""
How hub events look on the wire, and how JSON-mode client input is read.

Two WebSocket wire formats exist, chosen per connection by subprotocol:

Plain (no subprotocol; the classic TwistedWebsocket example's format)
    ``<id> connected`` and ``<id> disconnected`` text messages announce
    members; a text message is passed on unchanged; a binary message is
    passed on unchanged as binary; an image arrives as a binary PNG.

JSON (subprotocol ``broadcaster.json``)
    Every server message is one JSON object with a ``type``:

    - ``{"type": "welcome", "id": ..., "members": [{"id": ...}, ...]}`` first;
    - ``{"type": "join", "id": ..., "ts": ...}`` / ``{"type": "leave", ...}``;
    - ``{"type": "message", "from": ..., "text": ..., "ts": ...}``;
    - ``{"type": "binary", "from": ..., "size": ..., "ts": ...}`` immediately
      followed by a binary message holding the bytes;
    - ``{"type": "image", "id": ..., "from": ..., "width": ..., "height": ...,
      "format": "png", "size": ..., "ts": ...}`` immediately followed by a
      binary message holding the PNG (images come from the image port);
    - ``{"type": "error", "reason": ...}`` in answer to bad input.

    Clients send ``{"type": "message", "text": "..."}`` (or a binary message).

A codec turns one hub event into a list of ``(payload, is_binary)`` frames.
These functions are pure, so they are tested without any network.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from broadcaster.hub import BinaryMessage, Event, ImageMessage, Joined, Left, TextMessage

JSON_SUBPROTOCOL = "broadcaster.json"

Frame = Tuple[bytes, bool]


def _dumps(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _ts(event: Event) -> float:
    # Milliseconds are plenty for a chat and keep the JSON short.
    return round(event.ts, 3)


class PlainCodec:
    """The plain text format: announcements as sentences, messages unchanged."""

    name = "plain"

    def encode(self, event: Event) -> List[Frame]:
        if isinstance(event, TextMessage):
            return [(event.text.encode("utf-8"), False)]
        if isinstance(event, BinaryMessage):
            return [(event.data, True)]
        if isinstance(event, ImageMessage):
            return [(event.png, True)]
        if isinstance(event, Joined):
            return [("{} connected".format(event.member).encode("utf-8"), False)]
        if isinstance(event, Left):
            return [("{} disconnected".format(event.member).encode("utf-8"), False)]
        return []


class JSONCodec:
    """The ``broadcaster.json`` format: one JSON object per event."""

    name = "json"

    def encode(self, event: Event) -> List[Frame]:
        if isinstance(event, TextMessage):
            return [
                (
                    _dumps(
                        {
                            "type": "message",
                            "from": event.sender,
                            "text": event.text,
                            "ts": _ts(event),
                        }
                    ),
                    False,
                )
            ]
        if isinstance(event, BinaryMessage):
            header = {
                "type": "binary",
                "from": event.sender,
                "size": len(event.data),
                "ts": _ts(event),
            }
            return [(_dumps(header), False), (event.data, True)]
        if isinstance(event, ImageMessage):
            header = {
                "type": "image",
                "id": event.image_id,
                "from": event.sender,
                "width": event.width,
                "height": event.height,
                "format": "png",
                "size": len(event.png),
                "ts": _ts(event),
            }
            return [(_dumps(header), False), (event.png, True)]
        if isinstance(event, Joined):
            return [(_dumps({"type": "join", "id": event.member, "ts": _ts(event)}), False)]
        if isinstance(event, Left):
            return [(_dumps({"type": "leave", "id": event.member, "ts": _ts(event)}), False)]
        return []

    def welcome(self, member_id: str, members: List[str]) -> bytes:
        """
        The first message a JSON client receives: its own id and who is here.
        """
        return _dumps(
            {"type": "welcome", "id": member_id, "members": [{"id": m} for m in members]}
        )

    def error(self, reason: str) -> bytes:
        """
        The answer to input the server could not accept.
        """
        return _dumps({"type": "error", "reason": reason})


class BadRequest(ValueError):
    """
    Client input that cannot be accepted; ``str()`` is the reason sent back.
    """


#: The client message types JSON mode understands.
CLIENT_TYPES = ("message",)


def parse_client_message(payload: bytes) -> Dict[str, Any]:
    """
    Read one JSON-mode client message.

    :param payload: the UTF-8 bytes of a WebSocket text message (Autobahn has
        already checked that they are valid UTF-8).
    :return: the request, with ``type`` and the fields that type needs checked.
    :raise BadRequest: with a reason fit to send back to the client.
    """
    try:
        request = json.loads(payload)
    except ValueError as e:
        raise BadRequest("malformed JSON: {}".format(e)) from None
    if not isinstance(request, dict):
        raise BadRequest("expected a JSON object, got {}".format(type(request).__name__))
    kind = request.get("type")
    if not isinstance(kind, str):
        raise BadRequest('missing "type" (one of: {})'.format(", ".join(CLIENT_TYPES)))
    if kind not in CLIENT_TYPES:
        raise BadRequest(
            "unknown type {!r} (expected one of: {})".format(kind, ", ".join(CLIENT_TYPES))
        )
    if kind == "message":
        text = request.get("text")
        if not isinstance(text, str):
            raise BadRequest('a "message" needs a "text" string')
    return request
